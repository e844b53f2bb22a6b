package callstate

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"go.uber.org/zap"
)

// A notification Redis refused is answered 503, for Graph to deliver it again. But Graph's retry
// policy for calling callbacks is undocumented (RELIABILITY.md: at-least-once, possibly lost),
// and an outage that outlasts it lost the notification: an incoming call never answered (a Redis
// Cluster election takes 2 to 4 s; graphsim gives a notification up after about 3 s), a key
// press the caller had to make again, a transfer's failure that left the caller in silence until
// the transfer's timer (90 s), a caller's hang-up left to the reconciler. So the notifications
// whose repeat is harmless whenever it comes, as Graph's own late repeats must be, are also kept
// in process, and applied again until Redis takes them or keepFor has passed since the first
// refusal:
//
//   - an incoming call: applied again, its create finds the record Graph's own repeat made
//     (ErrExists), and is ignored;
//   - `established` while answering: only a call being answered takes it;
//   - a key press with a sequenceId: one at or below the call's last is ignored (Stale);
//   - a prompt's or an invite's end: only the one the call waits on (its clientContext) counts;
//   - a transfer's failure: notified, it only has callbot read the call from Graph, and the read
//     settles the attempt under way alone;
//   - a call's end: terminal stays terminal.
//
// The others are not kept: a roster (a notified one is never stale by itself) and a transfer's
// intermediate states (their loss is caught by the transfer's end or timer). Nor is a
// notification of a call callbot has no record of, which adopt reads Graph to take back (a read
// that failed is no refusal of Redis's): that one is Graph's to deliver again.
const (
	keepFor      = 15 * time.Second       // Graph's answer deadline: an incoming is no use later
	keepFirst    = 250 * time.Millisecond // the first attempt again after a refusal; doubled after each
	keepEvery    = time.Second            // at most this long between two attempts
	keepMax      = 10_000                 // notifications kept at once; more are left to Graph
	keepTry      = 2 * time.Second        // one attempt's deadline
	keepParallel = 64                     // attempts under way at once
)

// keptNote is a notification Redis refused, kept to be applied again (RunKept). Its times are
// the machine's clock's (Config.Now).
type keptNote struct {
	tenant, callID, key, scenario string
	ev                            Event
	since, next                   time.Time // first refused; next attempt
	wait                          time.Duration
}

// keptID identifies a kept notification: Graph's repeats of one are kept once.
type keptID struct {
	key  string
	kind EventKind
	seq  int64  // a key press's sequenceId
	cc   string // a prompt's or an invite's clientContext
}

func idOf(key string, ev Event) keptID {
	return keptID{key: key, kind: ev.Kind, seq: ev.Seq, cc: ev.ClientContext}
}

// kept holds the notifications RunKept applies again.
type kept struct {
	mu    sync.Mutex
	notes map[keptID]*keptNote
}

// keepable: ev may be applied again at any time, whatever happened to the call meanwhile.
func keepable(ev Event) bool {
	switch ev.Kind {
	case EvIncoming, EvEstablished, EvEnded:
		return true
	case EvTone:
		return ev.Seq != 0
	case EvPromptDone, EvInviteDone:
		return ev.ClientContext != ""
	case EvTransferFailed:
		return !ev.Verified
	}
	return false
}

// keep holds a notification Redis refused, for RunKept to apply again, unless it is not one to
// keep or keepMax are kept already.
func (m *Machine) keep(tenant, callID, key, scenario string, ev Event) {
	if !keepable(ev) {
		return
	}
	id := idOf(key, ev)
	now := m.cfg.Now()
	m.kept.mu.Lock()
	defer m.kept.mu.Unlock()
	if _, ok := m.kept.notes[id]; ok {
		return // Graph's repeat of one kept already
	}
	if len(m.kept.notes) >= keepMax {
		m.KeptDropped.Add(1)
		return
	}
	if m.kept.notes == nil {
		m.kept.notes = map[keptID]*keptNote{}
	}
	m.kept.notes[id] = &keptNote{tenant: tenant, callID: callID, key: key, scenario: scenario, ev: ev,
		since: now, next: now.Add(keepFirst), wait: keepFirst}
	m.Kept.Add(1)
}

// unkeep stops keeping the notifications of the call stored under key (it ended).
func (m *Machine) unkeep(key string) {
	m.kept.mu.Lock()
	defer m.kept.mu.Unlock()
	for id := range m.kept.notes {
		if id.key == key {
			delete(m.kept.notes, id)
		}
	}
}

// Keeping is how many refused notifications this instance holds to apply again.
func (m *Machine) Keeping() int {
	m.kept.mu.Lock()
	defer m.kept.mu.Unlock()
	return len(m.kept.notes)
}

// RunKept applies the notifications Redis refused (keep) again, every interval until ctx ends:
// each one once its back-off has passed, until Redis takes it or keepFor has passed since its
// first refusal. When ctx ends, what it still holds is tried once more, then given up.
func (m *Machine) RunKept(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			m.applyKept(context.WithoutCancel(ctx), true)
			return
		case <-t.C:
			m.applyKept(ctx, false)
		}
	}
}

// applyKept applies the kept notifications that are due (all of them when last), keepParallel
// at a time: a master that is down may hold each attempt for a dial timeout. One kept past
// keepFor is given up without an attempt.
func (m *Machine) applyKept(ctx context.Context, last bool) {
	now := m.cfg.Now()
	var due []*keptNote
	m.kept.mu.Lock()
	for _, n := range m.kept.notes {
		if last || !now.Before(n.next) {
			due = append(due, n)
		}
	}
	m.kept.mu.Unlock()
	var wg sync.WaitGroup
	slots := make(chan struct{}, keepParallel)
	for _, n := range due {
		if m.cfg.Now().Sub(n.since) >= keepFor {
			m.giveUpNote(n, errors.New("kept for as long as Graph's answer deadline"))
			continue
		}
		slots <- struct{}{}
		wg.Go(func() {
			defer func() { <-slots }()
			m.applyNote(ctx, n, last)
		})
	}
	wg.Wait()
}

// applyNote makes one attempt at n; it stops keeping n once Redis took it, or once it is given up.
func (m *Machine) applyNote(ctx context.Context, n *keptNote, last bool) {
	tctx, cancel := context.WithTimeout(graph.WithScenarioID(ctx, n.scenario), keepTry)
	defer cancel()
	changed, keep, err := m.notifyOne(tctx, n.tenant, n.callID, n.key, n.ev)
	switch {
	case err == nil:
		if changed {
			m.KeptApplied.Add(1)
			m.noteLog(n).Info("notification Redis had refused applied by the instance that kept it (Graph had not delivered it again)")
		}
		m.forgetNote(n)
	case keep && !last && m.cfg.Now().Sub(n.since) < keepFor:
		m.kept.mu.Lock()
		n.wait = min(2*n.wait, keepEvery)
		n.next = m.cfg.Now().Add(n.wait)
		m.kept.mu.Unlock()
	default:
		m.giveUpNote(n, err)
	}
}

// giveUpNote stops keeping n, still refused (err), and counts it.
func (m *Machine) giveUpNote(n *keptNote, err error) {
	m.KeptGivenUp.Add(1)
	m.noteLog(n).Warn("notification Redis refused, kept and applied again, given up: it is Graph's alone to deliver again", zap.Error(err))
	m.forgetNote(n)
}

func (m *Machine) forgetNote(n *keptNote) {
	m.kept.mu.Lock()
	delete(m.kept.notes, idOf(n.key, n.ev))
	m.kept.mu.Unlock()
}

func (m *Machine) noteLog(n *keptNote) *zap.Logger {
	return m.cfg.Log.With(zap.String("call_id", n.key), zap.String("tenant_id", n.tenant), zap.Stringer("event", n.ev.Kind),
		zap.Duration("since", m.cfg.Now().Sub(n.since)))
}

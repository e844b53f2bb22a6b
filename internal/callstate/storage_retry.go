package callstate

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"go.uber.org/zap"
)

// storageRetry is a batch of a call's storage commands (an agent's release, a queue write) that
// Redis refused when the transition that decided them was saved (carryOut), or when a re-drive
// carried them out (Redrive), for RunOutbox to carry out again.
type storageRetry struct {
	c     Call // the record they were decided on: its tenant and id
	ps    []Pending
	prev  int64     // the call's storage commands acknowledged behind them (ack)
	until time.Time // their outbox lease: past it a re-drive carries them out
}

// storageRetries holds the batches RunOutbox carries out again, by call.
type storageRetries struct {
	mu      sync.Mutex
	batches map[string][]storageRetry
}

// retryLater hands ps, the storage commands of c that Redis refused, to RunOutbox, which carries
// them out again on each tick until Redis takes them or their outbox lease runs out. Before,
// they waited for the lease and a re-drive: on Redis Cluster an agent's release refused by the
// tenant's master, killed, left the agent reserved for a call that had ended for 4 to 5 s after
// the promotion (the cluster failover soak).
func (m *Machine) retryLater(c Call, ps []Pending, prev int64) {
	key := graph.CallKey(c.ID)
	m.storageRetries.mu.Lock()
	defer m.storageRetries.mu.Unlock()
	if m.storageRetries.batches == nil {
		m.storageRetries.batches = map[string][]storageRetry{}
	}
	m.storageRetries.batches[key] = append(m.storageRetries.batches[key],
		storageRetry{c: c, ps: ps, prev: prev, until: m.cfg.Now().Add(m.cfg.OutboxLease)})
}

// retryStorage carries out again the storage commands Redis refused (retryLater), each call's on
// its own goroutine (a master down may hold each attempt for a dial timeout). Before each attempt
// it reads the call's record and leaves out the commands acknowledged since (a re-drive did them)
// and those the call has moved past (movedPast), as a re-drive does. It forgets the batches done,
// those of calls with no record and those whose outbox lease has run out (a re-drive carries them
// out). It returns how many batches are left.
func (m *Machine) retryStorage(ctx context.Context) int {
	now := m.cfg.Now()
	m.storageRetries.mu.Lock()
	todo := map[string][]storageRetry{}
	for key, bs := range m.storageRetries.batches {
		bs = slices.DeleteFunc(bs, func(b storageRetry) bool { return !now.Before(b.until) })
		if len(bs) == 0 {
			delete(m.storageRetries.batches, key)
			continue
		}
		m.storageRetries.batches[key] = bs
		todo[key] = slices.Clone(bs)
	}
	m.storageRetries.mu.Unlock()
	var wg sync.WaitGroup
	for key, bs := range todo {
		wg.Go(func() {
			tctx, cancel := context.WithTimeout(ctx, keepTry)
			defer cancel()
			done := m.retryBatches(tctx, key, bs)
			if done == 0 {
				return
			}
			m.storageRetries.mu.Lock()
			defer m.storageRetries.mu.Unlock()
			left := m.storageRetries.batches[key]
			if len(left) <= done {
				delete(m.storageRetries.batches, key)
			} else {
				// batches refused since were appended behind those taken
				m.storageRetries.batches[key] = left[done:]
			}
		})
	}
	wg.Wait()
	m.storageRetries.mu.Lock()
	defer m.storageRetries.mu.Unlock()
	return len(m.storageRetries.batches)
}

// retryBatches carries out the batches bs of the call stored under key, in order, and returns how
// many of them are done with (carried out, or not to be).
func (m *Machine) retryBatches(ctx context.Context, key string, bs []storageRetry) int {
	cur, err := m.cfg.Store.Get(ctx, key)
	if errors.Is(err, ErrNotFound) {
		return len(bs) // nothing left to do them for
	}
	if err != nil {
		return 0
	}
	log := m.cfg.Log.With(zap.String("call_id", key), zap.String("tenant_id", cur.Tenant))
	for i, b := range bs {
		due := slices.DeleteFunc(slices.Clone(b.ps), func(p Pending) bool {
			pending := slices.ContainsFunc(cur.Outbox, func(q Pending) bool { return q.Seq == p.Seq })
			return !pending || movedPast(cur, p.Cmd)
		})
		if cmd, err := m.doStorage(ctx, cur, due); err != nil {
			log.Warn("storage command Redis refused, tried again: refused again", zap.Stringer("command", cmd), zap.Error(err))
			return i
		}
		m.ack(ctx, key, false, b.prev, b.ps[len(b.ps)-1].Seq, log)
		if len(due) > 0 {
			log.Info("storage commands Redis had refused carried out", zap.Int("commands", len(due)))
		}
	}
	return len(bs)
}

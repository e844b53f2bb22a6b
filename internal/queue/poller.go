package queue

import (
	"cmp"
	"context"
	"errors"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/graph"
)

// Poller reads the Teams presence of every agent in batches of at most graph.MaxPresenceIDs
// (presenceParallel at once) and records who is routable. Among instances, the one holding a lease in Redis polls, so the
// Graph presence budget (1,500 requests / 30 s per tenant) is spent once, not once per instance.
type Poller struct {
	Store    *Store
	Source   PresenceSource
	Tenant   string
	Agents   []string
	Instance string // this instance's id, the lease holder's name
	Log      *zap.Logger
	// OnChange is called after a poll changed who is routable (the dispatcher's Poke).
	OnChange func()
	// SyncEvery: how often a poll writes every agent's presence and sets the set of free agents
	// right (Store.RepairFree); in between, a poll writes only what changed since the last one.
	// The first poll after the lease is taken is a full one. A full write also restores what
	// Redis lost (the last second of writes when it restarts with appendfsync everysec).
	// Default 10 s: 2,000 agents cost Redis about 4 ms then (BenchmarkSetRoutable).
	SyncEvery time.Duration
	// Now is when a poll read presence, written for the other instances (clock.Redis). Default
	// the store's.
	Now func() time.Time
	// MaxAge is how old a reading routing may go by. A batch Graph does not answer (throttled,
	// failing, Presence.Read.All withdrawn) keeps its agents' last reading until that reading is
	// MaxAge old; then they are taken as not routable until a read succeeds, as Graph's
	// PresenceUnknown is: an agent who left meanwhile (gone home, their Teams offline) would be
	// offered callers whose transfer rings out, or is taken by the agent's own voicemail. Zero
	// keeps the last reading however old.
	MaxAge time.Duration
	// Paused, when set and true, says this instance does not reach Graph while the others do:
	// it neither takes nor keeps the lease (one it holds is handed back, for another instance to
	// poll at once), so that agents' presence is not left to age past MaxAge.
	Paused func() bool

	readAt  map[string]time.Time // the lease holder's: when each agent's presence was last read
	stale   int                  // agents taken as not routable for want of a reading (logged)
	last    map[string]bool
	synced  time.Time
	holding bool
	// leaseTTL is the lease Run takes; a poll renews it before each batch and before writing,
	// so a poll of several slow batches keeps the lease it has (it was refused as lost).
	leaseTTL time.Duration
}

// presenceParallel is how many presence batches a poll reads at once: 4 requests at a time,
// one poll every CALLBOT_PRESENCE_INTERVAL (5 s), stays far within Graph's 1,500 presence
// requests per 30 s per tenant (16 batches, 10,400 agents: 96 requests per 30 s).
const presenceParallel = 4

// Run polls every interval until ctx ends.
func (p *Poller) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	p.leaseTTL = 3 * every
	for {
		if p.Paused != nil && p.Paused() {
			if p.holding {
				p.handBack(ctx)
				p.Log.Info("presence lease handed back: Graph is not reached from this instance")
				p.holding = false
			}
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			continue
		}
		held, err := p.lease(ctx, p.leaseTTL)
		if err != nil {
			p.Log.Warn("presence lease", zap.Error(err))
		}
		if held && !p.holding {
			p.synced = time.Time{} // another instance polled meanwhile: write everything
			p.readAt = nil         // and read presence since: its readings' time is in Redis
		}
		p.holding = held
		if held {
			err := p.poll(ctx, p.Instance)
			switch {
			case errors.Is(err, ErrLeaseLost):
				p.Log.Info("presence lease lost during a poll; its reading was not written")
				p.holding = false
			case err != nil && ctx.Err() == nil:
				p.Log.Warn("presence poll failed: agents not read keep their last reading while it is younger than the max age", zap.Error(err))
			}
		}
		select {
		case <-ctx.Done():
			if p.holding { // handed back: another instance polls at once
				p.handBack(ctx)
			}
			return
		case <-t.C:
		}
	}
}

// handBack gives the lease up, for another instance to poll at once.
func (p *Poller) handBack(ctx context.Context) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
	defer cancel()
	if err := p.Store.ReleasePresenceLease(rctx, p.Tenant, p.Instance); err != nil {
		p.Log.Warn("presence lease not handed back", zap.Error(err))
	}
}

func (p *Poller) lease(ctx context.Context, ttl time.Duration) (bool, error) {
	return p.Store.TryPresenceLease(ctx, p.Tenant, p.Instance, ttl)
}

// PollOnce reads every agent's presence and stores who is routable (what changed since the
// last poll, or everything every SyncEvery). Agents Graph does not return are not routable.
func (p *Poller) PollOnce(ctx context.Context) error { return p.poll(ctx, "") }

// poll is PollOnce; with a holder, the write is refused (ErrLeaseLost) unless holder still holds
// the tenant's presence lease: a poll that outlived its lease must not write its older reading
// over the newer one of the poller that took the lease.
func (p *Poller) poll(ctx context.Context, holder string) error {
	now := p.Now
	if now == nil {
		now = p.Store.Now
	}
	readAt := now()
	routable := make(map[string]bool, len(p.Agents))
	for _, a := range p.Agents {
		routable[a] = false
	}
	// renew keeps holder's lease through a poll longer than it: a poll that lost it to
	// another poller stops (its reading would be refused).
	renew := func() error {
		if holder == "" || p.leaseTTL <= 0 {
			return nil
		}
		held, err := p.lease(ctx, p.leaseTTL)
		if err == nil && !held {
			err = ErrLeaseLost
		}
		return err
	}
	if p.readAt == nil {
		// A new lease holder (or a restart) knows only the last whole reading any poller made.
		p.readAt = make(map[string]time.Time, len(p.Agents))
		if at, err := p.Store.PresenceReadAt(ctx, p.Tenant); err == nil {
			for _, a := range p.Agents {
				p.readAt[a] = at
			}
		}
	}
	stale := 0
	var read []string // agents whose presence Graph gave
	var errs []error
	var batches [][]string
	for start := 0; start < len(p.Agents); start += graph.MaxPresenceIDs {
		batches = append(batches, p.Agents[start:min(start+graph.MaxPresenceIDs, len(p.Agents))])
	}
	// Batches are read presenceParallel at a time: one after another, a tenant of 10,000 agents
	// (16 batches) read for 16 of Graph's round trips, longer than a poll interval at 300 ms
	// each, and routing went by a reading that old. The lease is renewed before each wave.
	type answer struct {
		ps  []graph.Presence
		err error
	}
	answers := make([]answer, len(batches))
	for wave := 0; wave < len(batches); wave += presenceParallel {
		if wave > 0 {
			if err := renew(); err != nil {
				return err
			}
		}
		var wg sync.WaitGroup
		for i := wave; i < min(wave+presenceParallel, len(batches)); i++ {
			wg.Go(func() {
				ps, err := p.Source.Presences(ctx, batches[i])
				answers[i] = answer{ps, err}
			})
		}
		wg.Wait()
	}
	for i, batch := range batches {
		ps, err := answers[i].ps, answers[i].err
		if err != nil {
			errs = append(errs, err)
			for _, a := range batch {
				if p.MaxAge > 0 && readAt.Sub(p.readAt[a]) > p.MaxAge {
					stale++ // too old to route on: false, as set above
					continue
				}
				delete(routable, a) // unknown for now: keep what was stored
			}
			continue
		}
		read = append(read, batch...)
		for _, pr := range ps {
			if _, ours := routable[pr.UserID]; ours {
				routable[pr.UserID] = pr.Routable()
			}
		}
	}
	// Between full writes, only what changed since the last poll is written: the script that
	// records presence also keeps the set of free agents true, at a cost per agent it is given.
	full := time.Since(p.synced) >= cmp.Or(p.SyncEvery, 10*time.Second)
	write := routable
	if !full {
		write = make(map[string]bool)
		for a, r := range routable {
			if old, known := p.last[a]; !known || old != r {
				write[a] = r
			}
		}
	}
	if err := renew(); err != nil {
		return err
	}
	if err := p.Store.setRoutableAs(ctx, p.Tenant, holder, write); err != nil {
		return err
	}
	for _, a := range read { // what routing goes by is now of readAt
		p.readAt[a] = readAt
	}
	if len(errs) == 0 {
		// every agent's presence is of readAt: what callbot_presence_age_seconds counts from
		// (a failed batch keeps its agents' last reading, which grows old)
		if err := p.Store.PresenceRead(ctx, p.Tenant, readAt); err != nil {
			errs = append(errs, err)
		}
	}
	if full {
		if err := p.Store.RepairFree(ctx, p.Tenant); err != nil {
			errs = append(errs, err)
		} else {
			p.synced = time.Now()
		}
	}
	switch {
	case stale > 0 && p.stale == 0:
		p.Log.Warn("presence not read for longer than its max age: those agents are offered no caller until it is read again",
			zap.Int("agents", stale), zap.Duration("max_age", p.MaxAge), zap.Errors("errors", errs))
	case stale == 0 && p.stale > 0:
		p.Log.Info("presence read again: every agent is routed on a fresh reading")
	}
	p.stale = stale
	changed := false
	for a, r := range routable {
		if p.last[a] != r {
			changed = true
		}
	}
	if p.last == nil {
		p.last = map[string]bool{}
	}
	for a, r := range routable {
		p.last[a] = r
	}
	if changed && p.OnChange != nil {
		p.OnChange()
	}
	return errors.Join(errs...)
}

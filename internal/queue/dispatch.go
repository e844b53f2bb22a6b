package queue

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/callstate"
)

// Offerer hands a reserved caller to an agent; false means the caller no longer waits.
type Offerer interface {
	Offer(ctx context.Context, tenant, callKey, agent string) (bool, error)
}

// Dispatcher matches waiting callers with free agents. Several instances may run one each: the
// reservation script is atomic. It implements callstate.Queues, waking itself on every enqueue
// and release so a caller is offered as soon as an agent is free.
type Dispatcher struct {
	Store  *Store
	Offer  Offerer
	Tenant string
	Queues []string
	Log    *zap.Logger
	Now    func() time.Time

	wake       chan struct{} // a caller joined a queue
	wakeAgents chan struct{} // an agent may have become free
	// exhausted holds the queues whose last reservation found no free agent: a new caller
	// there changes nothing until an agent is released, presence changes or the tick comes
	// (other instances release agents without telling this one). It spares Redis a reservation,
	// which reads the tenant's free agents, for every caller who joins a queue nobody can take.
	exhausted map[string]bool

	// id names this dispatcher's reservation attempts; seq numbers them. retryQueue and
	// retryToken are an attempt that failed: Redis may have made the reservation and lost only
	// its reply (the caller out of the queue, the agent reserved for nobody), so it is asked for
	// again, with the same token, before anything else.
	id                     string
	seq                    uint64
	retryQueue, retryToken string
}

var _ callstate.Queues = (*Dispatcher)(nil)

// OfferChecker says whether an offer that returned an error was saved all the same (the save
// was applied and only its answer lost). callstate.Machine implements it.
type OfferChecker interface {
	Offered(ctx context.Context, tenant, callKey, agent string) (bool, error)
}

// offerTook reads the call's record after an offer returned an error: took when the offer was
// applied all the same; known false when the record could not be read.
func (d *Dispatcher) offerTook(ctx context.Context, r Reservation) (took, known bool) {
	oc, ok := d.Offer.(OfferChecker)
	if !ok {
		return false, true
	}
	took, err := oc.Offered(ctx, d.Tenant, r.Call, r.Agent)
	return took, err == nil
}

// NewDispatcher returns a dispatcher for the queues of one tenant.
func NewDispatcher(store *Store, offer Offerer, tenant string, queues []string, log *zap.Logger) *Dispatcher {
	return &Dispatcher{Store: store, Offer: offer, Tenant: tenant, Queues: queues, Log: log, Now: time.Now,
		wake: make(chan struct{}, 1), wakeAgents: make(chan struct{}, 1), exhausted: map[string]bool{}, id: rand.Text()}
}

// Poke makes the dispatcher look at the queues now: a caller joined.
func (d *Dispatcher) Poke() { signal(d.wake) }

// PokeAgents makes the dispatcher look at every queue now: an agent may have become free.
func (d *Dispatcher) PokeAgents() { signal(d.wakeAgents) }

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// Enqueue implements callstate.Queues.
func (d *Dispatcher) Enqueue(ctx context.Context, tenant, queue, callKey string, score int64) error {
	err := d.Store.Enqueue(ctx, tenant, queue, callKey, score)
	d.Poke()
	return err
}

// Remove implements callstate.Queues.
func (d *Dispatcher) Remove(ctx context.Context, tenant, queue, callKey string) error {
	return d.Store.Remove(ctx, tenant, queue, callKey)
}

// Release implements callstate.Queues.
func (d *Dispatcher) Release(ctx context.Context, tenant, agent, callKey string, outcome callstate.AgentOutcome, hold time.Duration) error {
	err := d.Store.Release(ctx, tenant, agent, callKey, outcome, hold)
	d.PokeAgents()
	return err
}

var _ callstate.QueueWriter = (*Dispatcher)(nil)

// Writes implements callstate.QueueWriter: enqueues, removals and releases sent in the pipeline
// of the save that decided them; then the dispatcher is woken.
func (d *Dispatcher) Writes(ctx context.Context, tenant, callKey string, cmds []callstate.Command) (func(redis.Pipeliner), func()) {
	write := func(p redis.Pipeliner) {
		for _, c := range cmds {
			switch c.Kind {
			case callstate.CmdEnqueue:
				d.Store.enqueue(ctx, p, tenant, c.Queue, callKey, c.Score)
			case callstate.CmdLeaveQueue:
				d.Store.remove(ctx, p, tenant, c.Queue, callKey)
			case callstate.CmdReleaseAgent:
				d.Store.release(ctx, p, tenant, c.Agent, callKey, c.AgentOutcome, c.After)
			}
		}
	}
	after := d.Poke // a caller joined
	for _, c := range cmds {
		if c.Kind == callstate.CmdReleaseAgent {
			after = d.PokeAgents // an agent is free: every queue may have work
		}
	}
	return write, after
}

var _ callstate.QueueSweeper = (*Dispatcher)(nil)

// Entries implements callstate.QueueSweeper.
func (d *Dispatcher) Entries(ctx context.Context, tenant string, queues []string) (map[string][]callstate.QueueEntry, error) {
	return d.Store.Entries(ctx, tenant, queues)
}

// RemoveEntries implements callstate.QueueSweeper.
func (d *Dispatcher) RemoveEntries(ctx context.Context, tenant, queue string, entries []callstate.QueueEntry) (int, error) {
	return d.Store.RemoveEntries(ctx, tenant, queue, entries)
}

// Reservations implements callstate.Queues.
func (d *Dispatcher) Reservations(ctx context.Context, tenant string) (map[string]string, error) {
	return d.Store.Reservations(ctx, tenant)
}

// Run dispatches until ctx ends: when poked, and every tick (agents become free by presence
// and cool-downs end without a poke; other instances enqueue without poking this one).
func (d *Dispatcher) Run(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = 250 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			clear(d.exhausted)
		case <-d.wakeAgents:
			clear(d.exhausted)
		case <-d.wake:
		}
		d.DispatchOnce(ctx)
	}
}

// DispatchOnce offers every caller it can to a free agent and returns how many offers it made.
// Among its queues, the one whose head caller has waited longest is served first, one caller at
// a time: queues that share agents take turns by their callers' waiting time, so a queue is not
// starved while a busier one has callers. It is not safe for concurrent use: one goroutine (Run)
// calls it.
func (d *Dispatcher) DispatchOnce(ctx context.Context) int {
	offers := 0
	for ctx.Err() == nil {
		order, err := d.byHead(ctx)
		if err != nil {
			d.Log.Warn("read queue heads", zap.Error(err))
			return offers
		}
		served := false
		if q := d.retryQueue; q != "" {
			order = append([]string{q}, slices.DeleteFunc(order, func(o string) bool { return o == q })...)
		}
		for _, q := range order {
			token := d.retryToken
			if q != d.retryQueue || token == "" {
				d.seq++
				token = strconv.FormatUint(d.seq, 10)
			}
			d.retryQueue, d.retryToken = "", ""
			r, err := d.Store.reserveAs(ctx, d.Tenant, q, d.Now(), d.id, token)
			if errors.Is(err, ErrNoAgent) {
				d.exhausted[q] = true
			}
			if errors.Is(err, ErrEmpty) {
				continue
			}
			if err != nil {
				// Redis may have made it and lost only the reply: ask again first, next time
				d.retryQueue, d.retryToken = q, token
				d.Log.Warn("reserve agent", zap.String("queue", q), zap.Error(err))
				return offers
			}
			ok, err := d.Offer.Offer(ctx, d.Tenant, r.Call, r.Agent)
			// What follows a reservation runs even when ctx ended meanwhile (a shutdown stops the
			// loops): the caller and the agent it holds are handed back, not left to the reconciler.
			// Redis's own timeouts bound it.
			uctx := context.WithoutCancel(ctx)
			switch {
			case err != nil:
				took, known := d.offerTook(uctx, r)
				if took {
					// the save was applied, only its answer was lost: the offer stands, and
					// freeing the agent would let another caller have them during the transfer
					d.Log.Warn("offer answered with an error but applied", zap.String("call_id", r.Call), zap.String("agent", r.Agent), zap.Error(err))
					offers++
					return offers
				}
				// The caller goes back where it was (harmless if the offer did apply: a later
				// offer to a call that moved on is refused). The agent is freed only when the
				// record shows the offer did not apply; when it cannot be read, the reconciler
				// frees the agent if the caller is still queued on its next pass.
				d.Log.Warn("offer failed, caller requeued", zap.String("call_id", r.Call), zap.String("agent", r.Agent), zap.Error(err))
				undo := d.Store.Enqueue(uctx, d.Tenant, q, r.Call, r.Score)
				if known {
					undo = errors.Join(undo, d.Store.Release(uctx, d.Tenant, r.Agent, r.Call, callstate.AgentAbandoned, 0))
				}
				if undo != nil {
					// the reconciler puts the caller back and frees the agent
					d.Log.Error("undo reservation", zap.String("call_id", r.Call), zap.String("agent", r.Agent), zap.Error(undo))
				}
				return offers
			case !ok:
				d.Log.Debug("reserved caller no longer waiting", zap.String("call_id", r.Call))
				_ = d.Store.Release(uctx, d.Tenant, r.Agent, r.Call, callstate.AgentAbandoned, 0)
			default:
				offers++
				d.Log.Info("caller offered to agent", zap.String("call_id", r.Call), zap.String("queue", q), zap.String("agent", r.Agent))
			}
			served = true
			break // the heads changed: the next caller is the one who has waited longest now
		}
		if !served {
			return offers
		}
	}
	return offers
}

// byHead returns the queues that are not exhausted, the one whose head caller has waited
// longest (lowest score) first; queues nobody waits in are left out. With one queue it reads
// nothing: the reservation finds out.
func (d *Dispatcher) byHead(ctx context.Context) ([]string, error) {
	var qs []string
	for _, q := range d.Queues {
		if !d.exhausted[q] {
			qs = append(qs, q)
		}
	}
	if len(qs) < 2 {
		return qs, nil
	}
	heads := make([]*redis.ZSliceCmd, len(qs))
	if _, err := d.Store.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, q := range qs {
			heads[i] = p.ZRangeWithScores(ctx, d.Store.keys(d.Tenant, q).queue, 0, 0)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	score := map[string]float64{}
	order := qs[:0]
	for i, q := range qs {
		if h := heads[i].Val(); len(h) > 0 {
			score[q] = h[0].Score
			order = append(order, q)
		}
	}
	slices.SortStableFunc(order, func(a, b string) int { return cmp.Compare(score[a], score[b]) })
	return order, nil
}

package queue

import (
	"cmp"
	"context"
	"crypto/rand"
	"errors"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/callstate"
)

// Offerer hands a reserved caller to an agent; false means the caller no longer waits.
type Offerer interface {
	Offer(ctx context.Context, tenant, callKey, agent string) (bool, error)
}

// QueueOfferer is an Offerer told the queue the reservation took the caller from: false too
// when the caller waits in another queue now (an entry left behind in a queue they moved on
// from must not give them to that queue's agent). callstate.Machine implements it.
type QueueOfferer interface {
	OfferFrom(ctx context.Context, tenant, queue, callKey, agent string) (bool, error)
}

// offer offers r's caller, taken from queue q, to r's agent.
func (d *Dispatcher) offer(ctx context.Context, q string, r Reservation) (bool, error) {
	if qo, ok := d.Offer.(QueueOfferer); ok {
		return qo.OfferFrom(ctx, d.Tenant, q, r.Call, r.Agent)
	}
	return d.Offer.Offer(ctx, d.Tenant, r.Call, r.Agent)
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
	// Paused, when set and true, says this instance does not reach Graph while the others do:
	// it offers no caller (the offer's transfer would wait for Graph in vain here); the
	// others' dispatchers do. What it began (undos, follow-ups, all in Redis) it carries on.
	Paused func() bool

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

	// OfferRecheck is how long after an offer found saved on the master but not on its replicas
	// (the save refused as unreplicated, CALLBOT_REDIS_REPLICAS) the dispatcher first reads the
	// call's record again, to learn whether a failover lost it; after an unsettled look it looks
	// again once the time since the offer has doubled, OfferRechecks looks in all. The defaults
	// (15 s, 4) look 15 s, 30 s, 1 min and 2 min after the offer: past a failover (Sentinel's
	// down-after plus its election; Azure Cache for Redis takes 15-30 s).
	OfferRecheck  time.Duration
	OfferRechecks int
	// LostOffers counts the offers the follow-ups found lost (a failover took the call's record
	// back to the queue): the caller put back in the queue at their place, the agent freed.
	LostOffers atomic.Int64
	// followUps are the offers being followed up, oldest first; only the dispatcher's goroutine
	// (Run) touches them, as it does DispatchOnce.
	followUps []*followUp
	// undos are the reservations whose offer failed and that are not undone yet (RetryUndos):
	// the call's record could not be read, or the undo's writes failed. Their callers are out
	// of the queue and their agents reserved until then.
	undos []*pendingUndo
}

// pendingUndo is a reservation whose offer failed, to be undone once its fate is known: the
// caller put back at their place and the agent freed.
type pendingUndo struct {
	r     Reservation
	queue string
	since time.Time
	tries int
}

// undoFor is how long RetryUndos tries to undo a reservation before leaving it to the
// reconciler: past a failover (Redis Cluster's node timeout and election, Sentinel's).
const undoFor = 2 * time.Minute

// undo hands a reservation whose offer did not apply back: the caller to their place in the
// queue if their record shows them still waiting there (waiting: offerTook), the agent freed
// (AgentAbandoned: they keep their place among the longest idle). Both writes are idempotent.
// A caller who has hung up, or moved on since to a menu or another queue (RetryUndos undoes
// seconds or minutes after the offer), is not put back: they would be a ghost entry, an agent
// reserved for them and refused, or a caller in two queues.
func (d *Dispatcher) undo(ctx context.Context, q string, r Reservation, waiting bool) error {
	var err error
	if waiting {
		err = d.Store.Enqueue(ctx, d.Tenant, q, r.Call, r.Score)
	}
	if err == nil {
		err = d.Store.Release(ctx, d.Tenant, r.Agent, r.Call, callstate.AgentAbandoned, 0)
	}
	if err != nil {
		d.Log.Warn("undo reservation failed, tried again", zap.String("call_id", r.Call), zap.String("agent", r.Agent), zap.Error(err))
		return err
	}
	clear(d.exhausted) // an agent may be free, a caller waits again
	return nil
}

// giveUpUndo puts the caller of a reservation RetryUndos could not undo back in the queue
// (harmless if the offer did apply: a later offer to a call that moved on is refused) and leaves
// the agent to the reconciler, which frees them if the caller is still queued on its next pass.
func (d *Dispatcher) giveUpUndo(ctx context.Context, u *pendingUndo, msg string) {
	err := d.Store.Enqueue(context.WithoutCancel(ctx), d.Tenant, u.queue, u.r.Call, u.r.Score)
	d.Log.Error(msg, zap.String("call_id", u.r.Call), zap.String("agent", u.r.Agent), zap.Int("tries", u.tries), zap.Error(err))
}

// RetryUndos tries again the reservations whose offer failed without the dispatcher learning
// whether it applied (the call's record could not be read: its master was down, on Redis
// Cluster while the others served) or whose undo failed (the cluster down meanwhile), and
// returns how many are left. Each is read again (offerTook): an offer that applied all the
// same stands (followed up if its replicas lack it); one that did not is undone, the caller put
// back at their score and the agent freed. Before, the caller was put back at once and the
// agent left to the reconciler: the dispatcher reserved agent after agent for that caller, one
// each tick while the call's master was away, and left each reserved for nobody; and a caller
// whose put-back failed (the cluster down by then) waited in no queue, with hold music, until
// the reconciler's pass (up to 5 minutes). One still pending after undoFor (2 minutes), or when
// Run ends, has its caller put back and its agent left to the reconciler (giveUpUndo). Run calls it on every wake; it is not safe for concurrent
// use.
func (d *Dispatcher) RetryUndos(ctx context.Context) int {
	if len(d.undos) == 0 {
		return 0
	}
	uctx := context.WithoutCancel(ctx)
	kept := d.undos[:0]
	for i, u := range d.undos {
		if ctx.Err() != nil {
			kept = append(kept, d.undos[i:]...)
			break
		}
		log := d.Log.With(zap.String("call_id", u.r.Call), zap.String("agent", u.r.Agent), zap.String("queue", u.queue))
		took, known, waiting := d.offerTook(uctx, u.queue, u.r)
		switch {
		case took:
			log.Warn("failed offer found applied: it stands")
			continue
		case known && d.undo(uctx, u.queue, u.r, waiting) == nil:
			log.Info("failed offer undone: agent freed, caller back in the queue at their place if still waiting there",
				zap.Bool("caller_back", waiting), zap.Int("tries", u.tries+1))
			continue
		}
		if u.tries++; d.Now().Sub(u.since) > undoFor {
			d.giveUpUndo(ctx, u, "failed offer still not undone: caller put back, agent left to the reconciler")
			continue
		}
		kept = append(kept, u)
	}
	clear(d.undos[len(kept):])
	d.undos = kept
	return len(kept)
}

// followUp is an offer the dispatcher watches until it knows whether a failover lost it: the
// reservation (caller, agent, score), the queue, what the record showed of the offer,
// when to look next, the wait after that look (the time since the offer then) and the looks so
// far.
type followUp struct {
	r     Reservation
	queue string
	offer callstate.OfferCheck
	due   time.Time
	wait  time.Duration
	looks int
}

var _ callstate.Queues = (*Dispatcher)(nil)

// OfferChecker says whether an offer that returned an error was saved all the same (the save
// was applied and only its answer lost). callstate.Machine implements it.
type OfferChecker interface {
	Offered(ctx context.Context, tenant, callKey, agent string) (bool, error)
}

// OfferFollower is an OfferChecker that can also tell whether an offer found applied is on the
// replicas, and later whether a failover lost it. callstate.Machine implements it.
type OfferFollower interface {
	CheckOffer(ctx context.Context, tenant, callKey, agent string) (callstate.OfferCheck, error)
	OfferFate(ctx context.Context, tenant, callKey string, offer callstate.OfferCheck) (callstate.OfferFate, error)
}

// offerTook reads the call's record after an offer returned an error: took when the offer was
// applied all the same; known false when the record could not be read; waiting when the record
// shows the caller still waiting in q (always so when the Offer cannot tell). An offer that took
// on the master without being replicated is followed up (follow).
func (d *Dispatcher) offerTook(ctx context.Context, q string, r Reservation) (took, known, waiting bool) {
	if of, ok := d.Offer.(OfferFollower); ok {
		c, err := of.CheckOffer(ctx, d.Tenant, r.Call, r.Agent)
		if err == nil && c.Took && !c.Replicated {
			d.follow(q, r, c)
		}
		return c.Took, err == nil, c.Waiting && c.Queue == q
	}
	oc, ok := d.Offer.(OfferChecker)
	if !ok {
		return false, true, true
	}
	took, err := oc.Offered(ctx, d.Tenant, r.Call, r.Agent)
	return took, err == nil, true
}

// follow starts following up an offer that took on the master but is on no replica yet.
func (d *Dispatcher) follow(q string, r Reservation, offer callstate.OfferCheck) {
	wait := cmp.Or(d.OfferRecheck, defaultOfferRecheck)
	d.followUps = append(d.followUps, &followUp{r: r, queue: q, offer: offer, due: d.Now().Add(wait), wait: wait})
	d.Log.Warn("offer saved on the master but not on its replicas: following it up", zap.String("call_id", r.Call),
		zap.String("agent", r.Agent), zap.Duration("first_look", wait))
}

// Defaults of OfferRecheck and OfferRechecks.
const (
	defaultOfferRecheck  = 15 * time.Second
	defaultOfferRechecks = 4
)

// FollowUpOffers looks at the offers being followed up whose time has come (Run calls it on
// every wake, before DispatchOnce) and returns how many are still followed up. An offer saved on
// the master but refused as unreplicated stands (the transfer is in the call's outbox; freeing
// the agent would let another caller have them during it), but a failover to a replica that
// lacks it takes the call's record back to the queue while the reservation, replicated before the
// offer, keeps the caller out of the queue and the agent reserved for them: nobody would offer
// that caller again before the reconciler's pass (up to 5 minutes), nor free the agent before
// the pass after (up to 10). The follow-up reads the record again (callstate.Machine.OfferFate):
// a record that shows the offer or anything after it (with the agent, or back in the queue after
// the transfer failed: the machine requeued the caller and freed the agent itself, and another
// instance may have reserved the agent for them again) is never acted on, and ends it once the
// replicas confirm it; one that shows the call neither queued nor with the offer's agent (back
// in a menu, with another agent, ended with another), or that lost the offer and moved on since
// (passed on to another queue at its max wait: put back in this one too, the caller would wait
// in two) (callstate.OfferPassed; one that counts the offer's attempt, once the replicas have
// it) frees that agent if still reserved for the call, and leaves the caller alone; an
// offer lost
// puts the caller back at their score (an enqueue is
// idempotent) and frees the agent if still reserved for that call (AgentAbandoned: they keep
// their place among the longest idle), the agent alone if the call ended meanwhile. A follow-up still unsettled
// after its last look is left to the reconciler, as are those pending when Run ends (a shutdown)
// or when the instance dies: the follow-ups live in this process only, the reconciler is the
// durable fallback. They are the offers this dispatcher made in the last couple of minutes that
// the replicas did not confirm: few, and none once the replicas are back.
//
// It is not safe for concurrent use: the goroutine that calls DispatchOnce (Run) calls it.
func (d *Dispatcher) FollowUpOffers(ctx context.Context) int {
	of, ok := d.Offer.(OfferFollower)
	if !ok || len(d.followUps) == 0 {
		return len(d.followUps)
	}
	now := d.Now()
	failed := false // Redis failed one look: the others due wait for the next pass, not counted
	kept := d.followUps[:0]
	for _, f := range d.followUps {
		if failed || now.Before(f.due) || ctx.Err() != nil {
			kept = append(kept, f)
			continue
		}
		log := d.Log.With(zap.String("call_id", f.r.Call), zap.String("agent", f.r.Agent), zap.String("queue", f.queue))
		fate, err := of.OfferFate(ctx, d.Tenant, f.r.Call, f.offer)
		if fate == callstate.OfferLost || fate == callstate.OfferLostEnded {
			// decided: carried through even if ctx ends meanwhile (as DispatchOnce's undo)
			uctx := context.WithoutCancel(ctx)
			if fate == callstate.OfferLost {
				err = d.Store.Enqueue(uctx, d.Tenant, f.queue, f.r.Call, f.r.Score)
			}
			// the release script frees the agent only while reserved for this call
			err = errors.Join(err, d.Store.Release(uctx, d.Tenant, f.r.Agent, f.r.Call, callstate.AgentAbandoned, 0))
			if err == nil {
				d.LostOffers.Add(1)
				clear(d.exhausted) // an agent may be free, a caller waits again
				log.Warn("offer lost with a failover: caller put back in the queue at their place, agent freed", zap.Stringer("fate", fate))
				continue
			}
			fate = callstate.OfferUnsettled // looked at again: both writes are idempotent
		}
		if fate == callstate.OfferPassed {
			// the call is neither queued nor with the agent: their reservation for it, if they
			// still have one, holds them for nobody (the release script frees them only then)
			err = d.Store.Release(context.WithoutCancel(ctx), d.Tenant, f.r.Agent, f.r.Call, callstate.AgentAbandoned, 0)
			if err == nil {
				clear(d.exhausted)
				log.Info("offer followed up: the call is past it, agent freed if still reserved for it")
				continue
			}
			fate = callstate.OfferUnsettled
		}
		if fate == callstate.OfferKept {
			log.Info("offer followed up: kept")
			continue
		}
		failed = err != nil
		f.looks++
		if f.looks >= cmp.Or(d.OfferRechecks, defaultOfferRechecks) {
			log.Warn("offer still not confirmed on the replicas: left to the reconciler", zap.Int("looks", f.looks), zap.Error(err))
			continue
		}
		f.due = now.Add(f.wait) // the time since the offer doubles
		log.Debug("offer followed up: not settled yet", zap.Duration("next_look", f.wait), zap.Error(err))
		f.wait *= 2
		kept = append(kept, f)
	}
	clear(d.followUps[len(kept):])
	d.followUps = kept
	return len(kept)
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

// KnownQueues implements callstate.QueueSweeper.
func (d *Dispatcher) KnownQueues(ctx context.Context, tenant string) ([]string, error) {
	return d.Store.KnownQueues(ctx, tenant)
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
// and cool-downs end without a poke; other instances enqueue without poking this one). Before
// each dispatch it looks at the offers being followed up whose time has come (FollowUpOffers);
// those still pending when ctx ends are logged and left to the reconciler.
func (d *Dispatcher) Run(ctx context.Context, every time.Duration) {
	if every <= 0 {
		every = 250 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			for _, f := range d.followUps {
				d.Log.Warn("offer not confirmed on the replicas at shutdown: left to the reconciler",
					zap.String("call_id", f.r.Call), zap.String("agent", f.r.Agent))
			}
			d.followUps = nil
			for _, u := range d.undos {
				d.giveUpUndo(ctx, u, "failed offer not undone at shutdown: caller put back, agent left to the reconciler")
			}
			d.undos = nil
			return
		case <-t.C:
			clear(d.exhausted)
		case <-d.wakeAgents:
			clear(d.exhausted)
		case <-d.wake:
		}
		d.RetryUndos(ctx)
		d.FollowUpOffers(ctx)
		if d.Paused == nil || !d.Paused() {
			d.DispatchOnce(ctx)
		}
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
			ok, err := d.offer(ctx, q, r)
			// What follows a reservation runs even when ctx ended meanwhile (a shutdown stops the
			// loops): the caller and the agent it holds are handed back, not left to the reconciler.
			// Redis's own timeouts bound it.
			uctx := context.WithoutCancel(ctx)
			switch {
			case err != nil:
				took, known, waiting := d.offerTook(uctx, q, r)
				if took {
					// the save was applied, only its answer was lost or its replicas did not
					// confirm it: the offer stands, and freeing the agent would let another caller
					// have them during the transfer; one the replicas lack is followed up, in case
					// a failover loses it (FollowUpOffers)
					d.Log.Warn("offer answered with an error but applied", zap.String("call_id", r.Call), zap.String("agent", r.Agent), zap.Error(err))
					offers++
					return offers
				}
				// The record shows the offer did not apply: the caller goes back where they were
				// and the agent is freed. When it cannot be read (the call's master is down),
				// or the undo fails (the tenant's), the reservation is undone later
				// (RetryUndos): not left to the reconciler's pass (minutes), and not put
				// back in the queue before the offer's fate is known, to be reserved again,
				// agent after agent, each tick the call's master is away.
				d.Log.Warn("offer failed, caller requeued", zap.String("call_id", r.Call), zap.String("agent", r.Agent), zap.Error(err))
				if !known || d.undo(uctx, q, r, waiting) != nil {
					d.undos = append(d.undos, &pendingUndo{r: r, queue: q, since: d.Now()})
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

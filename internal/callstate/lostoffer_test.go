package callstate_test

import (
	"context"
	"maps"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/queue"
	"github.com/callbot/callbot/internal/redistest"
)

// holdBeforeOffer is the machine as the dispatcher's offerer, whose next offer, once armed, is
// made with the reservation on the replica and the replication stream held from then on: the
// offer's save is applied on the master and refused as unreplicated, and a failover now keeps
// the reservation (the caller out of the queue, the agent reserved) and loses the offer.
type holdBeforeOffer struct {
	*callstate.Machine
	t     *testing.T
	s     *redistest.Sentinel
	rdb   *redis.Client
	armed atomic.Bool
}

func (h *holdBeforeOffer) OfferFrom(ctx context.Context, tenant, queue, callKey, agent string) (bool, error) {
	if h.armed.CompareAndSwap(true, false) {
		if n, err := h.rdb.Do(ctx, "WAIT", 1, 5000).Int(); err != nil || n != 1 {
			h.t.Errorf("the reservation not on the replica before the offer: WAIT %d %v", n, err)
		}
		h.s.HoldReplication()
	}
	return h.Machine.OfferFrom(ctx, tenant, queue, callKey, agent)
}

// queueEntry is the caller's score in queue q, and whether they are in it.
func queueEntry(t *testing.T, qs *queue.Store, call string) (float64, bool) {
	t.Helper()
	es, err := qs.Entries(context.Background(), "tenant-1", []string{"q"})
	mustDo(t, err)
	for _, e := range es["q"] {
		if e.Call == call {
			return e.Score, true
		}
	}
	return 0, false
}

// With CALLBOT_REDIS_REPLICAS, the dispatcher reserves an agent (the caller out of the queue,
// the reservation replicated) and saves the offer on the call's record. That save was refused as
// unreplicated but applied on the master, so the dispatcher let the offer stand. The master then
// failed over to a replica that lacked the offer: the record was back in the queue, the caller in
// none, the agent reserved for them. Nobody offered that caller again until the reconciler's pass
// (up to 5 minutes, on hold music), nor freed the agent until the pass after. The dispatcher now
// follows such an offer up: once the failover has lost it, the caller is back in the queue at
// their place and the agent free, without the reconciler.
func TestOfferLostWithAFailoverIsPutBack(t *testing.T) {
	ctx := context.Background()
	s := redistest.StartSentinelWithLink(t)
	rdb := s.Client(t)
	const prefix = "lo"
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	mustDo(t, err)
	qs := queue.NewStore(rdb, prefix)
	const agent = "11111111-0000-4000-8000-000000000001"
	mustDo(t, qs.SetMembers(ctx, "tenant-1", "q", []string{agent}))
	mustDo(t, qs.SetRoutable(ctx, "tenant-1", map[string]bool{agent: true}))
	store := callstate.NewStore(rdb, prefix)
	store.WaitForReplicas(1, 200*time.Millisecond)
	watchReplicas(t, store, 50*time.Millisecond)
	d := queue.NewDispatcher(qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(t))
	d.OfferRecheck, d.OfferRechecks = 300*time.Millisecond, 10
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, prefix), Control: &fakeGraph{},
		Queues: d, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
	t.Cleanup(m.Wait)
	offerer := &holdBeforeOffer{Machine: m, t: t, s: s, rdb: rdb}
	d.Offer = offerer

	notify(t, m, note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	score, in := queueEntry(t, qs, realCallKey)
	if !in {
		t.Fatal("the caller is in no queue")
	}

	offerer.armed.Store(true)
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers: want the offer found applied on the master to stand", n)
	}
	c, err := store.Get(ctx, realCallKey)
	mustDo(t, err)
	if c.State != callstate.StateTransferring || c.Agent != agent {
		t.Fatalf("on the master after the offer: %s agent %q, want transferring to %s", c.State, c.Agent, agent)
	}
	// not settled while the master lives and its replica lacks the offer: nothing is undone
	time.Sleep(400 * time.Millisecond)
	if n := d.FollowUpOffers(ctx); n != 1 {
		t.Errorf("%d offers followed up while the replica lacks the offer, want 1", n)
	}
	if _, in := queueEntry(t, qs, realCallKey); in {
		t.Errorf("the caller was put back in the queue while the master has the offer")
	}

	old, err := s.KillMaster(ctx)
	mustDo(t, err)
	_, err = s.WaitFailover(old, 20*time.Second)
	mustDo(t, err)
	failedOver := time.Now()
	waitFor(t, "the promoted master read", func() bool { _, err := store.Get(ctx, realCallKey); return err == nil })
	c, err = store.Get(ctx, realCallKey)
	mustDo(t, err)
	res, err := qs.Reserved(ctx, "tenant-1", agent)
	mustDo(t, err)
	if _, in := queueEntry(t, qs, realCallKey); c.State != callstate.StateQueued || res != realCallKey || in {
		t.Fatalf("after the failover: %s, agent reserved for %q, caller in the queue %v: want the offer lost, the reservation kept (the set-up is wrong)", c.State, res, in)
	}

	// the follow-ups, as Run makes them on its ticks; no reconciler
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		d.FollowUpOffers(ctx)
		_, in := queueEntry(t, qs, realCallKey)
		res, err = qs.Reserved(ctx, "tenant-1", agent)
		if err == nil && in && res == "" || time.Now().After(deadline) {
			break
		}
	}
	got, in := queueEntry(t, qs, realCallKey)
	if !in || got != score {
		t.Errorf("after the follow-up: caller in the queue %v at %v, want back at their place %v", in, got, score)
	}
	if res != "" {
		t.Errorf("after the follow-up: the agent is still reserved for %q", res)
	}
	if n := d.LostOffers.Load(); n != 1 {
		t.Errorf("LostOffers = %d, want 1", n)
	}
	t.Logf("caller back and agent free %s after the failover", time.Since(failedOver).Round(time.Millisecond))

	// and the caller is offered to the agent again
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Errorf("%d offers after the follow-up, want the caller offered again", n)
	}
	if c, err := store.Get(ctx, realCallKey); err != nil || c.State != callstate.StateTransferring || c.Agent != agent {
		t.Errorf("after the next dispatch: %s agent %q (%v), want transferring to %s", c.State, c.Agent, err, agent)
	}
}

// fakeReplica stands for a replica of a standalone Redis: INFO replication counts one, and WAIT
// answers 1 unless the replica is cut (0). It lets a test refuse writes as unreplicated at will.
type fakeReplica struct{ cut atomic.Bool }

func (f *fakeReplica) DialHook(next redis.DialHook) redis.DialHook { return next }
func (f *fakeReplica) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		f.rewrite(cmd)
		return err
	}
}
func (f *fakeReplica) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		for _, c := range cmds {
			f.rewrite(c)
		}
		return err
	}
}

func (f *fakeReplica) rewrite(cmd redis.Cmder) {
	switch c := cmd.(type) {
	case *redis.Cmd:
		if c.Name() == "wait" && c.Err() == nil {
			n := int64(1)
			if f.cut.Load() {
				n = 0
			}
			c.SetVal(n)
		}
	case *redis.StringCmd:
		if c.Name() == "info" && c.Err() == nil {
			c.SetVal(strings.Replace(c.Val(), "connected_slaves:0", "connected_slaves:1\r\nslave0:ip=127.0.0.1,port=1,state=online,offset=0,lag=0", 1))
		}
	}
}

// replicatedOnFake is an instance (machine, dispatcher, store) whose store waits for the fake
// replica of rep on f's Redis, and whose dispatcher follows offers up after 100 ms.
func replicatedOnFake(t *testing.T, f *agentOnRealQueues, rep *fakeReplica) (*callstate.Machine, *queue.Dispatcher, *callstate.Store) {
	rdb := f.srv.Client(t)
	rdb.AddHook(rep)
	m, d, st := f.instance(rdb, &fakeGraph{}, nil)
	st.WaitForReplicas(1, 20*time.Millisecond)
	d.OfferRecheck = 100 * time.Millisecond
	return m, d, st
}

// followUpsUntilDone runs d's follow-ups, its clock moved on past each look, until none is left
// (at most OfferRechecks looks each).
func followUpsUntilDone(t *testing.T, d *queue.Dispatcher) {
	t.Helper()
	skew := time.Duration(0)
	d.Now = func() time.Time { return time.Now().Add(skew) }
	for i := 0; d.FollowUpOffers(context.Background()) > 0; i++ {
		if i > 20 {
			t.Fatal("offers still followed up after 20 looks")
		}
		skew += 10 * time.Minute
	}
}

// unreplicatedOffer has d offer the queued caller with the replica cut: the offer's save is
// applied on the master and refused as unreplicated, and the dispatcher lets it stand. The
// replica is then back, or, with stall, stays cut.
func unreplicatedOffer(t *testing.T, m *callstate.Machine, d *queue.Dispatcher, rep *fakeReplica, stall bool) {
	t.Helper()
	rep.cut.Store(true)
	if n := d.DispatchOnce(context.Background()); n != 1 {
		t.Fatalf("%d offers", n)
	}
	m.Wait()
	rep.cut.Store(stall)
}

// failoverLosesOffer is unreplicatedOffer followed by a failover that loses the offer: the
// call's record (under f's prefix) put back as the replica had it, before the offer.
func failoverLosesOffer(t *testing.T, f *agentOnRealQueues, m *callstate.Machine, d *queue.Dispatcher, rep *fakeReplica) {
	t.Helper()
	ctx := context.Background()
	rdb := f.srv.Client(t)
	key := f.prefix + ":{call:" + realCallKey + "}"
	before, err := rdb.Dump(ctx, key).Result()
	mustDo(t, err)
	unreplicatedOffer(t, m, d, rep, false)
	mustDo(t, rdb.RestoreReplace(ctx, key, 0, before).Err())
}

// An offer refused as unreplicated but applied stands, and is followed up. Meanwhile it goes on
// as offers do: the transfer fails, the machine puts the caller back in the queue and frees the
// agent, and another instance reserves the same agent for the same caller again, about to offer.
// The record then shows the call queued, as after a lost offer, but with the attempt counted: the
// follow-up must leave it alone. Freeing the agent (reserved for that call, as the lost offer's
// reservation was) would let another caller have them during the new offer.
func TestOfferFollowUpLeavesARequeuedCallAlone(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "lq")
	rep := &fakeReplica{}
	m, d, _ := replicatedOnFake(t, f, rep)
	f.queueCaller(m)
	score, _ := queueEntry(t, f.qs, realCallKey)

	unreplicatedOffer(t, m, d, rep, false)
	if n := d.FollowUpOffers(ctx); n != 1 {
		t.Fatalf("%d offers followed up, want the unreplicated one", n)
	}
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subCode":7000}}`))
	if got, in := queueEntry(t, f.qs, realCallKey); !in || got != score {
		t.Fatalf("after the failed transfer: caller in the queue %v at %v, want at %v", in, got, score)
	}
	r, err := f.qs.Reserve(ctx, "tenant-1", "q", time.Now().Add(11*time.Second)) // another instance, about to offer, once the cool-down is over
	mustDo(t, err)
	if r.Call != realCallKey || r.Agent != f.agent {
		t.Fatalf("reservation %+v, want the caller with the agent again", r)
	}

	rep.cut.Store(true) // the follow-up's looks cannot settle it by the replicas: the record must
	followUpsUntilDone(t, d)
	if res, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); res != realCallKey {
		t.Errorf("the agent, reserved again for %s by another instance, is reserved for %q after the follow-up", realCallKey, res)
	}
	if _, in := queueEntry(t, f.qs, realCallKey); in {
		t.Errorf("the follow-up put back in the queue a caller another instance is offering")
	}
	if n := d.LostOffers.Load(); n != 0 {
		t.Errorf("LostOffers = %d, want 0", n)
	}
}

// A failover loses an offer (the record taken back to the queue), and the agent it held has
// since been freed and reserved for another caller (the reconciler's second pass, say). The
// follow-up puts the first caller back at their place and leaves the agent with the other.
func TestOfferFollowUpFreesOnlyItsOwnReservation(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "lf")
	rep := &fakeReplica{}
	m, d, _ := replicatedOnFake(t, f, rep)
	f.queueCaller(m)
	score, _ := queueEntry(t, f.qs, realCallKey)
	failoverLosesOffer(t, f, m, d, rep)
	mustDo(t, f.qs.Release(ctx, "tenant-1", f.agent, realCallKey, callstate.AgentAbandoned, 0))
	mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", "other-caller", time.Now().UnixMilli()))
	r, err := f.qs.Reserve(ctx, "tenant-1", "q", time.Now())
	mustDo(t, err)
	if r.Call != "other-caller" {
		t.Fatalf("reservation %+v, want the other caller", r)
	}

	followUpsUntilDone(t, d)
	if got, in := queueEntry(t, f.qs, realCallKey); !in || got != score {
		t.Errorf("after the follow-up: caller in the queue %v at %v, want back at their place %v", in, got, score)
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); res != "other-caller" {
		t.Errorf("the agent, reserved for the other caller, is reserved for %q after the follow-up", res)
	}
	if n := d.LostOffers.Load(); n != 1 {
		t.Errorf("LostOffers = %d, want 1", n)
	}
}

// overflowFlowYAML is flowYAML whose queue q passes its callers on to q2 after a minute.
const overflowFlowYAML = `
name: t
prompts:
  menu: {uri: https://m.test/menu.wav}
  hold: {uri: https://m.test/hold.wav}
start: main
menus:
  main:
    prompt: menu
    options:
      "1": {queue: q}
queues:
  q:
    hold: hold
    max-wait: 1m
    on-timeout: {queue: q2}
    agents: [11111111-0000-4000-8000-000000000001]
  q2:
    hold: hold
    agents: [11111111-0000-4000-8000-000000000002]
`

// A failover loses an offer (the record taken back to queue q), and before the follow-up looks
// the caller's max wait passes them on to q2: they wait in q2 now. The follow-up must not put
// them back in q as well: in two queues, a dispatcher of q would hand them to q's agent, whom
// the flow no longer meant them for, while q2 still counts them. It must free q's agent, whom
// the lost offer's reservation holds for a caller who is not with them: left to the reconciler,
// they were reserved for nobody for up to its interval (5 minutes), q's callers waiting.
func TestOfferFollowUpLeavesACallerWhoMovedOnToAnotherQueue(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "lm")
	flow, err := ivr.Parse([]byte(overflowFlowYAML), "t.yaml")
	mustDo(t, err)
	f.flow = flow
	rep := &fakeReplica{}
	m, d, st := replicatedOnFake(t, f, rep)
	f.queueCaller(m)
	queued, err := st.Get(ctx, realCallKey)
	mustDo(t, err)

	failoverLosesOffer(t, f, m, d, rep)
	// the caller's max wait, fired by another instance: on to q2
	other, _, _ := f.instance(f.srv.Client(t), &fakeGraph{}, nil)
	if ok, err := other.Handle(ctx, "tenant-1", realCallKey, callstate.Event{Kind: callstate.EvTimeout,
		Timer: callstate.TimerMaxWait, TimerToken: queued.Timers[callstate.TimerMaxWait]}); !ok || err != nil {
		t.Fatalf("max wait: %v %v", ok, err)
	}
	other.Wait()
	if c, err := st.Get(ctx, realCallKey); err != nil || c.State != callstate.StateQueued || c.Queue != "q2" {
		t.Fatalf("after the max wait: %s in %q (%v), want queued in q2", c.State, c.Queue, err)
	}

	followUpsUntilDone(t, d)
	if _, in := queueEntry(t, f.qs, realCallKey); in {
		t.Errorf("the follow-up put the caller, who waits in q2 now, back in q")
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); res != "" {
		t.Errorf("after the follow-up, q's agent is still reserved for %q, who waits in q2: reserved for nobody until the reconciler", res)
	}
	if c, err := st.Get(ctx, realCallKey); err != nil || c.State != callstate.StateQueued || c.Queue != "q2" {
		t.Errorf("after the follow-up: %s in %q (%v), want left queued in q2", c.State, c.Queue, err)
	}
	if n := d.LostOffers.Load(); n != 0 {
		t.Errorf("LostOffers = %d, want 0", n)
	}
}

// batchedRelease is a machine with the real queue store and dispatcher on rdb, agent the one
// member of queue q, routable, and its acknowledgements batched every acksEvery (from 20 ms on,
// RunAcks batching).
func batchedRelease(t *testing.T, rdb redis.UniversalClient, prefix, agent string, acksEvery time.Duration) (*callstate.Machine, *queue.Dispatcher, *queue.Store) {
	t.Helper()
	ctx := context.Background()
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	mustDo(t, err)
	qs := queue.NewStore(rdb, prefix)
	mustDo(t, qs.SetMembers(ctx, "tenant-1", "q", []string{agent}))
	mustDo(t, qs.SetRoutable(ctx, "tenant-1", map[string]bool{agent: true}))
	d := queue.NewDispatcher(qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(t))
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, prefix), Timers: callstate.NewTimers(rdb, prefix),
		Control: &fakeGraph{}, Queues: d, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
	d.Offer = m
	actx, stop := context.WithCancel(ctx)
	acked := make(chan struct{})
	go func() { m.RunAcks(actx, acksEvery); close(acked) }()
	t.Cleanup(func() { stop(); <-acked; m.Wait() })
	time.Sleep(20 * time.Millisecond) // RunAcks has started batching
	return m, d, qs
}

// The agent of a call that ended is released in the next batch of acknowledgements, after the
// save that decided it won its race: in the batch's round trip, ahead of the release's own
// acknowledgement, the dispatcher woken once it is written. Checked with the real queue store
// and dispatcher: the agent free again, the record's outbox empty.
func TestReleaseOfAnEndedCallGoesInTheAcknowledgementBatch(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	const agent = "11111111-0000-4000-8000-000000000001"
	m, d, qs := batchedRelease(t, rdb, "rb", agent, 10*time.Millisecond)
	store := callstate.NewStore(rdb, "rb")

	queuedCall(t, m, realCallID)
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers, want 1", n)
	}
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	// the caller hangs up while the agent rings: released at once (AgentAbandoned, no hold)
	notify(t, m, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":200,"subcode":0}}`))
	waitFor(t, "the agent released and the release acknowledged", func() bool {
		r, err := qs.Reserved(ctx, "tenant-1", agent)
		c, gerr := store.Get(ctx, realCallKey)
		return err == nil && gerr == nil && r == "" && c.State == callstate.StateTerminated && len(c.Outbox) == 0
	})
}

// On Redis Cluster the batch of acknowledgements spans masters, and part of it can be applied
// while another part fails (a failover): an ended call's release runs on its own, at once, not
// in the batch. With the batch held back (an hour), the agent is free all the same.
func TestReleaseOfAnEndedCallOnClusterRunsOnItsOwn(t *testing.T) {
	ctx := context.Background()
	const agent = "11111111-0000-4000-8000-000000000001"
	m, d, qs := batchedRelease(t, redistest.StartCluster(t).Client(t), "rc", agent, time.Hour)

	queuedCall(t, m, realCallID)
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers, want 1", n)
	}
	notify(t, m, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":200,"subcode":0}}`))
	waitFor(t, "the agent released with the batch held back", func() bool {
		r, err := qs.Reserved(ctx, "tenant-1", agent)
		return err == nil && r == ""
	})
}

// A caller whose offer stands on the master, unreplicated (the replicas stalled), is in the
// queue again as a ghost: a queue write that went with a save that lost its race (they are sent
// whatever the save's outcome), or the dispatcher's own undo when it could not read the record.
// The dispatcher reserves the ghost for a second agent, and the machine refuses the offer: the
// record shows the call with the first agent. That refusal came back as an error while the
// replicas lagged (the machine waited for them, as it does before acknowledging a notification it
// ignores), and the dispatcher took it for a failed offer: the caller back in the queue, reserved
// again on the next tick, every 250 ms for as long as the stall lasted. A refused offer is now
// refused, replicas or not: the second agent freed, the ghost gone.
func TestAGhostOfAnUnreplicatedOfferIsNotRequeued(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "lg")
	const second = "11111111-0000-4000-8000-000000000002"
	mustDo(t, f.qs.SetMembers(ctx, "tenant-1", "q", []string{f.agent, second}))
	mustDo(t, f.qs.SetRoutable(ctx, "tenant-1", map[string]bool{f.agent: true, second: true}))
	rep := &fakeReplica{}
	m, d, store := replicatedOnFake(t, f, rep)
	f.queueCaller(m)
	score, _ := queueEntry(t, f.qs, realCallKey)

	unreplicatedOffer(t, m, d, rep, true) // the stall lasts
	c, err := store.Get(ctx, realCallKey)
	mustDo(t, err)
	first, other := c.Agent, second
	if first == second {
		other = f.agent
	}
	mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", realCallKey, int64(score))) // the ghost

	for i := range 3 { // Run's ticks
		if n := d.DispatchOnce(ctx); n != 0 {
			t.Errorf("dispatch %d: %d offers, want the ghost's refused", i, n)
		}
	}
	if _, in := queueEntry(t, f.qs, realCallKey); in {
		t.Errorf("the caller, offered to %s on the master, is back in the queue", first)
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", other); res != "" {
		t.Errorf("the second agent is reserved for %q", res)
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", first); res != realCallKey {
		t.Errorf("the first agent, offered the call, is reserved for %q", res)
	}
	if c, err := store.Get(ctx, realCallKey); err != nil || c.State != callstate.StateTransferring || c.Agent != first {
		t.Errorf("the record: %s agent %q (%v), want transferring to %s", c.State, c.Agent, err, first)
	}
}

// A failover loses an offer refused as unreplicated, and before the follow-up looks the call has
// moved past it: a queue write of a save that lost its race (a stale cached copy deciding a
// repeated key press) put the caller back in the queue, and another instance offered them to a
// second agent; or the failover took the record back further, to the menu. Either way the
// record shows the call neither queued nor with the first agent, who is still reserved for it
// (the reservation was replicated before the offer). The follow-up took such a record for a kept
// offer (it counts as many transfer attempts as the offer did, or it is "somewhere the follow-up
// has no business with") and left the agent reserved for nobody until the reconciler's pass, up
// to 5 minutes. It now frees them, and leaves the caller where their record has them.
func TestOfferFollowUpFreesTheAgentOfAnOfferTheCallMovedPast(t *testing.T) {
	const second = "11111111-0000-4000-8000-000000000002"
	for _, tc := range []struct {
		name string
		// after the failover (the record restored to before the offer, or to the menu), what
		// happens before the follow-up looks; wantAgent is who the call is with then
		after     func(t *testing.T, f *agentOnRealQueues, score float64)
		wantAgent bool
	}{
		{"reoffered to another agent", func(t *testing.T, f *agentOnRealQueues, score float64) {
			ctx := context.Background()
			mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", realCallKey, int64(score))) // the ghost
			_, other, _ := f.instance(f.srv.Client(t), &fakeGraph{}, nil)
			if n := other.DispatchOnce(ctx); n != 1 {
				t.Fatalf("%d offers by the other instance, want the caller offered to the second agent", n)
			}
		}, true},
		{"taken back to the menu", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			f := newAgentOnRealQueues(t, "lp")
			mustDo(t, f.qs.SetMembers(ctx, "tenant-1", "q", []string{f.agent, second}))
			mustDo(t, f.qs.SetRoutable(ctx, "tenant-1", map[string]bool{f.agent: true, second: true}))
			rep := &fakeReplica{}
			m, d, st := replicatedOnFake(t, f, rep)
			rdb := f.srv.Client(t)
			key := "lp:{call:" + realCallKey + "}"
			notify(t, m, note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
			notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
			inMenu, err := rdb.Dump(ctx, key).Result()
			mustDo(t, err)
			notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
			score, _ := queueEntry(t, f.qs, realCallKey)
			queued, err := rdb.Dump(ctx, key).Result()
			mustDo(t, err)

			rep.cut.Store(true)
			if n := d.DispatchOnce(ctx); n != 1 {
				t.Fatalf("%d offers", n)
			}
			m.Wait()
			c, err := st.Get(ctx, realCallKey)
			mustDo(t, err)
			first := c.Agent
			rep.cut.Store(false)
			// the failover: the record as the replica had it, the reservation kept
			before := queued
			if tc.after == nil {
				before = inMenu
			}
			mustDo(t, rdb.RestoreReplace(ctx, key, 0, before).Err())
			if tc.after != nil {
				tc.after(t, f, score)
			}

			followUpsUntilDone(t, d)
			if res, _ := f.qs.Reserved(ctx, "tenant-1", first); res != "" {
				t.Errorf("the agent of the lost offer is still reserved for %q after the follow-up", res)
			}
			c, err = st.Get(ctx, realCallKey)
			mustDo(t, err)
			if tc.wantAgent {
				if res, _ := f.qs.Reserved(ctx, "tenant-1", c.Agent); c.Agent == first || res != realCallKey {
					t.Errorf("the call is with %q, reserved for %q: want the second agent's offer left alone", c.Agent, res)
				}
			} else if c.State != callstate.StateInMenu {
				t.Errorf("the record is %s, want left in the menu", c.State)
			}
			if _, in := queueEntry(t, f.qs, realCallKey); in {
				t.Errorf("the follow-up put the caller back in the queue")
			}
		})
	}
}

// snapshot is the state of keys on rdb (DUMP; nil for a key that does not exist), for restore.
func snapshot(t *testing.T, rdb *redis.Client, keys ...string) map[string]*string {
	t.Helper()
	out := map[string]*string{}
	for _, k := range keys {
		v, err := rdb.Dump(context.Background(), k).Result()
		if err == redis.Nil {
			out[k] = nil
			continue
		}
		mustDo(t, err)
		out[k] = &v
	}
	return out
}

// restore puts keys back as snapshot read them.
func restore(t *testing.T, rdb *redis.Client, keys map[string]*string) {
	t.Helper()
	ctx := context.Background()
	for k, v := range keys {
		if v == nil {
			mustDo(t, rdb.Del(ctx, k).Err())
			continue
		}
		mustDo(t, rdb.RestoreReplace(ctx, k, 0, *v).Err())
	}
}

// An offer refused as unreplicated stands and is followed up, and the replica stays stalled
// while the call goes on past the offer on the master alone: the transfer fails (the caller back
// in the queue, the agent freed) and another instance offers the caller to a second agent. The
// follow-up's look found the call neither queued nor with the first agent (OfferPassed) and
// ended there, on a record no replica had. The master then failed over to the replica, which had
// the reservation and not the offer: the call queued in its record and in no queue, the first
// agent reserved for it. Nothing put the caller back or freed the agent before the reconciler's
// passes (up to 5 and 10 minutes), which is what the follow-up is for. A record past the offer
// that counts its transfer attempt settles only once the replicas have it, as one that shows the
// offer does; the follow-up then finds the lost offer after the failover.
func TestOfferFollowUpPassesOnlyOnAReplicatedRecord(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "lr")
	const second = "11111111-0000-4000-8000-000000000002"
	mustDo(t, f.qs.SetMembers(ctx, "tenant-1", "q", []string{f.agent, second}))
	mustDo(t, f.qs.SetRoutable(ctx, "tenant-1", map[string]bool{f.agent: true, second: true}))
	rep := &fakeReplica{}
	m, d, st := replicatedOnFake(t, f, rep)
	rdb := f.srv.Client(t)
	f.queueCaller(m)
	score, _ := queueEntry(t, f.qs, realCallKey)
	record := f.prefix + ":{call:" + realCallKey + "}"
	replica := snapshot(t, rdb, record) // the record as the replica keeps it: before the offer

	unreplicatedOffer(t, m, d, rep, true) // the stall lasts
	c, err := st.Get(ctx, realCallKey)
	mustDo(t, err)
	first := c.Agent
	// the replica has the reservation (replicated before the offer): the caller out of the queue,
	// the first agent reserved for them
	tk := func(name string) string { return f.prefix + ":{tenant:tenant-1}:" + name }
	maps.Copy(replica, snapshot(t, rdb, tk("queue:q"), tk("busy"), tk("free"), tk("idle"), tk("cool")))

	// on the master alone: the transfer fails and another instance offers the caller to the
	// second agent (its store waits for no replica: what counts is what the master has)
	other, otherD, _ := f.instance(f.srv.Client(t), &fakeGraph{}, nil)
	notify(t, other, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	notify(t, other, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subCode":7000}}`))
	if n := otherD.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers by the other instance, want the caller offered to the second agent", n)
	}
	other.Wait()
	if c, err := st.Get(ctx, realCallKey); err != nil || c.Agent == first || c.State != callstate.StateTransferring {
		t.Fatalf("on the master: %s agent %q (%v), want transferring to the second agent", c.State, c.Agent, err)
	}

	// the follow-up looks while the master lives
	d.Now = func() time.Time { return time.Now().Add(time.Minute) }
	d.FollowUpOffers(ctx)

	// the failover to the stalled replica
	restore(t, rdb, replica)
	rep.cut.Store(false)
	if c, err := st.Get(ctx, realCallKey); err != nil || c.State != callstate.StateQueued {
		t.Fatalf("after the failover: %s (%v), want queued (the set-up is wrong)", c.State, err)
	}

	followUpsUntilDone(t, d)
	if got, in := queueEntry(t, f.qs, realCallKey); !in || got != score {
		t.Errorf("after the follow-up: caller in the queue %v at %v, want back at their place %v", in, got, score)
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", first); res != "" {
		t.Errorf("after the follow-up: the agent of the lost offer is still reserved for %q", res)
	}
}

// A caller's max wait passes them on from q to q2, and their entry in q is still there for a
// moment (its removal is carried out after the save), or again (a queue write of a save that
// lost its race). q's dispatcher reserves that entry for q's agent, and the offer was accepted
// because the record was queued, in q2: the caller went to an agent of the queue the flow had
// just taken them out of (overflow to another team, a voicemail queue), and their q2 entry was
// left a ghost. An offer is now made only to a caller queued where the reservation found them.
func TestAnEntryInTheQueueTheCallerLeftIsNotOffered(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "lx")
	flow, err := ivr.Parse([]byte(overflowFlowYAML), "t.yaml")
	mustDo(t, err)
	f.flow = flow
	m, d, st := f.instance(f.srv.Client(t), &fakeGraph{}, nil)
	f.queueCaller(m)
	queued, err := st.Get(ctx, realCallKey)
	mustDo(t, err)
	score, _ := queueEntry(t, f.qs, realCallKey)
	mustDo(t, f.qs.SetRoutable(ctx, "tenant-1", map[string]bool{f.agent: false})) // q's agent busy meanwhile
	if ok, err := m.Handle(ctx, "tenant-1", realCallKey, callstate.Event{Kind: callstate.EvTimeout,
		Timer: callstate.TimerMaxWait, TimerToken: queued.Timers[callstate.TimerMaxWait]}); !ok || err != nil {
		t.Fatalf("max wait: %v %v", ok, err)
	}
	m.Wait()
	mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", realCallKey, int64(score))) // the entry in q, still there
	mustDo(t, f.qs.SetRoutable(ctx, "tenant-1", map[string]bool{f.agent: true}))

	if n := d.DispatchOnce(ctx); n != 0 {
		t.Errorf("%d offers: want the entry in q, which the caller left for q2, refused", n)
	}
	if c, err := st.Get(ctx, realCallKey); err != nil || c.State != callstate.StateQueued || c.Queue != "q2" {
		t.Errorf("the caller: %s in %q with %q (%v), want still waiting in q2", c.State, c.Queue, c.Agent, err)
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); res != "" {
		t.Errorf("q's agent is reserved for %q", res)
	}
}

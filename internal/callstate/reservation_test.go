package callstate_test

import (
	"context"
	"errors"
	"sync"
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

// agentOnRealQueues is one agent, routable, in queue q of tenant-1 on a real queue store; the
// tests make callbot instances on it with instance.
type agentOnRealQueues struct {
	t      *testing.T
	srv    *redistest.Server
	prefix string
	qs     *queue.Store
	flow   *ivr.Flow
	agent  string
}

const (
	realCallID  = "57dab8b1-894c-409a-b240-bd8beae78896"
	realCallKey = "57dab8b1894c409ab240bd8beae78896"
)

func newAgentOnRealQueues(t *testing.T, prefix string) *agentOnRealQueues {
	ctx := context.Background()
	srv := redistest.Start(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f := &agentOnRealQueues{t: t, srv: srv, prefix: prefix, qs: queue.NewStore(srv.Client(t), prefix), flow: flow, agent: "11111111-0000-4000-8000-000000000001"}
	if err := errors.Join(f.qs.SetMembers(ctx, "tenant-1", "q", []string{f.agent}),
		f.qs.SetRoutable(ctx, "tenant-1", map[string]bool{f.agent: true})); err != nil {
		t.Fatal(err)
	}
	return f
}

// instance is a callbot instance on client c (its own connection, to which a test may add a
// hook), with a dispatcher of its own; mod changes its configuration.
func (f *agentOnRealQueues) instance(c *redis.Client, g callstate.CallControl, mod func(*callstate.Config)) (*callstate.Machine, *queue.Dispatcher, *callstate.Store) {
	prefix := f.prefix
	d := queue.NewDispatcher(f.qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(f.t))
	st := callstate.NewStore(c, prefix)
	cfg := callstate.Config{Store: st, Timers: callstate.NewTimers(c, prefix), Control: g, Queues: d, Flow: f.flow,
		CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(f.t), Now: time.Now}
	if mod != nil {
		mod(&cfg)
	}
	m := callstate.NewMachine(cfg)
	f.t.Cleanup(m.Wait) // its Graph commands are done before the test ends (and its logger with it)
	d.Offer = m
	return m, d, st
}

// queueCaller brings the call in, answers it, and queues the caller (key 1) on m.
func (f *agentOnRealQueues) queueCaller(m *callstate.Machine) {
	notify(f.t, m, note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(f.t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(f.t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if w, _ := f.qs.Waiting(context.Background(), "tenant-1", "q"); len(w) != 1 {
		f.t.Fatalf("waiting %v", w)
	}
}

func mustDo(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// lostReply, once armed, lets the next command reach Redis and be applied, then reports a
// failure: a read timeout, or the connection dropped, after the server did the write.
type lostReply struct{ armed atomic.Bool }

func (h *lostReply) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *lostReply) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err == nil && h.armed.CompareAndSwap(true, false) {
			return errors.New("read tcp: i/o timeout")
		}
		return err
	}
}
func (h *lostReply) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		if err == nil && h.armed.CompareAndSwap(true, false) {
			return errors.New("read tcp: i/o timeout")
		}
		return err
	}
}

// The save of the offer (queued -> transferring to the agent) is applied but its reply is lost:
// Offer returns an error. The dispatcher used to undo the reservation it believed never took:
// the agent freed and the caller put back in the queue, while the call's record said it was
// being transferred to that agent and its outbox held the transfer, which another instance
// re-drove; the agent was then reserved for another caller while the first was sent to them.
// Now the dispatcher reads the record and keeps the reservation the offer took.
func TestOfferAppliedDespiteAnErrorKeepsTheAgent(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "rv")
	agent := f.agent
	rdbA := f.srv.Client(t)
	hook := &lostReply{}
	rdbA.AddHook(hook)
	a, d, _ := f.instance(rdbA, &fakeGraph{}, nil)
	f.queueCaller(a)

	hook.armed.Store(true) // the offer's save is applied, its reply lost
	d.DispatchOnce(ctx)

	// instance B re-drives the outbox A left (the transfer never went out)
	gb := &fakeGraph{}
	b, dB, storeB := f.instance(f.srv.Client(t), gb, nil)
	c, err := storeB.Get(ctx, realCallKey)
	mustDo(t, err)
	redriveAll(t, b, storeB, time.Minute)
	// meanwhile another caller arrives; before, a dispatcher took the first caller again (its
	// offer ignored: the call is transferring), freed the agent, and reserved them for the second
	dB.DispatchOnce(ctx)
	mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", "second-caller", time.Now().UnixMilli()))
	r, err := f.qs.Reserve(ctx, "tenant-1", "q", time.Now())
	if c.State != callstate.StateTransferring || c.Agent != agent {
		t.Fatalf("after the offer: %s agent %q, want transferring to the agent", c.State, c.Agent)
	}
	if err == nil && r.Agent == agent {
		t.Errorf("agent %s is reserved for %s while call %s is being transferred to them (B sent %v)", agent, r.Call, realCallKey, gb.log())
	}
}

// An instance reserves the agent for the head caller and dies before offering; the caller then
// hangs up. The call ended, so it is no longer live: the reconciler lists no live call of the
// tenant. It used to look only at the reservations of tenants with a live call, so the agent stayed
// reserved for the ended call, however many passes ran, and the next caller got no agent. The
// tenants callbot serves are now checked on every pass.
func TestReservationOfAnEndedCallIsReleased(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "rs")
	skew := time.Duration(0)
	m, _, _ := f.instance(f.srv.Client(t), &fakeGraph{}, func(c *callstate.Config) {
		c.Now = func() time.Time { return time.Now().Add(skew) }
		c.Tenants = []string{"tenant-1"}
	})
	f.queueCaller(m)
	r, err := f.qs.Reserve(ctx, "tenant-1", "q", time.Now()) // the instance that does this dies now
	mustDo(t, err)
	notify(t, m, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`)) // caller hangs up

	for pass := 1; pass <= 3; pass++ {
		skew = time.Duration(pass) * 6 * time.Minute
		mustDo(t, m.Reconcile(ctx))
	}
	mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", "next-caller", time.Now().UnixMilli()))
	_, rerr := f.qs.Reserve(ctx, "tenant-1", "q", time.Now())
	if res, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); res == r.Call {
		t.Errorf("after 3 reconciler passes the agent is still reserved for ended call %s; the next caller's reservation: %v", res, rerr)
	}
}

// dropStorageAck, once armed, makes the next acknowledgement of storage commands fail (a Redis
// hiccup: the machine only logs it).
type dropStorageAck struct{ armed atomic.Bool }

func (h *dropStorageAck) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *dropStorageAck) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		a := cmd.Args()
		if len(a) == 8 && (cmd.Name() == "evalsha" || cmd.Name() == "eval") && a[4] == "s" && h.armed.CompareAndSwap(true, false) {
			cmd.SetErr(errors.New("connection reset"))
			return cmd.Err()
		}
		return next(ctx, cmd)
	}
}
func (h *dropStorageAck) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// The release of the agent after a failed transfer runs but its acknowledgement is lost, so it
// stays in the call's outbox. The caller is offered to the same agent again once the cool-down
// ends (by another instance's dispatcher). When the outbox was re-driven, the old release matched
// (agent, call) and freed the agent in the middle of the new offer. The re-drive now skips a
// release of the agent the call is with again.
func TestRedrivenReleaseDoesNotFreeALaterReservation(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "rr") // FailCooldown 10 s
	agent := f.agent
	rdbA := f.srv.Client(t)
	hook := &dropStorageAck{}
	rdbA.AddHook(hook)
	a, dA, _ := f.instance(rdbA, &fakeGraph{}, nil)
	b, dB, storeB := f.instance(f.srv.Client(t), &fakeGraph{}, nil)
	f.queueCaller(a)
	if n := dA.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers", n)
	}
	a.Wait()
	notify(t, a, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	hook.armed.Store(true) // the storage ack of the release after the failure is lost
	notify(t, a, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subCode":7000}}`))
	a.Wait()
	if res, _ := f.qs.Reserved(ctx, "tenant-1", agent); res != "" {
		t.Fatalf("agent still reserved for %q after the failed transfer", res)
	}

	dB.Now = func() time.Time { return time.Now().Add(11 * time.Second) } // the cool-down is over
	if n := dB.DispatchOnce(ctx); n != 1 {
		t.Fatalf("second offer: %d", n)
	}
	b.Wait()
	redriveAll(t, b, storeB, time.Minute)
	c, _ := storeB.Get(ctx, realCallKey)
	res, _ := f.qs.Reserved(ctx, "tenant-1", agent)
	if len(c.Outbox) != 0 {
		t.Errorf("outbox after the re-drive: %+v, want nothing left", c.Outbox)
	}
	if c.State != callstate.StateTransferring || c.Agent != agent {
		t.Fatalf("after the second offer: %s agent %q", c.State, c.Agent)
	}
	if res != realCallKey {
		r, rerr := f.qs.Reserve(ctx, "tenant-1", "q", time.Now().Add(11*time.Second))
		t.Errorf("after the re-drive: call %s is transferring to %s but busy[agent]=%q; next reservation: %+v %v", realCallKey, agent, res, r, rerr)
	}
}

// An ended call's release goes out with the next batch of acknowledgements, after the save that
// ended the call: a reconciler pass reading the record in between took the agent's reservation
// for a stale one and freed the agent at once, as abandoned, keeping their place at the head of
// the idle agents; the release with its outcome (a transfer: the connected guard, while the
// agent talks to the caller) then found nothing to release, and the agent was offered the next
// caller mid-conversation. A release still in the record's outbox is left to it.
func TestReconcilerLeavesAnEndedCallsPendingRelease(t *testing.T) {
	ctx := context.Background()
	f, m, stopAcks := offeredWithBatchHeld(t, "pr")
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	notify(t, m, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":7015}}`))
	mustDo(t, m.Reconcile(ctx)) // before the batch goes out
	stopAcks()
	mustDo(t, f.qs.Enqueue(ctx, "tenant-1", "q", "next-caller", time.Now().UnixMilli()))
	if r, err := f.qs.Reserve(ctx, "tenant-1", "q", time.Now()); err == nil {
		t.Errorf("the agent who took the transfer was reserved for the next caller at once (%v), want them guarded as connected", r)
	}
}

// A release that stays in an ended call's outbox for a whole pass was never carried out (its
// outbox not re-driven: the index entry lost with Redis data): the next pass frees the agent, as
// for any reservation of an ended call, rather than leaving them reserved until the record expires.
func TestReconcilerFreesAnAgentWhoseReleaseStaysPending(t *testing.T) {
	ctx := context.Background()
	f, m, _ := offeredWithBatchHeld(t, "ps")
	notify(t, m, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":7015}}`))
	mustDo(t, m.Reconcile(ctx))
	if r, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); r != realCallKey {
		t.Fatalf("after the first pass the agent is reserved for %q, want still for the ended call (its release on its way)", r)
	}
	mustDo(t, m.Reconcile(ctx))
	if r, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); r != "" {
		t.Errorf("after the second pass the agent is reserved for %q, want freed", r)
	}
}

// offeredWithBatchHeld offers the caller to f's agent on an instance whose batch of
// acknowledgements goes out only when the returned stop is called (or the test ends).
func offeredWithBatchHeld(t *testing.T, prefix string) (f *agentOnRealQueues, m *callstate.Machine, stop func()) {
	t.Helper()
	ctx := context.Background()
	f = newAgentOnRealQueues(t, prefix)
	m, d, _ := f.instance(f.srv.Client(t), &fakeGraph{}, func(c *callstate.Config) { c.Tenants = []string{"tenant-1"} })
	acksCtx, stopAcks := context.WithCancel(ctx)
	acking := make(chan struct{})
	go func() { m.RunAcks(acksCtx, time.Hour); close(acking) }() // the batch goes out when it stops
	stop = sync.OnceFunc(func() { stopAcks(); <-acking })
	t.Cleanup(stop)
	f.queueCaller(m)
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Fatalf("offers %d, want 1", n)
	}
	m.Wait()
	return f, m, stop
}

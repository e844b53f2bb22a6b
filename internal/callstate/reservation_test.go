package callstate_test

import (
	"context"
	"errors"
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
	srv := redistest.Start(t)
	rdb := srv.Client(t) // the dispatcher's and instance B's connection
	rdbA := srv.Client(t)
	hook := &lostReply{}
	rdbA.AddHook(hook)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const agent = "11111111-0000-4000-8000-000000000001"
	qs := queue.NewStore(rdb, "rv")
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(qs.SetMembers(ctx, "tenant-1", "q", []string{agent}))
	must(qs.SetRoutable(ctx, "tenant-1", map[string]bool{agent: true}))
	d := queue.NewDispatcher(qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(t))
	a := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdbA, "rv"), Timers: callstate.NewTimers(rdbA, "rv"),
		Control: &fakeGraph{}, Queues: d, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), Now: time.Now})
	d.Offer = a
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	key := "57dab8b1894c409ab240bd8beae78896"
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if w, _ := qs.Waiting(ctx, "tenant-1", "q"); len(w) != 1 {
		t.Fatalf("waiting %v", w)
	}

	hook.armed.Store(true) // the offer's save is applied, its reply lost
	d.DispatchOnce(ctx)

	storeB := callstate.NewStore(rdb, "rv")
	c, err := storeB.Get(ctx, key)
	must(err)
	res, _ := qs.Reserved(ctx, "tenant-1", agent)
	t.Logf("record: state=%v agent=%s; busy[agent]=%q", c.State, c.Agent, res)

	// instance B re-drives the outbox A left (the transfer never went out)
	gb := &fakeGraph{}
	b := callstate.NewMachine(callstate.Config{Store: storeB, Timers: callstate.NewTimers(rdb, "rv"), Control: gb,
		Queues: d, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), Now: time.Now})
	keys, score, err := storeB.ClaimOutbox(ctx, time.Now().Add(time.Minute), 30*time.Second, 100)
	must(err)
	for _, k := range keys {
		b.Redrive(ctx, k, score)
	}
	b.Wait()
	// meanwhile another caller arrives; the dispatcher takes the first caller again (its offer is
	// ignored: the call is transferring), frees the agent, and reserves the agent for the second
	d.Offer = b
	d.DispatchOnce(ctx)
	must(qs.Enqueue(ctx, "tenant-1", "q", "second-caller", time.Now().UnixMilli()))
	r, err := qs.Reserve(ctx, "tenant-1", "q", time.Now())
	t.Logf("graph commands of B: %q; then reserve: %+v %v", gb.log(), r, err)
	if c.State == callstate.StateTransferring && c.Agent == agent && err == nil && r.Agent == agent {
		t.Errorf("agent %s is reserved for %s while call %s (state %v) is being transferred to them", agent, r.Call, key, c.State)
	}
}

// An instance reserves the agent for the head caller and dies before offering; the caller then
// hangs up. The call ended, so it is no longer live: the reconciler lists no live call of the
// tenant. It used to look only at the reservations of tenants with a live call, so the agent stayed
// reserved for the ended call, however many passes ran, and the next caller got no agent. The
// tenants callbot serves are now checked on every pass.
func TestReservationOfAnEndedCallIsReleased(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const agent = "11111111-0000-4000-8000-000000000001"
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	qs := queue.NewStore(rdb, "rs")
	must(qs.SetMembers(ctx, "tenant-1", "q", []string{agent}))
	must(qs.SetRoutable(ctx, "tenant-1", map[string]bool{agent: true}))
	d := queue.NewDispatcher(qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(t))
	skew := time.Duration(0)
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "rs"), Timers: callstate.NewTimers(rdb, "rs"),
		Control: &fakeGraph{}, Queues: d, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Now: func() time.Time { return time.Now().Add(skew) }, Tenants: []string{"tenant-1"}})
	d.Offer = m
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))

	r, err := qs.Reserve(ctx, "tenant-1", "q", time.Now()) // the instance that does this dies now
	must(err)
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`)) // caller hangs up

	for pass := 1; pass <= 3; pass++ {
		skew = time.Duration(pass) * 6 * time.Minute
		must(m.Reconcile(ctx))
	}
	must(qs.Enqueue(ctx, "tenant-1", "q", "next-caller", time.Now().UnixMilli()))
	_, rerr := qs.Reserve(ctx, "tenant-1", "q", time.Now())
	if res, _ := qs.Reserved(ctx, "tenant-1", agent); res == r.Call {
		t.Errorf("after 3 reconciler passes the agent is still reserved for ended call %s; the next caller's reservation: %v", res, rerr)
	}
}

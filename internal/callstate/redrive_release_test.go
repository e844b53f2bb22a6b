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
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	rdbA := srv.Client(t)
	hook := &dropStorageAck{}
	rdbA.AddHook(hook)
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
	qs := queue.NewStore(rdb, "rr") // FailCooldown 10 s
	must(qs.SetMembers(ctx, "tenant-1", "q", []string{agent}))
	must(qs.SetRoutable(ctx, "tenant-1", map[string]bool{agent: true}))
	newInstance := func(c *redis.Client, d *queue.Dispatcher) (*callstate.Machine, *callstate.Store) {
		st := callstate.NewStore(c, "rr")
		return callstate.NewMachine(callstate.Config{Store: st, Timers: callstate.NewTimers(c, "rr"), Control: &fakeGraph{}, Queues: d,
			Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), Now: time.Now}), st
	}
	dA := queue.NewDispatcher(qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(t))
	a, _ := newInstance(rdbA, dA)
	dA.Offer = a
	dB := queue.NewDispatcher(qs, nil, "tenant-1", []string{"q"}, zaptest.NewLogger(t))
	b, storeB := newInstance(rdb, dB)
	dB.Offer = b

	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	key := "57dab8b1894c409ab240bd8beae78896"
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if n := dA.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers", n)
	}
	a.Wait()
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	hook.armed.Store(true) // the storage ack of the release after the failure is lost
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subCode":7000}}`))
	a.Wait()
	if res, _ := qs.Reserved(ctx, "tenant-1", agent); res != "" {
		t.Fatalf("agent still reserved for %q after the failed transfer", res)
	}

	dB.Now = func() time.Time { return time.Now().Add(11 * time.Second) } // the cool-down is over
	if n := dB.DispatchOnce(ctx); n != 1 {
		t.Fatalf("second offer: %d", n)
	}
	b.Wait()
	c, _ := storeB.Get(ctx, key)
	res, _ := qs.Reserved(ctx, "tenant-1", agent)
	t.Logf("before the re-drive: state=%v agent=%s busy[agent]=%q outbox=%d", c.State, c.Agent, res, len(c.Outbox))

	keys, score, err := storeB.ClaimOutbox(ctx, time.Now().Add(time.Minute), 30*time.Second, 100)
	must(err)
	for _, k := range keys {
		b.Redrive(ctx, k, score)
	}
	b.Wait()
	c, _ = storeB.Get(ctx, key)
	res, _ = qs.Reserved(ctx, "tenant-1", agent)
	if len(c.Outbox) != 0 {
		t.Errorf("outbox after the re-drive: %+v, want nothing left", c.Outbox)
	}
	must(qs.Enqueue(ctx, "tenant-1", "q", "second-caller", time.Now().UnixMilli()))
	r, rerr := qs.Reserve(ctx, "tenant-1", "q", time.Now().Add(11*time.Second))
	if c.State != callstate.StateTransferring || c.Agent != agent {
		t.Fatalf("after the second offer: %s agent %q", c.State, c.Agent)
	}
	if res != key {
		t.Errorf("after the re-drive: call %s is transferring to %s but busy[agent]=%q; next reservation: %+v %v", key, agent, res, r, rerr)
	}
}

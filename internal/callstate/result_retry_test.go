package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"
)

// A Graph command's result that Redis refuses for a moment (down, failing over: on Redis
// Cluster the call's master alone) is applied a moment later. Nothing else would bring it back:
// it is no notification that Graph delivers again after a 503. Before, it was logged and
// dropped: a refused transfer left the caller transferring, in silence and in no queue, and the
// agent reserved, until the transfer's timer, 90 s on (the Redis Cluster failover soak, a
// transfer failure read from Graph during the outage).
func TestCommandResultRedisRefusesIsAppliedAMomentLater(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	hook := &failSave{kind: string(callstate.TimerHold)}
	rdb.AddHook(hook)
	g := &fakeGraph{fail: map[string]error{"transfer": &graph.Error{Op: "transfer", Status: 403}}}
	q := &fakeQueues{}
	m := instance(t, rdb, "rr", g, q, nil)
	id := "0f4c2a9e-5b1d-4e7a-9c3f-8d2b6a1e4c70"
	queuedCall(t, m, id)
	// Graph refuses the transfer; the save of that result (the caller back in the queue, the hold
	// music and its timer) fails once, as with the call's master down
	hook.armed.Store(true)
	offeredToAgentA(t, m, id) // waits for the call's commands and what they fed back
	if hook.armed.Load() {
		t.Fatal("the save of the refused transfer's result never failed: the test proves nothing")
	}
	c, err := callstate.NewStore(srv.Client(t), "rr").Get(context.Background(), graph.CallKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if c.State != callstate.StateQueued || !slices.Contains(q.snapshot(), "release agent-a failed") {
		t.Errorf("after the refused transfer: %s, queue ops %v; want the caller back in the queue and agent-a released as failed", c.State, q.snapshot())
	}
}

// A call's removal from the live calls goes behind the save that ended it and can fail alone
// (on Redis Cluster its master down while the call's served): the save's error has Graph deliver
// the notification again, and that delivery, ignored by the ended record, removes it. Before,
// the entry stayed until the reconciler's pass (the cluster failover soak, seed 7).
func TestEndedCallLeftInTheLiveSetLeavesItWhenItsEndComesAgain(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "lv", &fakeGraph{}, &fakeQueues{}, nil)
	store := callstate.NewStore(rdb, "lv")
	id := "3e8b1c52-7a4d-4f19-b6e0-c2d95a7f1e38"
	queuedCall(t, m, id)
	ended := note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`)
	notify(t, m, ended)
	m.Wait()
	ctx := context.Background()
	if keys := liveCalls(t, store); len(keys) != 0 {
		t.Fatalf("live calls after the end: %v, want none", keys)
	}
	// as if the removal had failed behind the save that ended the call
	if err := rdb.ZAdd(ctx, "lv:{active}", redis.Z{Score: float64(time.Now().UnixMilli()), Member: graph.CallKey(id)}).Err(); err != nil {
		t.Fatal(err)
	}
	m2 := instance(t, rdb, "lv", &fakeGraph{}, &fakeQueues{}, nil) // another instance: no cached copy
	notify(t, m2, ended)
	m2.Wait()
	if keys := liveCalls(t, store); len(keys) != 0 {
		t.Errorf("live calls after the end delivered again: %v, want none", keys)
	}
}

// A create writes the call's entry in the live calls ahead of its record; on Redis Cluster the
// record's master can refuse the write (down) while the entry's takes it. Graph then gives up
// delivering the incoming call, and reports its end: that end, for a call with no record, was
// ignored, and the entry stayed until the reconciler's pass (the cluster failover soak). It now
// removes the entry, or, Redis refusing the removal, is refused (503) to be delivered again.
func TestLiveEntryOfACallNeverCreatedLeavesWithItsEnd(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	hook := &failZRem{}
	rdb.AddHook(hook)
	m := instance(t, rdb, "nc", &fakeGraph{}, &fakeQueues{}, nil)
	store := callstate.NewStore(srv.Client(t), "nc")
	id := "5c0e7d21-9a3b-4e6f-8d14-b2a9c7e05f61"
	ctx := context.Background()
	if err := rdb.ZAdd(ctx, "nc:{active}", redis.Z{Score: float64(time.Now().UnixMilli()), Member: graph.CallKey(id)}).Err(); err != nil {
		t.Fatal(err)
	}
	ended := note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`)
	hook.fail.Store(true)
	if err := deliver(m, ended); !errors.Is(err, graph.ErrUnavailable) {
		t.Errorf("the end of a call with no record, its removal refused: %v, want ErrUnavailable (503: delivered again)", err)
	}
	if keys := liveCalls(t, store); len(keys) != 1 {
		t.Fatalf("live calls after a refused removal: %v, want the entry kept for the next delivery", keys)
	}
	hook.fail.Store(false)
	if err := deliver(m, ended); err != nil {
		t.Fatal(err)
	}
	if keys := liveCalls(t, store); len(keys) != 0 {
		t.Errorf("live calls after the end of a call with no record: %v, want none", keys)
	}
	if _, err := store.Get(ctx, graph.CallKey(id)); !errors.Is(err, callstate.ErrNotFound) {
		t.Errorf("the end of a call with no record made one: %v", err)
	}
}

// liveCalls lists the calls in store's set of live calls.
func liveCalls(t *testing.T, store *callstate.Store) []string {
	t.Helper()
	keys, err := store.Live(context.Background(), time.Now().Add(time.Hour), 10)
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// failZRem is a go-redis hook that, while fail is set, refuses every ZREM sent alone (a master
// down that holds the live calls, the record's answering).
type failZRem struct{ fail atomic.Bool }

func (h *failZRem) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *failZRem) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if h.fail.Load() && cmd.Name() == "zrem" {
			cmd.SetErr(errDown)
			return errDown
		}
		return next(ctx, cmd)
	}
}
func (h *failZRem) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// applyThenFail is a Redis that applies a save whose pipeline arms a timer of kind and then
// reports an error, as a reply lost or replicas that did not confirm it (ErrNotReplicated): the
// change is on the master. meanwhile runs, once, before the error is returned.
type applyThenFail struct {
	armed     atomic.Bool
	kind      string
	meanwhile func()
}

func (h *applyThenFail) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *applyThenFail) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *applyThenFail) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if args := cmd.Args(); len(args) == 4 && cmd.Name() == "zadd" && strings.Contains(fmt.Sprint(args[3]), "|"+h.kind+"|") &&
				h.armed.CompareAndSwap(true, false) {
				if err := next(ctx, cmds); err != nil {
					return err
				}
				h.meanwhile()
				return context.DeadlineExceeded
			}
		}
		return next(ctx, cmds)
	}
}

// A refused transfer's result whose save reached Redis but answered with an error (a reply
// lost, replicas that did not confirm it) is applied again a moment later: by then the caller,
// back in the queue on the master, may be transferring to another agent, offered by another
// instance. The failure, which says nothing of which transfer it is, must not be taken for that
// one's: it released agent-b as failed and put the caller back in the queue while Graph
// transferred them to agent-b (the caller offered to a third agent meanwhile).
func TestTransferFailureAppliedAgainDoesNotFailTheNextTransfer(t *testing.T) {
	srv := redistest.Start(t)
	rdbA := srv.Client(t)
	gB, qB := &fakeGraph{}, &fakeQueues{}
	b := instance(t, srv.Client(t), "ra", gB, qB, nil)
	id := "7d2f9c41-3b8e-4a6d-9f15-0c4e8b2a7d93"
	key := graph.CallKey(id)
	hook := &applyThenFail{kind: string(callstate.TimerHold), meanwhile: func() {
		// instance B offers the caller, back in the queue on the master, to agent-b
		if ok, err := b.Offer(context.Background(), "tenant-1", key, "agent-b"); !ok || err != nil {
			t.Errorf("B's offer to agent-b: %v %v", ok, err)
		}
		b.Wait()
	}}
	rdbA.AddHook(hook)
	gA := &fakeGraph{fail: map[string]error{"transfer": &graph.Error{Op: "transfer", Status: 403}}}
	qA := &fakeQueues{}
	a := instance(t, rdbA, "ra", gA, qA, nil)
	queuedCall(t, a, id)
	hook.armed.Store(true)
	offeredToAgentA(t, a, id) // agent-a's transfer refused; its result saved, answered with an error
	if hook.armed.Load() {
		t.Fatal("the save of the refused transfer's result never failed: the test proves nothing")
	}
	c, err := callstate.NewStore(srv.Client(t), "ra").Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != callstate.StateTransferring || c.Agent != "agent-b" {
		t.Errorf("after agent-a's refused transfer and agent-b's offer: %s with %q; want transferring to agent-b", c.State, c.Agent)
	}
	for _, op := range append(qA.snapshot(), qB.snapshot()...) {
		if strings.Contains(op, "agent-b") {
			t.Errorf("queue op %q: agent-b's transfer was failed by agent-a's refusal", op)
		}
	}
}

// A new call whose record Redis took but its replicas did not confirm in time (refused as
// unreplicated: 503, Graph delivers the notification again) has its answer re-driven as soon as
// the replicas have the record, not a whole outbox lease later: the instance that saved it does
// not send it, and the instance that acknowledges the notification delivered again finds the
// record already there and sends nothing. Before, the answer waited for the lease: 6 to 10 s
// late in the Sentinel soak, where Graph drops a call not answered in 15 s.
func TestCommandsOfASaveRefusedAsUnreplicatedAreRedrivenSoon(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	rep := &fakeReplica{}
	rdb.AddHook(rep)
	g := &fakeGraph{state: graph.CallIncoming} // Graph has not been answered
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	store := callstate.NewStore(rdb, "nr")
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "nr"), Control: g,
		Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), OutboxLease: 8 * time.Second})
	store.WaitForReplicas(1, 20*time.Millisecond)
	id := "6a1f3c2e-8b7d-4e59-a0c4-d3b2e1f09a87"
	rep.cut.Store(true)
	ns, err := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Notify(context.Background(), "tenant-1", ns); err == nil || !strings.Contains(err.Error(), callstate.ErrNotReplicated.Error()) {
		t.Fatalf("notification with the replica cut: %v, want refused as unreplicated", err)
	}
	m.Wait()
	if n := countPrefix(g.log(), "answer"); n != 0 {
		t.Fatalf("%d answers sent by the instance whose save was refused, want none", n)
	}
	// RunOutbox's look a second later, not a lease: the replica still lacks the record (a new
	// master without its replica yet), so nothing is sent, and the outbox is due again a second on
	redriveAll(t, m, store, time.Second)
	if n := countPrefix(g.log(), "answer"); n != 0 {
		t.Fatalf("%d answers re-driven before the replicas had the record, want none", n)
	}
	rep.cut.Store(false)
	redriveAll(t, m, store, 3*time.Second)
	if n := countPrefix(g.log(), "answer "+id+" https://"); n != 1 {
		t.Errorf("answers after the re-drive once the replica has the record: %d (log %v), want 1", n, g.log())
	}
}

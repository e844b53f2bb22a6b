package callstate_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// outage makes every command of the client it hooks fail while on, as a Redis master that is
// down (or failing over) does.
type outage struct{ on atomic.Bool }

func (o *outage) DialHook(next redis.DialHook) redis.DialHook { return next }
func (o *outage) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if o.on.Load() {
			cmd.SetErr(errDown)
			return errDown
		}
		return next(ctx, cmd)
	}
}
func (o *outage) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if o.on.Load() {
			for _, cmd := range cmds {
				cmd.SetErr(errDown)
			}
			return errDown
		}
		return next(ctx, cmds)
	}
}

// downable is the client of a Redis of the test's own, with its outage switch.
func downable(t *testing.T) (*redis.Client, *outage) {
	rdb := redistest.Start(t).Client(t)
	down := &outage{}
	rdb.AddHook(down)
	return rdb, down
}

// refused delivers payload to m and wants it refused as Redis's (503, for Graph to deliver
// again).
func refused(t *testing.T, m *callstate.Machine, payload string) {
	t.Helper()
	ns, err := graph.Decode([]byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Notify(context.Background(), "tenant-1", ns); !errors.Is(err, graph.ErrUnavailable) {
		t.Fatalf("notification during the outage: %v, want it refused as unavailable", err)
	}
}

// runKept runs m's RunKept until the test ends.
func runKept(t *testing.T, m *callstate.Machine) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunKept(ctx, 10*time.Millisecond); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal(what)
		}
	}
}

const keptIncoming = `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`

// An incoming call Redis refused (a master down through Graph's retries: a Redis Cluster election
// outlasted graphsim's, and the caller was never answered) is kept and created, and the call
// answered, once Redis takes it, whether or not Graph delivers it again. Graph's repeats during
// the outage are kept once.
func TestIncomingRedisRefusedIsAnsweredWithoutGraphDeliveringItAgain(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	down := &outage{}
	rdb.AddHook(down)
	g := &fakeGraph{}
	m := instance(t, rdb, "kp", g, &fakeQueues{}, nil)
	id := "6a1f3c9e-2b7d-4e58-a0c4-9d3e7b2f1a65"
	down.on.Store(true)
	for range 3 { // Graph's first delivery and two repeats, all refused
		refused(t, m, note("created", id, keptIncoming))
	}
	if n, k := m.Keeping(), m.Kept.Load(); n != 1 || k != 1 {
		t.Fatalf("kept during the outage: %d held, %d counted; want the incoming once", n, k)
	}
	runKept(t, m)
	time.Sleep(300 * time.Millisecond) // attempts during the outage change nothing
	if slices.ContainsFunc(g.log(), func(s string) bool { return strings.HasPrefix(s, "answer") }) {
		t.Fatal("answered while Redis refused the call's record")
	}
	down.on.Store(false) // Redis back; Graph has given up
	eventually(t, "the kept incoming was never answered once Redis was back", func() bool {
		return slices.ContainsFunc(g.log(), func(s string) bool { return strings.HasPrefix(s, "answer "+id) })
	})
	c, err := callstate.NewStore(srv.Client(t), "kp").Get(context.Background(), graph.CallKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if c.State != callstate.StateAnswering {
		t.Errorf("call after the kept incoming: %s, want answering", c.State)
	}
	eventually(t, "the incoming still kept after it was applied", func() bool { return m.Keeping() == 0 })
	if a := m.KeptApplied.Load(); a != 1 {
		t.Errorf("kept notifications applied: %d, want 1", a)
	}
}

// A key press kept and delivered again by Graph as well takes effect once: the kept copy, applied
// after Graph's, is ignored (its sequenceId is the call's last).
func TestKeptKeyPressDeliveredAgainByGraphTakesEffectOnce(t *testing.T) {
	rdb, down := downable(t)
	q := &fakeQueues{}
	m := instance(t, rdb, "kt", &fakeGraph{}, q, nil)
	id := "b3e9d2a1-7c4f-4a6b-8e15-2f9c0d7a3b48"
	notify(t, m, note("created", id, keptIncoming))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	key1 := note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
	down.on.Store(true)
	refused(t, m, key1)
	down.on.Store(false)
	notify(t, m, key1) // Graph's repeat, taken
	runKept(t, m)
	eventually(t, "the key press still kept after Graph's repeat was taken", func() bool { return m.Keeping() == 0 })
	m.Wait()
	enqueued := 0
	for _, op := range q.snapshot() {
		if strings.HasPrefix(op, "enqueue") {
			enqueued++
		}
	}
	if enqueued != 1 || m.KeptApplied.Load() != 0 {
		t.Errorf("queue ops %v, kept applied %d: want the caller queued once, by Graph's repeat", q.snapshot(), m.KeptApplied.Load())
	}
}

// Only notifications whose repeat is harmless whenever it comes are kept: not a transfer's
// intermediate state, and not a key press without a sequenceId, which cannot be told from a new
// one.
func TestNotificationsNotKept(t *testing.T) {
	rdb, down := downable(t)
	m := instance(t, rdb, "kn", &fakeGraph{}, &fakeQueues{}, nil)
	id := "0d4b8e2f-9a3c-4f71-b6d5-e8a2c1f7094b"
	queuedCall(t, m, id)
	down.on.Store(true)
	refused(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferAccepted"}`))
	refused(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"tone":"tone2"}}`))
	if n := m.Keeping(); n != 0 {
		t.Errorf("kept: %d, want none", n)
	}
}

// A transfer's failure Redis refused (an agent let the call ring out while the call's master
// failed over) is kept: applied once Redis is back, it has callbot read the call, which takes the
// caller back to the queue. Before, the caller waited in silence for the transfer's timer, 90 s
// (the cluster failover soak with cluster-node-timeout 2 s).
func TestKeptTransferFailureTakesTheCallerBackToTheQueue(t *testing.T) {
	rdb, down := downable(t)
	g := &fakeGraph{}
	clock := &skewClock{}
	m := instance(t, rdb, "kf", g, &fakeQueues{}, clock.now)
	id := "3a8f2c6d-1e4b-4d97-b0a5-6c2e9f4d1b83"
	key := offeredToAgentA(t, m, id)
	down.on.Store(true)
	refused(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subcode":7000,"message":"Call transfer failed: not answered."}}`))
	down.on.Store(false)
	runKept(t, m)
	eventually(t, "the kept transfer failure did not have the call read", func() bool { return slices.Contains(g.log(), "get") })
	// Graph says established so soon after the transfer request: looked at again 5 s later
	// (transferRecheck), and that look settles it
	ctx, cancel := context.WithCancel(context.Background())
	timing := make(chan struct{})
	go func() { m.RunTimers(ctx, 10*time.Millisecond); close(timing) }()
	defer func() { cancel(); <-timing }()
	clock.add(6 * time.Second)
	store := callstate.NewStore(rdb, "kf")
	eventually(t, "the caller was not taken back to the queue after the kept transfer failure", func() bool {
		c, err := store.Get(context.Background(), key)
		return err == nil && c.State == callstate.StateQueued
	})
	m.Wait()
}

// A caller who hangs up while their incoming is kept is not answered: the end, for a call with
// no record, stops the keeping.
func TestKeptIncomingOfACallerWhoHungUpIsDropped(t *testing.T) {
	rdb, down := downable(t)
	g := &fakeGraph{}
	m := instance(t, rdb, "kh", g, &fakeQueues{}, nil)
	id := "9e2c7a4b-1f6d-4b3e-a85c-3d0f9b6e2a17"
	down.on.Store(true)
	refused(t, m, note("created", id, keptIncoming))
	down.on.Store(false)
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`))
	if n := m.Keeping(); n != 0 {
		t.Fatalf("kept after the caller's end: %d, want none", n)
	}
	runKept(t, m)
	time.Sleep(100 * time.Millisecond)
	m.Wait()
	if len(g.log()) != 0 {
		t.Errorf("Graph commands for a caller who hung up ringing: %v, want none", g.log())
	}
}

// An instance that stops while Redis still refuses what it keeps tries it once more, then gives
// it up (counted), and RunKept returns.
func TestKeptGivenUpWhenTheInstanceStops(t *testing.T) {
	rdb, down := downable(t)
	m := instance(t, rdb, "ks", &fakeGraph{}, &fakeQueues{}, nil)
	down.on.Store(true)
	refused(t, m, note("created", "4f8a2d6c-3b1e-4c97-a0d5-7e9b2c4f1a83", keptIncoming))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunKept(ctx, 10*time.Millisecond); close(done) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	<-done
	if n, g := m.Keeping(), m.KeptGivenUp.Load(); n != 0 || g != 1 {
		t.Errorf("after the stop: %d kept, %d given up; want 0 and 1", n, g)
	}
}

// A notification kept for as long as Graph's answer deadline is given up without another
// attempt: an incoming created then would ring nobody (Graph has dropped the call), and a key
// press would come long after the caller's choice.
func TestKeptGivenUpAfterTheAnswerDeadline(t *testing.T) {
	rdb, down := downable(t)
	clock := &skewClock{}
	g := &fakeGraph{}
	m := instance(t, rdb, "kd", g, &fakeQueues{}, clock.now)
	down.on.Store(true)
	refused(t, m, note("created", "7b3d9e1f-4a2c-4e86-b5d0-1c9f8a3e6d24", keptIncoming))
	down.on.Store(false)
	clock.add(16 * time.Second)
	runKept(t, m)
	eventually(t, "the incoming still kept past the answer deadline", func() bool { return m.Keeping() == 0 })
	m.Wait()
	if n, a := m.KeptGivenUp.Load(), m.KeptApplied.Load(); n != 1 || a != 0 || len(g.log()) != 0 {
		t.Errorf("past the deadline: %d given up, %d applied, Graph commands %v; want 1, 0 and none", n, a, g.log())
	}
}

// An incoming delivered again after its call ended (late from Graph, or kept by another instance
// while Redis refused it, as in the cluster failover soak) leaves the call out of the live calls:
// its create writes the live entry ahead of the record it finds. Before, the ended call stayed
// listed live until the reconciler's pass.
func TestIncomingRepeatedAfterTheEndLeavesNoLiveEntry(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "ke", &fakeGraph{}, &fakeQueues{}, nil)
	store := callstate.NewStore(rdb, "ke")
	id := "c41e7a9d-5b2f-4e83-9d16-0a7f3c8e2b54"
	queuedCall(t, m, id)
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`))
	notify(t, m, note("created", id, keptIncoming))
	if keys := liveCalls(t, store); len(keys) != 0 {
		t.Errorf("live calls after the incoming came again past the end: %v, want none", keys)
	}
}

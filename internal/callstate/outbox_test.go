package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

type failingQueues struct{ fakeQueues }

func (q *failingQueues) Enqueue(context.Context, string, string, string, int64) error {
	return errors.New("redis went away")
}

// Two instances share one Redis. Instance A saves a decision and dies before carrying it out;
// instance B, once A's lease has run out, re-drives what A left: storage commands again, a
// command that acts on the call only after asking Graph whether it already took effect.
// redriveAll re-drives, on m, every outbox whose lease has run out skew from now (as RunOutbox
// would), and waits for m's Graph commands.
func redriveAll(t *testing.T, m *callstate.Machine, store *callstate.Store, skew time.Duration) {
	t.Helper()
	ctx := context.Background()
	keys, score, err := store.ClaimOutbox(ctx, time.Now().Add(skew), 30*time.Second, 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		m.Redrive(ctx, k, score)
	}
	m.Wait()
}

func TestOutboxRedrivenByAnotherInstance(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	newInstance := func(g *fakeGraph, q callstate.Queues, skew time.Duration) (*callstate.Machine, *callstate.Store) {
		store := callstate.NewStore(rdb, "ob")
		return callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "ob"), Control: g, Queues: q,
			Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
			Now: func() time.Time { return time.Now().Add(skew) }}), store
	}
	ctx := context.Background()
	apply := func(m *callstate.Machine, id, data string) {
		ns, err := graph.Decode([]byte(note("updated", id, data)))
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Notify(ctx, "t1", ns); err != nil {
			t.Fatal(err)
		}
	}

	for _, c := range []struct {
		name       string
		graphState graph.CallState // where Graph has the call when B asks
		getFails   bool            // Graph cannot be read
		want       []string
		skipped    int64 // counted as shown done by Graph (callbot_outbox_skipped_total)
	}{
		{"answer never reached Graph", graph.CallIncoming, false, []string{"get", "answer c-%s https://bot.test/api/calls"}, 0},
		{"answer took effect before A died", graph.CallEstablished, false, []string{"get"}, 1},
		// when in doubt callbot does not answer twice (the answer timer asks Graph again), and
		// does not count the answer as shown done
		{"Graph cannot be read", "unreadable", true, []string{"get"}, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			id := "c-" + string(c.graphState)
			hung := &fakeGraph{block: make(chan struct{})}
			a, _ := newInstance(hung, &fakeQueues{}, 0)
			defer func() { close(hung.block); a.Wait() }() // A's goroutines end before the test does
			ns, _ := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
			if err := a.Notify(ctx, "t1", ns); err != nil {
				t.Fatal(err)
			}
			// A hangs in its answer request; B looks before the lease ran out, then after
			g := &fakeGraph{state: c.graphState}
			if c.getFails {
				g.fail = map[string]error{"get": &graph.Error{Op: "getCall", Status: 503}}
			}
			b, storeB := newInstance(g, &fakeQueues{}, 0)
			redriveAll(t, b, storeB, 0)
			if len(g.log()) != 0 {
				t.Fatalf("B acted within A's lease: %v", g.log())
			}
			redriveAll(t, b, storeB, time.Minute)
			want := make([]string, len(c.want))
			for i, w := range c.want {
				want[i] = w
				if i == 1 {
					want[i] = "answer " + id + " https://bot.test/api/calls"
				}
			}
			if diff := cmp.Diff(g.log(), want); diff != "" {
				t.Fatalf("B's graph commands (-got +want):\n%s", diff)
			}
			if got := b.Skipped.Load(); got != c.skipped {
				t.Errorf("skipped %d, want %d", got, c.skipped)
			}
			// done: another pass finds nothing to do
			redriveAll(t, b, storeB, 2*time.Minute)
			if diff := cmp.Diff(g.log(), want); diff != "" {
				t.Errorf("second pass sent more (-got +want):\n%s", diff)
			}
		})
	}

	t.Run("queue write lost with A", func(t *testing.T) {
		id := "c-queue"
		ga := &fakeGraph{}
		a, _ := newInstance(ga, &failingQueues{}, 0)
		ns, _ := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		a.Notify(ctx, "t1", ns)
		apply(a, id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`)
		apply(a, id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
		a.Wait()
		qb := &fakeQueues{}
		b, storeB := newInstance(&fakeGraph{}, qb, 0)
		redriveAll(t, b, storeB, time.Minute)
		if diff := cmp.Diff(qb.ops, []string{"enqueue q"}); diff != "" {
			t.Errorf("B's queue writes (-got +want):\n%s", diff)
		}
		if b.Redriven.Load() == 0 {
			t.Error("nothing counted as re-driven")
		}
	})
}

// At start-up (and periodically) the reconciler closes calls Graph no longer knows, keeps long
// calls alive, and forgets ended ones.
func TestReconcile(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, _ := ivr.Parse([]byte(flowYAML), "t.yaml")
	ctx := context.Background()
	skew := time.Duration(0)
	g := &fakeGraph{}
	store := callstate.NewStore(rdb, "rc")
	var ended []string
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "rc"), Control: g, Queues: &fakeQueues{},
		Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Now: func() time.Time { return time.Now().Add(skew) }, OnEnd: func(c callstate.Call) { ended = append(ended, c.Outcome) }})
	for _, id := range []string{"gone-call", "long-call"} {
		ns, _ := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		if err := m.Notify(ctx, "t1", ns); err != nil {
			t.Fatal(err)
		}
	}
	m.Wait()
	if live, _ := store.Live(ctx, time.Now().Add(time.Hour), 10); len(live) != 2 {
		t.Fatalf("live calls %v, want 2", live)
	}
	// a minute later Graph has forgotten every call: both are closed and counted
	skew = 2 * time.Minute
	g.mu.Lock()
	g.state, g.calls = "gone", nil
	g.mu.Unlock()
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if m.Closed.Load() != 2 || len(ended) != 2 {
		t.Errorf("closed %d, ended %v; want both calls closed", m.Closed.Load(), ended)
	}
	if live, _ := store.Live(ctx, time.Now().Add(time.Hour), 10); len(live) != 0 {
		t.Errorf("live calls after reconcile %v, want none", live)
	}
}

func TestReconcileKeepsLongCallsAlive(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, _ := ivr.Parse([]byte(flowYAML), "t.yaml")
	ctx := context.Background()
	skew := time.Duration(0)
	g := &fakeGraph{}
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "ka"), Timers: callstate.NewTimers(rdb, "ka"), Control: g,
		Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Now: func() time.Time { return time.Now().Add(skew) }})
	ns, _ := graph.Decode([]byte(note("created", "long", `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
	m.Notify(ctx, "t1", ns)
	m.Wait()
	skew = 16 * time.Minute
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if got := g.log(); got[len(got)-1] != "keepAlive" {
		t.Errorf("graph commands %v, want a keepAlive for a 16-minute call", got)
	}
}

// A call callbot is hanging up (its hangups refused or failing: terminating) gets no keepAlive,
// however long it lasts: Graph's 45-minute drop of a call without one is the backstop that ends
// it. It is still read, so that one Graph has ended is closed. Before, the reconciler kept such
// a call alive every pass, the caller in silence after the goodbye until they hung up.
func TestReconcileKeepsNoCallBeingHungUpAlive(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	g := &fakeGraph{}
	m := instance(t, rdb, "kh", g, &fakeQueues{}, func() time.Time { return time.Now().Add(16 * time.Minute) })
	c := &callstate.Call{ID: "hanging", Tenant: "t1", State: callstate.StateTerminating, CreatedAt: time.Now()}
	if err := callstate.NewStore(rdb, "kh").Create(ctx, c, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if got := g.log(); !slices.Equal(got, []string{"get"}) {
		t.Errorf("graph commands %v for a 16-minute call being hung up, want a read and no keepAlive", got)
	}
}

// Two instances: A created the call and caches it; B applies the next notification. A must not
// ignore the one after on its stale copy (answering), but decide on the record in Redis.
func TestStaleCacheDoesNotIgnoreEvents(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, _ := ivr.Parse([]byte(flowYAML), "t.yaml")
	ctx := context.Background()
	newInstance := func(g *fakeGraph) *callstate.Machine {
		return callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "sc"), Timers: callstate.NewTimers(rdb, "sc"), Control: g,
			Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
	}
	ga, gb := &fakeGraph{}, &fakeGraph{}
	a, b := newInstance(ga), newInstance(gb)
	notify(t, a, note("created", "c1", `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, b, note("updated", "c1", `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	ok, err := a.Handle(ctx, "tenant-1", "c1", callstate.Event{Kind: callstate.EvTone, Digit: "1", Seq: 1})
	if err != nil || !ok {
		t.Fatalf("tone on the instance with a stale copy: applied=%v err=%v, want applied", ok, err)
	}
	a.Wait()
	if got := ga.log(); got[len(got)-1] != "playPrompt hold" {
		t.Errorf("instance A's commands %v, want the caller queued with hold music", got)
	}
}

// The reconciler repairs what a failure between two Redis writes can leave: a queued caller
// missing from its queue, an agent reserved for a call that ended or whose offer was lost.
func TestReconcileRepairsQueuesAndReservations(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, _ := ivr.Parse([]byte(flowYAML), "t.yaml")
	ctx := context.Background()
	skew := time.Duration(0)
	q := &fakeQueues{}
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "rq"), Timers: callstate.NewTimers(rdb, "rq"), Control: &fakeGraph{},
		Queues: q, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Now: func() time.Time { return time.Now().Add(skew) }})
	notify(t, m, note("created", "queued", `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", "queued", `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", "queued", `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	q.mu.Lock()
	q.ops = nil
	q.reserved = map[string]string{"agent-lost-offer": "queued", "agent-of-ended-call": "nosuchcall"}
	q.mu.Unlock()
	skew = 2 * time.Minute
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(q.ops, []string{"enqueue q", "release agent-of-ended-call abandoned"}); diff != "" {
		t.Errorf("first pass (-got +want):\n%s", diff)
	}
	q.mu.Lock()
	q.ops = nil
	q.mu.Unlock()
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	// still reserved for a caller that is still queued: the offer was lost, free the agent
	if diff := cmp.Diff(q.ops, []string{"enqueue q", "release agent-lost-offer abandoned"}); diff != "" {
		t.Errorf("second pass (-got +want):\n%s", diff)
	}
}

func TestLeaseHeldByOneInstance(t *testing.T) {
	store := callstate.NewStore(redistest.Start(t).Client(t), "ls")
	ctx := context.Background()
	for _, c := range []struct {
		holder string
		want   bool
	}{{"a", true}, {"b", false}, {"a", true}} {
		if got, err := store.TryLease(ctx, "reconcile", c.holder, time.Minute); err != nil || got != c.want {
			t.Errorf("TryLease(%s) = %v, %v; want %v", c.holder, got, err, c.want)
		}
	}
}

// With RunAcks, acknowledgements are written in batches; once written, a record's outbox is
// empty, and nothing is left for another instance to re-drive.
func TestBatchedAcks(t *testing.T) {
	g, q := &fakeGraph{}, &fakeQueues{}
	m, store := newMachine(t, g, q)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunAcks(ctx, 10*time.Millisecond); close(done) }()
	for i := range 5 {
		id := fmt.Sprintf("batched-%d", i)
		notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
		notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
		notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	}
	cancel()
	<-done
	for i := range 5 {
		c, err := store.Get(context.Background(), fmt.Sprintf("batched%d", i))
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Outbox) != 0 {
			t.Errorf("call %d: %d commands still unacknowledged after the batches were written: %+v", i, len(c.Outbox), c.Outbox)
		}
	}
}

// A claim's DoneOutbox removes the index entry it claimed, not one a save re-leased since, even
// in the same millisecond.
func TestDoneOutboxKeepsAReLease(t *testing.T) {
	store, c, now := createWithOutbox(t)
	ctx := context.Background()
	keys, score, err := store.ClaimOutbox(ctx, now, 0, 10) // the claim's lease ends in this very millisecond
	if err != nil || len(keys) != 1 {
		t.Fatalf("claim: %v %v", keys, err)
	}
	if err := store.Save(ctx, c, now); err != nil { // re-leased until the same millisecond
		t.Fatal(err)
	}
	if err := store.DoneOutbox(ctx, "c1", score); err != nil {
		t.Fatal(err)
	}
	if keys, _, _ := store.ClaimOutbox(ctx, now.Add(time.Minute), time.Minute, 10); len(keys) != 1 {
		t.Errorf("the save's index entry was removed by an older claim: %v", keys)
	}
}

// RunOutbox's sweep of a claimed batch: Pending tells the calls with commands left from those
// done with or without a record, in one read, and DoneOutboxes removes the index entries of the
// latter that are still at the claim's score (one a save re-leased since stays).
func TestPendingAndDoneOutboxes(t *testing.T) {
	store, _, now := createWithOutbox(t) // c1: one command not acknowledged
	ctx := context.Background()
	done := &callstate.Call{ID: "c2", Tenant: "t", State: callstate.StateQueued, CreatedAt: now,
		Outbox: []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdEnqueue, Queue: "q"}}}}
	releasedSince := &callstate.Call{ID: "c3", Tenant: "t", State: callstate.StateQueued, CreatedAt: now, Outbox: done.Outbox}
	for _, x := range []*callstate.Call{done, releasedSince} {
		if err := store.Create(ctx, x, now); err != nil {
			t.Fatal(err)
		}
	}
	if err := store.AckMany(ctx, callstate.Ack{Call: "c2", Seq: 1}, callstate.Ack{Call: "c3", Seq: 1}); err != nil {
		t.Fatal(err)
	}
	keys, score, err := store.ClaimOutbox(ctx, now.Add(time.Minute), 0, 10)
	if err != nil || len(keys) != 3 {
		t.Fatalf("claim: %v %v", keys, err)
	}
	pending, err := store.Pending(ctx, []string{"c1", "c2", "c3", "no-record"})
	if err != nil || !slices.Equal(pending, []bool{true, false, false, false}) {
		t.Fatalf("Pending = %v %v, want only c1", pending, err)
	}
	releasedSince.State = callstate.StateTerminated
	if err := store.Save(ctx, releasedSince, now.Add(time.Minute)); err != nil { // a save leases c3 again
		t.Fatal(err)
	}
	if err := store.DoneOutboxes(ctx, []string{"c2", "c3"}, score); err != nil {
		t.Fatal(err)
	}
	left, _, err := store.ClaimOutbox(ctx, now.Add(time.Hour), time.Minute, 10)
	slices.Sort(left)
	if err != nil || !slices.Equal(left, []string{"c1", "c3"}) {
		t.Errorf("index after DoneOutboxes: %v %v, want c1 (pending) and c3 (saved since the claim)", left, err)
	}
}

// An instance carrying out a command that takes longer than the outbox lease (Graph is slow)
// renews the lease while it lives, so no other instance re-drives the command meanwhile (a
// second answer, a prompt played twice); once it dies, the lease runs out and another instance
// re-drives what it left, a lease later.
func TestSlowCommandKeepsItsLeaseWhileItsInstanceLives(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	const lease = 400 * time.Millisecond
	newInstance := func(g *fakeGraph) *callstate.Machine {
		store := callstate.NewStore(rdb, "ol")
		return callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "ol"), Control: g, Queues: &fakeQueues{},
			Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), OutboxLease: lease})
	}
	run := func(m *callstate.Machine) (stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { m.RunOutbox(ctx, 50*time.Millisecond); close(done) }()
		return func() { cancel(); <-done }
	}
	incoming := func(m *callstate.Machine, id string) {
		ns, err := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Notify(context.Background(), "t1", ns); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("alive", func(t *testing.T) {
		slow := &fakeGraph{block: make(chan struct{})}
		a := newInstance(slow)
		stopA := run(a)
		defer stopA()
		gb := &fakeGraph{state: graph.CallIncoming}
		stopB := run(newInstance(gb))
		defer stopB()
		incoming(a, "c-slow")
		time.Sleep(5 * lease) // Graph takes five leases to answer
		if got := a.Carrying(); len(got) != 1 || got[0] != graph.CallKey("c-slow") {
			t.Errorf("A carries %v, want [%s]", got, graph.CallKey("c-slow"))
		}
		close(slow.block)
		a.Wait()
		time.Sleep(2 * lease)
		if got := gb.log(); len(got) != 0 {
			t.Fatalf("B re-drove a command A was still carrying out: %v", got)
		}
		if got := a.Carrying(); len(got) != 0 {
			t.Errorf("A still carries %v after its answer was acknowledged", got)
		}
		if got := slow.log(); len(got) != 1 {
			t.Errorf("Graph got %v from A, want one answer", got)
		}
	})

	t.Run("dead", func(t *testing.T) {
		hung := &fakeGraph{block: make(chan struct{})}
		a := newInstance(hung)
		defer func() { close(hung.block); a.Wait() }() // A's hung answer returns before the test ends
		stopA := run(a)
		incoming(a, "c-dead")
		stopA() // A dies: its answer never returns, and nothing renews its lease
		gb := &fakeGraph{state: graph.CallIncoming}
		stopB := run(newInstance(gb))
		defer stopB()
		want := []string{"get", "answer c-dead https://bot.test/api/calls"}
		for deadline := time.Now().Add(20 * lease); !cmp.Equal(gb.log(), want); time.Sleep(10 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("B's graph commands %v, want %v once A's lease ran out", gb.log(), want)
			}
		}
	})
}

// RenewOutbox moves a lease forward, never back, and never brings back an outbox that is gone.
func TestRenewOutbox(t *testing.T) {
	store, _, now := createWithOutbox(t) // leased until now
	ctx := context.Background()
	claim := func(at time.Time) []string {
		t.Helper()
		keys, _, err := store.ClaimOutbox(ctx, at, 0, 10) // a claim of no length: it changes nothing later claims see
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	if err := store.RenewOutbox(ctx, []string{"c1", "gone"}, now.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if keys := claim(now.Add(30 * time.Second)); len(keys) != 0 {
		t.Errorf("claimed %v within the renewed lease", keys)
	}
	if err := store.RenewOutbox(ctx, []string{"c1"}, now.Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if keys := claim(now.Add(30 * time.Second)); len(keys) != 0 {
		t.Errorf("claimed %v: an earlier renewal shortened the lease", keys)
	}
	if keys := claim(now.Add(2 * time.Minute)); !cmp.Equal(keys, []string{"c1"}) {
		t.Errorf("claimed %v after the lease, want [c1] (and no outbox that was never there)", keys)
	}
}

// createWithOutbox stores call c1 with one command in its outbox, leased until now, in a Redis of
// its own.
func createWithOutbox(t *testing.T) (*callstate.Store, *callstate.Call, time.Time) {
	t.Helper()
	store := callstate.NewStore(redistest.Start(t).Client(t), "ob")
	now := time.Now()
	c := &callstate.Call{ID: "c1", Tenant: "t", State: callstate.StateQueued, CreatedAt: now,
		Outbox: []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdEnqueue, Queue: "q"}}}}
	if err := store.Create(context.Background(), c, now); err != nil {
		t.Fatal(err)
	}
	return store, c, now
}

// Batches of a call's commands are acknowledged in whatever order instances finish them. A
// batch done ahead of an older one not yet done waits beside the watermark, is not taken as
// done beyond itself, and joins the watermark once the older one is done.
func TestAcksInAnyOrder(t *testing.T) {
	ctx := context.Background()
	store := callstate.NewStore(redistest.Start(t).Client(t), "ao")
	play := func(seq, version int64) callstate.Pending {
		return callstate.Pending{Seq: seq, Version: version, Cmd: callstate.Command{Kind: callstate.CmdPlayPrompt, ClientContext: fmt.Sprint("p", seq)}}
	}
	c := &callstate.Call{ID: "c1", Tenant: "t", State: callstate.StateInviting, CreatedAt: time.Now(),
		Outbox: []callstate.Pending{play(1, 1), play(2, 1), {Seq: 3, Version: 2, Cmd: callstate.Command{Kind: callstate.CmdLeaveQueue}}, play(4, 2), play(5, 3)}}
	if err := store.Create(ctx, c, time.Now()); err != nil {
		t.Fatal(err)
	}
	seqs := func() []int64 {
		t.Helper()
		got, err := store.Get(ctx, "c1")
		if err != nil {
			t.Fatal(err)
		}
		var out []int64
		for _, p := range got.Outbox {
			out = append(out, p.Seq)
		}
		return out
	}
	steps := []struct {
		ack  callstate.Ack
		want []int64
	}{
		{callstate.Ack{Call: "c1", Graph: true, Prev: 2, Seq: 4}, []int64{1, 2, 3, 5}}, // version 2's prompt, before version 1's
		{callstate.Ack{Call: "c1", Graph: true, Prev: 4, Seq: 5}, []int64{1, 2, 3}},    // version 3's
		{callstate.Ack{Call: "c1", Graph: false, Prev: 0, Seq: 3}, []int64{1, 2}},      // storage: its own watermark
		{callstate.Ack{Call: "c1", Graph: true, Prev: 0, Seq: 2}, nil},                 // version 1's at last: all done
	}
	for i, st := range steps {
		if err := store.AckMany(ctx, st.ack); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(st.want, seqs()); diff != "" {
			t.Errorf("after ack %d %+v, commands left (-want +got):\n%s", i, st.ack, diff)
		}
	}
	// A later batch whose predecessors are all done moves the watermark at once.
	c2, _ := store.Get(ctx, "c1")
	c2.Outbox = append(c2.Outbox, play(6, 4))
	if err := store.Save(ctx, &c2, time.Now()); err != nil {
		t.Fatal(err)
	}
	if err := store.AckMany(ctx, callstate.Ack{Call: "c1", Graph: true, Prev: 0, Seq: 6}); err != nil {
		t.Fatal(err)
	}
	if got := seqs(); len(got) != 0 {
		t.Errorf("left %v, want nothing", got)
	}
}

// A caller queued in a queue the flow no longer has (edited, callbot restarted) is not put back
// in it by the reconciler: no dispatcher serves it, and the sweep of ended callers' entries reads
// only the flow's queues, so the entry stayed in Redis for good. The caller leaves that queue for
// the start menu at their hold music's end or timer (decide.go, queueGone).
func TestReconcileDoesNotEnqueueInAQueueTheFlowLacks(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, _ := ivr.Parse([]byte(flowYAML), "t.yaml")
	ctx := context.Background()
	skew := time.Duration(0)
	q := &fakeQueues{}
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "rg"), Timers: callstate.NewTimers(rdb, "rg"), Control: &fakeGraph{},
		Queues: q, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Now: func() time.Time { return time.Now().Add(skew) }})
	queuedCall(t, m, "queued")
	renamed, err := ivr.Parse([]byte(strings.NewReplacer("{queue: q}", "{queue: support}", "\n  q:\n", "\n  support:\n").Replace(flowYAML)), "t.yaml")
	mustDo(t, err)
	m.SetFlow(renamed)
	q.mu.Lock()
	q.ops = nil
	q.mu.Unlock()
	skew = 2 * time.Minute
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if len(q.ops) != 0 {
		t.Errorf("reconciler's queue writes for a caller in a queue the flow lacks: %v, want none", q.ops)
	}
}

// A claim of a call's outbox (its last lease ran out: its commands long done, the index entry
// left for a claim to remove, as every call's is) can land just as a live instance saves the
// call's next transition: the re-drive then read the new record and sent the new transition's
// commands, which that instance was sending at that moment. The rolling-deploy soak showed it
// with a read of the call (a35140ed94284280a82a1c5a0e7db1f1: the transfer's recheck timer
// saved, and its read re-driven 3 ms later, a second read behind the first); with a transfer,
// the re-drive's look at Graph comes before the live instance's request has reached it, and
// the transfer goes twice. A save after the claim takes the index entry back (its own lease):
// the re-drive leaves that record's commands to the instance that saved it.
func TestOutboxSavedAgainSinceItsClaimIsNotRedriven(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "test")
	q := &fakeQueues{}
	ga := &fakeGraph{}
	gb := &fakeGraph{}
	a := instance(t, rdb, "test", ga, q, nil)
	b := instance(t, rdb, "test", gb, q, nil)
	id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e77"
	key := graph.CallKey(id)
	queuedCall(t, a, id) // the caller waits in the queue; its commands are done
	// B's claim: the call's index entry fell due (a lease after its last transition)
	keys, score, err := store.ClaimOutbox(ctx, time.Now().Add(time.Minute), 30*time.Second, 100)
	mustDo(t, err)
	if !slices.Contains(keys, key) {
		t.Fatalf("claimed %v, want the call %s", keys, key)
	}
	// meanwhile A's dispatcher offers the caller: the transfer is on its way to Graph
	ga.block = make(chan struct{})
	defer close(ga.block)
	if ok, err := a.Offer(ctx, "tenant-1", key, "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	b.Redrive(ctx, key, score)
	b.Wait()
	if n := countPrefix(gb.log(), "transfer"); n != 0 {
		t.Errorf("the re-drive of a claim older than the offer's save sent %d transfers (graph %v): want none, A is sending it", n, gb.log())
	}
}

// An instance that stops with a transfer in doubt (the rolling-deploy soak: a 10 s grace ran
// out while its read of the call, after the transfer's 504, was throttled; the instance exited
// 1) leaves the transfer to the re-drive, which reads the call first. That read throttled too,
// the re-drive gave up ("not repeating transfer") and left the call to the transfer's timer, 90 s
// after the offer: the caller in silence and the agent reserved for the whole of it
// (6c2d7d45197b4b1c96abd1b72255ddb3). Any read of a call being transferred that Graph does not
// answer is made again a recheck (5 s) later, the re-drive's too.
func TestRedriveOfATransferUnreadableIsReadAgainSoon(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "test")
	q := &fakeQueues{}
	ga := &fakeGraph{block: make(chan struct{})}
	gb := &fakeGraph{fail: map[string]error{"get": &graph.Error{Op: "get", Status: 429, Code: "TooManyRequests"}}}
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	a := instance(t, rdb, "test", ga, q, nil)
	b := instance(t, rdb, "test", gb, q, now)
	id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e88"
	key := graph.CallKey(id)
	queuedCall(t, b, id)
	// A offers the caller and stops before its transfer is known to have reached Graph
	if ok, err := a.Offer(ctx, "tenant-1", key, "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	defer close(ga.block)
	// a lease later B re-drives it: its read of the call is throttled
	mu.Lock()
	clock = clock.Add(time.Minute)
	mu.Unlock()
	redriveAll(t, b, store, time.Minute)
	if n := countPrefix(gb.log(), "transfer"); n != 0 {
		t.Fatalf("transfer re-sent without a read of the call: %v", gb.log())
	}
	gb.mu.Lock()
	delete(gb.fail, "get") // Graph answers again: the call is established, the transfer never took
	gb.mu.Unlock()
	mu.Lock()
	clock = clock.Add(6 * time.Second) // a recheck later, not the transfer's 90 s
	mu.Unlock()
	tctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { b.RunTimers(tctx, 10*time.Millisecond); close(done) }()
	var c callstate.Call
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if c, _ = store.Get(ctx, key); c.State == callstate.StateQueued {
			break
		}
	}
	cancel()
	<-done
	b.Wait()
	if c.State != callstate.StateQueued || !slices.Contains(q.ops, "release agent-a failed") {
		t.Errorf("6 s after the re-drive's read went unanswered: %s with %q, queue ops %v, graph %v; want read again, back in the queue, agent-a freed",
			c.State, c.Agent, q.ops, gb.log())
	}
}

// A save that adds no command to the outbox leaves the call's lease as it was. An instance died
// with a transfer on its way (its lease runs out 8 s after its save); 5 s later another
// instance saves the call's next notification, "transferring", which decides nothing to send.
// That save wrote the outbox's index entry with its own lease, as a save with commands must:
// the dead instance's transfer then waited for a lease after the last notification, not its
// own (and every later notification pushed it again). Claimed when the dead instance's lease
// runs out, its commands are re-driven then.
func TestSaveWithoutCommandsKeepsTheOutboxLease(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "test")
	q := &fakeQueues{}
	ga := &fakeGraph{}
	const lease = 8 * time.Second
	start := time.Now()
	var clock skewClock
	a := instanceLeased(t, rdb, "test", ga, q, clock.now, lease)
	b := instanceLeased(t, rdb, "test", &fakeGraph{}, q, clock.now, lease)
	id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e99"
	key := graph.CallKey(id)
	queuedCall(t, a, id)
	ga.block = make(chan struct{}) // A's transfer never reaches Graph: A is gone
	defer close(ga.block)
	if ok, err := a.Offer(ctx, "tenant-1", key, "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	index := "test:{outbox}"
	leased, err := rdb.ZScore(ctx, index, key).Result()
	mustDo(t, err)
	if min := float64(start.Add(lease).UnixMilli()); leased < min {
		t.Fatalf("the offer's lease %v, want at least %v", leased, min)
	}

	clock.add(5 * time.Second)
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	if c, err := store.Get(ctx, key); err != nil || !c.Transferring || len(c.Outbox) == 0 {
		t.Fatalf("after the transferring notification: %+v %v, want saved, the transfer still pending", c, err)
	}
	if got, err := rdb.ZScore(ctx, index, key).Result(); err != nil || got != leased {
		t.Errorf("outbox lease after a save that decided nothing: %v %v, want the offer's %v", got, err, leased)
	}
	// 9 s after the offer, past its lease: another instance claims the dead one's transfer
	keys, _, err := store.ClaimOutbox(ctx, start.Add(9*time.Second), lease, 100)
	mustDo(t, err)
	if !slices.Contains(keys, key) {
		t.Errorf("claim 9 s after the offer: %v, want the call %s (its lease ran out at 8 s)", keys, key)
	}
}

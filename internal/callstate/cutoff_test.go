package callstate_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// An instance cut off from Graph while the others reach it (Config.CutOff) leaves Graph's work
// to them: the commands it decides, and one that failed there without an answer from Graph, are
// not sent, nor taken for Graph's refusal, but handed back, due at once, and another instance
// re-drives them (the answer after reading the call). A lease another instance holds since (it
// claimed the outbox once this one's lapsed) is left to it.
func TestCutOffInstanceLeavesItsCommandsToTheOthers(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	newInstance := func(t *testing.T, g *fakeGraph, cut *atomic.Bool) (*callstate.Machine, *callstate.Store) {
		prefix := "co-" + t.Name() // each subtest its own keys: a claim takes only its calls
		store := callstate.NewStore(rdb, prefix)
		cfg := callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, prefix), Control: g, Queues: &fakeQueues{},
			Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), OutboxLease: 5 * time.Second}
		if cut != nil {
			cfg.CutOff = cut.Load
		}
		return callstate.NewMachine(cfg), store
	}
	incoming := func(m *callstate.Machine, id string) {
		t.Helper()
		ns, err := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		if err != nil {
			t.Fatal(err)
		}
		if err := m.Notify(ctx, "t1", ns); err != nil {
			t.Fatal(err)
		}
	}
	// B, which reaches Graph, claims what is due now (not what is leased) and re-drives it
	redriveNow := func(b *callstate.Machine, store *callstate.Store) []string {
		t.Helper()
		keys, score, err := store.ClaimOutbox(ctx, time.Now(), 5*time.Second, 100)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			b.Redrive(ctx, k, score)
		}
		b.Wait()
		return keys
	}
	answered := func(id string) []string { return []string{"get", "answer " + id + " https://bot.test/api/calls"} }

	t.Run("decided while cut off", func(t *testing.T) {
		var cut atomic.Bool
		cut.Store(true)
		ga, gb := &fakeGraph{}, &fakeGraph{state: graph.CallIncoming}
		a, _ := newInstance(t, ga, &cut)
		b, storeB := newInstance(t, gb, nil)
		incoming(a, "c-cut")
		a.Wait()
		if got := ga.log(); len(got) != 0 {
			t.Fatalf("A, cut off, sent %v", got)
		}
		if a.HandedOver.Load() != 1 {
			t.Errorf("handed over %d batches, want 1", a.HandedOver.Load())
		}
		if keys := redriveNow(b, storeB); len(keys) != 1 {
			t.Fatalf("B claimed %v now: the outbox was not handed back due at once", keys)
		}
		if diff := cmp.Diff(gb.log(), answered("c-cut")); diff != "" {
			t.Errorf("B's Graph requests (-got +want):\n%s", diff)
		}
	})

	t.Run("failed without an answer once cut off", func(t *testing.T) {
		var cut atomic.Bool
		ga := &fakeGraph{block: make(chan struct{}), started: make(chan struct{}, 1),
			fail: map[string]error{"answer": errors.New("http2: client connection lost")}}
		gb := &fakeGraph{state: graph.CallIncoming}
		a, _ := newInstance(t, ga, &cut)
		b, storeB := newInstance(t, gb, nil)
		incoming(a, "c-lost")
		<-ga.started
		cut.Store(true) // found cut off while its answer hangs
		close(ga.block)
		a.Wait()
		// no read of the call, no failure fed back: a re-drive decides
		if diff := cmp.Diff(ga.log(), []string{"answer c-lost https://bot.test/api/calls"}); diff != "" {
			t.Errorf("A's Graph requests (-got +want):\n%s", diff)
		}
		redriveNow(b, storeB)
		if diff := cmp.Diff(gb.log(), answered("c-lost")); diff != "" {
			t.Errorf("B's Graph requests (-got +want):\n%s", diff)
		}
	})

	t.Run("failed without an answer while the others reach Graph", func(t *testing.T) {
		// not cut off (yet): its first failure is left to the others, not taken for Graph's
		ga := &fakeGraph{fail: map[string]error{"answer": errors.New("connection reset by peer")}}
		gb := &fakeGraph{state: graph.CallIncoming}
		store := callstate.NewStore(rdb, "co-"+t.Name())
		a := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "co-"+t.Name()), Control: ga,
			Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
			OutboxLease: 5 * time.Second, OthersReachGraph: func() bool { return true }})
		b, storeB := newInstance(t, gb, nil)
		incoming(a, "c-reset")
		a.Wait()
		if diff := cmp.Diff(ga.log(), []string{"answer c-reset https://bot.test/api/calls"}); diff != "" {
			t.Errorf("A's Graph requests (-got +want):\n%s", diff)
		}
		redriveNow(b, storeB)
		if diff := cmp.Diff(gb.log(), answered("c-reset")); diff != "" {
			t.Errorf("B's Graph requests (-got +want):\n%s", diff)
		}
	})

	t.Run("the lease another instance claimed since is left to it", func(t *testing.T) {
		var cut atomic.Bool
		ga := &fakeGraph{block: make(chan struct{}), started: make(chan struct{}, 1), fail: map[string]error{"answer": errors.New("i/o timeout")}}
		a, store := newInstance(t, ga, &cut)
		incoming(a, "c-claimed")
		<-ga.started
		// A's lease runs out (it stopped renewing): B claims the outbox and is re-driving it
		keys, claim, err := store.ClaimOutbox(ctx, time.Now().Add(time.Minute), 5*time.Second, 100)
		if err != nil || len(keys) != 1 {
			t.Fatalf("claim: %v %v", keys, err)
		}
		cut.Store(true)
		close(ga.block)
		a.Wait()
		score, ok, err := store.OutboxLease(ctx, graph.CallKey("c-claimed"))
		if err != nil || !ok || score != claim {
			t.Errorf("outbox lease %v (%v, %v) after A's hand-over, want B's claim %v left alone", score, ok, err, claim)
		}
	})

	t.Run("under way when found cut off", func(t *testing.T) {
		ga := &fakeGraph{block: make(chan struct{}), started: make(chan struct{}, 1)}
		gb := &fakeGraph{state: graph.CallIncoming}
		a, _ := newInstance(t, ga, nil)
		b, storeB := newInstance(t, gb, nil)
		incoming(a, "c-hung")
		<-ga.started
		a.HandOverCarried() // the answer hangs: handed over at once, not a lease later
		redriveNow(b, storeB)
		if diff := cmp.Diff(gb.log(), answered("c-hung")); diff != "" {
			t.Errorf("B's Graph requests (-got +want):\n%s", diff)
		}
		close(ga.block)
		a.Wait()
	})
}

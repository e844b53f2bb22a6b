package callstate_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// succeed makes the fake's action work from now on.
func (f *fakeGraph) succeed(action string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.fail, action)
}

// runTimers fires m's due timers until cond holds (or fails the test after a while).
func runTimers(t *testing.T, m *callstate.Machine, cond func() bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
	defer func() { cancel(); <-done; m.Wait() }()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("timed out waiting for the timers")
		}
	}
}

var errUnavailable = &graph.Error{Op: "subscribeToTone", Status: 503, Code: "ServiceUnavailable"}

// A tone subscription that failed (after the Graph client's retries) is not only logged: the
// caller's keys would do nothing for the whole call. It is made again by the call's tone timer,
// which is durable: another instance fires it when the one that saw the failure is gone. Then
// the caller's key works.
func TestFailedToneSubscriptionIsMadeAgain(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ga := &fakeGraph{fail: map[string]error{"subscribeToTone": errUnavailable}}
	a := instance(t, rdb, "tone", ga, &fakeQueues{}, nil)
	store := callstate.NewStore(rdb, "tone")
	id := "3f2e4a2e-7d3c-4a43-9c51-0f6c3c9d9e66"
	key := graph.CallKey(id)
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	if diff := cmp.Diff(ga.log()[1:], []string{"subscribeToTone", "playPrompt menu"}); diff != "" {
		t.Fatalf("A's graph commands (-got +want):\n%s", diff)
	}
	c, err := store.Get(context.Background(), key)
	if err != nil || c.ToneFails != 1 || c.Timers[callstate.TimerTone] == 0 {
		t.Fatalf("after the failed subscription: %d failures, timers %v, %v; want the tone timer armed", c.ToneFails, c.Timers, err)
	}

	// A dies; B, a second later, fires the timer A armed
	gb := &fakeGraph{}
	clock := &skewClock{}
	b := instance(t, rdb, "tone", gb, &fakeQueues{}, clock.now)
	clock.add(2 * time.Second)
	runTimers(t, b, func() bool { return slices.Contains(gb.log(), "subscribeToTone") })
	if c, _ = store.Get(context.Background(), key); c.ToneCtx == "" || c.Timers[callstate.TimerTone] != 0 {
		t.Errorf("after the new subscription: ToneCtx %q timers %v, want it waited on, the timer spent", c.ToneCtx, c.Timers)
	}
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if c, _ = store.Get(context.Background(), key); c.State != callstate.StateQueued {
		t.Errorf("the caller's key after the subscription was made again: %s, want queued", c.State)
	}
	if diff := cmp.Diff(gb.log(), []string{"subscribeToTone", "cancelMediaProcessing", "playPrompt hold"}); diff != "" {
		t.Errorf("B's graph commands (-got +want):\n%s", diff)
	}
}

// An instance that dies while sending the subscription leaves it in the call's outbox: another
// re-drives it, and if it fails there, arms the retry; a failed subscription is not re-driven
// again (its retry is the timer's).
func TestToneSubscriptionOfADeadInstanceIsRedrivenAndRetried(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ga := &fakeGraph{}
	a := instance(t, rdb, "tone", ga, &fakeQueues{}, nil)
	store := callstate.NewStore(rdb, "tone")
	id := "3f2e4a2e-7d3c-4a43-9c51-0f6c3c9d9e77"
	key := graph.CallKey(id)
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	ga.block = make(chan struct{}) // A hangs in its next Graph request, the subscription
	defer func() { close(ga.block); a.Wait() }()
	ns, err := graph.Decode([]byte(note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`)))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Notify(context.Background(), "tenant-1", ns); err != nil {
		t.Fatal(err)
	}

	gb := &fakeGraph{fail: map[string]error{"subscribeToTone": errUnavailable}}
	clock := &skewClock{}
	b := instance(t, rdb, "tone", gb, &fakeQueues{}, clock.now)
	redriveAll(t, b, store, time.Minute)
	if diff := cmp.Diff(gb.log(), []string{"subscribeToTone", "playPrompt menu"}); diff != "" {
		t.Fatalf("B's re-drive (-got +want):\n%s", diff)
	}
	c, _ := store.Get(context.Background(), key)
	if c.ToneFails != 1 || c.Timers[callstate.TimerTone] == 0 {
		t.Fatalf("after the re-driven subscription failed: %d failures, timers %v; want the tone timer armed", c.ToneFails, c.Timers)
	}
	redriveAll(t, b, store, 2*time.Minute)
	if n := countPrefix(gb.log(), "subscribeToTone"); n != 1 {
		t.Errorf("%d subscriptions after a second re-drive pass, want the failed one not sent again", n)
	}
	gb.succeed("subscribeToTone")
	clock.add(2 * time.Second)
	runTimers(t, b, func() bool { return countPrefix(gb.log(), "subscribeToTone") == 2 })
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if c, _ = store.Get(context.Background(), key); c.State != callstate.StateQueued {
		t.Errorf("the caller's key: %s, want queued", c.State)
	}
}

// A subscription Graph never takes is given up after the six retries, not tried for ever: no
// tone timer is left, and the giving up is counted (callbot_tone_given_up_total) so that an
// operator sees callers whose keys do nothing.
func TestToneSubscriptionGivenUpIsCounted(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ga := &fakeGraph{fail: map[string]error{"subscribeToTone": errUnavailable}}
	clock := &skewClock{}
	a := instance(t, rdb, "tonegiveup", ga, &fakeQueues{}, clock.now)
	store := callstate.NewStore(rdb, "tonegiveup")
	id := "5b1c0f3e-2a4d-4c8e-9f00-7e2d1a3b4c5d"
	key := graph.CallKey(id)
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	for fails := 2; fails <= 7; fails++ {
		if a.ToneGivenUp.Load() != 0 {
			t.Fatalf("given up after %d failures, want after 7", fails-1)
		}
		clock.add(31 * time.Second)
		runTimers(t, a, func() bool { c, _ := store.Get(context.Background(), key); return c.ToneFails >= fails })
	}
	a.Wait()
	c, err := store.Get(context.Background(), key)
	if err != nil || c.ToneFails != 7 || c.Timers[callstate.TimerTone] != 0 {
		t.Fatalf("after the seventh failure: %d failures, timers %v, %v; want 7 and no tone timer", c.ToneFails, c.Timers, err)
	}
	if n := a.ToneGivenUp.Load(); n != 1 {
		t.Errorf("ToneGivenUp = %d, want 1", n)
	}
	if n := strings.Count(strings.Join(ga.log(), "\n"), "subscribeToTone"); n != 7 {
		t.Errorf("%d subscriptions sent, want 7 (the first and six retries)", n)
	}
}

// toneOpFailed answers subscribeToTone with 200 and the operation failed.
type toneOpFailed struct{ *fakeGraph }

func (g toneOpFailed) SubscribeToTone(ctx context.Context, id, cc string) (graph.Operation, error) {
	op, err := g.fakeGraph.SubscribeToTone(ctx, id, cc)
	op.Status = graph.OpFailed
	return op, err
}

// A subscription whose response says failed (a final status in the response is the outcome; no
// notification follows) is a failed subscription, made again by the tone timer. Before, it was
// taken for a subscription made: the caller's keys did nothing for the whole call.
func TestToneSubscriptionFailedInTheResponseIsMadeAgain(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ga := toneOpFailed{&fakeGraph{}}
	a := instance(t, rdb, "tonef", ga, &fakeQueues{}, nil)
	id := "5b0c1e3a-2f4d-4c6e-8a9b-1c2d3e4f5a6b"
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	c, err := callstate.NewStore(rdb, "tonef").Get(context.Background(), graph.CallKey(id))
	if err != nil || c.ToneFails != 1 || c.Timers[callstate.TimerTone] == 0 {
		t.Fatalf("after a subscription answered failed: %d failures, timers %v, %v; want the tone timer armed", c.ToneFails, c.Timers, err)
	}
}

package callstate_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
)

// failHangups fails the first n hangups with err (after the Graph client's own retries, as
// Machine sees them), then lets them through; it counts the hangups that ended the call. With
// gate set, a hangup waits for it before failing.
type failHangups struct {
	*fakeGraph
	mu    sync.Mutex
	n     int
	err   error
	ok    int
	gate  chan struct{}
	gated chan struct{} // closed when a hangup waits at the gate
}

func (g *failHangups) Hangup(ctx context.Context, id string) error {
	if err := g.fakeGraph.Hangup(ctx, id); err != nil {
		return err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.n > 0 {
		g.n--
		if g.gate != nil {
			close(g.gated)
			g.mu.Unlock()
			<-g.gate
			g.mu.Lock()
		}
		return g.err
	}
	g.ok++
	return nil
}

func (g *failHangups) succeeded() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ok
}

// hangingUp takes call id through three invalid keys to the menu's fallback, a disconnect
// without a goodbye: the transition decides the hangup.
func (r *rig) hangingUp(t *testing.T, id string) {
	t.Helper()
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	for i := int64(1); i <= 3; i++ {
		r.handle(t, id, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: i})
	}
}

var errHangupThrottled = &graph.Error{Op: "hangup", Status: 429, Code: "TooManyRequests"}

// A hangup Graph throttles (429 after the Graph client's own retries) is sent again a second
// later, then 2 and 4 s after each further failure (or after Graph's Retry-After when it gives a
// longer one), until it takes: one DELETE ends the call, and Graph's terminated notification
// ends the record. Before, only the hang-up grace sent it again, 30 s on, the caller in silence
// after the goodbye meanwhile (the 17–26 s tails of "last call ended" in TestRollingDeploy's
// slow-Graph modes, docs/chaos.md).
func TestThrottledHangupIsSentAgainSoon(t *testing.T) {
	for _, tc := range []struct {
		name       string
		retryAfter time.Duration
		waits      []time.Duration // between the hangups
	}{
		{"backoff", 0, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}},
		{"retry-after", 3 * time.Second, []time.Duration{3 * time.Second, 3 * time.Second, 4 * time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			throttled := *errHangupThrottled
			throttled.RetryAfter = tc.retryAfter
			g := &failHangups{fakeGraph: &fakeGraph{}, n: len(tc.waits), err: &throttled}
			r := newRig(t, g, "hthr")
			id := "c-hangup-throttled"
			r.hangingUp(t, id)
			for i, wait := range tc.waits {
				if n := countPrefix(g.log(), "hangup"); n != i+1 {
					t.Fatalf("%d hangups sent, want %d", n, i+1)
				}
				r.skew += wait / 2
				r.fireDue(t)
				if n := countPrefix(g.log(), "hangup"); n != i+1 {
					t.Fatalf("hangup %d sent again before %v", i+1, wait)
				}
				r.skew += wait/2 + 300*time.Millisecond
				r.fireDue(t)
				if n := countPrefix(g.log(), "hangup"); n != i+2 {
					t.Fatalf("%v after hangup %d was throttled: %d hangups sent, want it sent again", wait, i+1, n)
				}
			}
			if g.succeeded() != 1 {
				t.Fatalf("%d hangups took, want 1", g.succeeded())
			}
			r.handle(t, id, callstate.Event{Kind: callstate.EvEnded}) // Graph's terminated notification
			c, err := r.store.Get(context.Background(), graph.CallKey(id))
			if err != nil || c.State != callstate.StateTerminated || c.Outcome != callstate.OutcomeDisconnected {
				t.Fatalf("after the hangup took: %s %s, %v; want terminated, disconnected", c.State, c.Outcome, err)
			}
			r.skew += 31 * time.Second // past the hang-up grace
			r.fireDue(t)
			if n := countPrefix(g.log(), "hangup"); n != len(tc.waits)+1 || g.succeeded() != 1 {
				t.Errorf("after the call ended: %d hangups sent, %d took; want %d and 1", n, g.succeeded(), len(tc.waits)+1)
			}
		})
	}
}

// A hangup that fails after the call has ended (the caller hung up while Graph was slow to answer
// callbot's DELETE) does nothing more: no retry is armed, none is sent.
func TestHangupFailingAfterTheCallEndedDoesNothing(t *testing.T) {
	g := &failHangups{fakeGraph: &fakeGraph{}, n: 1, err: errHangupThrottled, gate: make(chan struct{}), gated: make(chan struct{})}
	r := newRig(t, g, "hend")
	id := "c-hangup-ended"
	key := graph.CallKey(id)
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	for i := int64(1); i <= 2; i++ {
		r.handle(t, id, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: i})
	}
	// the third invalid key decides the hangup, which Graph holds
	if _, err := r.m.Handle(context.Background(), "t1", key, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: 3}); err != nil {
		t.Fatal(err)
	}
	<-g.gated
	if _, err := r.m.Handle(context.Background(), "t1", key, callstate.Event{Kind: callstate.EvEnded}); err != nil {
		t.Fatal(err)
	}
	close(g.gate) // now Graph throttles it
	r.m.Wait()
	c, err := r.store.Get(context.Background(), key)
	if err != nil || c.State != callstate.StateTerminated || len(c.Timers) != 0 {
		t.Fatalf("after the hangup failed on an ended call: %s timers %v, %v; want terminated, none", c.State, c.Timers, err)
	}
	r.skew += time.Hour
	r.fireDue(t)
	if n := countPrefix(g.log(), "hangup"); n != 1 {
		t.Errorf("%d hangups sent, want the one that failed alone", n)
	}
}

// The quick retry is a durable timer: the instance that saw the hangup throttled dies, and
// another instance's RunTimers sends it again a second or two later.
func TestThrottledHangupOfADeadInstanceIsSentAgainByAnother(t *testing.T) {
	ga := &failHangups{fakeGraph: &fakeGraph{}, n: 1, err: errHangupThrottled}
	r := newRig(t, ga, "hdead")
	id := "c-hangup-dead"
	key := graph.CallKey(id)
	r.hangingUp(t, id)
	if n := countPrefix(ga.log(), "hangup"); n != 1 {
		t.Fatalf("A's graph commands %v, want one hangup", ga.log())
	}

	// A dies; B, with a clock 2 s on, runs its timers
	gb := &fakeGraph{}
	clock := &skewClock{}
	b := instance(t, r.rdb.(*redis.Client), "hdead", gb, &fakeQueues{}, clock.now)
	clock.add(2 * time.Second)
	runTimers(t, b, func() bool { return slices.Contains(gb.log(), "hangup") })
	if _, err := b.Handle(context.Background(), "t1", key, callstate.Event{Kind: callstate.EvEnded}); err != nil {
		t.Fatal(err)
	}
	c, err := r.store.Get(context.Background(), key)
	if err != nil || c.State != callstate.StateTerminated || c.Outcome != callstate.OutcomeDisconnected {
		t.Fatalf("after B's hangup: %s %s, %v; want terminated, disconnected", c.State, c.Outcome, err)
	}
	if n := countPrefix(gb.log(), "hangup"); n != 1 {
		t.Errorf("B sent %d hangups, want 1", n)
	}
}

// A hangup Graph refuses (403: a permission missing) is sent again quickly three times only:
// the fourth refusal gives the quick retries up, logged as an error and counted
// (callbot_hangup_given_up_total); the hang-up grace still hangs up every 30 s, until the call
// ends.
func TestRefusedHangupGivesUpQuickRetries(t *testing.T) {
	g := &failHangups{fakeGraph: &fakeGraph{}, n: 100, err: &graph.Error{Op: "hangup", Status: 403, Code: "Forbidden"}}
	r := newRig(t, g, "hgive")
	id := "c-hangup-refused"
	r.hangingUp(t, id)
	for i, wait := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		if r.m.HangupGivenUp.Load() != 0 {
			t.Fatalf("given up after %d refusals, want after 4", i+1)
		}
		r.skew += wait + 200*time.Millisecond
		r.fireDue(t)
		if n := countPrefix(g.log(), "hangup"); n != i+2 {
			t.Fatalf("%v after refusal %d: %d hangups, want %d", wait, i+1, n, i+2)
		}
	}
	if n := r.m.HangupGivenUp.Load(); n != 1 {
		t.Fatalf("HangupGivenUp = %d after the fourth refusal, want 1", n)
	}
	r.skew += 20 * time.Second
	r.fireDue(t)
	if n := countPrefix(g.log(), "hangup"); n != 4 {
		t.Fatalf("%d hangups 20 s after giving up, want no quick retry", n)
	}
	r.skew += 11 * time.Second // past the hang-up grace
	r.fireDue(t)
	if n := countPrefix(g.log(), "hangup"); n != 5 {
		t.Fatalf("%d hangups after the hang-up grace, want it sent again", n)
	}
	if n := r.m.HangupGivenUp.Load(); n != 1 {
		t.Errorf("HangupGivenUp = %d after a fifth refusal, want still 1 (one per call)", n)
	}
	r.handle(t, id, callstate.Event{Kind: callstate.EvEnded})
	r.skew += time.Hour
	r.fireDue(t)
	if n := countPrefix(g.log(), "hangup"); n != 5 {
		t.Errorf("%d hangups after the call ended, want none more", n-5)
	}
}

package main

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/redistest"
)

// fakeReach is a Graph client's reach, set by the test; Probe answers with probeErr.
type fakeReach struct {
	mu                sync.Mutex
	answered, failing time.Time
	probes            atomic.Int32
	probeErr          error
}

func (f *fakeReach) set(answered, failing time.Time) {
	f.mu.Lock()
	f.answered, f.failing = answered, failing
	f.mu.Unlock()
}

func (f *fakeReach) Reach() (time.Time, time.Time) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.answered, f.failing
}

func (f *fakeReach) Probe(context.Context) error {
	f.probes.Add(1)
	return f.probeErr
}

func TestCutOffFromGraph(t *testing.T) {
	now := time.Now()
	ago := func(d time.Duration) time.Time { return now.Add(-d) }
	for _, c := range []struct {
		name            string
		failing, others time.Time
		want            bool
	}{
		{"its last request had an answer", time.Time{}, ago(0), false},
		{"failing a moment, another answered since", ago(500 * time.Millisecond), ago(0), false},
		{"failing for a second, another answered since", ago(time.Second), ago(0), true},
		{"failing for a minute, another answered since", ago(time.Minute), ago(10 * time.Second), true},
		// Graph down for everyone: the others' last answer came before this one's failures
		{"failing, the others' last answer before", ago(10 * time.Second), ago(11 * time.Second), false},
		{"failing, no other instance", ago(10 * time.Second), time.Time{}, false},
	} {
		if got := cutOffFromGraph(now, c.failing, c.others); got != c.want {
			t.Errorf("%s: cut off %v, want %v", c.name, got, c.want)
		}
	}
}

// Two instances share Redis: one whose requests fail without an answer while the other's are
// answered is cut off, probes Graph, hands its commands over once, and is back once it has an
// answer; when both fail (Graph down for everyone), neither is cut off.
func TestGraphReachAcrossInstances(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	srcA, srcB := &fakeReach{probeErr: errors.New("i/o timeout")}, &fakeReach{}
	a := newGraphReach(srcA, rdb, "gr", "a", time.Now, zaptest.NewLogger(t))
	b := newGraphReach(srcB, rdb, "gr", "b", time.Now, zaptest.NewLogger(t))
	var handed atomic.Int32
	a.onCut = func() { handed.Add(1) }
	now := time.Now()

	srcA.set(now.Add(-time.Minute), now.Add(-3*time.Second)) // failing for 3 s
	srcB.set(now, time.Time{})                               // answered just now
	a.look(ctx)                                              // b has not said yet
	if a.cutOff() {
		t.Fatal("cut off before any other instance said it reaches Graph")
	}
	b.look(ctx)
	a.look(ctx)
	if !a.cutOff() || b.cutOff() {
		t.Fatalf("a failing, b answered: a cut off %v, b %v; want a alone", a.cutOff(), b.cutOff())
	}
	a.look(ctx) // still cut off: handed over once, not at every look
	deadline := time.Now().Add(2 * time.Second)
	for handed.Load() < 1 || srcA.probes.Load() < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("cut off: commands handed over %d times, Graph probed %d times; want both", handed.Load(), srcA.probes.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if n := handed.Load(); n != 1 {
		t.Errorf("commands handed over %d times for one cut, want 1", n)
	}
	if a.cuts.Load() != 1 {
		t.Errorf("cuts counted %d, want 1", a.cuts.Load())
	}

	if !a.othersReachGraph() || b.othersReachGraph() {
		t.Errorf("others reach Graph: for a %v, for b %v; want b's answer of a moment ago seen by a alone",
			a.othersReachGraph(), b.othersReachGraph())
	}

	srcA.set(time.Now(), time.Time{}) // a probe had an answer
	a.look(ctx)
	if a.cutOff() {
		t.Fatal("still cut off after an answer from Graph")
	}

	// Graph down for everyone: each had its last answer before the other's failures began
	now = time.Now()
	srcA.set(now.Add(-20*time.Second), now.Add(-10*time.Second))
	srcB.set(now.Add(-18*time.Second), now.Add(-9*time.Second))
	b.look(ctx)
	a.look(ctx)
	b.look(ctx)
	if a.cutOff() || b.cutOff() {
		t.Errorf("both failing: a cut off %v, b %v; want neither taken out of service", a.cutOff(), b.cutOff())
	}
	if a.othersReachGraph() || b.othersReachGraph() {
		t.Errorf("both failing: others reach Graph for a %v, for b %v; want neither: their failures are Graph's",
			a.othersReachGraph(), b.othersReachGraph())
	}
	// staggered: a had an answer after b's failures began; b goes out, a, the latest, stays
	srcA.set(now.Add(-5*time.Second), now.Add(-4*time.Second))
	a.look(ctx)
	b.look(ctx)
	a.look(ctx)
	if a.cutOff() || !b.cutOff() {
		t.Errorf("b failing since before a's last answer: a cut off %v, b %v; want b alone", a.cutOff(), b.cutOff())
	}

	// an instance that stops takes itself out of the hash
	rctx, cancel := context.WithCancel(ctx)
	cancel()
	b.run(rctx, time.Hour)
	if n, err := rdb.HLen(ctx, "gr:{graph-reach}").Result(); err != nil || n != 1 {
		t.Errorf("instances in the hash after b stopped: %d, %v; want a alone", n, err)
	}
}

package callstate_test

import (
	"context"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// A rolling update with the shipped deployment (maxSurge 1, maxUnavailable 0) starts the new
// instance before it stops the old one: the new instance's start-up pass finds the reconciler's
// lease held and is skipped. The old instance hands the lease back when it stops; another
// instance must take it then, not at its next pass a whole interval (5 minutes) later, during
// which a call Graph no longer knows stays live and a reservation made for nobody stays.
func TestReconcileLeaseHandedBackIsTakenWithinTheInterval(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var clock skewClock
	g := &fakeGraph{}
	store := callstate.NewStore(rdb, "rl")
	m := instance(t, rdb, "rl", g, &fakeQueues{}, clock.now)
	ns, _ := graph.Decode([]byte(note("created", "gone-call", `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
	if err := m.Notify(ctx, "t1", ns); err != nil {
		t.Fatal(err)
	}
	m.Wait()
	clock.add(2 * time.Minute) // older than a minute: the reconciler looks at it
	g.mu.Lock()
	g.state = "gone" // Graph no longer knows the call
	g.mu.Unlock()

	// the old instance holds the lease; the new one starts and its first pass is skipped
	if ok, err := store.TryLease(ctx, "reconcile", "old", time.Hour); err != nil || !ok {
		t.Fatalf("old instance's lease: %v %v", ok, err)
	}
	const every = 4 * time.Second
	done := make(chan struct{})
	go func() { m.RunReconcile(ctx, every, "new"); close(done) }()
	defer func() { cancel(); <-done }()
	time.Sleep(300 * time.Millisecond)
	if n := m.Closed.Load(); n != 0 {
		t.Fatalf("%d calls closed while the old instance held the lease", n)
	}
	if err := store.ReleaseLease(ctx, "reconcile", "old"); err != nil { // the old instance stops
		t.Fatal(err)
	}
	deadline := time.Now().Add(every / 2)
	for m.Closed.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if m.Closed.Load() != 1 {
		t.Errorf("the call Graph no longer knows is not closed %v after the lease was handed back (interval %v): "+
			"nobody took the lease until the next pass", every/2, every)
	}
}

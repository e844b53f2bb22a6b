package callstate_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// pacedGraph is a fakeGraph whose reads and keepAlives of a call take their time, as a real
// Graph's tens to hundreds of milliseconds do: each waits until wanted of them are in flight
// at once, or until patience runs out (and then so do all after it), or release is closed.
type pacedGraph struct {
	*fakeGraph
	wanted   int
	patience time.Duration
	release  chan struct{}

	mu         sync.Mutex
	inFlight   int
	most       int
	reached    chan struct{} // closed once wanted were in flight at once
	wasReached bool
	gaveUp     bool
	entered    atomic.Int64
}

func newPacedGraph(wanted int, patience time.Duration) *pacedGraph {
	return &pacedGraph{fakeGraph: &fakeGraph{}, wanted: wanted, patience: patience, release: make(chan struct{}), reached: make(chan struct{})}
}

func (g *pacedGraph) wait(ctx context.Context) {
	g.entered.Add(1)
	g.mu.Lock()
	g.inFlight++
	g.most = max(g.most, g.inFlight)
	if g.inFlight == g.wanted && !g.wasReached {
		g.wasReached = true
		close(g.reached)
	}
	patient := !g.gaveUp
	g.mu.Unlock()
	defer func() { g.mu.Lock(); g.inFlight--; g.mu.Unlock() }()
	if !patient {
		return
	}
	select {
	case <-g.reached:
	case <-g.release:
	case <-ctx.Done():
	case <-time.After(g.patience):
		g.mu.Lock()
		g.gaveUp = true
		g.mu.Unlock()
	}
}

func (g *pacedGraph) GetCall(ctx context.Context, id string) (graph.CallState, error) {
	g.wait(ctx)
	if ctx.Err() != nil {
		return "", ctx.Err()
	}
	return g.fakeGraph.GetCall(ctx, id)
}

func (g *pacedGraph) KeepAlive(ctx context.Context, id string) error {
	g.wait(ctx)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return g.fakeGraph.KeepAlive(ctx, id)
}

// writeLiveCalls writes n call records, queued, created now, and returns their keys.
func writeLiveCalls(t *testing.T, rdb *redis.Client, prefix string, n int) []string {
	t.Helper()
	store := callstate.NewStore(rdb, prefix)
	var keys []string
	for i := range n {
		c := &callstate.Call{ID: fmt.Sprintf("call-%04d", i), Tenant: "t1", State: callstate.StateInMenu, CreatedAt: time.Now()}
		if err := store.Create(context.Background(), c, time.Time{}); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, c.ID)
	}
	return keys
}

// A pass checks many calls at once. One at a time, a pass over 10,000 live calls waited for
// 10,000 Graph round trips end to end: 500 s at 50 ms each, longer than the 5 minutes between
// passes, and a call older than 15 minutes waited as long for its keepAlive. Half the calls here
// are older than 15 minutes (a keepAlive), half are not (a read).
func TestReconcileChecksCallsInParallel(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	var clock skewClock
	n := 2 * callstate.ReconcileParallel
	writeLiveCalls(t, rdb, "rp", n/2)
	clock.add(10 * time.Minute)
	store := callstate.NewStore(rdb, "rp")
	for i := range n / 2 {
		c := &callstate.Call{ID: fmt.Sprintf("new-%04d", i), Tenant: "t1", State: callstate.StateInMenu, CreatedAt: clock.now()}
		if err := store.Create(ctx, c, time.Time{}); err != nil {
			t.Fatal(err)
		}
	}
	clock.add(6 * time.Minute) // the first half 16 minutes old, the second 6
	g := newPacedGraph(callstate.ReconcileParallel, 2*time.Second)
	m := instance(t, rdb, "rp", g, &fakeQueues{}, clock.now)
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	g.mu.Lock()
	most := g.most
	g.mu.Unlock()
	if most != callstate.ReconcileParallel {
		t.Errorf("at most %d Graph requests in flight at once during the pass, want %d", most, callstate.ReconcileParallel)
	}
	var gets, keepAlives int
	for _, c := range g.log() {
		switch c {
		case "get":
			gets++
		case "keepAlive":
			keepAlives++
		}
	}
	if gets != n/2 || keepAlives != n/2 {
		t.Errorf("%d reads and %d keepAlives, want %d of each (every live call checked once)", gets, keepAlives, n/2)
	}
	if got := m.KeepAlives.Load(); got != int64(n/2) {
		t.Errorf("KeepAlives %d, want %d", got, n/2)
	}
	if got := m.ReconcileChecked.Load(); got != int64(n) {
		t.Errorf("ReconcileChecked %d, want %d", got, n)
	}
	if m.ReconcilePasses.Load() != 1 || m.ReconcileLastPass.Load() <= 0 || m.ReconcileLastCalls.Load() != int64(n) {
		t.Errorf("passes %d, last pass %v over %d calls; want one pass timed, over %d", m.ReconcilePasses.Load(), time.Duration(m.ReconcileLastPass.Load()), m.ReconcileLastCalls.Load(), n)
	}
}

// A keepAlive Graph refuses is counted (an operator alerts on it: Graph ends a call that had
// none for 45 minutes), and so is one it takes.
func TestReconcileCountsKeepAliveFailures(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	g := &fakeGraph{fail: map[string]error{"keepAlive": &graph.Error{Op: "keepAlive", Status: 503}}}
	writeLiveCalls(t, rdb, "kf", 3)
	m := instance(t, rdb, "kf", g, &fakeQueues{}, func() time.Time { return time.Now().Add(16 * time.Minute) })
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if m.KeepAliveFailures.Load() != 3 || m.KeepAlives.Load() != 0 {
		t.Errorf("keepAlive failures %d, sent %d; want 3 and 0", m.KeepAliveFailures.Load(), m.KeepAlives.Load())
	}
	// the calls stay live: the next pass tries again
	if live, _ := callstate.NewStore(rdb, "kf").Live(ctx, time.Now().Add(time.Hour), 10); len(live) != 3 {
		t.Errorf("live calls %v after refused keepAlives, want all 3", live)
	}
}

// Every live call is checked, however many there are. A pass read at most 10,000: beyond, the
// newest calls had no keepAlive, and a call Graph no longer had stayed live, until enough older
// ones ended. Here the set holds 10,050 calls whose records expired: each pass takes them out.
func TestReconcileReachesEveryLiveCall(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx := context.Background()
	const n = 10_050
	old := time.Now().Add(-time.Hour).UnixMilli()
	zs := make([]redis.Z, n)
	for i := range zs {
		zs[i] = redis.Z{Score: float64(old + int64(i)), Member: fmt.Sprintf("gone-%05d", i)}
	}
	if err := rdb.ZAdd(ctx, "ra:{active}", zs...).Err(); err != nil {
		t.Fatal(err)
	}
	store := callstate.NewStore(rdb, "ra")
	if live, _ := store.Live(ctx, time.Now(), n+1); len(live) != n {
		t.Fatalf("the test writes the wrong key: %d live calls, want %d", len(live), n)
	}
	m := instance(t, rdb, "ra", &fakeGraph{}, &fakeQueues{}, nil)
	if err := m.Reconcile(ctx); err != nil {
		t.Fatal(err)
	}
	if left, _ := rdb.ZCard(ctx, "ra:{active}").Result(); left != 0 {
		t.Errorf("%d of %d live calls without a record left after a pass, want none", left, n)
	}
	if got := m.ReconcileChecked.Load(); got != n {
		t.Errorf("ReconcileChecked %d, want %d", got, n)
	}
}

// A pass that outlasts the reconciler's lease (many calls, a slow Graph) renews it: another
// instance does not start a second pass over the same calls meanwhile. And a pass whose lease
// another instance has taken (it lapsed while Redis did not answer) stops.
func TestReconcileRenewsItsLeaseDuringALongPass(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var clock skewClock
	n := 3 * callstate.ReconcileParallel
	writeLiveCalls(t, rdb, "rr", n)
	clock.add(2 * time.Minute)
	g := newPacedGraph(n+1, time.Minute) // never reached: every request waits for release
	m := instance(t, rdb, "rr", g, &fakeQueues{}, clock.now)
	store := callstate.NewStore(rdb, "rr")
	const every = time.Second // lease 1.5 s
	done := make(chan struct{})
	go func() { m.RunReconcile(ctx, every, "a"); close(done) }()
	defer func() { close(g.release); cancel(); <-done }()
	for g.entered.Load() == 0 {
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(2 * every) // past the lease the pass took
	if ok, err := store.TryLease(ctx, "reconcile", "b", 2*every); err != nil || ok {
		t.Fatalf("another instance took the reconciler's lease during a pass %v long (lease %v): %v %v", 2*every, every*3/2, ok, err)
	}
	// the lease lapses (Redis lost it) and b takes it: a's pass stops at its next renewal
	if err := rdb.Del(ctx, "rr:{lease:reconcile}").Err(); err != nil {
		t.Fatal(err)
	}
	if ok, err := store.TryLease(ctx, "reconcile", "b", time.Hour); err != nil || !ok {
		t.Fatalf("b's lease: %v %v", ok, err)
	}
	deadline := time.Now().Add(5 * every)
	for {
		g.mu.Lock()
		inFlight := g.inFlight
		g.mu.Unlock()
		if inFlight == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d Graph requests of the pass still in flight %v after another instance took the lease", inFlight, 5*every)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := g.entered.Load(); got != int64(callstate.ReconcileParallel) {
		t.Errorf("%d calls checked, want the pass stopped after its first %d", got, callstate.ReconcileParallel)
	}
	if m.ReconcilePasses.Load() != 0 {
		t.Errorf("a pass counted complete after it stopped")
	}
}

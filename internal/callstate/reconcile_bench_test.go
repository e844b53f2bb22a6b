package callstate_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// latentGraph answers reads and keepAlives of a call after a fixed latency, as a real Graph's
// round trip takes tens to hundreds of milliseconds.
type latentGraph struct {
	*fakeGraph
	latency time.Duration
}

func (g latentGraph) GetCall(ctx context.Context, id string) (graph.CallState, error) {
	time.Sleep(g.latency)
	return graph.CallEstablished, nil
}

func (g latentGraph) KeepAlive(ctx context.Context, id string) error {
	time.Sleep(g.latency)
	return nil
}

// BenchmarkReconcilePass times one pass of the reconciler over 1,000 live calls with a Graph
// that answers in 5 ms (compare builds with benchstat; docs/performance.md, "The reconciler's
// pass").
func BenchmarkReconcilePass(b *testing.B) {
	rdb := redistest.Start(b).Client(b)
	ctx := context.Background()
	store := callstate.NewStore(rdb, "bp")
	const calls = 1000
	for i := range calls {
		c := &callstate.Call{ID: fmt.Sprintf("call-%04d", i), Tenant: "t1", State: callstate.StateInMenu, CreatedAt: time.Now()}
		if err := store.Create(ctx, c, time.Time{}); err != nil {
			b.Fatal(err)
		}
	}
	later := func() time.Time { return time.Now().Add(2 * time.Minute) }
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "bp"),
		Control: latentGraph{&fakeGraph{}, 5 * time.Millisecond}, Queues: &fakeQueues{}, CallbackURI: "https://bot.test/api/calls",
		Now: later})
	b.ResetTimer()
	for b.Loop() {
		if err := m.Reconcile(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/calls, "µs/call")
}

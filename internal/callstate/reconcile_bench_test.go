package callstate_test

import (
	"context"
	"fmt"
	"github.com/callbot/callbot/internal/ivr"
	"go.uber.org/zap"
	"sync/atomic"
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
		Control: latentGraph{&fakeGraph{}, 5 * time.Millisecond}, Queues: &fakeQueues{}, CallbackURI: "https://bot.test/api/calls", Log: zap.NewNop(),
		Now: later})
	b.ResetTimer()
	for b.Loop() {
		if err := m.Reconcile(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N)/calls, "µs/call")
}

// BenchmarkRedriveAnswers times the re-drive of 100 answers an instance saved and died with, by
// another instance's RunOutbox, with a Graph that answers in 20 ms: each answer is sent again
// after a read of the call shows Graph still has it incoming (compare builds with benchstat;
// docs/performance.md, "The re-drive after a kill").
func BenchmarkRedriveAnswers(b *testing.B) {
	rdb := redistest.Start(b).Client(b)
	ctx := context.Background()
	const calls = 100
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		prefix := fmt.Sprintf("br%d", i)
		hung := &fakeGraph{block: make(chan struct{})}
		a := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, prefix), Timers: callstate.NewTimers(rdb, prefix),
			Control: hung, Queues: &fakeQueues{}, CallbackURI: "https://bot.test/api/calls", Flow: benchFlow(b), Log: zap.NewNop()})
		ringIn(b, a, calls)
		g := &countingGraph{latentGraph: latentGraph{&fakeGraph{state: graph.CallIncoming}, 20 * time.Millisecond}}
		later := func() time.Time { return time.Now().Add(time.Minute) }
		m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, prefix), Timers: callstate.NewTimers(rdb, prefix),
			Control: g, Queues: &fakeQueues{}, CallbackURI: "https://bot.test/api/calls", Flow: benchFlow(b), Log: zap.NewNop(), Now: later})
		rctx, cancel := context.WithCancel(ctx)
		b.StartTimer()
		done := make(chan struct{})
		go func() { m.RunOutbox(rctx, 10*time.Millisecond); close(done) }()
		for g.answers.Load() < calls {
			time.Sleep(time.Millisecond)
		}
		b.StopTimer()
		cancel()
		<-done
		m.Wait()
		close(hung.block)
		a.Wait()
		b.StartTimer()
	}
}

// countingGraph is latentGraph that reads a call as incoming, and counts answers.
type countingGraph struct {
	latentGraph
	answers atomic.Int64
}

func (g *countingGraph) GetCall(ctx context.Context, id string) (graph.CallState, error) {
	time.Sleep(g.latency)
	return graph.CallIncoming, nil
}

func (g *countingGraph) Answer(ctx context.Context, id string, r graph.AnswerRequest) error {
	time.Sleep(g.latency)
	g.answers.Add(1)
	return nil
}

func benchFlow(b *testing.B) *ivr.Flow {
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		b.Fatal(err)
	}
	return flow
}

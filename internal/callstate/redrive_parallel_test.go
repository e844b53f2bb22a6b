package callstate_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// An instance dies with many calls answering: their answers are saved in its outboxes, not
// acknowledged. The instance that re-drives them reads each call from Graph before answering
// it again, and reads many at once. One at a time, each re-drive waited for the reads of those
// before it: with 40 such calls and Graph's reads at 200 ms, the last answer went out 8 s after
// the lease ran out (8 s itself), past Graph's 15 s answer deadline, and its caller was dropped.
func TestRedriveReadsManyCallsFromGraphAtOnce(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	n := 2 * callstate.RedriveParallel
	hung := &fakeGraph{block: make(chan struct{})} // A's answers never come back: it dies with them
	a := instance(t, rdb, "rd", hung, &fakeQueues{}, nil)
	defer func() { close(hung.block); a.Wait() }()
	ringIn(t, a, n)

	// B, a lease later: Graph has every call still incoming (the answers never reached it)
	g := newPacedGraph(callstate.RedriveParallel, time.Second)
	g.fakeGraph.state = graph.CallIncoming
	b := instance(t, rdb, "rd", g, &fakeQueues{}, func() time.Time { return time.Now().Add(time.Minute) })
	done := make(chan struct{})
	go func() { b.RunOutbox(ctx, 10*time.Millisecond); close(done) }()
	answered := func() int {
		k := 0
		for _, c := range g.log() {
			if strings.HasPrefix(c, "answer ") {
				k++
			}
		}
		return k
	}
	for deadline := time.Now().Add(30 * time.Second); answered() < n; {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d calls answered again by the instance that re-drove them", answered(), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	b.Wait()
	g.mu.Lock()
	most := g.most
	g.mu.Unlock()
	if most != callstate.RedriveParallel {
		t.Errorf("at most %d reads of a call from Graph in flight at once during the re-drive, want %d", most, callstate.RedriveParallel)
	}
	if got := answered(); got != n {
		t.Errorf("%d answers sent again, want %d (one per call)", got, n)
	}
}

// ringIn notifies m of n new incoming calls, c-000 to c-(n-1).
func ringIn(tb testing.TB, m *callstate.Machine, n int) {
	tb.Helper()
	for i := range n {
		ns, err := graph.Decode([]byte(note("created", fmt.Sprintf("c-%03d", i), `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		if err != nil {
			tb.Fatal(err)
		}
		if err := m.Notify(context.Background(), "t1", ns); err != nil {
			tb.Fatal(err)
		}
	}
}

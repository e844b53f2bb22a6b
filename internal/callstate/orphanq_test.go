package callstate_test

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/queue"
)

// A flow edit renames queue q to q2 (a rolling update: instances on the old flow and the new one
// share Redis). The reconciler swept of ghosts only the queues of its own instance's flow, so
// the entries of callers who ended while in q (a hang-up whose enqueue lost its race, a record
// that expired or was lost) stayed in Redis for good once every instance ran the new flow: no
// instance has q in its flow, no dispatcher reserves from it, nothing removed them. Likewise an
// instance still on the old flow, holding the reconciler's lease, never swept q2.
//
// Now the sweep covers every queue the tenant has in Redis: the ghosts of q go at the new
// instance's pass and those of q2 at the old one's, while a caller waiting in either queue by
// their record stays, in a queue the sweeping instance's flow does not have.
//
// The pass runs minutes later (the calls are read by the reconciler's walk of the live calls)
// or within the minute (they are too young for it). In the upgrade case the old instances kept
// no registry of the tenant's queues (a callbot before it): the new instance's start-up finds q
// in Redis.
func TestSweepCoversQueuesNotInTheFlow(t *testing.T) {
	for _, upgrade := range []bool{false, true} {
		for _, later := range []time.Duration{6 * time.Minute, 0} {
			name := later.String()
			if upgrade {
				name += "/upgrade"
			}
			t.Run(name, func(t *testing.T) { sweepCoversQueuesNotInTheFlow(t, later, upgrade) })
		}
	}
}

func sweepCoversQueuesNotInTheFlow(t *testing.T, later time.Duration, upgrade bool) {
	ctx := context.Background()
	g := newGhostInstances(t, "oq") // a and b on the old flow (queue q)
	rdb := g.f.srv.Client(t)
	store := callstate.NewStore(rdb, g.f.prefix)

	// the new flow: q renamed q2; its instance starts as callbot serve does (SetQueues)
	newYAML := strings.NewReplacer("{queue: q}", "{queue: q2}", "\n  q:\n", "\n  q2:\n").Replace(flowYAML)
	newFlow, err := ivr.Parse([]byte(newYAML), "new.yaml")
	mustDo(t, err)
	if newFlow.Queues["q"] != nil || newFlow.Queues["q2"] == nil {
		t.Fatalf("new flow's queues %v, want q2 and not q", slices.Collect(maps.Keys(newFlow.Queues)))
	}
	var newSkew time.Duration
	dN := queue.NewDispatcher(g.f.qs, nil, "tenant-1", []string{"q2"}, zaptest.NewLogger(t))
	n := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, g.f.prefix), Control: &fakeGraph{},
		Queues: dN, Flow: newFlow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Tenants: []string{"tenant-1"}, Now: func() time.Time { return time.Now().Add(newSkew) }})
	t.Cleanup(n.Wait)
	dN.Offer = n

	queueOn := func(m *callstate.Machine, id string) {
		notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
		notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
		notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	}
	const (
		waitingQ   = "c0000000-0000-4000-8000-000000000011"
		expiredQ   = "c0000000-0000-4000-8000-000000000012"
		waitingQ2  = "c0000000-0000-4000-8000-000000000013"
		expiredQ2  = "c0000000-0000-4000-8000-000000000014"
		waitingKQ  = "c0000000000040008000000000000011"
		expiredKQ  = "c0000000000040008000000000000012"
		waitingKQ2 = "c0000000000040008000000000000013"
		expiredKQ2 = "c0000000000040008000000000000014"
	)
	// in q, on the old flow: a ghost of a hang-up whose enqueue lost its race (as
	// TestGhostOfALostRaceIsSwept), a caller whose record expired, and a caller waiting
	notify(t, g.a, note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, g.a, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, g.b, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`))
	notify(t, g.a, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	queueOn(g.a, expiredQ)
	queueOn(g.a, waitingQ)
	// the new instance starts, as callbot serve does; in the upgrade case the old instances left
	// no registry of the tenant's queues
	if upgrade {
		mustDo(t, rdb.Del(ctx, g.f.prefix+":{tenant:tenant-1}:queues").Err())
	}
	mustDo(t, g.f.qs.SetQueues(ctx, "tenant-1", map[string][]string{"q2": {g.f.agent}}))
	// in q2, on the new flow: a caller whose record expired, and one waiting
	queueOn(n, expiredQ2)
	queueOn(n, waitingQ2)
	for _, k := range []string{expiredKQ, expiredKQ2} {
		mustDo(t, rdb.Del(ctx, g.f.prefix+":{call:"+k+"}").Err()) // the record expired (or was lost)
	}
	inQueue := func(q string) []string {
		t.Helper()
		w, err := g.f.qs.Waiting(ctx, "tenant-1", q)
		mustDo(t, err)
		slices.Sort(w) // callers queued within the same millisecond come in key order
		return w
	}
	if w := inQueue("q"); !slices.Contains(w, realCallKey) || !slices.Contains(w, expiredKQ) || !slices.Contains(w, waitingKQ) {
		t.Fatalf("queue q %v before the passes, want the ghost, the expired and the waiting caller", w)
	}
	if w := inQueue("q2"); !slices.Equal(w, []string{waitingKQ2, expiredKQ2}) {
		t.Fatalf("queue q2 %v before the passes, want the expired and the waiting caller", w)
	}

	// the new instance's pass (it holds the reconciler's lease), then the old one's
	newSkew += later
	mustDo(t, n.Reconcile(ctx))
	if w := inQueue("q"); !slices.Equal(w, []string{waitingKQ}) {
		t.Errorf("after the new flow's pass queue q (not in its flow) holds %v, want only %s, waiting there by its record", w, waitingKQ)
	}
	if w := inQueue("q2"); !slices.Equal(w, []string{waitingKQ2}) {
		t.Errorf("after the new flow's pass queue q2 holds %v, want only %s", w, waitingKQ2)
	}
	if got := n.Ghosts.Load(); got != 3 {
		t.Errorf("the new flow's pass counted %d ghosts, want 3", got)
	}

	// a caller's record expires in q2 while the old instance holds the lease
	const lateQ2, lateKQ2 = "c0000000-0000-4000-8000-000000000015", "c0000000000040008000000000000015"
	queueOn(n, lateQ2)
	mustDo(t, rdb.Del(ctx, g.f.prefix+":{call:"+lateKQ2+"}").Err())
	g.reconcile(t, later)
	if w := inQueue("q2"); !slices.Equal(w, []string{waitingKQ2}) {
		t.Errorf("after the old flow's pass queue q2 (not in its flow) holds %v, want only %s", w, waitingKQ2)
	}
	if w := inQueue("q"); !slices.Equal(w, []string{waitingKQ}) {
		t.Errorf("after the old flow's pass queue q holds %v, want only %s", w, waitingKQ)
	}
	for _, k := range []string{waitingKQ, waitingKQ2} {
		if c, err := store.Get(ctx, k); err != nil || c.State != callstate.StateQueued {
			t.Errorf("waiting caller %s: %s %v, want still queued", k, c.State, err)
		}
	}
}

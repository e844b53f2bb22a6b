package callstate_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
)

// A queue entry whose record is gone (expired, or lost with Redis data) is swept too; every
// caller whose record is not terminal stays, whatever its state: a caller waiting (queued), one
// just offered whose entry is back (transferring: a failed transfer puts them back at the same
// score at any moment), one still in the menu, one being answered. Their places are kept.
//
// The pass runs minutes later (the calls are read by the reconciler's walk of the live calls,
// and their entries are not read again), or within the minute (the calls are too young for that
// walk, and the sweep reads their records).
func TestSweepKeepsEveryLiveCaller(t *testing.T) {
	for _, later := range []time.Duration{6 * time.Minute, 0} {
		t.Run(later.String(), func(t *testing.T) { sweepKeepsEveryLiveCaller(t, later) })
	}
}

func sweepKeepsEveryLiveCaller(t *testing.T, later time.Duration) {
	ctx := context.Background()
	g := newGhostInstances(t, "gk")
	const (
		offered   = "c0000000-0000-4000-8000-000000000002"
		menu      = "c0000000-0000-4000-8000-000000000003"
		answering = "c0000000-0000-4000-8000-000000000004"
	)
	// the offered caller: queued, then reserved and offered to the agent (transferring)
	queueOn := func(m *callstate.Machine, id string) {
		notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
		notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
		notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	}
	queueOn(g.a, offered)
	if n := g.dA.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers, want 1", n)
	}
	g.a.Wait()
	store := callstate.NewStore(g.f.srv.Client(t), g.f.prefix)
	offeredKey := "c0000000000040008000000000000002"
	c, err := store.Get(ctx, offeredKey)
	mustDo(t, err)
	if c.State != callstate.StateTransferring {
		t.Fatalf("offered call %s, want transferring", c.State)
	}

	g.f.queueCaller(g.a) // waiting, queued
	// the offered caller's entry is back at its place (an undo whose record could not be read, a
	// failed transfer's re-enqueue): it must stay
	mustDo(t, g.f.qs.Enqueue(ctx, "tenant-1", "q", offeredKey, c.QueueScore))
	notify(t, g.a, note("created", menu, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, g.a, note("updated", menu, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	menuKey := "c0000000000040008000000000000003"
	mustDo(t, g.f.qs.Enqueue(ctx, "tenant-1", "q", menuKey, time.Now().UnixMilli()))
	// answering: the call is being set up (its entry is what a lost race of a later record may leave)
	notify(t, g.a, note("created", answering, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	answeringKey := "c0000000000040008000000000000004"
	mustDo(t, g.f.qs.Enqueue(ctx, "tenant-1", "q", answeringKey, time.Now().UnixMilli()))
	// and one whose record is gone
	mustDo(t, g.f.qs.Enqueue(ctx, "tenant-1", "q", "no-record", 1))

	g.reconcile(t, later)
	g.reconcile(t, later)
	w := g.waiting(t)
	for _, k := range []string{realCallKey, offeredKey, menuKey, answeringKey} {
		if !slices.Contains(w, k) {
			cs, _ := store.Get(ctx, k)
			t.Errorf("live caller %s (%s) removed from the queue: %v", k, cs.State, w)
		}
	}
	if slices.Contains(w, "no-record") {
		t.Errorf("an entry with no record is still in the queue after a pass: %v", w)
	}
	if n := g.a.Ghosts.Load(); n != 1 {
		t.Errorf("ghosts removed counted %d, want 1 (the entry with no record)", n)
	}
	ended, err := store.Ended(ctx, []string{realCallKey, offeredKey, menuKey, answeringKey, "no-record"})
	mustDo(t, err)
	if want := []bool{false, false, false, false, true}; !slices.Equal(ended, want) {
		t.Errorf("ended %v, want %v", ended, want)
	}
	if s, err := g.f.srv.Client(t).ZScore(ctx, g.f.prefix+":{tenant:tenant-1}:queue:q", offeredKey).Result(); err != nil || s != float64(c.QueueScore) {
		t.Errorf("offered caller's place %v %v, want %d", s, err, c.QueueScore)
	}
}

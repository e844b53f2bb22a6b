package queue

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
)

// An agent taken out of the flow must not stay in the tenant's agent records for good: before
// SetQueues forgot them, every agent a deployment ever had stayed routable, idle and free, at
// the head of the free agents, where every reservation read past them, and in every repair.
func TestSetQueuesForgetsAgentsNoQueueHas(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetQueues(ctx, "t", map[string][]string{"sales": {"a1", "a2", "a3"}, "support": {"a3", "a4"}}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true, "a2": true, "a3": true, "a4": true}))
	// a1 declines a call (cools down); a4 is on a call when the flow changes
	must(t, s.Enqueue(ctx, "t", "sales", "c1", 100))
	r, err := s.Reserve(ctx, "t", "sales", time.Now())
	must(t, err)
	if r.Agent != "a1" {
		t.Fatalf("reserved %s, want a1", r.Agent)
	}
	must(t, s.Release(ctx, "t", "a1", "c1", callstate.AgentFailed, 0))
	must(t, s.Enqueue(ctx, "t", "support", "c2", 200))
	if r, err = s.Reserve(ctx, "t", "support", time.Now()); err != nil || r.Agent != "a3" {
		t.Fatalf("reserved %+v, %v; want a3", r, err)
	}
	must(t, s.Enqueue(ctx, "t", "support", "c3", 300))
	if r, err = s.Reserve(ctx, "t", "support", time.Now()); err != nil || r.Agent != "a4" {
		t.Fatalf("reserved %+v, %v; want a4", r, err)
	}
	must(t, s.Release(ctx, "t", "a3", "c2", callstate.AgentConnected, 0))

	// the next start has a flow without a1 and a4
	must(t, s.SetQueues(ctx, "t", map[string][]string{"sales": {"a2", "a3"}, "support": {"a3"}}))
	k := s.keys("t", "")
	want := []string{"a2", "a3"}
	check := func(when string) {
		t.Helper()
		idle, _ := s.rdb.ZRange(ctx, k.idle, 0, -1).Result()
		free, _ := s.rdb.ZRange(ctx, k.free, 0, -1).Result()
		routable, _ := s.rdb.HKeys(ctx, k.routable).Result()
		cool, _ := s.rdb.ZRange(ctx, k.cool, 0, -1).Result()
		slices.Sort(idle)
		slices.Sort(free)
		slices.Sort(routable)
		if !slices.Equal(idle, want) || !slices.Equal(routable, want) {
			t.Errorf("%s: idle %v, routable %v; want %v", when, idle, routable, want)
		}
		if slices.ContainsFunc(append(free, cool...), func(a string) bool { return !slices.Contains(want, a) }) {
			t.Errorf("%s: free %v, cool %v; want only agents of %v", when, free, cool, want)
		}
	}
	check("after the flow changed")
	// a4's reservation stands until its call ends; the release frees nobody
	if c, _ := s.Reserved(ctx, "t", "a4"); c != "c3" {
		t.Fatalf("a4 reserved for %q, want c3", c)
	}
	must(t, s.Release(ctx, "t", "a4", "c3", callstate.AgentConnected, 0))
	if c, _ := s.Reserved(ctx, "t", "a4"); c != "" {
		t.Fatalf("a4 still reserved for %q", c)
	}
	must(t, s.RepairFree(ctx, "t"))
	idle, _ := s.rdb.ZRange(ctx, k.idle, 0, -1).Result()
	free, _ := s.rdb.ZRange(ctx, k.free, 0, -1).Result()
	if slices.Contains(idle, "a4") || slices.Contains(free, "a4") {
		t.Errorf("a4 back among the agents after its release: idle %v, free %v", idle, free)
	}
	// the agents left are offered as before
	must(t, s.Enqueue(ctx, "t", "sales", "c4", 400))
	if r, err = s.Reserve(ctx, "t", "sales", time.Now()); err != nil || !slices.Contains(want, r.Agent) {
		t.Fatalf("reserved %+v, %v; want a2 or a3", r, err)
	}
}

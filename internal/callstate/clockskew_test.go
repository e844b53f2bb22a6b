package callstate_test

import (
	"context"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/clock"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

// An instance whose host clock is 20 s behind puts a caller in the menu; the timers it arms
// (the menu's no-input timeout) are due on the time every instance shares, Redis's, so another
// instance, with a right clock, does not find them due at once. Before, each instance armed
// timers on its own clock: the other instance fired the no-input timeout as the menu began.
func TestTimersOfAHostWhoseClockIsOffAreDueOnTime(t *testing.T) {
	g := &fakeGraph{}
	r := newRig(t, g, "skew")
	ctx := context.Background()
	c := clock.New(r.rdb, "skew", nil)
	c.Local = func() time.Time { return time.Now().Add(-20 * time.Second) }
	if err := c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	flow, err := ivr.Parse([]byte(handoffFlowYAML), "r.yaml")
	if err != nil {
		t.Fatal(err)
	}
	r.m = r.newMachine(t, g, flow, c.Now)
	id := "c-skew"
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	rec, _ := r.store.Get(ctx, graph.CallKey(id))
	r.handle(t, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: rec.PromptCtx}) // the menu's prompt ended
	rec, _ = r.store.Get(ctx, graph.CallKey(id))
	if rec.State != callstate.StateInMenu || len(rec.Timers) == 0 {
		t.Fatalf("after the menu's prompt: %s, timers %v; want in the menu, its timeout armed", rec.State, rec.Timers)
	}
	due, err := r.timers.Claim(ctx, time.Now(), time.Minute, 100) // another instance, its clock right
	if err != nil {
		t.Fatal(err)
	}
	if len(due) != 0 {
		t.Errorf("another instance finds %d timer(s) due as the menu begins (%v); want none", len(due), due)
	}
}

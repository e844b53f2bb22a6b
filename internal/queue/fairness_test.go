package queue

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
)

// Two queues share an agent. The agent is freed one call at a time (as agents are), and queue
// a always has a caller who arrived after the one waiting in queue b. The dispatcher used to
// drain its queues in a fixed order (the flow's map order), so each free agent went to queue
// a's newest caller while queue b's caller, who had waited longest, was never offered: a whole
// queue starved as long as another busier queue sharing its agents had callers. Now the caller
// who has waited longest among the queues' heads is served first.
func TestDispatcherDoesNotStarveAQueueSharingAgents(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	s.ConnectedGuard = 0
	must(t, s.SetMembers(ctx, "t", "a", []string{"agent"}))
	must(t, s.SetMembers(ctx, "t", "b", []string{"agent"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"agent": true}))
	off := &fakeOfferer{accept: true}
	d := NewDispatcher(s, off, "t", []string{"a", "b"}, zaptest.NewLogger(t))
	must(t, d.Enqueue(ctx, "t", "b", "old-b", 100)) // waiting since t=100
	for i := range 5 {
		call := "new-a-" + string(rune('0'+i))
		must(t, d.Enqueue(ctx, "t", "a", call, int64(200+i))) // arrives later, every time
		clear(d.exhausted)
		if n := d.DispatchOnce(ctx); n != 1 {
			t.Fatalf("round %d: %d offers, want 1", i, n)
		}
		last := off.offers[len(off.offers)-1]
		if last == "old-b->agent" {
			return
		}
		// the agent talks to the caller, then is free again
		must(t, s.Release(ctx, "t", "agent", last[:len(last)-len("->agent")], callstate.AgentConnected, 0))
		time.Sleep(2 * time.Millisecond) // a later idle time
	}
	t.Errorf("offers %v: the caller of queue b, waiting longest, was never offered the shared agent", off.offers)
}

// With a blind transfer callbot leaves the call, so it only learns when the conversation ends
// from the agent's presence. An agent's idle time was set when the transfer completed and never
// again: agent x, who took a long call, came back with the idle time of that call's start and
// was offered the next caller ahead of agent y, who had finished a short call long before and
// sat idle since. Now an agent's idle time starts again when presence makes them routable.
func TestLongestIdleCountsFromTheEndOfTheLastConversation(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	s.ConnectedGuard = 0
	must(t, s.SetMembers(ctx, "t", "q", []string{"x", "y"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"x": true, "y": true}))
	take := func(call, want string) {
		t.Helper()
		must(t, s.Enqueue(ctx, "t", "q", call, time.Now().UnixMilli()))
		r, err := s.Reserve(ctx, "t", "q", time.Now())
		must(t, err)
		if r.Agent != want {
			t.Fatalf("%s reserved for %s, want %s", call, r.Agent, want)
		}
		must(t, s.Release(ctx, "t", r.Agent, call, callstate.AgentConnected, 0)) // transferred
		must(t, s.SetRoutable(ctx, "t", map[string]bool{r.Agent: false}))        // in a call
		time.Sleep(5 * time.Millisecond)
	}
	take("c1", "x")                                              // x's long call starts
	take("c2", "y")                                              // y's short call starts ...
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"y": true})) // ... and ends: y idle from now
	time.Sleep(5 * time.Millisecond)
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"x": true})) // x's long call ends just now
	must(t, s.Enqueue(ctx, "t", "q", "c3", time.Now().UnixMilli()))
	r, err := s.Reserve(ctx, "t", "q", time.Now())
	must(t, err)
	if r.Agent != "y" {
		t.Errorf("c3 reserved for %s, want y: idle since its short call ended, longer than x who just hung up", r.Agent)
	}
}

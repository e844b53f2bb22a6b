package callstate_test

import (
	"context"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// Paths on which a caller could be left in a call nobody serves, or a Graph command lost or
// sent twice, and the tests that keep them closed. Found by a review of callstate that proved
// each with one of these tests failing.

// handoffFlowYAML has a queue with blind transfer (1) and one with the conference hand-off (2).
const handoffFlowYAML = `
name: r
prompts:
  menu: {uri: https://m.test/menu.wav}
  hold: {uri: https://m.test/hold.wav}
start: main
menus:
  main:
    prompt: menu
    options:
      "1": {queue: q}
      "2": {queue: vip}
queues:
  q:
    hold: hold
    agents: [11111111-0000-4000-8000-000000000001]
  vip:
    hold: hold
    handoff: invite
    agents: [11111111-0000-4000-8000-000000000002]
`

// rig is one machine on a Redis of its own, with a clock that can be moved forward.
type rig struct {
	m      *callstate.Machine
	store  *callstate.Store
	timers *callstate.Timers
	rdb    redis.UniversalClient
	skew   time.Duration
}

func newRig(t *testing.T, g callstate.CallControl, prefix string) *rig {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(handoffFlowYAML), "r.yaml")
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{rdb: rdb, store: callstate.NewStore(rdb, prefix), timers: callstate.NewTimers(rdb, prefix)}
	r.m = callstate.NewMachine(callstate.Config{Store: r.store, Timers: r.timers, Control: g,
		Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t),
		Now: func() time.Time { return time.Now().Add(r.skew) }})
	return r
}

func (r *rig) handle(t *testing.T, id string, ev callstate.Event) {
	t.Helper()
	if _, err := r.m.Handle(context.Background(), "t1", graph.CallKey(id), ev); err != nil {
		t.Fatal(err)
	}
	r.m.Wait()
}

// fireDue applies the timers due at the rig's clock, as RunTimers does.
func (r *rig) fireDue(t *testing.T) {
	t.Helper()
	ctx := context.Background()
	due, err := r.timers.Claim(ctx, time.Now().Add(r.skew), time.Minute, 100)
	if err != nil {
		t.Fatal(err)
	}
	for _, tm := range due {
		if _, err := r.m.Handle(ctx, tm.Tenant, tm.Call, callstate.Event{Kind: callstate.EvTimeout, Timer: tm.Kind, TimerToken: tm.Token}); err != nil {
			t.Fatal(err)
		}
		r.timers.Done(ctx, tm)
	}
	r.m.Wait()
}

func countPrefix(s []string, prefix string) int {
	n := 0
	for _, x := range s {
		if len(x) >= len(prefix) && x[:len(prefix)] == prefix {
			n++
		}
	}
	return n
}

// The menu's fallback is a disconnect without a goodbye: the transition decides a hangup. Graph
// refuses it (503 after the client's retries). callbot hangs up again when no terminated
// notification has come after the hang-up grace, for as long as it takes; before, nothing was
// pending and the caller stayed in a call nobody served (the reconciler even kept it alive).
func TestFailedHangupIsSentAgain(t *testing.T) {
	g := &fakeGraph{fail: map[string]error{"hangup": &graph.Error{Op: "hangup", Status: 503}}}
	r := newRig(t, g, "rh")
	id := "c-hangup"
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	for i := int64(1); i <= 3; i++ { // three invalid keys: retries exhausted, fallback disconnect
		r.handle(t, id, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: i})
	}
	if n := countPrefix(g.log(), "hangup"); n != 1 {
		t.Fatalf("graph commands %v, want one hangup", g.log())
	}
	for want := 2; want <= 3; want++ {
		r.skew += 31 * time.Second // past the hang-up grace (30 s)
		r.fireDue(t)
		if n := countPrefix(g.log(), "hangup"); n != want {
			t.Fatalf("after %v with no terminated notification: %d hangups sent (%v), want %d", r.skew, n, g.log(), want)
		}
	}
	r.handle(t, id, callstate.Event{Kind: callstate.EvEnded})
	r.skew += 31 * time.Second
	r.fireDue(t)
	if n := countPrefix(g.log(), "hangup"); n != 3 {
		t.Errorf("%d hangups after the call ended, want none more", n-3)
	}
}

// failPrompts refuses playPrompt (400) up to limit times once armed.
type failPrompts struct {
	*fakeGraph
	armed  bool
	failed int
	limit  int
}

func (g *failPrompts) PlayPrompt(ctx context.Context, id string, ps []graph.MediaPrompt, cc string) (graph.Operation, error) {
	op, err := g.fakeGraph.PlayPrompt(ctx, id, ps, cc)
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.armed && g.failed < g.limit {
		g.failed++
		return graph.Operation{}, &graph.Error{Op: "playPrompt", Status: 400}
	}
	return op, err
}

// While the agent's phone rings (conference hand-off) a hold prompt Graph refuses is tried again
// 5 s later, as in the queue; before, it was played again at once, a loop of refused requests
// for as long as Graph refused.
func TestRefusedHoldMusicWhileInvitingWaits(t *testing.T) {
	g := &failPrompts{fakeGraph: &fakeGraph{}, limit: 500}
	r := newRig(t, g, "rp")
	id := "c-loop"
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	r.handle(t, id, callstate.Event{Kind: callstate.EvTone, Digit: "2", Seq: 1})
	r.handle(t, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: "agent-b"})
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateInviting {
		t.Fatalf("after the offer: %s, want inviting", c.State)
	}
	g.mu.Lock()
	g.armed = true
	g.mu.Unlock()
	r.handle(t, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: c.PromptCtx}) // hold music ended: play it again
	g.mu.Lock()
	n := g.failed
	g.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d refused playPrompt requests back to back, want one, then a pause", n)
	}
	g.mu.Lock()
	g.armed = false
	g.mu.Unlock()
	r.skew += 6 * time.Second
	r.fireDue(t)
	if c, _ := r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateInviting || c.PromptCtx == "" {
		t.Errorf("5 s after the refused prompt: %s, prompt %q; want the hold music playing again", c.State, c.PromptCtx)
	}
}

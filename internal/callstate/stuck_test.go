package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
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

// handoffFlowYAML is flowYAML with a second option (2) to a queue with the conference hand-off.
var handoffFlowYAML = strings.Replace(flowYAML, `      "1": {queue: q}
`, `      "1": {queue: q}
      "2": {queue: vip}
`, 1) + `  vip:
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
	q      *fakeQueues
	skew   time.Duration
}

func newRig(t *testing.T, g callstate.CallControl, prefix string) *rig {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(handoffFlowYAML), "r.yaml")
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{rdb: rdb, store: callstate.NewStore(rdb, prefix), timers: callstate.NewTimers(rdb, prefix), q: &fakeQueues{}}
	r.m = r.newMachine(t, g, flow, func() time.Time { return time.Now().Add(r.skew) })
	return r
}

// newMachine is a machine on r's Redis, store, timers and queues, with its own clock.
func (r *rig) newMachine(t *testing.T, g callstate.CallControl, flow *ivr.Flow, now func() time.Time) *callstate.Machine {
	return callstate.NewMachine(callstate.Config{Store: r.store, Timers: r.timers, Control: g,
		Queues: r.q, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), Now: now})
}

func (r *rig) handle(t *testing.T, id string, ev callstate.Event) {
	t.Helper()
	if _, err := r.m.Handle(context.Background(), "t1", graph.CallKey(id), ev); err != nil {
		t.Fatal(err)
	}
	r.m.Wait()
}

// inviting brings call id through the menu (key 2) to the conference hand-off queue, and offers
// it to agent: the agent is invited.
func (r *rig) inviting(t *testing.T, id, agent string) {
	t.Helper()
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	r.handle(t, id, callstate.Event{Kind: callstate.EvTone, Digit: "2", Seq: 1})
	r.handle(t, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: agent})
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

// failPrompts fails playPrompt up to limit times once armed: refused (400), or, with inResponse,
// answered 200 with the operation already failed (Graph may put an operation's final status in
// the action's response, and then no notification follows: commsOperation; graph/WIRE.md a.4).
type failPrompts struct {
	*fakeGraph
	armed      bool
	inResponse bool
	failed     int
	limit      int
}

func (g *failPrompts) PlayPrompt(ctx context.Context, id string, ps []graph.MediaPrompt, cc string) (graph.Operation, error) {
	op, err := g.fakeGraph.PlayPrompt(ctx, id, ps, cc)
	g.mu.Lock()
	defer g.mu.Unlock()
	if err != nil || !g.armed || g.failed >= g.limit {
		return op, err
	}
	g.failed++
	if g.inResponse {
		op.Status = graph.OpFailed
		return op, nil
	}
	return graph.Operation{}, &graph.Error{Op: "playPrompt", Status: 400}
}

// While the agent's phone rings (conference hand-off) a hold prompt Graph refuses is tried again
// 5 s later, as in the queue; before, it was played again at once, a loop of refused requests
// for as long as Graph refused.
func TestRefusedHoldMusicWhileInvitingWaits(t *testing.T) {
	g := &failPrompts{fakeGraph: &fakeGraph{}, limit: 500}
	r := newRig(t, g, "rp")
	id := "c-loop"
	r.inviting(t, id, "agent-b")
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateInviting {
		t.Fatalf("after the offer: %s, want inviting", c.State)
	}
	r.holdMusicFailsOnceThenWaits(t, g, id, c.PromptCtx, callstate.StateInviting)
}

// Hold music whose playPrompt response already says failed is a failed prompt, tried again 5 s
// later, as one whose failure is notified. Before, a final status in the response was taken for
// a prompt that had played to its end: the hold music was asked for again at once, a loop of
// requests for as long as Graph failed them.
func TestHoldMusicFailedInTheResponseWaits(t *testing.T) {
	g := &failPrompts{fakeGraph: &fakeGraph{}, inResponse: true, limit: 500}
	r := newRig(t, g, "rf")
	id := "c-failed-op"
	r.handle(t, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	r.handle(t, id, callstate.Event{Kind: callstate.EvEstablished})
	r.handle(t, id, callstate.Event{Kind: callstate.EvTone, Digit: "1", Seq: 1})
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateQueued || c.PromptCtx == "" {
		t.Fatalf("after key 1: %s, prompt %q; want queued with hold music", c.State, c.PromptCtx)
	}
	r.holdMusicFailsOnceThenWaits(t, g, id, c.PromptCtx, callstate.StateQueued)
}

// holdMusicFailsOnceThenWaits ends call id's hold music (prompt cc) with g failing every
// playPrompt: one request fails, and no other follows at once; then, with g no longer failing,
// the hold music plays again 5 s later, the call still in state.
func (r *rig) holdMusicFailsOnceThenWaits(t *testing.T, g *failPrompts, id, cc string, state callstate.State) {
	t.Helper()
	g.mu.Lock()
	g.armed = true
	g.mu.Unlock()
	r.handle(t, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: cc}) // hold music ended: play it again
	g.mu.Lock()
	n := g.failed
	g.armed = false
	g.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d failed playPrompt requests back to back, want one, then a pause", n)
	}
	r.skew += 6 * time.Second
	r.fireDue(t)
	if c, _ := r.store.Get(context.Background(), graph.CallKey(id)); c.State != state || c.PromptCtx == "" {
		t.Errorf("5 s after the failed prompt: %s, prompt %q; want %s with the hold music playing again", c.State, c.PromptCtx, state)
	}
}

// roster is a participants notification of call id: the caller, the bot and the given users,
// each with its own rosterSequenceNumber (seqs: caller, bot, then the users').
func roster(id string, seqs []int, users ...string) string {
	ps := []string{
		fmt.Sprintf(`{"@odata.type":"#microsoft.graph.participant","id":"p-caller","info":{"identity":{"phone":{"id":"+14255550100"}}},"rosterSequenceNumber":%d}`, seqs[0]),
		fmt.Sprintf(`{"@odata.type":"#microsoft.graph.participant","id":"p-bot","info":{"identity":{"application":{"id":"bot"}}},"rosterSequenceNumber":%d}`, seqs[1]),
	}
	for i, u := range users {
		ps = append(ps, fmt.Sprintf(`{"@odata.type":"#microsoft.graph.participant","id":"p-%d","info":{"identity":{"user":{"id":%q}}},"rosterSequenceNumber":%d}`, i, u, seqs[2+i]))
	}
	return `{"@odata.type":"#microsoft.graph.commsNotifications","value":[{"changeType":"updated","resourceUrl":"/communications/calls/` +
		id + `/participants","resourceData":[` + strings.Join(ps, ",") + `]}]}`
}

// A participant's rosterSequenceNumber is "the roster sequence number in which the participant
// was last updated" (https://learn.microsoft.com/en-us/graph/api/resources/participant): the
// roster that shows the agent gone lists the caller and the bot with the numbers they had, no
// higher than the agent's. callbot took the highest number of a roster for the roster's and
// ignored that one as older than the roster that showed the agent, and then its minute roster
// reads as well (older than the roster notified): the caller stayed in a call with nobody, and
// the agent reserved, until the caller hung up. Now a roster without the agent is checked with a
// read, and the read (the agent gone) ends the call.
func TestAgentLeavingSeenWithParticipantSequenceNumbers(t *testing.T) {
	g := &fakeGraph{}
	r := newRig(t, g, "rs")
	id := "c-roster"
	agent := "11111111-0000-4000-8000-000000000002"
	r.inviting(t, id, agent)
	r.notify(t, roster(id, []int{1, 1, 1}, agent)) // the call became a group call as the agent joined
	if c, _ := r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateConnected {
		t.Fatalf("after the roster with the agent: %s, want connected", c.State)
	}
	r.notify(t, roster(id, []int{1, 1})) // the agent left: the others were not updated
	if c, _ := r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateTerminating || countPrefix(g.log(), "hangup") != 1 {
		t.Errorf("after the roster without the agent: %s, Graph commands %v; want callbot to hang up", c.State, g.log())
	}
}

// gatedGraph holds Transfer until gate is closed: a slow Graph, or an executor that is behind.
type gatedGraph struct {
	*fakeGraph
	gate chan struct{}
}

func (g *gatedGraph) Transfer(ctx context.Context, id string, p graph.Party, cc string) error {
	if g.gate != nil {
		<-g.gate
	}
	return g.fakeGraph.Transfer(ctx, id, p, cc)
}

// twoInstances makes two machines (two callbot instances) on one Redis.
func twoInstances(t *testing.T, prefix string, ga, gb callstate.CallControl, qa, qb callstate.Queues) (a, b *callstate.Machine, store *callstate.Store) {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(handoffFlowYAML), "r.yaml")
	if err != nil {
		t.Fatal(err)
	}
	mk := func(g callstate.CallControl, q callstate.Queues) *callstate.Machine {
		m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, prefix), Timers: callstate.NewTimers(rdb, prefix), Control: g,
			Queues: q, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
		t.Cleanup(m.Wait) // its Graph commands are done before the test ends (and its logger with it)
		return m
	}
	return mk(ga, qa), mk(gb, qb), callstate.NewStore(rdb, prefix)
}

func must(t *testing.T, m *callstate.Machine, id string, ev callstate.Event) bool {
	t.Helper()
	ok, err := m.Handle(context.Background(), "t1", graph.CallKey(id), ev)
	if err != nil {
		t.Fatal(err)
	}
	return ok
}

// Attempt 1 fails, and instance A offers the caller to agent-b; A's transfer request has not
// reached Graph yet (its executor is behind). Graph repeats attempt 1's failure notification and
// instance B gets it. B asks Graph, which still has the call established, since attempt 2 has not
// reached it. Before, B took that as attempt 2's failure: agent-b released as failed and the
// caller requeued, while A's transfer to agent-b went out. Now a failure is settled only once Graph
// said the current attempt was under way (transferring), or by a later look.
func TestRepeatedFailureOfAnEarlierAttemptDoesNotEndTheNext(t *testing.T) {
	ga := &gatedGraph{fakeGraph: &fakeGraph{}}
	gb := &fakeGraph{}
	qa, qb := &fakeQueues{}, &fakeQueues{}
	a, b, store := twoInstances(t, "lt", ga, gb, qa, qb)
	id := "c-late"
	key := graph.CallKey(id)
	must(t, a, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	must(t, a, id, callstate.Event{Kind: callstate.EvEstablished})
	must(t, a, id, callstate.Event{Kind: callstate.EvTone, Digit: "1", Seq: 1})
	must(t, a, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: "agent-a"})
	a.Wait()
	must(t, a, id, callstate.Event{Kind: callstate.EvTransferring}) // Graph took attempt 1
	failure := callstate.Event{Kind: callstate.EvTransferFailed, Result: graph.ResultInfo{Code: 500, Subcode: 7000}}
	must(t, a, id, failure) // attempt 1's failure: checked with Graph (established), requeued
	a.Wait()
	if c, _ := store.Get(context.Background(), key); c.State != callstate.StateQueued {
		t.Fatalf("after attempt 1 failed: %s, want queued", c.State)
	}
	ga.gate = make(chan struct{})
	if !must(t, a, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: "agent-b"}) {
		t.Fatal("offer to agent-b refused")
	}
	must(t, b, id, failure) // Graph repeats attempt 1's failure; B gets it
	b.Wait()
	close(ga.gate)
	a.Wait()
	c, _ := store.Get(context.Background(), key)
	if c.State != callstate.StateTransferring || c.Agent != "agent-b" {
		t.Fatalf("a repeated failure of attempt 1 ended attempt 2: call %s agent %q; A sent %v; B's queue operations %v",
			c.State, c.Agent, ga.log(), qb.ops)
	}
	if countPrefix(qb.ops, "release") != 0 {
		t.Errorf("B released an agent: %v", qb.ops)
	}
}

// A participants notification with no roster in it (resourceData null, absent, or one
// participant's object) is not an empty roster: read as one, it took the agent of a connected
// call for gone and hung up on the caller. An empty array is a roster with nobody in it.
func TestParticipantsNotificationWithoutARosterIsNoRoster(t *testing.T) {
	const id = "57dab8b1-894c-409a-b240-bd8beae78896"
	for _, tc := range []struct {
		url, data string
		roster    bool
	}{
		{"/participants", `null`, false},
		{"/participants", `{"@odata.type":"#microsoft.graph.participant","id":"p1"}`, false},
		{"/participants/p1", `{"@odata.type":"#microsoft.graph.participant","id":"p1"}`, false},
		{"/participants", `[]`, true},
	} {
		body := `{"@odata.type":"#microsoft.graph.commsNotifications","value":[{"changeType":"updated","resourceUrl":"/communications/calls/` +
			id + tc.url + `","resourceData":` + tc.data + `}]}`
		ns, err := graph.Decode([]byte(body))
		if err != nil {
			t.Fatalf("%s %s: %v", tc.url, tc.data, err)
		}
		ev, ok := callstate.EventOf(ns[0], "t1", "")
		if ok != tc.roster || (ok && (ev.Kind != callstate.EvRoster || len(ev.Participants) != 0)) {
			t.Errorf("%s %s: event %v %v, want a roster: %v", tc.url, tc.data, ev.Kind, ok, tc.roster)
		}
	}
}

// With several tenants allowed, a notification carrying one tenant's token must not change a
// call of another: call updates, terminations, operations and rosters do not name the tenant
// in their body, so the call's own record is what is checked. The webhook answers 403.
func TestNotificationOfAnotherTenantChangesNothing(t *testing.T) {
	m, store := newMachine(t, &fakeGraph{}, &fakeQueues{})
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)) // tenant-1's call
	m.Wait()
	before, err := store.Get(context.Background(), graph.CallKey(id))
	if err != nil {
		t.Fatal(err)
	}
	ns, err := graph.Decode([]byte(note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`)))
	if err != nil {
		t.Fatal(err)
	}
	err = m.Notify(context.Background(), "tenant-2", ns)
	if !errors.Is(err, graph.ErrWrongTenant) {
		t.Fatalf("Notify with another tenant's token = %v, want ErrWrongTenant", err)
	}
	after, err := store.Get(context.Background(), graph.CallKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if after.State != before.State || after.Version != before.Version {
		t.Errorf("call went %s v%d -> %s v%d on another tenant's notification", before.State, before.Version, after.State, after.Version)
	}
}

// Instance A saves the offer (invite agent-b) and dies before sending the invite. Within A's
// lease the hold music's end (still awaited in inviting) reaches B, which plays it again and
// acknowledges its own Graph commands. Acknowledgements were a watermark per kind of command,
// so B's covered A's invite: the re-drive found nothing, the invite was never sent, and 90 s
// later the caller was requeued and agent-b marked failed without having rung. A batch finished
// ahead of an older one is now recorded ahead of the watermark, and the re-drive sends the
// commands the call still waits on, older ones included.
func TestInviteNotSentByADeadInstanceIsNotLostBehindALaterTransition(t *testing.T) {
	ga := &fakeGraph{}
	gb := &fakeGraph{}
	a, b, store := twoInstances(t, "rl", ga, gb, &fakeQueues{}, &fakeQueues{})
	id := "c-lost"
	key := graph.CallKey(id)
	must(t, a, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	must(t, a, id, callstate.Event{Kind: callstate.EvEstablished})
	must(t, a, id, callstate.Event{Kind: callstate.EvTone, Digit: "2", Seq: 1})
	a.Wait()
	ga.block = make(chan struct{})               // A hangs from here on: it never sends the invite
	defer func() { close(ga.block); a.Wait() }() // A's goroutines end before the test does
	must(t, a, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: "agent-b"})
	ctx := context.Background()
	c, _ := store.Get(ctx, key)
	if c.State != callstate.StateInviting || c.PromptCtx == "" {
		t.Fatalf("after the offer: %s prompt %q", c.State, c.PromptCtx)
	}
	must(t, b, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: c.PromptCtx}) // hold music ended
	b.Wait()
	redriveAll(t, b, store, time.Minute) // A's lease ran out
	if n := countPrefix(gb.log(), "invite"); n != 1 {
		c, _ = store.Get(ctx, key)
		t.Fatalf("invite sent %d times by the re-drive (B sent %v); the call waits in %s with %d commands left", n, gb.log(), c.State, len(c.Outbox))
	}
	if n := countPrefix(gb.log(), "playPrompt"); n != 1 {
		t.Errorf("B played the hold music %d times; want once (its own batch was done, and an older prompt is moot)", n)
	}
	// Everything is done now: a later claim finds nothing to send.
	if c, _ = store.Get(ctx, key); len(c.Outbox) != 0 {
		t.Errorf("outbox after the re-drive: %+v, want empty", c.Outbox)
	}
}

// slowGraph: GetCall takes getDelay; Answer for gateCall waits for gate.
type slowGraph struct {
	*fakeGraph
	getDelay time.Duration
	gateCall string
	gate     chan struct{}
}

func (g *slowGraph) GetCall(ctx context.Context, id string) (graph.CallState, error) {
	time.Sleep(g.getDelay)
	return g.fakeGraph.GetCall(ctx, id)
}

func (g *slowGraph) Answer(ctx context.Context, id string, r graph.AnswerRequest) error {
	if id == g.gateCall {
		<-g.gate
	}
	return g.fakeGraph.Answer(ctx, id, r)
}

// Instance A carries out a slow answer and, in its RunOutbox, re-drives the outbox of a dead
// instance, asking Graph first, which is slower than a lease. The renewal of A's leases used to
// run in the same loop as the re-drive and waited behind it: instance B then re-drove the answer A
// was still sending, and the outbox A was re-driving. Renewal now runs on its own, and a re-drive
// renews the lease of the outbox it works on.
func TestLeasesRenewedWhileARedriveWaitsForGraph(t *testing.T) {
	const lease = 400 * time.Millisecond
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(handoffFlowYAML), "r.yaml")
	if err != nil {
		t.Fatal(err)
	}
	mk := func(g callstate.CallControl) *callstate.Machine {
		return callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "rl"), Timers: callstate.NewTimers(rdb, "rl"), Control: g,
			Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), OutboxLease: lease})
	}
	incoming := func(m *callstate.Machine, id string) {
		must(t, m, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	}
	dead := &fakeGraph{block: make(chan struct{})}
	d := mk(dead)
	incoming(d, "c-orphan") // saved, never sent: this instance hangs for good

	ga := &slowGraph{fakeGraph: &fakeGraph{state: graph.CallIncoming}, getDelay: 8 * lease, gateCall: "c-slow", gate: make(chan struct{})}
	a := mk(ga)
	incoming(a, "c-slow") // A's answer to Graph is slow
	gb := &fakeGraph{state: graph.CallIncoming}
	b := mk(gb)
	ctx, cancel := context.WithCancel(context.Background())
	var loops sync.WaitGroup
	defer func() { // everything the instances started ends before the test does
		close(ga.gate)
		cancel()
		loops.Wait()
		close(dead.block)
		for _, m := range []*callstate.Machine{a, b, d} {
			m.Wait()
		}
	}()
	loops.Go(func() { a.RunOutbox(ctx, 50*time.Millisecond) })

	time.Sleep(2 * lease) // A has claimed the orphan's outbox and is asking Graph about it
	loops.Go(func() { b.RunOutbox(ctx, 50*time.Millisecond) })
	time.Sleep(4 * lease)
	for _, cmd := range gb.log() {
		if strings.HasPrefix(cmd, "answer") {
			t.Errorf("B sent %q while A, alive, was sending it (B's commands: %v)", cmd, gb.log())
		}
	}
}

// sentThenHung sends invites (recorded by the fake), then hangs before returning: an instance
// that dies after its invite reached Graph and before it acknowledged it.
type sentThenHung struct {
	*fakeGraph
	hang chan struct{}
}

func (g *sentThenHung) InviteParticipants(ctx context.Context, id string, r graph.InviteRequest) (graph.Operation, error) {
	op, err := g.fakeGraph.InviteParticipants(ctx, id, r)
	<-g.hang
	return op, err
}

// Instance A invites agent-b into the call and dies before acknowledging it. The re-drive cannot
// tell from the call (it stays established) whether the invite reached Graph; it re-sent it, so
// an agent who had joined was invited again, and an agent still ringing got a second invite that
// Graph refused (graphsim: "is ringing already"), a refusal taken as the attempt's failure: the
// caller went back to the queue while agent-b's phone rang. Now the re-drive reads the roster: an
// agent in it is not invited again (the call is connected); one not in it is, and a refusal of
// that second invite is left to the first one's outcome.
func TestInviteSentByADeadInstanceIsNotSentTwice(t *testing.T) {
	setup := func(t *testing.T, prefix string) (a, b *callstate.Machine, gb *fakeGraph, store *callstate.Store, id string) {
		ga := &sentThenHung{fakeGraph: &fakeGraph{}, hang: make(chan struct{})}
		gb = &fakeGraph{}
		a, b, store = twoInstances(t, prefix, ga, gb, &fakeQueues{}, &fakeQueues{})
		t.Cleanup(func() { close(ga.hang) })
		id = "c-" + prefix
		must(t, a, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
		must(t, a, id, callstate.Event{Kind: callstate.EvEstablished})
		must(t, a, id, callstate.Event{Kind: callstate.EvTone, Digit: "2", Seq: 1})
		a.Wait()
		must(t, a, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: "agent-b"})
		for countPrefix(ga.log(), "invite") == 0 {
			time.Sleep(time.Millisecond)
		}
		return a, b, gb, store, id
	}
	t.Run("the agent joined", func(t *testing.T) {
		_, b, gb, store, id := setup(t, "ij")
		gb.setUsers("caller", "agent-b")
		redriveAll(t, b, store, time.Minute) // A's lease ran out
		if n := countPrefix(gb.log(), "invite"); n != 0 {
			t.Errorf("the re-drive invited the agent %d more times (B sent %v); they are in the call", n, gb.log())
		}
		if c, _ := store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateConnected {
			t.Errorf("call %s, want connected (the roster shows the agent)", c.State)
		}
	})
	t.Run("the call is still peer to peer", func(t *testing.T) {
		_, b, gb, store, _ := setup(t, "ip")
		gb.fail = map[string]error{"participants": &graph.Error{Op: "listParticipants", Status: 400}}
		redriveAll(t, b, store, time.Minute) // A's lease ran out
		if n := countPrefix(gb.log(), "invite"); n != 1 {
			t.Errorf("the re-drive sent %d invites (%v), want one (Graph lists no roster: nobody joined)", n, gb.log())
		}
	})
	t.Run("its failure is being checked", func(t *testing.T) {
		a, b, gb, store, id := setup(t, "ic")
		c, _ := store.Get(context.Background(), graph.CallKey(id))
		// A takes a failure (a second invite's, say) and decides to read the roster; the read
		// waits behind A's hung invite: no answer comes
		must(t, a, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx, Failed: true})
		gb.setUsers("caller")                // the agent is not in the call (yet)
		redriveAll(t, b, store, time.Minute) // A's lease ran out
		if n := countPrefix(gb.log(), "invite"); n != 0 {
			t.Errorf("the re-drive sent %d invites while the invite's failure was being checked (%v), want none", n, gb.log())
		}
	})
	t.Run("the agent is ringing", func(t *testing.T) {
		_, b, gb, store, id := setup(t, "ir")
		gb.setUsers("caller")
		gb.fail = map[string]error{"invite": &graph.Error{Op: "invite", Status: 400, Message: "An invited participant (agent-b) is ringing already."}}
		redriveAll(t, b, store, time.Minute) // A's lease ran out
		if n := countPrefix(gb.log(), "invite"); n != 1 {
			t.Fatalf("the re-drive sent %d invites (%v), want one (Graph may never have had the first)", n, gb.log())
		}
		c, _ := store.Get(context.Background(), graph.CallKey(id))
		if c.State != callstate.StateInviting || c.Agent != "agent-b" {
			t.Fatalf("after the second invite was refused: %s agent %q, want still inviting agent-b", c.State, c.Agent)
		}
		must(t, b, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx}) // the first invite: agent-b joined
		b.Wait()
		if c, _ := store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateConnected {
			t.Errorf("after the first invite completed: %s, want connected", c.State)
		}
	})
}

// Connected, the agent leaves and the roster that says so is lost. callbot reads the roster a
// check interval later, hangs up and lets the agent wrap up; before, the caller stayed in a call
// with nobody until they hung up.
func TestLostRosterOfTheAgentLeavingIsFoundByReading(t *testing.T) {
	g := &fakeGraph{}
	r := newRig(t, g, "rr")
	id := "c-left"
	r.inviting(t, id, "agent-b")
	r.handle(t, id, callstate.Event{Kind: callstate.EvRoster, Participants: []string{"caller", "agent-b"}, Seq: 1})
	g.setUsers("caller", "agent-b")
	r.skew += 61 * time.Second
	r.fireDue(t)
	if c, _ := r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateConnected {
		t.Fatalf("a minute into the conversation: %s, want connected (the agent is still there)", c.State)
	}
	g.setUsers("caller") // the agent hung up; the roster notification is lost
	r.skew += 61 * time.Second
	r.fireDue(t)
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateTerminating || countPrefix(g.log(), "hangup") != 1 {
		t.Errorf("a check interval after the agent left: %s, Graph saw %v; want callbot to hang up", c.State, g.log())
	}
}

// Graph does not list the participants of a peer-to-peer call (the caller and callbot, before an
// invited agent joins). Such a refusal says the agent is not in the call: a failed invite sends
// the caller back to the queue at once rather than after the roster read's recheck (and the
// re-drive of an invite sends it again: TestInviteSentByADeadInstanceIsNotSentTwice).
func TestPeerToPeerRosterMeansTheAgentHasNotJoined(t *testing.T) {
	p2p := &graph.Error{Op: "listParticipants", Status: 400, Message: "Listing participants is not supported for peer-to-peer calls."}
	g := &fakeGraph{fail: map[string]error{"participants": p2p}}
	r := newRig(t, g, "rp2p")
	id := "c-p2p"
	r.inviting(t, id, "agent-b")
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	r.handle(t, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx, Failed: true})
	if c, _ = r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateQueued || c.Agent != "" {
		t.Errorf("declined invite, roster refused as peer-to-peer: %s agent %q, want back in the queue", c.State, c.Agent)
	}
}

// A call Graph has established whose record is gone (lost with Redis data: a failover that lost
// unreplicated writes, a crash within the AOF's second): its notifications were ignored as being
// for an unknown call, and the caller waited in a call nobody served. callbot now asks Graph
// and, the call being established, takes it back: the menu starts again. Once per call per
// adoptEvery, and not for a call Graph no longer has, nor for events of a transfer or a
// conference.
func TestCallWithoutARecordIsTakenBack(t *testing.T) {
	g, q := &fakeGraph{}, &fakeQueues{}
	m, store := newMachine(t, g, q)
	id := "8a1b2c3d-0000-4000-8000-00000000a0a0"
	tone := `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":3,"tone":"tone1"}}`
	notify(t, m, note("updated", id, tone))
	c, err := store.Get(context.Background(), graph.CallKey(id))
	if err != nil || c.State != callstate.StateQueued || c.Tenant != "tenant-1" || c.ID != id {
		t.Fatalf("a key press (1: the queue) of a call with no record, established in Graph: %+v %v; want the call taken back, and the key press applied to its new menu", c, err)
	}
	want := []string{"get", "participants", "subscribeToTone", "playPrompt menu", "cancelMediaProcessing", "playPrompt hold"}
	if got := g.log(); !slices.Equal(got, want) {
		t.Errorf("graph commands %v, want %v: the call and its participants read, tones subscribed, the menu started, then the key press", got, want)
	}
	if n := m.Adopted.Load(); n != 1 {
		t.Errorf("Adopted = %d, want 1", n)
	}
	notify(t, m, note("updated", id, tone)) // known now: a repeat changes nothing
	if got := g.log(); len(got) != len(want) {
		t.Errorf("a repeat of the key press: %v", got[len(want):])
	}

	gone := "8a1b2c3d-0000-4000-8000-00000000b0b0"
	g.mu.Lock()
	g.state = "gone"
	g.mu.Unlock()
	notify(t, m, note("updated", gone, tone))
	notify(t, m, note("updated", gone, tone)) // within adoptEvery: not asked again
	if _, err := store.Get(context.Background(), graph.CallKey(gone)); !errors.Is(err, callstate.ErrNotFound) {
		t.Errorf("a call Graph no longer has: %v, want no record", err)
	}
	if n := countPrefix(g.log(), "get"); n != 2 {
		t.Errorf("Graph read %d times in all, want 2 (the second call once)", n)
	}
	// A conference (an invited agent with the caller): the menu must not play over it.
	g.mu.Lock()
	g.state = ""
	g.mu.Unlock()
	g.setUsers("caller", "agent-b")
	conf := "8a1b2c3d-0000-4000-8000-00000000d0d0"
	notify(t, m, note("updated", conf, tone))
	if _, err := store.Get(context.Background(), graph.CallKey(conf)); !errors.Is(err, callstate.ErrNotFound) {
		t.Errorf("a conference with no record was taken back (its menu played over the conversation): %v", err)
	}
	if n := countPrefix(g.log(), "subscribeToTone"); n != 1 {
		t.Errorf("commands %v: a second call was taken back", g.log())
	}
	roster := `[{"@odata.type":"#microsoft.graph.participant","id":"p","info":{"identity":{"user":{"id":"agent-b"}}}}]`
	notify(t, m, `{"@odata.type":"#microsoft.graph.commsNotifications","value":[{"changeType":"updated","resourceUrl":"/communications/calls/8a1b2c3d-0000-4000-8000-00000000c0c0/participants","resourceData":`+roster+`}]}`)
	if n := countPrefix(g.log(), "get"); n != 3 {
		t.Errorf("a roster of an unknown call (a conference) made Graph be read: %v", g.log())
	}
}

// A call taken back starts its tokens above any its lost record drew: another instance that
// still caches the lost record (it handled an earlier event of the call) ignored the new menu's
// end and its no-input timer as past ones (Stale), and the caller heard the menu once, then
// silence.
func TestAdoptedCallIsNotIgnoredByAnotherInstancesCache(t *testing.T) {
	r, b, id := takenBackWhileCachedElsewhere(t, "ra")
	ctx := context.Background()
	key := graph.CallKey(id)
	c, err := r.store.Get(ctx, key)
	if err != nil || c.State != callstate.StateInMenu || c.PromptCtx == "" || r.m.Adopted.Load() != 1 {
		t.Fatalf("taken back on A: %+v %v (adopted %d)", c, err, r.m.Adopted.Load())
	}
	// the new menu prompt ends; Graph's notification lands on B
	must(t, b, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: c.PromptCtx})
	if got, _ := r.store.Get(ctx, key); got.PromptCtx != "" {
		t.Errorf("the new menu's end, on B: PromptCtx still %q, want it applied", got.PromptCtx)
	}
	c, _ = r.store.Get(ctx, key)
	if !must(t, b, id, callstate.Event{Kind: callstate.EvTimeout, Timer: callstate.TimerMenu, TimerToken: c.Timers[callstate.TimerMenu]}) {
		t.Errorf("the new menu's no-input timer, on B: ignored, want the menu replayed")
	}
}

// Graph could not be read about a call with no record: the notification is refused (503), so
// Graph delivers it again, and the call is taken back then, the key press applied.
func TestFailedReadOfAnUnknownCallIsAskedAgain(t *testing.T) {
	g := &fakeGraph{fail: map[string]error{"get": &graph.Error{Op: "getCall", Status: 503}}}
	m, store := newMachine(t, g, &fakeQueues{})
	id := "8a1b2c3d-0000-4000-8000-00000000e0e0"
	press := note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
	if err := deliver(m, press); !errors.Is(err, graph.ErrUnavailable) {
		t.Fatalf("a key press of an unknown call, Graph unreadable: %v, want ErrUnavailable (503: delivered again)", err)
	}
	g.mu.Lock()
	g.fail = nil
	g.mu.Unlock()
	if err := deliver(m, press); err != nil { // Graph delivers it again
		t.Fatal(err)
	}
	if c, err := store.Get(context.Background(), graph.CallKey(id)); err != nil || m.Adopted.Load() != 1 || c.State != callstate.StateQueued {
		t.Errorf("the key press delivered again: %+v %v (adopted %d), want the call taken back and queued", c.State, err, m.Adopted.Load())
	}
}

// secondInstance is another machine on the rig's Redis and key prefix, with its own Graph.
func secondInstance(t *testing.T, r *rig, prefix string, g callstate.CallControl) *callstate.Machine {
	t.Helper()
	flow, err := ivr.Parse([]byte(handoffFlowYAML), "r.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(r.rdb, prefix), Timers: callstate.NewTimers(r.rdb, prefix),
		Control: g, Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
	t.Cleanup(m.Wait)
	return m
}

// takenBackWhileCachedElsewhere: instance B handles a call into its menu (and caches its
// record, at version 3); the record is lost with Redis data; a key press (invalid: the menu
// again) lands on instance A (the rig), which takes the call back. It returns the rig, B and the
// call's id.
func takenBackWhileCachedElsewhere(t *testing.T, prefix string) (*rig, *callstate.Machine, string) {
	t.Helper()
	r := newRig(t, &fakeGraph{}, prefix)
	b := secondInstance(t, r, prefix, &fakeGraph{})
	ctx := context.Background()
	id := "c-" + prefix
	must(t, b, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	must(t, b, id, callstate.Event{Kind: callstate.EvEstablished})
	must(t, b, id, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: 1})
	b.Wait()
	if err := r.rdb.Del(ctx, prefix+":{call:"+graph.CallKey(id)+"}").Err(); err != nil {
		t.Fatal(err)
	}
	ns, err := graph.Decode([]byte(note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":2,"tone":"tone7"}}`)))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.m.Notify(ctx, "t1", ns); err != nil {
		t.Fatal(err)
	}
	r.m.Wait()
	return r, b, id
}

// A call taken back starts its version above any its lost record had: it started at 1, so an
// instance caching the lost record at version N passed the save's version check once the new
// record reached N, and saved a decision made on the lost state over it.
func TestAdoptedRecordNotOverwrittenFromALostRecordsCache(t *testing.T) {
	r, b, id := takenBackWhileCachedElsewhere(t, "rv")
	ctx := context.Background()
	key := graph.CallKey(id)
	c, _ := r.store.Get(ctx, key)
	r.handle(t, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: c.PromptCtx})
	adopted, _ := r.store.Get(ctx, key)
	if r.m.Adopted.Load() != 1 {
		t.Fatalf("not taken back")
	}
	must(t, b, id, callstate.Event{Kind: callstate.EvTone, Digit: "2", Seq: 3}) // lands on B
	b.Wait()
	c, _ = r.store.Get(ctx, key)
	if c.Seq < adopted.Seq {
		t.Errorf("B saved a decision made on its cached copy of the lost record: Seq %d, below the adopted record's %d", c.Seq, adopted.Seq)
	}
	if c.PromptCtx != "" && !must(t, r.m, id, callstate.Event{Kind: callstate.EvPromptDone, ClientContext: c.PromptCtx}) {
		t.Errorf("the prompt's end (%s), on A: ignored", c.PromptCtx)
	}
}

// A call taken back numbers its commands above any its lost record did: they started at 1, so
// an instance slow on Graph that acknowledged the lost record's commands afterwards moved the
// new record's watermark past commands not sent yet, and the re-drive found nothing to send.
func TestLostRecordsAckDoesNotRetireTheAdoptedRecordsCommands(t *testing.T) {
	ga := &fakeGraph{}
	r := newRig(t, ga, "rk") // instance A
	gb, gc := &fakeGraph{}, &fakeGraph{}
	b, c := secondInstance(t, r, "rk", gb), secondInstance(t, r, "rk", gc)
	ctx := context.Background()
	id := "c-ack"
	key := graph.CallKey(id)
	must(t, r.m, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	must(t, r.m, id, callstate.Event{Kind: callstate.EvEstablished})
	must(t, r.m, id, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: 1})
	r.m.Wait()
	gateA := make(chan struct{})
	ga.block = gateA // A's Graph is slow from now on
	must(t, r.m, id, callstate.Event{Kind: callstate.EvTone, Digit: "9", Seq: 2})
	if err := r.rdb.Del(ctx, "rk:{call:"+key+"}").Err(); err != nil {
		t.Fatal(err)
	}
	ns, _ := graph.Decode([]byte(note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":3,"tone":"tone9"}}`)))
	if err := b.Notify(ctx, "t1", ns); err != nil { // B takes it back
		t.Fatal(err)
	}
	b.Wait()
	if b.Adopted.Load() != 1 {
		t.Fatal("not taken back")
	}
	close(gateA) // A's commands of the lost record go out; A acknowledges them
	r.m.Wait()
	gb.block = make(chan struct{}) // B hangs (dies) before sending its next commands
	t.Cleanup(func() { close(gb.block) })
	must(t, b, id, callstate.Event{Kind: callstate.EvTone, Digit: "1", Seq: 4}) // the queue
	redriveAll(t, c, r.store, time.Minute)
	if n := countPrefix(gc.log(), "playPrompt"); n == 0 {
		after, _ := r.store.Get(ctx, key)
		t.Errorf("the re-drive sent no hold music (C sent %v): B's commands were taken as done by A's acknowledgement of the lost record's (acked graph %d, CmdSeq %d)",
			gc.log(), after.AckedGraph, after.CmdSeq)
	}
}

// hungRoster never answers a roster read: an instance that dies while reading.
type hungRoster struct {
	*fakeGraph
	hang chan struct{}
}

func (g *hungRoster) Participants(ctx context.Context, id string) ([]graph.Participant, error) {
	<-g.hang
	return nil, context.Canceled
}

// A roster read left behind by an instance that died is not re-driven once the call has ended:
// nothing waits for it any more.
func TestRosterReadNotRedrivenForAnEndedCall(t *testing.T) {
	ga := &hungRoster{fakeGraph: &fakeGraph{}, hang: make(chan struct{})}
	gb := &fakeGraph{}
	a, b, store := twoInstances(t, "rx", ga, gb, &fakeQueues{}, &fakeQueues{})
	t.Cleanup(func() { close(ga.hang) })
	ctx := context.Background()
	id := "c-rx"
	key := graph.CallKey(id)
	must(t, a, id, callstate.Event{Kind: callstate.EvIncoming, Incoming: &callstate.Incoming{GraphID: id, TenantID: "t1"}})
	must(t, a, id, callstate.Event{Kind: callstate.EvEstablished})
	must(t, a, id, callstate.Event{Kind: callstate.EvTone, Digit: "2", Seq: 1})
	must(t, a, id, callstate.Event{Kind: callstate.EvAgentOffer, Agent: "agent-b"})
	must(t, a, id, callstate.Event{Kind: callstate.EvRoster, Participants: []string{"caller", "agent-b"}, Seq: 1})
	c, _ := store.Get(ctx, key)
	if c.State != callstate.StateConnected {
		t.Fatalf("set-up: %s", c.State)
	}
	must(t, a, id, callstate.Event{Kind: callstate.EvTimeout, Timer: callstate.TimerRoster, TimerToken: c.Timers[callstate.TimerRoster]})
	must(t, b, id, callstate.Event{Kind: callstate.EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}})
	b.Wait()
	if c, _ = store.Get(ctx, key); !c.State.Terminal() {
		t.Fatalf("after the caller hung up: %s", c.State)
	}
	redriveAll(t, b, store, time.Minute)
	if n := countPrefix(gb.log(), "participants"); n != 0 {
		t.Errorf("the re-drive read the roster of a call that has ended: B sent %v", gb.log())
	}
}

// Graph documents no answer for the roster of a peer-to-peer call; if it answers 404 there
// (the participants collection, not the call, not found), that must not end a call Graph still
// has: callbot took a 404 from the roster for the call gone and ended the record, leaving the
// caller in a live call nobody served. The call itself is read to tell.
func TestARoster404OfALiveCallIsNotTheCallGone(t *testing.T) {
	g := &fakeGraph{fail: map[string]error{"participants": &graph.Error{Op: "listParticipants", Status: 404}}}
	r := newRig(t, g, "rp404")
	id := "c-p404"
	r.inviting(t, id, "agent-b")
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	r.handle(t, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx, Failed: true})
	if c, _ = r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateQueued || c.Agent != "" {
		t.Errorf("declined invite, roster 404 while the call lives: %s agent %q, want back in the queue (%v)", c.State, c.Agent, g.log())
	}

	// and the call gone indeed: the roster's 404 and the call's agree
	gone := "c-p404-gone"
	r.inviting(t, gone, "agent-b")
	g.mu.Lock()
	g.state = "gone"
	g.mu.Unlock()
	c, _ = r.store.Get(context.Background(), graph.CallKey(gone))
	r.handle(t, gone, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx, Failed: true})
	if c, _ = r.store.Get(context.Background(), graph.CallKey(gone)); !c.State.Terminal() {
		t.Errorf("declined invite of a call Graph no longer has: %s, want ended", c.State)
	}
}

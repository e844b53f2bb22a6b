package callstate_test

import (
	"context"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// fakeGraph records every command in order, the contract of the machine.
type fakeGraph struct {
	mu    sync.Mutex
	calls []string
	fail  map[string]error
	state graph.CallState // what GetCall answers; default established
	users []string        // the users Participants lists besides the caller (the bot is always there)
	block chan struct{}   // when set, commands wait for it (an instance that hangs)
	// started, when set, gets a value (if it has room) as each command begins to wait on block
	started chan struct{}
}

func (f *fakeGraph) rec(s string) error {
	if f.block != nil {
		if f.started != nil {
			select {
			case f.started <- struct{}{}:
			default:
			}
		}
		<-f.block
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, s)
	return f.fail[strings.SplitN(s, " ", 2)[0]]
}
func (f *fakeGraph) log() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

func (f *fakeGraph) Answer(_ context.Context, id string, r graph.AnswerRequest) error {
	return f.rec("answer " + id + " " + r.CallbackURI)
}
func (f *fakeGraph) Reject(_ context.Context, id string, r graph.RejectReason) error {
	return f.rec("reject " + id)
}
func (f *fakeGraph) PlayPrompt(_ context.Context, id string, ps []graph.MediaPrompt, cc string) (graph.Operation, error) {
	var ids []string
	for _, p := range ps {
		ids = append(ids, p.ResourceID)
	}
	return graph.Operation{ID: "op", Status: graph.OpRunning, ClientContext: cc}, f.rec("playPrompt " + strings.Join(ids, ","))
}
func (f *fakeGraph) SubscribeToTone(_ context.Context, id, cc string) (graph.Operation, error) {
	return graph.Operation{Status: graph.OpCompleted}, f.rec("subscribeToTone")
}
func (f *fakeGraph) CancelMediaProcessing(_ context.Context, id, cc string) (graph.Operation, error) {
	return graph.Operation{Status: graph.OpCompleted}, f.rec("cancelMediaProcessing")
}
func (f *fakeGraph) Transfer(_ context.Context, id string, p graph.Party, cc string) error {
	return f.rec("transfer " + p.ID)
}
func (f *fakeGraph) Redirect(_ context.Context, id string, ps []graph.Party, t int, cb string) error {
	return f.rec("redirect")
}
func (f *fakeGraph) Hangup(_ context.Context, id string) error { return f.rec("hangup") }
func (f *fakeGraph) InviteParticipants(_ context.Context, id string, r graph.InviteRequest) (graph.Operation, error) {
	return graph.Operation{ID: "inv", Status: graph.OpRunning, ClientContext: r.ClientContext}, f.rec("invite " + r.Participants[0].Party.ID)
}
func (f *fakeGraph) KeepAlive(_ context.Context, id string) error { return f.rec("keepAlive") }
func (f *fakeGraph) GetCall(_ context.Context, id string) (graph.CallState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "get")
	if err := f.fail["get"]; err != nil {
		return "", err
	}
	if f.state == "gone" {
		return "", &graph.Error{Op: "get", Status: 404}
	}
	if f.state == "" {
		return graph.CallEstablished, nil
	}
	return f.state, nil
}

func (f *fakeGraph) Participants(_ context.Context, id string) ([]graph.Participant, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "participants")
	if err := f.fail["participants"]; err != nil {
		return nil, err
	}
	if f.state == "gone" {
		return nil, &graph.Error{Op: "participants", Status: 404}
	}
	ps := []graph.Participant{{ID: "p-bot", Info: graph.ParticipantInfo{Identity: graph.IdentitySet{Application: &graph.Identity{ID: "bot"}}}}}
	for i, u := range f.users {
		ps = append(ps, graph.Participant{ID: "p-" + strconv.Itoa(i), Info: graph.ParticipantInfo{Identity: graph.IdentitySet{User: &graph.Identity{ID: u}}}})
	}
	return ps, nil
}

// setUsers sets the users Participants lists.
func (f *fakeGraph) setUsers(users ...string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.users = users
}

type fakeQueues struct {
	mu       sync.Mutex
	ops      []string
	reserved map[string]string
}

func (q *fakeQueues) Reservations(context.Context, string) (map[string]string, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	return maps.Clone(q.reserved), nil
}

// snapshot is the ops so far, read under the lock (the call's executor may still write).
func (q *fakeQueues) snapshot() []string {
	q.mu.Lock()
	defer q.mu.Unlock()
	return slices.Clone(q.ops)
}

func (q *fakeQueues) add(s string) error {
	q.mu.Lock()
	q.ops = append(q.ops, s)
	q.mu.Unlock()
	return nil
}
func (q *fakeQueues) Enqueue(_ context.Context, tenant, queue, call string, score int64) error {
	return q.add("enqueue " + queue)
}
func (q *fakeQueues) Remove(_ context.Context, tenant, queue, call string) error {
	return q.add("remove " + queue)
}
func (q *fakeQueues) Release(_ context.Context, tenant, agent, call string, o callstate.AgentOutcome, hold time.Duration) error {
	q.mu.Lock()
	if q.reserved[agent] == call {
		delete(q.reserved, agent)
	}
	q.mu.Unlock()
	if hold > 0 {
		return q.add("release " + agent + " " + string(o) + " " + hold.String())
	}
	return q.add("release " + agent + " " + string(o))
}

// The conference hand-off's counterpart: an invite Graph never processed (throttled after the
// client's retries, or never sent for want of a token) never rang the agent either. Its failure
// is still checked against the roster (a re-drive of the same invite may have reached Graph), and
// once the roster (or, unreadable, its recheck) shows the agent did not join, they are released
// as after a transfer Graph never processed: their idle place kept, held back 10 s. Before, the
// roster read carried no "not processed" and the agent was released as declining. An invite that
// did reach the agent (refused, or declined per Graph's notification) still cools them down.
func TestInviteNotProcessedKeepsTheAgentsIdlePlace(t *testing.T) {
	throttled := &graph.Error{Op: "invite", Status: 429, Code: "TooManyRequests"}
	for _, tc := range []struct {
		name     string
		fail     map[string]error
		declined bool // the invite is sent, and Graph notifies its failure
		want     string
	}{
		{"refused", map[string]error{"invite": &graph.Error{Op: "invite", Status: 403, Code: "Forbidden"}}, false, "release agent-b failed"},
		{"declined", nil, true, "release agent-b failed"},
		{"throttled", map[string]error{"invite": throttled}, false, "release agent-b abandoned 10s"},
		{"no token", map[string]error{"invite": fmt.Errorf("get token: %w", graph.ErrNotSent)}, false, "release agent-b abandoned 10s"},
		{"throttled, the roster too", map[string]error{"invite": throttled, "participants": &graph.Error{Op: "participants", Status: 429}}, false, "release agent-b abandoned 10s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &fakeGraph{fail: tc.fail}
			r := newRig(t, g, "rns")
			id := "c-invite-not-processed"
			r.inviting(t, id, "agent-b")
			if tc.declined {
				c, _ := r.store.Get(context.Background(), graph.CallKey(id))
				r.handle(t, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx, Failed: true})
			}
			r.skew += 6 * time.Second // past the roster read's recheck
			r.fireDue(t)
			c, _ := r.store.Get(context.Background(), graph.CallKey(id))
			if c.State != callstate.StateQueued || c.Agent != "" || !slices.Contains(r.q.ops, tc.want) || countPrefix(g.log(), "invite") != 1 {
				t.Errorf("after the invite failed: %s agent %q, queue ops %v, graph %v; want back in the queue, %q, one invite",
					c.State, c.Agent, r.q.ops, g.log(), tc.want)
			}
		})
	}
}

const flowYAML = `
name: t
prompts:
  menu: {uri: https://m.test/menu.wav}
  hold: {uri: https://m.test/hold.wav}
start: main
menus:
  main:
    prompt: menu
    options:
      "1": {queue: q}
queues:
  q:
    hold: hold
    agents: [11111111-0000-4000-8000-000000000001]
`

func newMachine(t *testing.T, g *fakeGraph, q callstate.Queues, now ...func() time.Time) (*callstate.Machine, *callstate.Store) {
	rdb := redistest.Start(t).Client(t)
	return instance(t, rdb, "test", g, q, append(now, time.Now)[0]), callstate.NewStore(rdb, "test")
}

// instance is a machine with the test flow on rdb under prefix, one of the instances that may
// share it; now is its clock (nil: time.Now).
func instance(t *testing.T, rdb *redis.Client, prefix string, g callstate.CallControl, q callstate.Queues, now func() time.Time) *callstate.Machine {
	t.Helper()
	return instanceLeased(t, rdb, prefix, g, q, now, 0)
}

// instanceLeased is instance with an outbox lease of lease (0: the default).
func instanceLeased(t *testing.T, rdb *redis.Client, prefix string, g callstate.CallControl, q callstate.Queues, now func() time.Time, lease time.Duration) *callstate.Machine {
	t.Helper()
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if now == nil {
		now = time.Now
	}
	return callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, prefix), Timers: callstate.NewTimers(rdb, prefix),
		Control: g, Queues: q, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), Now: now,
		OutboxLease: lease})
}

// skewClock is the wall clock moved forward by what a test adds.
type skewClock struct {
	mu   sync.Mutex
	skew time.Duration
}

func (c *skewClock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return time.Now().Add(c.skew) }
func (c *skewClock) add(d time.Duration) {
	c.mu.Lock()
	c.skew += d
	c.mu.Unlock()
}

// offeredToAgentA takes a new call through the menu into the queue (key 1) and offers it to
// agent-a; it returns the call's key.
func offeredToAgentA(t *testing.T, m *callstate.Machine, id string) string {
	t.Helper()
	queuedCall(t, m, id)
	if ok, err := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	m.Wait()
	return graph.CallKey(id)
}

// queuedCall takes a new call through the menu into the queue (key 1).
func queuedCall(t *testing.T, m *callstate.Machine, id string) {
	t.Helper()
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
}

func notify(t *testing.T, m *callstate.Machine, payload string) {
	t.Helper()
	ns, err := graph.Decode([]byte(payload))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Notify(context.Background(), "tenant-1", ns); err != nil {
		t.Fatal(err)
	}
	m.Wait()
}

func note(change, callID, data string) string {
	return `{"@odata.type":"#microsoft.graph.commsNotifications","value":[{"changeType":"` + change +
		`","resourceUrl":"/communications/calls/` + callID + `","resourceData":` + data + `}]}`
}

// The exact Graph commands in order are the contract; duplicates and the other id format of the
// same call change nothing.
func TestMachineCommandSequence(t *testing.T) {
	g, q := &fakeGraph{}, &fakeQueues{}
	m, store := newMachine(t, g, q)
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	upper := "57DAB8B1894C409AB240BD8BEAE78896"
	in, _ := os.ReadFile("../graph/testdata/payloads/notification-incoming.json")

	notify(t, m, string(in))
	notify(t, m, string(in)) // repeated incoming
	notify(t, m, note("updated", upper, `{"@odata.type":"#microsoft.graph.call","state":"establishing"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", upper, `{"@odata.type":"#microsoft.graph.call","state":"Established"}`)) // duplicate, other id form
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))

	want := []string{
		"answer " + upper + " https://bot.test/api/calls",
		"subscribeToTone",
		"playPrompt menu",
		"cancelMediaProcessing",
		"playPrompt hold",
	}
	if diff := cmp.Diff(g.log(), want); diff != "" {
		t.Fatalf("graph commands (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(q.ops, []string{"enqueue q"}); diff != "" {
		t.Fatalf("queue ops (-got +want):\n%s", diff)
	}
	c, err := store.Get(context.Background(), graph.CallKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if c.State != callstate.StateQueued || c.Tenant != "tenant-1" || c.Version != 3 {
		t.Errorf("stored call: state %s tenant %s version %d", c.State, c.Tenant, c.Version)
	}

	// offered, transfer fails at Graph (declined), then succeeds on the second offer
	ok, err := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-a")
	if err != nil || !ok {
		t.Fatalf("offer: %v %v", ok, err)
	}
	m.Wait()
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	m.Wait()
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subCode":7000}}`))
	if ok, _ := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-b"); !ok {
		t.Fatal("second offer refused")
	}
	m.Wait()
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":7015}}`))
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`)) // repeated end

	if diff := cmp.Diff(g.log()[5:], []string{"transfer agent-a", "get", "playPrompt hold", "transfer agent-b"}); diff != "" {
		t.Errorf("graph commands after queueing (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(q.ops[1:], []string{"release agent-a failed", "enqueue q", "release agent-b connected"}); diff != "" {
		t.Errorf("queue ops (-got +want):\n%s", diff)
	}
	c, _ = store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateTerminated || c.Outcome != callstate.OutcomeTransferred {
		t.Errorf("final %s %s", c.State, c.Outcome)
	}
	if ok, _ := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-c"); ok {
		t.Error("an ended call accepted an offer")
	}
}

// Unknown calls and a Redis outage: a call Graph does not have changes nothing (callbot only
// reads it: TestCallWithoutARecordIsTakenBack), and the outage is reported so the webhook answers
// 503 and Graph sends the notification again.
func TestMachineUnknownCallAndOutage(t *testing.T) {
	g, q := &fakeGraph{state: "gone"}, &fakeQueues{}
	m, _ := newMachine(t, g, q)
	notify(t, m, note("updated", "unknown-call", `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	if got := g.log(); !slices.Equal(got, []string{"get"}) {
		t.Errorf("commands for an unknown call Graph does not have: %v, want only the read", got)
	}

	rdbDown := callstate.NewStore(deadRedis(t), "test")
	m2 := callstate.NewMachine(callstate.Config{Store: rdbDown, Control: g, Queues: q, Log: zaptest.NewLogger(t)})
	ns, _ := graph.Decode([]byte(note("updated", "c1", `{"@odata.type":"#microsoft.graph.call","state":"established"}`)))
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := m2.Notify(ctx, "t", ns); err == nil || !strings.Contains(err.Error(), graph.ErrUnavailable.Error()) {
		t.Errorf("Notify with Redis down = %v, want ErrUnavailable", err)
	}
}

func TestMachineTimers(t *testing.T) {
	g, q := &fakeGraph{}, &fakeQueues{}
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	m, store := newMachine(t, g, q, now)
	id := "c-timer"
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	c, _ := store.Get(context.Background(), graph.CallKey(id))
	notify(t, m, `{"value":[{"changeType":"deleted","resourceUrl":"/communications/calls/`+id+`/operations/o1","resourceData":{"@odata.type":"#microsoft.graph.playPromptOperation","status":"completed","clientContext":"`+c.PromptCtx+`"}}]}`)
	// the no-input timer (5s default) is durable: it fires once the clock has passed it
	mu.Lock()
	clock = clock.Add(6 * time.Second)
	mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, _ = store.Get(context.Background(), graph.CallKey(id))
		if c.Menu.Attempts == 1 || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	<-done
	m.Wait()
	if c.Menu.Attempts != 1 {
		t.Fatalf("no-input timer did not fire: %+v", c.Menu)
	}
	if got := g.log(); got[len(got)-1] != "playPrompt menu" {
		t.Errorf("after no input: %v, want the menu replayed", got)
	}
}

func deadRedis(t *testing.T) *redisClient { return newDead() }

// Hold music Graph reports as failed (its operation's final status "failed": a media file it
// could not fetch, say) is played again only after a while: played again at once, it failed
// again at once, a loop of playPrompt requests for as long as the caller waited.
func TestFailedHoldMusicIsRetriedLater(t *testing.T) {
	g, q := &fakeGraph{}, &fakeQueues{}
	m, store := newMachine(t, g, q)
	id := "6a0d4a2e-7d3c-4a43-9c51-0f6c3c9d9e11"
	queuedCall(t, m, id)
	c, err := store.Get(context.Background(), graph.CallKey(id))
	if err != nil || c.State != callstate.StateQueued || c.PromptCtx == "" {
		t.Fatalf("queued caller with hold music: %+v %v", c, err)
	}
	before := len(g.log())
	notify(t, m, `{"value":[{"changeType":"deleted","resourceUrl":"/communications/calls/`+id+`/operations/o1","resourceData":{"@odata.type":"#microsoft.graph.playPromptOperation","status":"failed","clientContext":"`+c.PromptCtx+`","resultInfo":{"code":400,"subcode":8513,"message":"media fetch failed"}}}]}`)
	if got := g.log()[before:]; len(got) != 0 {
		t.Errorf("Graph commands right after the hold music failed: %v, want none (a retry later)", got)
	}
	c, _ = store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateQueued || c.Timers[callstate.TimerHold] == 0 {
		t.Errorf("after the hold music failed: state %s timers %v, want queued with the hold retry armed", c.State, c.Timers)
	}
}

// A timer a transition disarms (the menu's no-input once the caller pressed a key, every timer of
// a call that ended) leaves the timer set with the acknowledgements; the current state's timers
// stay. Left there, each fired later for nothing: a claim, a read of the record and a removal,
// for every call (a fifth of a Redis round trip per notification at 100 calls a second).
func TestDisarmedTimersLeaveTheTimerSet(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "dt", &fakeGraph{}, &fakeQueues{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	acking := make(chan struct{})
	go func() { m.RunAcks(ctx, 10*time.Millisecond); close(acking) }()
	defer func() { cancel(); <-acking }()
	id := "0c9d4a2e-7d3c-4a43-9c51-0f6c3c9d9e22"
	key := graph.CallKey(id)
	timersOf := func() []string {
		all, err := rdb.ZRange(context.Background(), "dt:{timers}", 0, -1).Result()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, mem := range all {
			if strings.Contains(mem, "|"+key+"|") {
				out = append(out, strings.Split(mem, "|")[2])
			}
		}
		slices.Sort(out)
		return out
	}
	settle := func(want func([]string) bool) []string {
		deadline := time.Now().Add(2 * time.Second)
		for {
			got := timersOf()
			if want(got) || time.Now().After(deadline) {
				return got
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	c, _ := callstate.NewStore(rdb, "dt").Get(context.Background(), key)
	notify(t, m, `{"value":[{"changeType":"deleted","resourceUrl":"/communications/calls/`+id+`/operations/o1","resourceData":{"@odata.type":"#microsoft.graph.playPromptOperation","status":"completed","clientContext":"`+c.PromptCtx+`"}}]}`)
	if got := settle(func(ts []string) bool { return slices.Contains(ts, string(callstate.TimerMenu)) }); !slices.Contains(got, string(callstate.TimerMenu)) {
		t.Fatalf("in the menu: timers %v, want the no-input timer armed", got)
	}
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	c, _ = callstate.NewStore(rdb, "dt").Get(context.Background(), key)
	var want []string
	for kind := range c.Timers {
		want = append(want, string(kind))
	}
	slices.Sort(want)
	if len(want) == 0 {
		t.Fatal("a queued caller with no timer: the test proves nothing")
	}
	if got := settle(func(ts []string) bool { return slices.Equal(ts, want) }); !slices.Equal(got, want) {
		t.Errorf("queued: timers in the set %v, want those of the record %v (the menu's gone)", got, want)
	}
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`))
	if got := settle(func(ts []string) bool { return len(ts) == 0 }); len(got) != 0 {
		t.Errorf("ended: timers %v left in the set, want none", got)
	}
}

// During a shutdown's grace the batches of acknowledgements have stopped (RunAcks returned) while
// what Graph answers to the commands still being sent is applied: a timer such a transition
// disarms leaves the timer set at once. Before, it stayed until it fired for nothing (hold-music
// guards minutes after the calls had ended, in the rolling-deploy soak, docs/chaos.md).
func TestDisarmedTimersLeaveTheTimerSetDuringAShutdown(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "sd", &fakeGraph{}, &fakeQueues{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	acking := make(chan struct{})
	go func() { m.RunAcks(ctx, 10*time.Millisecond); close(acking) }()
	id := "3e8d1c2b-6a5f-4e4d-8c3b-2a1f0e9d8c7b"
	key := graph.CallKey(id)
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	cancel() // SIGTERM: the loops stop, RunAcks writes what it holds and returns
	<-acking
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	c, _ := callstate.NewStore(rdb, "sd").Get(context.Background(), key)
	var want []string
	for kind, tok := range c.Timers {
		want = append(want, "tenant-1|"+key+"|"+string(kind)+"|"+strconv.FormatInt(tok, 10))
	}
	slices.Sort(want)
	got, _ := rdb.ZRange(context.Background(), "sd:{timers}", 0, -1).Result()
	slices.Sort(got)
	if c.State != callstate.StateQueued || !slices.Equal(got, want) {
		t.Errorf("%s: timer set %v, want the record's timers alone %v (the menu's no-input timer disarmed)", c.State, got, want)
	}
}

// Timers are armed in the save's round trip, ahead of the record: a save that loses its race
// (instance A decides on its cached copy while instance B moved the call on) armed them for a
// decision no record holds. They leave the timer set too, with the acknowledgements. Left there,
// each fired later for nothing (the rolling-deploy soak, docs/chaos.md, found transfer timers
// due 90 s after calls that had ended, one per lost race).
func TestTimersOfALostSaveLeaveTheTimerSet(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	a := instance(t, rdb, "ls", &fakeGraph{}, &fakeQueues{}, nil)
	b := instance(t, rdb, "ls", &fakeGraph{}, &fakeQueues{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	var acking sync.WaitGroup
	acking.Go(func() { a.RunAcks(ctx, 10*time.Millisecond) })
	acking.Go(func() { b.RunAcks(ctx, 10*time.Millisecond) })
	defer func() { cancel(); acking.Wait() }()
	id := "5b1c0f7e-2d4a-4c8e-9f3b-7a6d5e4c3b2a"
	key := graph.CallKey(id)
	store := callstate.NewStore(rdb, "ls")
	notify(t, a, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, a, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	// B applies the end of the hold music (played again, its guard armed again): A's copy is stale
	c, _ := store.Get(context.Background(), key)
	notify(t, b, `{"value":[{"changeType":"deleted","resourceUrl":"/communications/calls/`+id+`/operations/o1","resourceData":{"@odata.type":"#microsoft.graph.playPromptOperation","status":"completed","clientContext":"`+c.PromptCtx+`"}}]}`)
	// A's dispatcher offers the caller on its stale copy: its first save (transfer timer armed) loses
	if ok, err := a.Offer(context.Background(), "tenant-1", key, "agent-1"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	a.Wait()
	c, _ = store.Get(context.Background(), key)
	if c.State != callstate.StateTransferring {
		t.Fatalf("after the offer: %s, want transferring", c.State)
	}
	var want []string
	for kind, tok := range c.Timers {
		want = append(want, "tenant-1|"+key+"|"+string(kind)+"|"+strconv.FormatInt(tok, 10))
	}
	slices.Sort(want)
	var got []string
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		got, _ = rdb.ZRange(context.Background(), "ls:{timers}", 0, -1).Result()
		slices.Sort(got)
		if slices.Equal(got, want) || time.Now().After(deadline) {
			break
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("timer set %v, want the record's timers alone %v (a save that lost its race left its timers)", got, want)
	}
}

// A transfer request that timed out may have reached Graph all the same, and Graph may not have
// left "established" yet when callbot reads the call at once: taking that read for the
// transfer's failure put the caller back in the queue while Graph was transferring them (the
// next offer a second transfer). The read is one more look, settled a while later (or by the
// transfer's own notifications), not a verdict.
func TestAmbiguousTransferFailureIsNotSettledByAnImmediateRead(t *testing.T) {
	g, q := &fakeGraph{fail: map[string]error{"transfer": fmt.Errorf("post transfer: %w", context.DeadlineExceeded)}}, &fakeQueues{}
	m, store := newMachine(t, g, q)
	id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e33"
	offeredToAgentA(t, m, id) // the transfer times out; callbot reads the call: still established
	c, _ := store.Get(context.Background(), graph.CallKey(id))
	if c.State != callstate.StateTransferring || slices.Contains(q.ops, "release agent-a failed") {
		t.Fatalf("after a timed-out transfer and an immediate read: %s, queue ops %v; want still transferring, the agent kept", c.State, q.ops)
	}
	// Graph did take it
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":7015}}`))
	c, _ = store.Get(context.Background(), graph.CallKey(id))
	if c.Outcome != callstate.OutcomeTransferred || countPrefix(g.log(), "transfer") != 1 || countPrefix(q.ops, "enqueue") != 1 {
		t.Errorf("outcome %s, graph %v, queue ops %v; want transferred by the one transfer, queued once", c.Outcome, g.log(), q.ops)
	}
}

// A read may find Graph throttling (429 after the client's retry) or failing, the immediate one
// or the recheck's: the doubt stays, and callbot asks again a recheck later, until a read settles
// it. Before, the next look was the transfer's timer, 90 s on: the caller heard nothing (the
// transfer had taken the hold music) and the agent stayed reserved for a minute and a half (the
// rolling-deploy soak with a throttling Graph, docs/chaos.md).
func TestAmbiguousTransferFailureUnreadableIsReadAgainSoon(t *testing.T) {
	throttled := &graph.Error{Op: "get", Status: 429, Code: "TooManyRequests"}
	for _, tc := range []struct {
		name      string
		immediate bool // the immediate read fails too, not only the recheck's
		notified  bool // the transfer went through; Graph notified it under way, then its failure
		reads     int  // reads by then
	}{{"the recheck's read", false, false, 2}, {"the immediate read", true, false, 1}, {"a notified failure's read", true, true, 1}} {
		t.Run(tc.name, func(t *testing.T) {
			g, q := &fakeGraph{fail: map[string]error{"transfer": fmt.Errorf("post transfer: %w", context.DeadlineExceeded)}}, &fakeQueues{}
			if tc.notified {
				delete(g.fail, "transfer")
			}
			if tc.immediate && !tc.notified {
				g.fail["get"] = throttled
			}
			var mu sync.Mutex
			clock := time.Now()
			now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
			advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
			m, store := newMachine(t, g, q, now)
			id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e55"
			offeredToAgentA(t, m, id) // the transfer times out; callbot reads the call
			if tc.notified {
				g.mu.Lock()
				g.fail["get"] = throttled
				g.mu.Unlock()
				notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
				notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subcode":7000}}`))
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
			defer func() { cancel(); <-done }()
			if !tc.immediate {
				g.mu.Lock()
				g.fail["get"] = throttled
				g.mu.Unlock()
				advance(6 * time.Second) // past the recheck: its read is throttled
				// polled, not m.Wait: RunTimers adds work meanwhile, and a WaitGroup's Wait must not
				// run concurrently with an Add from zero
				for deadline := time.Now().Add(5 * time.Second); countPrefix(g.log(), "get") < 2 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				}
			}
			if n := countPrefix(g.log(), "get"); n != tc.reads {
				t.Fatalf("reads of the call %d (graph %v), want %d", n, g.log(), tc.reads)
			}
			g.mu.Lock()
			delete(g.fail, "get")
			g.mu.Unlock()
			advance(6 * time.Second) // another recheck later, not the transfer's 90 s
			var c callstate.Call
			var ops []string
			for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				c, _ = store.Get(context.Background(), graph.CallKey(id))
				q.mu.Lock()
				ops = slices.Clone(q.ops)
				q.mu.Unlock()
				if c.State == callstate.StateQueued && slices.Contains(ops, "release agent-a failed") {
					break
				}
			}
			if c.State != callstate.StateQueued || !slices.Contains(ops, "release agent-a failed") || countPrefix(g.log(), "transfer") != 1 {
				t.Errorf("6 s after a read Graph did not answer: %s, queue ops %v, graph %v; want read again and back in the queue, the agent freed", c.State, ops, g.log())
			}
		})
	}
}

// The other side of it: Graph did not take the timed-out transfer. The second read, a while
// later, settles it: the caller goes back to the head of the queue and the agent is freed.
func TestAmbiguousTransferFailureRequeuesAfterASecondRead(t *testing.T) {
	g, q := &fakeGraph{fail: map[string]error{"transfer": fmt.Errorf("post transfer: %w", context.DeadlineExceeded)}}, &fakeQueues{}
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	m, store := newMachine(t, g, q, now)
	id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e44"
	offeredToAgentA(t, m, id)
	mu.Lock()
	clock = clock.Add(6 * time.Second) // past the recheck
	mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
	var c callstate.Call
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		m.Wait()
		if c, _ = store.Get(context.Background(), graph.CallKey(id)); c.State == callstate.StateQueued {
			break
		}
	}
	cancel()
	<-done
	if c.State != callstate.StateQueued || !slices.Contains(q.ops, "release agent-a failed") || countPrefix(g.log(), "transfer") != 1 {
		t.Errorf("after the second read: %s, queue ops %v, graph %v; want back in the queue, the agent freed, one transfer sent", c.State, q.ops, g.log())
	}
}

// A transfer Graph refused is the agent's failed attempt: they cool down and their idle time
// starts again. One Graph never processed (throttled after the client's retries, or never sent
// for want of a token) never rang the agent: they keep their place among the longest idle, held
// back 10 s (not a tight loop of offers), while the caller goes back to the head of the queue
// either way.
func TestTransferNotProcessedKeepsTheAgentsIdlePlace(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"refused", &graph.Error{Op: "transfer", Status: 403, Code: "Forbidden"}, "release agent-a failed"},
		{"throttled", &graph.Error{Op: "transfer", Status: 429, Code: "TooManyRequests"}, "release agent-a abandoned 10s"},
		{"no token", fmt.Errorf("get token: %w", graph.ErrNotSent), "release agent-a abandoned 10s"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, q := &fakeGraph{fail: map[string]error{"transfer": tc.err}}, &fakeQueues{}
			m, store := newMachine(t, g, q)
			id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e55"
			offeredToAgentA(t, m, id)
			c, _ := store.Get(context.Background(), graph.CallKey(id))
			if c.State != callstate.StateQueued || !slices.Contains(q.ops, tc.want) || countPrefix(q.ops, "enqueue") != 2 {
				t.Errorf("after the transfer failed: %s, queue ops %v; want back in the queue and %q", c.State, q.ops, tc.want)
			}
		})
	}
}

// A blind transfer whose terminated notification is lost: the transfer's timer reads the call,
// Graph no longer has it (404), and the call ends there, its agent released as after a transfer
// (held until presence has been read again). Before, callbot waited for a notification that was
// never coming, the agent reserved, offered no caller, until the reconciler's next pass (up to
// five minutes later).
func TestTransferWhoseEndIsLostEndsAtItsTimer(t *testing.T) {
	for _, tc := range []struct {
		name     string
		notified bool // Graph said the transfer was under way
		outcome  string
	}{
		{"transferring notified", true, callstate.OutcomeTransferred},
		{"nothing notified", false, callstate.OutcomeCallerHangup},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, q := &fakeGraph{}, &fakeQueues{}
			clock := &skewClock{}
			m, store := newMachine(t, g, q, clock.now)
			id := "5d2f3c1e-8a4b-4c6d-9e0f-1a2b3c4d5e6f"
			key := offeredToAgentA(t, m, id)
			if tc.notified {
				notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
			}
			g.mu.Lock()
			g.state = "gone" // the transfer went through (or the caller left); the terminated notification is lost
			g.mu.Unlock()
			clock.add(91 * time.Second)
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
			var c callstate.Call
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				if c, _ = store.Get(context.Background(), key); c.State == callstate.StateTerminated {
					break
				}
			}
			cancel()
			<-done
			m.Wait()
			if c.State != callstate.StateTerminated || c.Outcome != tc.outcome {
				t.Fatalf("after the transfer's timer with the call gone from Graph: %s %q, want terminated %q", c.State, c.Outcome, tc.outcome)
			}
			q.mu.Lock()
			ops := slices.Clone(q.ops)
			q.mu.Unlock()
			if !slices.Contains(ops, "release agent-a connected") {
				t.Errorf("queue ops %v: want agent-a released as after a transfer", ops)
			}
		})
	}
}

// failSave, once armed, fails the pipeline of a save whose timers include one of kind, without
// sending it: a save that never reached Redis (the notification's request cancelled, a write
// timeout), the record left as it was.
type failSave struct {
	armed atomic.Bool
	kind  string
}

func (h *failSave) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *failSave) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return next
}
func (h *failSave) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if args := cmd.Args(); len(args) == 4 && cmd.Name() == "zadd" && strings.Contains(fmt.Sprint(args[3]), "|"+h.kind+"|") &&
				h.armed.CompareAndSwap(true, false) {
				return context.DeadlineExceeded
			}
		}
		return next(ctx, cmds)
	}
}

// A save that failed after one that lost its race does not vouch for the tokens it drew: nothing
// in Redis drew them, and another instance deciding on the same record draws them again. The
// lost save's timer (A, on its stale copy: the transfer's recheck) was taken out of the timer set
// as if no later decision could arm it again, while B armed the same timer, with the same token,
// on the record: the call's one guard never fired (the caller stuck in silence and the agent
// reserved if the transfer's outcome was lost).
func TestTimersOfALostSaveSpareATimerArmedAgainAfterAFailedSave(t *testing.T) {
	srv := redistest.Start(t)
	rdbA := srv.Client(t)
	hook := &failSave{kind: string(callstate.TimerHold)}
	rdbA.AddHook(hook)
	a := instance(t, rdbA, "fs", &fakeGraph{}, &fakeQueues{}, nil)
	b := instance(t, srv.Client(t), "fs", &fakeGraph{}, &fakeQueues{}, nil)
	ctx, cancel := context.WithCancel(context.Background())
	acking := make(chan struct{})
	go func() { a.RunAcks(ctx, time.Hour); close(acking) }() // A's batch goes out when it stops
	id := "2c7e9a1b-4d6f-4b3a-8e5c-1f0a9b8c7d6e"
	key := offeredToAgentA(t, a, id) // A caches the call transferring, Graph not yet heard from
	store := callstate.NewStore(srv.Client(t), "fs")
	// B applies Graph's word that the transfer is under way: no token drawn
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	// A reads the call established after a failure notification: on its stale copy, a recheck
	// (transfer timer, the next token), which loses; on the record, the transfer failed (hold
	// music and its guard: the same token and the next), which fails
	hook.armed.Store(true)
	if _, err := a.Handle(context.Background(), "tenant-1", key, callstate.Event{Kind: callstate.EvCallState, GraphState: graph.CallEstablished}); err == nil {
		t.Fatal("the failed save reported no error")
	}
	// B: a read of the call Graph does not answer arms the recheck, the same token again
	if ok, err := b.Handle(context.Background(), "tenant-1", key, callstate.Event{Kind: callstate.EvCallState, Unreadable: true}); !ok || err != nil {
		t.Fatalf("unreadable: %v %v", ok, err)
	}
	cancel()
	<-acking
	c, _ := store.Get(context.Background(), key)
	tok := c.Timers[callstate.TimerTransfer]
	if c.State != callstate.StateTransferring || tok == 0 {
		t.Fatalf("%s, transfer timer %d: want transferring with the recheck armed", c.State, tok)
	}
	want := "tenant-1|" + key + "|transfer|" + strconv.FormatInt(tok, 10)
	if _, err := srv.Client(t).ZScore(context.Background(), "fs:{timers}", want).Result(); err != nil {
		got, _ := srv.Client(t).ZRange(context.Background(), "fs:{timers}", 0, -1).Result()
		t.Errorf("the record's transfer timer %s is not in the timer set %v: it never fires", want, got)
	}
}

// gatedRead is a fakeGraph whose reads of the call wait for the gate to open: a read Graph (or
// the Graph client's retries, throttled) takes its time over.
type gatedRead struct {
	*fakeGraph
	gate    chan struct{}
	reading chan struct{}
}

func (g *gatedRead) GetCall(ctx context.Context, id string) (graph.CallState, error) {
	close(g.reading)
	<-g.gate
	return g.fakeGraph.GetCall(ctx, id)
}

// A read of the call settles the transfer attempt it was made for, never a later one. The
// rolling-deploy soak (mode both): call 03f5543d-7459-400f-89ab-b4001814c905's transfer to one
// agent failed ambiguously (504); its recheck read was made twice (the timer's, and the
// re-drive of that transition's outbox), throttled, 3.5 s each, one after the other on the
// call's executor. The first found the call established: back to the queue, and the dispatcher
// offered the caller to another agent at once, whose transfer waited behind the second read on
// the executor. That read, made before the new transfer reached Graph, found the call
// established too and was taken for the new attempt's failure: the caller put back in the queue
// and the new agent released (as having failed) while Graph transferred the caller to them;
// the caller's end then came as a queued caller's. Here: instance A's transfer timer reads the
// call, slowly, for the first attempt; meanwhile instance B applies that attempt's failure and
// the dispatcher offers the caller to agent-b; A's read, answered then, must change nothing.
func TestACallReadForAnEarlierTransferAttemptIsNotTheCurrentOnes(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	q := &fakeQueues{}
	ga := &gatedRead{fakeGraph: &fakeGraph{}, gate: make(chan struct{}), reading: make(chan struct{})}
	gb := &fakeGraph{}
	a := instance(t, rdb, "rt", ga, q, nil)
	b := instance(t, rdb, "rt", gb, q, nil)
	store := callstate.NewStore(rdb, "rt")
	id := "7b1e4a2e-7d3c-4a43-9c51-0f6c3c9d9e66"
	key := graph.CallKey(id)
	queuedCall(t, b, id)
	if ok, err := a.Offer(ctx, "tenant-1", key, "agent-a"); !ok || err != nil {
		t.Fatalf("offer to agent-a: %v %v", ok, err)
	}
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	c, err := store.Get(ctx, key)
	mustDo(t, err)
	// A's transfer timer: its read of the call (for the attempt to agent-a) takes its time
	if _, err := a.Handle(ctx, "tenant-1", key, callstate.Event{Kind: callstate.EvTimeout, Timer: callstate.TimerTransfer,
		TimerToken: c.Timers[callstate.TimerTransfer]}); err != nil {
		t.Fatal(err)
	}
	<-ga.reading
	// meanwhile agent-a declines: B applies it, the caller goes back to the queue and is offered
	// to agent-b
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","resultInfo":{"code":500,"subcode":7000}}`))
	if c, _ = store.Get(ctx, key); c.State != callstate.StateQueued {
		t.Fatalf("after agent-a's decline: %s, want queued", c.State)
	}
	if ok, err := b.Offer(ctx, "tenant-1", key, "agent-b"); !ok || err != nil {
		t.Fatalf("offer to agent-b: %v %v", ok, err)
	}
	b.Wait()
	close(ga.gate) // A's read answers: established (agent-b's transfer has not reached Graph yet)
	a.Wait()
	c, err = store.Get(ctx, key)
	mustDo(t, err)
	if c.State != callstate.StateTransferring || c.Agent != "agent-b" || slices.Contains(q.ops, "release agent-b failed") {
		t.Errorf("after a read made for the attempt to agent-a: %s with %q, queue ops %v; want still transferring to agent-b, not released",
			c.State, c.Agent, q.ops)
	}
}

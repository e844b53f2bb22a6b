package callstate

import (
	"errors"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

const testFlowYAML = `
name: test
prompts:
  welcome: {uri: https://media.test/welcome.wav}
  menu: {uri: https://media.test/menu.wav}
  invalid: {uri: https://media.test/invalid.wav}
  hold: {uri: https://media.test/hold.wav}
  bye: {uri: https://media.test/bye.wav}
greeting: welcome
start: main
menus:
  main:
    prompt: menu
    timeout: 4s
    retries: 1
    invalid: invalid
    options:
      "1": {queue: sales}
      "3": {transfer: 22222222-0000-4000-8000-000000000001}
      "4": {queue: vip}
      "9": {disconnect: bye}
    fallback: {queue: sales}
queues:
  sales:
    hold: hold
    max-wait: 2m
    on-timeout: {disconnect: bye}
    agents: [11111111-0000-4000-8000-000000000001]
  vip:
    hold: hold
    handoff: invite
    wrap-up: 30s
    agents: [11111111-0000-4000-8000-000000000002]
`

func testFlow(t testing.TB) *ivr.Flow {
	t.Helper()
	f, err := ivr.Parse([]byte(testFlowYAML), "test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func testEnv(t testing.TB) Env {
	return Env{Flow: testFlow(t), Now: t0, CallbackURI: "https://bot.test/api/calls", TransferTimeout: 90 * time.Second, HangupGrace: 30 * time.Second}
}

func prompt(name string) graph.MediaPrompt {
	return graph.MediaPrompt{URI: "https://media.test/" + name + ".wav", ResourceID: name}
}

// Every row of the table is reachable only through Decide; every pair without a row is ignored.
func TestTableIllegalPairsIgnored(t *testing.T) {
	env := testEnv(t)
	for s := StateNone; s <= StateTerminated; s++ {
		for e := EvIncoming; int(e) < len(eventNames); e++ {
			if handles(s, e) {
				continue
			}
			c := Call{ID: "c1", State: s}
			got, cmds, err := Decide(c, Event{Kind: e, Incoming: &Incoming{GraphID: "c1"}}, env)
			if !errors.Is(err, ErrIgnored) || len(cmds) != 0 || got.State != s {
				t.Errorf("%s on %s: state %s, %d commands, err %v; want ignored", e, s, got.State, len(cmds), err)
			}
		}
	}
	for _, e := range []EventKind{EvEnded, EvTone, EvTimeout, EvIncoming} {
		if handles(StateTerminated, e) {
			t.Errorf("terminated handles %s: terminal states must stay terminal", e)
		}
	}
}

// step applies events in order and returns the commands of each.
func step(t *testing.T, env Env, evs ...Event) (Call, [][]Command) {
	t.Helper()
	var c Call
	var all [][]Command
	for _, ev := range evs {
		if ev.Kind == EvPromptDone && ev.ClientContext == "*" {
			ev.ClientContext = c.PromptCtx // the prompt the call is waiting for
		}
		next, cmds, err := Decide(c, ev, env)
		if err != nil && !errors.Is(err, ErrIgnored) {
			t.Fatalf("%s in %s: %v", ev.Kind, c.State, err)
		}
		c = next
		all = append(all, cmds)
	}
	return c, all
}

func kinds(cmds []Command) []string {
	var out []string
	for _, c := range cmds {
		out = append(out, c.Kind.String())
	}
	return out
}

var incoming = Event{Kind: EvIncoming, Incoming: &Incoming{GraphID: "491f0b00-ffff-4bc9-a43e-b226498ec22a", TenantID: "t1",
	Caller: graph.Party{Kind: graph.KindPhone, ID: "+14255550100"}}}

func TestHappyPathToAgent(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env,
		incoming,
		Event{Kind: EvEstablished},
		Event{Kind: EvPromptDone, ClientContext: "*"},
		Event{Kind: EvTone, Digit: "1", Seq: 1},
		Event{Kind: EvAgentOffer, Agent: "11111111-0000-4000-8000-000000000001"},
		Event{Kind: EvTransferAccepted},
		Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 0, Subcode: 7015}},
	)
	want := [][]string{
		{"answer", "setTimer"},                        // answer, and ask Graph if established does not come
		{"subscribeToTone", "playPrompt", "setTimer"}, // greeting + menu, with a guard if its end is lost
		{"setTimer"}, // the menu prompt ended: no-input timer
		{"playPrompt", "setTimer", "enqueue", "setTimer"}, // hold music and its guard, queue, max wait
		{"transfer", "setTimer"},
		nil,
		{"releaseAgent"},
	}
	var got [][]string
	for _, cs := range cmds {
		got = append(got, kinds(cs))
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Fatalf("commands (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(cmds[0][0].Answer, graph.AnswerRequest{CallbackURI: "https://bot.test/api/calls",
		PrefetchMedia: []graph.MediaPrompt{prompt("bye"), prompt("hold"), prompt("invalid"), prompt("menu"), prompt("welcome")}}); diff != "" {
		t.Errorf("answer (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(cmds[1][1].Prompts, []graph.MediaPrompt{prompt("welcome"), prompt("menu")}); diff != "" {
		t.Errorf("first prompts (-got +want):\n%s", diff)
	}
	if cmds[1][2].Timer != TimerMenu || cmds[1][2].After != 4*time.Second+promptGuard {
		t.Errorf("menu guard = %+v", cmds[1][2])
	}
	if cmds[2][0].Timer != TimerMenu || cmds[2][0].After != 4*time.Second {
		t.Errorf("menu timer = %+v", cmds[2][0])
	}
	if cmds[3][2].Queue != "sales" || cmds[3][2].Score != t0.UnixMilli() {
		t.Errorf("enqueue = %+v", cmds[3][2])
	}
	if tr := cmds[4][0]; tr.Target != (graph.Party{Kind: graph.KindUser, ID: "11111111-0000-4000-8000-000000000001"}) {
		t.Errorf("transfer target = %+v", tr.Target)
	}
	if rel := cmds[6][0]; rel.AgentOutcome != AgentConnected || rel.Agent != "11111111-0000-4000-8000-000000000001" {
		t.Errorf("release = %+v", rel)
	}
	if c.State != StateTerminated || c.Outcome != OutcomeTransferred {
		t.Errorf("final %s %s", c.State, c.Outcome)
	}
}

func TestTransferFailedBackToHeadOfQueue(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	score := c.QueueScore
	env.Now = t0.Add(30 * time.Second)
	c2, cmds2, err := Decide(c, Event{Kind: EvAgentOffer, Agent: "a1"}, env)
	if err != nil {
		t.Fatal(err)
	}
	// Graph says it took the transfer
	c2, _, err = Decide(c2, Event{Kind: EvTransferring}, env)
	if err != nil || !c2.Transferring {
		t.Fatalf("transferring: %v, Transferring %v", err, c2.Transferring)
	}
	// a failure notification is first checked against Graph: it may belong to an earlier attempt
	c2b, check, err := Decide(c2, Event{Kind: EvTransferFailed, Result: graph.ResultInfo{Code: 500, Subcode: 7000}}, env)
	if err != nil || c2b.State != StateTransferring || len(check) != 1 || check[0].Kind != CmdCheckCall {
		t.Fatalf("unverified failure: %s %v %v, want a check and no change", c2b.State, kinds(check), err)
	}
	c3, cmds3, err := Decide(c2b, Event{Kind: EvCallState, GraphState: graph.CallEstablished}, env)
	if err != nil {
		t.Fatal(err)
	}
	_ = cmds
	_ = cmds2
	if c3.State != StateQueued || c3.Agent != "" {
		t.Fatalf("after failure: %s agent %q", c3.State, c3.Agent)
	}
	if diff := cmp.Diff(kinds(cmds3), []string{"releaseAgent", "playPrompt", "setTimer", "enqueue", "setTimer"}); diff != "" {
		t.Errorf("commands (-got +want):\n%s", diff)
	}
	if cmds3[0].AgentOutcome != AgentFailed || cmds3[3].Score != score {
		t.Errorf("release %+v, requeue score %d want the original %d", cmds3[0], cmds3[3].Score, score)
	}
	if cmds3[4].Timer != TimerMaxWait || cmds3[4].After != 90*time.Second {
		t.Errorf("max wait re-armed for %v, want what is left (90s)", cmds3[4].After)
	}
}

// A failure notification may repeat an earlier attempt's, and the current attempt's request may
// not have reached Graph yet (another instance sends it): Graph then still has the call
// established. Until Graph said the current attempt is under way (transferring), such a check does
// not end the attempt; callbot looks again 5 s later, and that look settles it.
func TestFailureNotKnownToBeThisAttemptsIsLookedAtAgain(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	c, _, err := Decide(c, Event{Kind: EvAgentOffer, Agent: "a1"}, env)
	if err != nil {
		t.Fatal(err)
	}
	c, check, err := Decide(c, Event{Kind: EvTransferFailed, Result: graph.ResultInfo{Code: 500, Subcode: 7000}}, env)
	if err != nil || len(check) != 1 || check[0].Kind != CmdCheckCall || check[0].Settles {
		t.Fatalf("failure notification: %v %v, want a check that does not settle the attempt", kinds(check), err)
	}
	c, out, err := Decide(c, Event{Kind: EvCallState, GraphState: graph.CallEstablished}, env)
	if err != nil || c.State != StateTransferring || c.Agent != "a1" || !slices.Equal(kinds(out), []string{"setTimer"}) ||
		out[0].Timer != TimerTransfer || out[0].After != 5*time.Second {
		t.Fatalf("established, never transferring: %s agent %q %v %v; want the attempt kept and a look again in 5 s", c.State, c.Agent, kinds(out), err)
	}
	c, out, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: c.Timers[TimerTransfer]}, env)
	if err != nil || len(out) == 0 || out[0].Kind != CmdCheckCall || !out[0].Settles {
		t.Fatalf("the look again: %v %v, want a check that settles", kinds(out), err)
	}
	c, _, err = Decide(c, Event{Kind: EvCallState, GraphState: graph.CallEstablished, Verified: true}, env)
	if err != nil || c.State != StateQueued || c.Agent != "" {
		t.Fatalf("still established 5 s later: %s agent %q %v, want back in the queue", c.State, c.Agent, err)
	}
	// a read that finds the attempt under way counts as Graph's transferring notification
	c, _ = step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1}, Event{Kind: EvAgentOffer, Agent: "a1"})
	if c, _, err = Decide(c, Event{Kind: EvCallState, GraphState: graph.CallTransferring}, env); err != nil || !c.Transferring {
		t.Fatalf("Graph read transferring: %v, Transferring %v", err, c.Transferring)
	}
	if c, _, err = Decide(c, Event{Kind: EvCallState, GraphState: graph.CallEstablished}, env); err != nil || c.State != StateQueued {
		t.Fatalf("established after transferring: %s %v, want back in the queue", c.State, err)
	}
	// a new attempt forgets the last one's transferring
	c, _, _ = Decide(c, Event{Kind: EvAgentOffer, Agent: "a2"}, env)
	if c.Transferring {
		t.Error("a new attempt starts with Transferring set")
	}
}

func TestDuplicatesAndStaleEventsChangeNothing(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvPromptDone, ClientContext: "*"})
	for _, ev := range []Event{
		{Kind: EvEstablished},                       // repeated established
		{Kind: EvPromptDone, ClientContext: "p2"},   // repeated completion
		{Kind: EvPromptDone, ClientContext: "p999"}, // someone else's operation
		{Kind: EvTimeout, Timer: TimerMenu, TimerToken: 1},
	} {
		if _, cmds, err := Decide(c, ev, env); !errors.Is(err, ErrIgnored) || cmds != nil {
			t.Errorf("%+v: %v %v, want ignored", ev, cmds, err)
		}
	}
	c2, _, err := Decide(c, Event{Kind: EvTone, Digit: "7", Seq: 4}, env)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := Decide(c2, Event{Kind: EvTone, Digit: "1", Seq: 4}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("same tone sequence id applied twice: %v", err)
	}
	if _, _, err := Decide(c2, Event{Kind: EvTone, Digit: "1", Seq: 3}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("older tone applied: %v", err)
	}
}

func TestInvalidKeyThenNoInputFallsBackToQueue(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "7", Seq: 1})
	if c.State != StateInMenu || c.Menu.Attempts != 1 {
		t.Fatalf("after invalid key: %s %+v", c.State, c.Menu)
	}
	if diff := cmp.Diff(kinds(cmds[2]), []string{"cancelMediaProcessing", "playPrompt", "setTimer"}); diff != "" {
		t.Errorf("barge-in commands (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(cmds[2][1].Prompts, []graph.MediaPrompt{prompt("invalid"), prompt("menu")}); diff != "" {
		t.Errorf("replay (-got +want):\n%s", diff)
	}
	c, _, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
	if err != nil {
		t.Fatal(err)
	}
	c, _, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != StateQueued || c.Queue != "sales" {
		t.Errorf("after retries: %s queue %q, want the fallback queue", c.State, c.Queue)
	}
}

func TestDisconnectPlaysGoodbyeThenHangsUp(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "9", Seq: 1})
	if c.State != StateTerminating || c.Outcome != OutcomeDisconnected {
		t.Fatalf("%s %s", c.State, c.Outcome)
	}
	if diff := cmp.Diff(kinds(cmds[2]), []string{"cancelMediaProcessing", "playPrompt", "setTimer"}); diff != "" {
		t.Errorf("(-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(cmds[2][1].Prompts, []graph.MediaPrompt{prompt("bye")}); diff != "" {
		t.Errorf("goodbye played once (-got +want):\n%s", diff)
	}
	c, cmds2, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
	if err != nil || !slices.Equal(kinds(cmds2), []string{"hangup", "setTimer"}) || cmds2[1].Timer != TimerMenu {
		t.Fatalf("after goodbye: %v %v, want hangup, and a timer in case no terminated notification comes", kinds(cmds2), err)
	}
	// The hangup failed, or its terminated notification was lost: when the timer fires callbot
	// hangs up again, and keeps watching; it never leaves the caller in a call nobody serves.
	for range 3 {
		c, cmds2, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env)
		if err != nil || c.State != StateTerminating || !slices.Equal(kinds(cmds2), []string{"hangup", "setTimer"}) || cmds2[1].After != env.HangupGrace {
			t.Fatalf("no terminated notification after the hangup: %s %v %v, want another hangup and the timer again", c.State, kinds(cmds2), err)
		}
	}
}

func TestCallerHangsUpWhileQueued(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1},
		Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}})
	if c.State != StateTerminated || c.Outcome != OutcomeCallerHangup {
		t.Fatalf("%s %s", c.State, c.Outcome)
	}
	if diff := cmp.Diff(kinds(cmds[3]), []string{"leaveQueue"}); diff != "" {
		t.Errorf("(-got +want):\n%s", diff)
	}
	if _, _, err := Decide(c, Event{Kind: EvAgentOffer, Agent: "a1"}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("offer to an ended call: %v, want ignored", err)
	}
}

func TestDirectTransferFailureReturnsToMenu(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "3", Seq: 1})
	if c.State != StateTransferring || cmds[2][1].Target != (graph.Party{Kind: graph.KindUser, ID: "22222222-0000-4000-8000-000000000001"}) {
		t.Fatalf("%s %+v", c.State, cmds[2])
	}
	c, cmds2, err := Decide(c, Event{Kind: EvTransferFailed, Verified: true}, env)
	if err != nil || c.State != StateInMenu {
		t.Fatalf("after failed direct transfer: %s %v", c.State, err)
	}
	// The caller is back at the start menu, not at the start of the call: the greeting is
	// played once, after answer.
	var played [][]graph.MediaPrompt
	for _, cmd := range cmds2 {
		if cmd.Kind == CmdPlayPrompt {
			played = append(played, cmd.Prompts)
		}
	}
	if diff := cmp.Diff(played, [][]graph.MediaPrompt{{prompt("menu")}}); diff != "" {
		t.Errorf("prompts after a failed direct transfer (-got +want):\n%s", diff)
	}
	if c.Menu != (ivr.Position{Menu: "main"}) || c.Timers[TimerMenu] == 0 {
		t.Errorf("after failed direct transfer: position %+v, timers %v; want the start menu, waiting for a key", c.Menu, c.Timers)
	}
}

func TestMaxWaitDisconnects(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	tok := cmds[2][len(cmds[2])-1].Token
	c, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: tok}, env)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != StateTerminating || out[0].Kind != CmdLeaveQueue {
		t.Errorf("%s %v", c.State, kinds(out))
	}
}

// A hold prompt Graph refuses must not become a tight loop of playPrompt requests.
func TestRefusedHoldMusicRetriedLater(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	c, cmds, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx, Failed: true}, env)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(kinds(cmds), []string{"setTimer"}); diff != "" || cmds[0].Timer != TimerHold {
		t.Fatalf("after a refused prompt (-got +want):\n%s %+v", diff, cmds)
	}
	maxWait := c.Timers[TimerMaxWait]
	c, cmds, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: cmds[0].Token}, env)
	if err != nil || len(cmds) != 2 || cmds[0].Kind != CmdPlayPrompt {
		t.Errorf("hold timer: %v %v, want the hold music again (and its guard)", kinds(cmds), err)
	}
	// the queue's max wait still runs beside the hold timer
	c, cmds, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: maxWait}, env)
	if err != nil || c.State != StateTerminating {
		t.Errorf("max wait after a hold retry: %s %v %v", c.State, kinds(cmds), err)
	}
}

// An answer that failed ambiguously is sent again only if Graph still has the call incoming,
// and at most once more.
func TestAnswerRepeatedOnlyWhileIncoming(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming)
	if _, _, err := Decide(c, Event{Kind: EvCallState, GraphState: graph.CallEstablishing}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("Graph establishing: %v, want no new answer", err)
	}
	c2, cmds, err := Decide(c, Event{Kind: EvCallState, GraphState: graph.CallIncoming}, env)
	if err != nil || len(cmds) == 0 || cmds[0].Kind != CmdAnswer || c2.Answers != 2 {
		t.Fatalf("Graph incoming: %v %v, want a second answer", kinds(cmds), err)
	}
	if _, _, err := Decide(c2, Event{Kind: EvCallState, GraphState: graph.CallIncoming}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("third answer: %v, want none", err)
	}
	c3, _, err := Decide(c2, Event{Kind: EvCallState, GraphState: graph.CallEstablished}, env)
	if err != nil || c3.State != StateInMenu {
		t.Errorf("Graph established (notification lost): %s %v, want the menu", c3.State, err)
	}
}

// A read that was to settle a transfer in doubt and that Graph did not answer (throttled,
// failing) is made again a second later, then two, four, and every transferRecheck (5 s) from
// then on; the next attempt starts again at a second. Before, every such read waited 5 s after
// the client's own retries: callers in silence for 20 s and more under a throttling Graph (the
// rolling-deploy soak).
func TestTransferReadGraphDidNotAnswerIsMadeAgainSoonThenLessOften(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	offer := func(c Call, agent string) Call {
		t.Helper()
		c, _, err := Decide(c, Event{Kind: EvAgentOffer, Agent: agent}, env)
		if err != nil || c.State != StateTransferring {
			t.Fatalf("offer to %s: %s %v", agent, c.State, err)
		}
		c, check, err := Decide(c, Event{Kind: EvTransferFailed, Result: graph.ResultInfo{Code: 500, Subcode: 7000}}, env)
		if err != nil || len(check) != 1 || check[0].Kind != CmdCheckCall {
			t.Fatalf("failure notification: %v %v, want a read of the call", kinds(check), err)
		}
		return c
	}
	unreadable := func(c Call) (Call, time.Duration) {
		t.Helper()
		c, out, err := Decide(c, Event{Kind: EvCallState, Unreadable: true}, env)
		if err != nil || c.State != StateTransferring || len(out) != 1 || out[0].Kind != CmdSetTimer || out[0].Timer != TimerTransfer {
			t.Fatalf("read not answered: %s %v %v, want the transfer's timer set", c.State, kinds(out), err)
		}
		wait := out[0].After
		// the timer fires: a read again
		c, out, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: c.Timers[TimerTransfer]}, env)
		if err != nil || len(out) == 0 || out[0].Kind != CmdCheckCall {
			t.Fatalf("recheck: %v %v, want a read of the call", kinds(out), err)
		}
		return c, wait
	}
	c = offer(c, "a1")
	var got []time.Duration
	for range 5 {
		var wait time.Duration
		c, wait = unreadable(c)
		got = append(got, wait)
	}
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, transferRecheck, transferRecheck}
	if !slices.Equal(got, want) {
		t.Errorf("waits before each read again: %v, want %v", got, want)
	}
	// Graph answers at last: established, the attempt failed; the caller queued again, then
	// offered to another agent, whose transfer is in doubt too
	c, _, err := Decide(c, Event{Kind: EvCallState, GraphState: graph.CallEstablished, Verified: true}, env)
	if err != nil || c.State != StateQueued {
		t.Fatalf("read answered: %s %v, want back in the queue", c.State, err)
	}
	c = offer(c, "a2")
	if _, out, err := Decide(c, Event{Kind: EvCallState, Unreadable: true}, env); err != nil || len(out) != 1 || out[0].After != time.Second {
		t.Errorf("the next attempt's first read not answered: %v %v, want a read again a second later", out, err)
	}
}

// A read of a call being answered that Graph did not answer is made again a second later while
// Graph may still take an answer (15 s after the call came in); past that, the answer's own
// check is the next look.
func TestAnswerUnreadableRecheckedWithinTheDeadline(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming)
	_, cmds, err := Decide(c, Event{Kind: EvCallState, Unreadable: true}, env)
	if err != nil || len(cmds) != 1 || cmds[0].Kind != CmdSetTimer || cmds[0].Timer != TimerAnswer || cmds[0].After != answerRecheck {
		t.Errorf("read not answered within the deadline: %v %v, want the answer's timer %s on", cmds, err, answerRecheck)
	}
	late := env
	late.Now = c.CreatedAt.Add(graph.AnswerDeadline)
	if _, cmds, err := Decide(c, Event{Kind: EvCallState, Unreadable: true}, late); !errors.Is(err, ErrIgnored) {
		t.Errorf("read not answered past the deadline: %v %v, want ignored (the answer's check reads again)", cmds, err)
	}
}

// Conference hand-off: the agent is invited, callbot stays in the call, sees the agent join and
// leave, hangs up then, and the agent wraps up.
func TestInviteHandoff(t *testing.T) {
	env := testEnv(t)
	agent := "11111111-0000-4000-8000-000000000002"
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1},
		Event{Kind: EvAgentOffer, Agent: agent})
	if c.State != StateInviting || kinds(cmds[3])[0] != "invite" || cmds[3][0].Target.ID != agent {
		t.Fatalf("after the offer: %s %v", c.State, kinds(cmds[3]))
	}
	if _, _, err := Decide(c, Event{Kind: EvInviteDone, ClientContext: "i-old"}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("another invite's completion: %v, want ignored", err)
	}
	hold := c.PromptCtx
	c, out, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: hold}, env)
	if err != nil || kinds(out)[0] != "playPrompt" {
		t.Errorf("hold music while the agent rings: %v %v", kinds(out), err)
	}
	c, out, err = Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx}, env)
	if err != nil || c.State != StateConnected || !slices.Equal(kinds(out), []string{"cancelMediaProcessing", "setTimer"}) || out[1].Timer != TimerRoster {
		t.Fatalf("agent joined: %s %v %v, want connected, the hold music stopped and a roster check armed", c.State, kinds(out), err)
	}
	// A roster without the agent once the completion connected the call: from before they
	// joined, or after they left (the roster that showed them late or lost): the roster check is
	// brought forward (Graph is asked in a few seconds, not at once: its roster may not list
	// them yet), the call not ended.
	if got, out, err := Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}}, env); err != nil || got.State != StateConnected ||
		!slices.Equal(kinds(out), []string{"setTimer"}) || out[0].Timer != TimerRoster || out[0].After != rosterSettle {
		t.Errorf("a roster before the agent appears: %s %v %v, want the roster check brought forward, the call not ended", got.State, kinds(out), err)
	}
	c, _, err = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller", agent}}, env)
	if err != nil || !c.Joined {
		t.Fatalf("roster with the agent: %v joined=%v", err, c.Joined)
	}
	// Without the agent: they left, or the roster is a late one from before they joined (its
	// rosterSequenceNumbers cannot tell): Graph is asked.
	c, out, err = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}}, env)
	if err != nil || c.State != StateConnected || !slices.Equal(kinds(out), []string{"checkRoster"}) {
		t.Fatalf("a roster without the agent: %s %v %v, want a roster read", c.State, kinds(out), err)
	}
	c, out, err = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: c.RosterCtx}, env)
	if err != nil || c.State != StateTerminating || !slices.Equal(kinds(out), []string{"hangup", "setTimer", "releaseAgent"}) {
		t.Fatalf("agent left: %s %v %v, want callbot to hang up (and watch that it did)", c.State, kinds(out), err)
	}
	if out[2].AgentOutcome != AgentWrapUp || out[1].After != 30*time.Second {
		t.Errorf("release %+v, want 30s of wrap-up", out[1])
	}
	c, out, _ = Decide(c, Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 7000}}, env)
	if c.State != StateTerminated || c.Outcome != OutcomeConnected || len(out) != 0 {
		t.Errorf("end: %s %s %v (the agent was released already)", c.State, c.Outcome, kinds(out))
	}
}

func TestInviteFailedOrCallerLeaves(t *testing.T) {
	env := testEnv(t)
	agent := "11111111-0000-4000-8000-000000000002"
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1}, Event{Kind: EvAgentOffer, Agent: agent})
	failed, out, err := Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx, Failed: true}, env)
	if err != nil || failed.State != StateInviting || !slices.Equal(kinds(out), []string{"checkRoster", "setTimer"}) {
		t.Fatalf("declined invite: %s %v %v, want the roster read first", failed.State, kinds(out), err)
	}
	failed, out, err = Decide(failed, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: failed.RosterCtx}, env)
	if err != nil || failed.State != StateQueued || out[0].AgentOutcome != AgentFailed {
		t.Errorf("declined invite, the agent not in the roster: %s %v %v, want back in the queue and the agent cooling down", failed.State, kinds(out), err)
	}
	joined, _, _ := Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx}, env)
	ended, out, _ := Decide(joined, Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}}, env)
	if ended.Outcome != OutcomeConnected || len(out) != 1 || out[0].AgentOutcome != AgentWrapUp {
		t.Errorf("caller hung up while connected: %s %v", ended.Outcome, kinds(out))
	}
}

// inviting is a call whose caller was offered to the conference hand-off queue's agent.
func inviting(t *testing.T) (Call, Env, string) {
	t.Helper()
	env := testEnv(t)
	agent := "11111111-0000-4000-8000-000000000002"
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1}, Event{Kind: EvAgentOffer, Agent: agent})
	if c.State != StateInviting {
		t.Fatalf("after the offer: %s", c.State)
	}
	return c, env, agent
}

// A roster that shows the invited agent means they are in the call: connected, whatever the
// invite's completion says later, or if it never comes. Waiting for it: an agent who joined and
// left before it came left the caller in a call with nobody and no timer; a lost completion sent
// the caller back to the queue (the agent released as failed) mid-conversation; a caller who
// hung up then cost the agent their wrap-up.
func TestRosterWithTheAgentConnectsAnInvite(t *testing.T) {
	t.Run("agent joined and left before the invite's completion", func(t *testing.T) {
		c, env, agent := inviting(t)
		inviteCtx := c.InviteCtx
		c, out, err := Decide(c, Event{Kind: EvRoster, Participants: []string{"caller", agent}}, env)
		if err != nil || c.State != StateConnected || !slices.Equal(kinds(out), []string{"cancelMediaProcessing", "setTimer"}) {
			t.Fatalf("roster with the agent: %s %v %v, want connected and the hold music stopped", c.State, kinds(out), err)
		}
		c, _, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}}, env)
		c, out, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: c.RosterCtx}, env)
		if c.State != StateTerminating || kinds(out)[0] != "hangup" {
			t.Fatalf("agent left: %s %v, want callbot to hang up", c.State, kinds(out))
		}
		if _, _, err := Decide(c, Event{Kind: EvInviteDone, ClientContext: inviteCtx}, env); !errors.Is(err, ErrIgnored) {
			t.Errorf("the invite's late completion: %v, want ignored", err)
		}
	})
	t.Run("invite completion lost", func(t *testing.T) {
		c, env, agent := inviting(t)
		timer := c.Timers[TimerTransfer]
		c, _, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{agent}}, env)
		if next, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: timer}, env); !errors.Is(err, ErrIgnored) || next.State != StateConnected {
			t.Errorf("the invite's timer after the agent joined: %s %v %v, want ignored", next.State, kinds(out), err)
		}
	})
	t.Run("caller hangs up before the completion", func(t *testing.T) {
		c, env, agent := inviting(t)
		c, _, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{agent}}, env)
		c, out, _ := Decide(c, Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}}, env)
		if c.Outcome != OutcomeConnected || len(out) != 1 || out[0].AgentOutcome != AgentWrapUp {
			t.Errorf("hang-up after the agent joined: outcome %s %+v, want connected and the agent's wrap-up", c.Outcome, out)
		}
	})
}

// An invite's failure is confirmed by reading the roster before the caller goes back to the
// queue: a re-drive may have invited the agent a second time, and that invite's failure comes
// while the agent talks to the caller after the first. Taking it at its word sent the caller
// back to the queue mid-conversation and marked the agent failed.
func TestInviteFailureIsCheckedAgainstTheRoster(t *testing.T) {
	c, env, agent := inviting(t)
	failed, out, err := Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx, Failed: true}, env)
	if err != nil || failed.State != StateInviting || out[0].Kind != CmdCheckRoster || out[0].ClientContext != failed.RosterCtx {
		t.Fatalf("failure: %s %+v %v, want a roster read", failed.State, out, err)
	}
	t.Run("the agent is in the call", func(t *testing.T) {
		got, out, err := Decide(failed, Event{Kind: EvRoster, Participants: []string{"caller", agent}, ClientContext: failed.RosterCtx}, env)
		if err != nil || got.State != StateConnected || slices.Contains(kinds(out), "releaseAgent") {
			t.Errorf("roster read with the agent: %s %v %v, want connected, the agent kept", got.State, kinds(out), err)
		}
	})
	t.Run("a read decided before is not this one", func(t *testing.T) {
		if _, _, err := Decide(failed, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: "r1"}, env); !errors.Is(err, ErrIgnored) {
			t.Errorf("another read's roster: %v, want ignored", err)
		}
		if !Stale(failed, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: "r1"}) {
			t.Error("another read's roster is not Stale")
		}
	})
	t.Run("the roster cannot be read", func(t *testing.T) {
		got, out, err := Decide(failed, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: failed.Timers[TimerTransfer]}, env)
		if err != nil || got.State != StateQueued || out[0].AgentOutcome != AgentFailed {
			t.Errorf("no read %v later: %s %v %v, want back in the queue", transferRecheck, got.State, kinds(out), err)
		}
	})
}

// An invite Graph never processed (NotSent: throttled, no token) is checked against the roster
// like any failure, and the agent, never rung, is released as after a transfer Graph never
// processed (abandoned, held back notSentHold), whether the read or its recheck settles it, and
// also when the invite's timer had started the read first. An agent the read shows in the call
// is connected all the same (a re-drive of the invite may have reached Graph).
func TestInviteNotProcessedReleasesTheAgentAsNeverRung(t *testing.T) {
	c, env, agent := inviting(t)
	notSent := Event{Kind: EvInviteDone, ClientContext: c.InviteCtx, Failed: true, NotSent: true}
	failed, out, err := Decide(c, notSent, env)
	if err != nil || failed.State != StateInviting || !failed.InviteNotSent || !slices.Equal(kinds(out), []string{"checkRoster", "setTimer"}) {
		t.Fatalf("invite not processed: %s %v %v, want the roster read first", failed.State, kinds(out), err)
	}
	if _, _, err := Decide(failed, notSent, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("the failure again: %v, want ignored", err)
	}
	neverRung := func(t *testing.T, got Call, out []Command, err error) {
		t.Helper()
		i := slices.IndexFunc(out, func(c Command) bool { return c.Kind == CmdReleaseAgent })
		if err != nil || got.State != StateQueued || i < 0 || out[i].AgentOutcome != AgentAbandoned || out[i].After != notSentHold || got.InviteNotSent {
			t.Errorf("%s %+v %v, want back in the queue and the agent released abandoned, held %v", got.State, out, err, notSentHold)
		}
	}
	t.Run("the read shows the agent absent", func(t *testing.T) {
		got, out, err := Decide(failed, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: failed.RosterCtx}, env)
		neverRung(t, got, out, err)
	})
	t.Run("the roster cannot be read", func(t *testing.T) {
		got, out, err := Decide(failed, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: failed.Timers[TimerTransfer]}, env)
		neverRung(t, got, out, err)
	})
	t.Run("the read shows the agent in the call", func(t *testing.T) {
		got, out, err := Decide(failed, Event{Kind: EvRoster, Participants: []string{"caller", agent}, ClientContext: failed.RosterCtx}, env)
		if err != nil || got.State != StateConnected || got.InviteNotSent || slices.Contains(kinds(out), "releaseAgent") {
			t.Errorf("%s %v %v, want connected, the agent kept", got.State, kinds(out), err)
		}
	})
	t.Run("the invite's timer read the roster first", func(t *testing.T) {
		timed, _, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: c.Timers[TimerTransfer]}, env)
		if err != nil || timed.RosterCtx == "" {
			t.Fatalf("the invite's timer: %v", err)
		}
		late, out, err := Decide(timed, notSent, env)
		if err != nil || len(out) != 0 || !late.InviteNotSent || late.RosterCtx != timed.RosterCtx {
			t.Fatalf("not processed while the roster is read: %v %v, want noted, no second read", kinds(out), err)
		}
		got, out, err := Decide(late, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: late.RosterCtx}, env)
		neverRung(t, got, out, err)
	})
	t.Run("the next offer's invite reaches the agent", func(t *testing.T) {
		back, _, _ := Decide(failed, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: failed.RosterCtx}, env)
		again, _, _ := Decide(back, Event{Kind: EvAgentOffer, Agent: agent}, env)
		declined, _, _ := Decide(again, Event{Kind: EvInviteDone, ClientContext: again.InviteCtx, Failed: true}, env)
		got, out, err := Decide(declined, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: declined.RosterCtx}, env)
		if err != nil || got.State != StateQueued || out[0].AgentOutcome != AgentFailed {
			t.Errorf("declined on the next offer: %s %+v %v, want the agent cooling down", got.State, out, err)
		}
	})
}

// While an invite's failure (or its timer) is checked against the roster, the invite's own
// success completion still counts: a re-driven second invite can fail while the agent rings from
// the first and then answers it. Dropping that success let the read, made before the agent
// joined, send the caller back to the queue (the agent released as failed) while the agent joined
// the call, and the roster showing them was then ignored in the queue.
func TestInviteSuccessDuringTheRosterCheckConnects(t *testing.T) {
	for _, start := range []string{"failure", "timer"} {
		t.Run(start, func(t *testing.T) {
			c, env, agent := inviting(t)
			inv := c.InviteCtx
			var err error
			if start == "failure" {
				c, _, err = Decide(c, Event{Kind: EvInviteDone, ClientContext: inv, Failed: true}, env)
			} else {
				c, _, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: c.Timers[TimerTransfer]}, env)
			}
			if err != nil || c.State != StateInviting || c.RosterCtx == "" {
				t.Fatalf("check started: %s %v", c.State, err)
			}
			read := c.RosterCtx
			success := Event{Kind: EvInviteDone, ClientContext: inv} // the agent joined on the first invite
			if Stale(c, success) {
				t.Errorf("the awaited invite's success is Stale during the roster check")
			}
			c, _, err = Decide(c, success, env)
			if err != nil || c.State != StateConnected {
				t.Fatalf("the invite's success during the roster check: %s %v, want connected", c.State, err)
			}
			if _, out, err := Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: read}, env); !errors.Is(err, ErrIgnored) {
				t.Errorf("the read made before the agent joined, coming back: %v %v, want ignored", kinds(out), err)
			}
			if _, _, err := Decide(c, Event{Kind: EvRoster, Participants: []string{"caller", agent}}, env); err != nil {
				t.Errorf("the roster showing the agent: %v", err)
			}
		})
	}
}

// Connected, the agent leaves: callbot hangs up, and the roster check armed while connected is
// disarmed. Left armed, it fired in terminating and sent a second hangup before the hang-up
// grace.
func TestAgentLeavingDisarmsTheRosterCheck(t *testing.T) {
	c, env, agent := inviting(t)
	c, _, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller", agent}}, env)
	tok := c.Timers[TimerRoster]
	c, _, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}}, env)
	c, out, err := Decide(c, Event{Kind: EvRoster, Participants: []string{"caller"}, ClientContext: c.RosterCtx}, env)
	if err != nil || c.State != StateTerminating || !slices.Contains(kinds(out), "hangup") {
		t.Fatalf("agent left: %s %v %v", c.State, kinds(out), err)
	}
	if _, ok := c.Timers[TimerRoster]; ok {
		t.Errorf("terminating still has the roster timer armed: %v", c.Timers)
	}
	if _, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerRoster, TimerToken: tok}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("the roster timer in terminating: %v %v, want ignored (no second hangup before the grace)", kinds(out), err)
	}
}

// No word of the invite in time (the agent-alert timer): the completion and the rosters may have
// been lost while the agent talks to the caller. callbot reads the roster before requeueing.
func TestInviteTimeoutReadsTheRoster(t *testing.T) {
	c, env, agent := inviting(t)
	c, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: c.Timers[TimerTransfer]}, env)
	if err != nil || c.State != StateInviting || !slices.Equal(kinds(out), []string{"checkRoster", "setTimer"}) || out[1].After != transferRecheck {
		t.Fatalf("the invite's timer: %s %v %v, want a roster read and a recheck", c.State, kinds(out), err)
	}
	got, _, err := Decide(c, Event{Kind: EvRoster, Participants: []string{agent}, ClientContext: c.RosterCtx}, env)
	if err != nil || got.State != StateConnected {
		t.Errorf("read shows the agent: %s %v, want connected", got.State, err)
	}
	got, out, err = Decide(c, Event{Kind: EvRoster, Participants: []string{}, ClientContext: c.RosterCtx}, env)
	if err != nil || got.State != StateQueued || out[0].AgentOutcome != AgentFailed {
		t.Errorf("read without the agent: %s %v %v, want back in the queue", got.State, kinds(out), err)
	}
	if _, _, err := Decide(c, Event{Kind: EvRoster, Participants: []string{}}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("a notified roster without the agent while the read is pending: %v, want ignored (only the read confirms)", err)
	}
}

// While connected, callbot reads the roster every rosterCheck: if the roster that showed the
// agent leaving was lost, the caller is not left in a call with nobody until they hang up.
func TestConnectedReadsTheRosterNowAndThen(t *testing.T) {
	c, env, agent := inviting(t)
	c, _, _ = Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx}, env) // joined; no roster seen yet
	c, _, _ = Decide(c, Event{Kind: EvRoster, Participants: []string{agent}}, env)
	tick, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerRoster, TimerToken: c.Timers[TimerRoster]}, env)
	if err != nil || tick.State != StateConnected || !slices.Equal(kinds(out), []string{"checkRoster", "setTimer"}) || out[1].After != rosterCheck {
		t.Fatalf("roster timer: %s %v %v, want a read and the next check", tick.State, kinds(out), err)
	}
	if _, _, err := Decide(tick, Event{Kind: EvRoster, Participants: []string{agent}, ClientContext: tick.RosterCtx}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("read with the agent: %v, want nothing to do", err)
	}
	got, out, err := Decide(tick, Event{Kind: EvRoster, Participants: []string{}, ClientContext: tick.RosterCtx}, env)
	if err != nil || got.State != StateTerminating || !slices.Equal(kinds(out), []string{"hangup", "setTimer", "releaseAgent"}) || out[2].AgentOutcome != AgentWrapUp {
		t.Errorf("read without the agent: %s %v %v, want callbot to hang up and the agent to wrap up", got.State, kinds(out), err)
	}
	t.Run("connected by the completion, no roster ever seen", func(t *testing.T) {
		c, env, _ := inviting(t)
		c, _, _ = Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx}, env)
		c, _, _ = Decide(c, Event{Kind: EvTimeout, Timer: TimerRoster, TimerToken: c.Timers[TimerRoster]}, env)
		got, _, err := Decide(c, Event{Kind: EvRoster, Participants: []string{}, ClientContext: c.RosterCtx}, env)
		if err != nil || got.State != StateTerminating {
			t.Errorf("read without the agent a check interval after joining: %s %v, want callbot to hang up", got.State, err)
		}
	})
}

// A key press without a sequenceId must not lower LastTone: a repeat of an earlier press was then
// applied again, and the cache's Stale contract (LastTone only rises) broken.
func TestToneWithoutSequenceKeepsLastTone(t *testing.T) {
	env := testEnv(t)
	env.Flow.Menus["main"].Retries = 5 // invalid keys replay the menu, no fallback yet
	dup := Event{Kind: EvTone, Digit: "7", Seq: 2}
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, dup)
	c, _, err := Decide(c, Event{Kind: EvTone, Digit: "8"}, env)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := Decide(c, dup, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("a repeat of the press with sequenceId 2, after one without: %v (LastTone %d), want ignored", err, c.LastTone)
	}
}

// EvAdopt makes a record for a call Graph has established and callbot lost: the caller starts
// the menu again. On a call callbot knows it changes nothing.
func TestAdoptStartsTheMenuAgain(t *testing.T) {
	env := testEnv(t)
	in := &Incoming{GraphID: "g-1", TenantID: "t1", ScenarioID: "s"}
	c, out, err := Decide(Call{}, Event{Kind: EvAdopt, Incoming: in}, env)
	if err != nil || c.State != StateInMenu || c.ID != "g-1" || c.Tenant != "t1" || c.AnsweredAt.IsZero() ||
		!slices.Equal(kinds(out)[:2], []string{"subscribeToTone", "playPrompt"}) {
		t.Fatalf("adopt: %+v %v %v, want the menu from its start", c, kinds(out), err)
	}
	if _, _, err := Decide(c, Event{Kind: EvAdopt, Incoming: in}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("adopt of a call with a record: %v, want ignored", err)
	}
}

// A timer the table refused (a bug) leaves a call that only Graph's notifications would move on;
// Graph showing the caller alone with callbot, the machine gives up on it (EvAbort): callbot hangs
// up, watches that it did, and frees the agent (after their wrap-up if they had been talking to
// the caller). A caller in the menu or a queue has no such row: their keys or the dispatcher still
// move them on.
func TestAbortHangsUpAndFreesTheAgent(t *testing.T) {
	c, env, agent := inviting(t)
	got, out, err := Decide(c, Event{Kind: EvAbort}, env)
	if err != nil || got.State != StateTerminating || got.Outcome != OutcomeFailed || got.Agent != "" || len(got.Timers) != 1 ||
		!slices.Equal(kinds(out), []string{"hangup", "setTimer", "releaseAgent"}) || out[2].Agent != agent || out[2].AgentOutcome != AgentAbandoned {
		t.Errorf("inviting: %s %s %+v %v, want a hangup, its retry timer alone, the agent freed", got.State, got.Outcome, out, err)
	}
	connected, _, _ := Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx}, env)
	got, out, err = Decide(connected, Event{Kind: EvAbort}, env)
	if err != nil || got.State != StateTerminating || got.Outcome != OutcomeConnected || len(out) != 3 || out[2].AgentOutcome != AgentWrapUp || out[2].After != 30*time.Second {
		t.Errorf("connected: %s %s %+v %v, want a hangup and the agent's wrap-up", got.State, got.Outcome, out, err)
	}
	inMenu, _ := step(t, env, incoming, Event{Kind: EvEstablished})
	queued, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1})
	for _, c := range []Call{inMenu, queued} {
		if _, _, err := Decide(c, Event{Kind: EvAbort}, env); !errors.Is(err, ErrIgnored) {
			t.Errorf("%s: %v, want ignored", c.State, err)
		}
	}
}

// Decide's ErrInvalidTransition carries the move the table refused.
func TestInvalidTransitionNamesTheMove(t *testing.T) {
	// a record a bug could leave: inviting with no agent, the invite's failure being checked
	c := Call{ID: "c1", State: StateInviting, RosterCtx: "r5", Seq: 6, Timers: map[TimerKind]int64{TimerTransfer: 6}}
	_, _, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerTransfer, TimerToken: 6}, testEnv(t))
	var te *TransitionError
	if !errors.Is(err, ErrInvalidTransition) || !errors.As(err, &te) || *te != (TransitionError{StateInviting, EvTimeout, StateInMenu}) {
		t.Fatalf("got %v, want the invalid transition inviting --timeout--> in_menu", err)
	}
	if want := "invalid transition: inviting --timeout--> in_menu"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
}

// loopFlow is testFlow with the start menu's fallback, taken after no input, its direct transfer.
func loopFlow(t *testing.T) Env {
	t.Helper()
	env := testEnv(t)
	env.Flow = fallbackTransfer(env.Flow)
	return env
}

// fallbackTransfer is f (testFlow) with the start menu's fallback its direct transfer (key 3).
func fallbackTransfer(f *ivr.Flow) *ivr.Flow {
	g := *f
	g.Menus = maps.Clone(f.Menus)
	main := *g.Menus["main"]
	main.Fallback = main.Options["3"]
	g.Menus["main"] = &main
	return &g
}

// unattendedRound takes a caller at the start menu who presses nothing (or key first) through
// the no-input replays to the fallback's direct transfer, and fails that transfer.
func unattendedRound(t *testing.T, env Env, c Call, key string) (Call, []Command) {
	t.Helper()
	if key != "" {
		var err error
		if c, _, err = Decide(c, Event{Kind: EvTone, Digit: key, Seq: c.LastTone + 1}, env); err != nil || c.State != StateInMenu {
			t.Fatalf("key %s: %s %v, want a replay of the menu", key, c.State, err)
		}
	}
	for c.State == StateInMenu {
		var err error
		if c.PromptCtx != "" {
			if c, _, err = Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env); err != nil {
				t.Fatal(err)
			}
		}
		if c, _, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env); err != nil {
			t.Fatal(err)
		}
	}
	if c.State != StateTransferring {
		t.Fatalf("after no input: %s, want the fallback's transfer", c.State)
	}
	c, out, err := Decide(c, Event{Kind: EvTransferFailed, Verified: true, Result: graph.ResultInfo{Code: 500, Subcode: 7000}}, env)
	if err != nil {
		t.Fatal(err)
	}
	return c, out
}

// A caller who presses nothing, at a menu whose fallback is a direct transfer that fails, does
// not go round the menu and the transfer until they hang up: the third failure in a row says
// goodbye (the menu's disconnect prompt) and hangs up, with an outcome of its own.
func TestUnattendedCallerLoopingThroughAFailingTransferIsEnded(t *testing.T) {
	env := loopFlow(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished})
	var out []Command
	for i := 1; i < 3; i++ {
		if c, _ = unattendedRound(t, env, c, ""); c.State != StateInMenu {
			t.Fatalf("failure %d: %s, want back at the menu", i, c.State)
		}
	}
	c, out = unattendedRound(t, env, c, "")
	if c.State != StateTerminating || c.Outcome != OutcomeTransferFailed {
		t.Fatalf("third failure with nobody pressing a key: %s %q, want goodbye (terminating, %s)", c.State, c.Outcome, OutcomeTransferFailed)
	}
	if diff := cmp.Diff(kinds(out), []string{"playPrompt", "setTimer"}); diff != "" || !slices.Equal(out[0].Prompts, []graph.MediaPrompt{prompt("bye")}) {
		t.Fatalf("goodbye commands %v %+v (-got +want):\n%s", kinds(out), out[0].Prompts, diff)
	}
	if len(c.Timers) != 1 || c.Timers[TimerMenu] == 0 {
		t.Errorf("timers %v, want only the goodbye's (no transfer timer left to hang up early)", c.Timers)
	}
	c, out, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
	if err != nil || !slices.Equal(kinds(out), []string{"hangup", "setTimer"}) {
		t.Fatalf("goodbye played: %v %v, want hangup", kinds(out), err)
	}
	c, _, _ = Decide(c, Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 7000}}, env)
	if c.State != StateTerminated || c.Outcome != OutcomeTransferFailed {
		t.Errorf("ended: %s %q, want terminated, %s", c.State, c.Outcome, OutcomeTransferFailed)
	}

	// A flow with no goodbye prompt hangs up at once; and the failure found by reading the call
	// (EvCallState) counts as a notified one.
	f := *env.Flow
	f.Menus = maps.Clone(f.Menus)
	main := *f.Menus["main"]
	main.Options = maps.Clone(main.Options)
	delete(main.Options, "9")
	f.Menus["main"] = &main
	env.Flow = &f
	c, _ = step(t, env, incoming, Event{Kind: EvEstablished})
	for range 2 {
		c, _ = unattendedRound(t, env, c, "")
	}
	for c.State == StateInMenu {
		c, _, _ = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env)
	}
	c, _, _ = Decide(c, Event{Kind: EvTransferring}, env)
	c, out, err = Decide(c, Event{Kind: EvCallState, GraphState: graph.CallEstablished}, env)
	if err != nil || c.State != StateTerminating || c.Outcome != OutcomeTransferFailed || !slices.Equal(kinds(out), []string{"hangup", "setTimer"}) {
		t.Fatalf("third failure read from Graph, no goodbye prompt: %s %q %v %v, want a hangup", c.State, c.Outcome, kinds(out), err)
	}
}

// A caller who presses keys is never cut off by that rule, however often the transfer fails.
func TestCallerPressingKeysIsNotEndedByFailingTransfers(t *testing.T) {
	env := loopFlow(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished})
	for i := range 10 {
		if c, _ = unattendedRound(t, env, c, "7"); c.State != StateInMenu {
			t.Fatalf("round %d: %s, want back at the menu", i, c.State)
		}
	}
	// the key that chose the transfer counts as a key too
	for i := range 10 {
		c, _, _ = Decide(c, Event{Kind: EvTone, Digit: "3", Seq: c.LastTone + 1}, env)
		if c, _, _ = Decide(c, Event{Kind: EvTransferFailed, Verified: true}, env); c.State != StateInMenu {
			t.Fatalf("round %d of key 3: %s, want back at the menu", i, c.State)
		}
	}
}

// A tone subscription that fails leaves the caller's keys dead for the whole call: it is tried
// again later, with backoff (1, 2, 4, 8, 16, 30 s), never at once and a bounded number of times,
// through a timer that outlives the menu's; a failure repeated, or of a request callbot no
// longer waits on, changes nothing.
func TestFailedToneSubscriptionIsRetriedWithBackoff(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished})
	sub := cmds[1][0]
	if sub.Kind != CmdSubscribeToTone || sub.ClientContext == "" || c.ToneCtx != sub.ClientContext {
		t.Fatalf("established: %+v, ToneCtx %q; want a subscription callbot waits on", sub, c.ToneCtx)
	}
	if _, _, err := Decide(c, Event{Kind: EvToneFailed, ClientContext: "t999"}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("failure of another request: %v, want ignored", err)
	}
	var waits []time.Duration
	for i := 0; ; i++ {
		next, out, err := Decide(c, Event{Kind: EvToneFailed, ClientContext: sub.ClientContext}, env)
		if err != nil {
			t.Fatalf("failure %d: %v", i+1, err)
		}
		if _, _, err := Decide(next, Event{Kind: EvToneFailed, ClientContext: sub.ClientContext}, env); !errors.Is(err, ErrIgnored) {
			t.Errorf("failure %d repeated: %v, want ignored", i+1, err)
		}
		if len(out) == 0 {
			c = next
			break
		}
		if !slices.Equal(kinds(out), []string{"setTimer"}) || out[0].Timer != TimerTone {
			t.Fatalf("failure %d: %v, want the tone timer, no request at once", i+1, kinds(out))
		}
		waits = append(waits, out[0].After)
		c = next
		if i == 0 {
			// the menu's no-input timeout (a new menu step) keeps the tone timer armed
			c, _, _ = Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
			c, _, _ = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env)
			if c.State != StateInMenu || c.Menu.Attempts != 1 || c.Timers[TimerTone] == 0 {
				t.Fatalf("no input meanwhile: %s %+v timers %v, want the menu replayed and the tone timer kept", c.State, c.Menu, c.Timers)
			}
		}
		c, out, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerTone, TimerToken: c.Timers[TimerTone]}, env)
		if err != nil || len(out) != 1 || out[0].Kind != CmdSubscribeToTone || out[0].ClientContext != c.ToneCtx || out[0].ClientContext == sub.ClientContext {
			t.Fatalf("tone timer %d: %v %v, want a new subscription", i+1, kinds(out), err)
		}
		sub = out[0]
	}
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second}
	if !slices.Equal(waits, want) {
		t.Errorf("retried after %v, want %v, then given up", waits, want)
	}
	if c.ToneFails != 7 || c.ToneCtx != "" || c.Timers[TimerTone] != 0 {
		t.Errorf("given up: %d failures, ToneCtx %q, timers %v", c.ToneFails, c.ToneCtx, c.Timers)
	}
}

// A key press shows the subscription works (one that failed ambiguously had taken effect): the
// retry is disarmed. A call being hung up subscribes no more.
func TestToneRetryStopsOnAKeyAndWhileHangingUp(t *testing.T) {
	env := testEnv(t)
	c, cmds := step(t, env, incoming, Event{Kind: EvEstablished})
	c, _, _ = Decide(c, Event{Kind: EvToneFailed, ClientContext: cmds[1][0].ClientContext}, env)
	tok := c.Timers[TimerTone]
	if tok == 0 {
		t.Fatal("no tone timer after the failure")
	}
	pressed, _, err := Decide(c, Event{Kind: EvTone, Digit: "7", Seq: 1}, env)
	if err != nil || pressed.Timers[TimerTone] != 0 {
		t.Errorf("key press: timers %v %v, want the tone timer disarmed", pressed.Timers, err)
	}
	if _, _, err := Decide(pressed, Event{Kind: EvTimeout, Timer: TimerTone, TimerToken: tok}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("disarmed tone timer firing: %v, want ignored", err)
	}
	// A retry still armed when the call moves to a goodbye (a queue's max wait keeps the
	// queue's timers) sends nothing when it fires: made here by arming it on a caller who chose
	// goodbye.
	bye, _, _ := Decide(c, Event{Kind: EvTone, Digit: "9", Seq: 1}, env)
	bye.Timers = map[TimerKind]int64{TimerTone: tok, TimerMenu: bye.Timers[TimerMenu]}
	if _, out, err := Decide(bye, Event{Kind: EvTimeout, Timer: TimerTone, TimerToken: tok}, env); !errors.Is(err, ErrIgnored) || len(out) != 0 {
		t.Errorf("tone timer while hanging up: %v %v, want ignored", kinds(out), err)
	}
	// queued, the retry is still armed (a failed transfer may bring the caller back to a menu)
	c, _, _ = Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
	for c.State == StateInMenu {
		c, _, _ = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env)
	}
	if c.State != StateQueued || c.Timers[TimerTone] != tok {
		t.Fatalf("fallback to the queue: %s timers %v, want the tone timer kept", c.State, c.Timers)
	}
	if _, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerTone, TimerToken: tok}, env); err != nil || !slices.Equal(kinds(out), []string{"subscribeToTone"}) {
		t.Errorf("tone timer while queued: %v %v, want a subscription", kinds(out), err)
	}
	// transferring, Graph would refuse it: it waits for the transfer's end, not counted
	c, _, _ = Decide(c, Event{Kind: EvAgentOffer, Agent: "a1"}, env)
	c, out, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerTone, TimerToken: tok}, env)
	if err != nil || !slices.Equal(kinds(out), []string{"setTimer"}) || out[0].Timer != TimerTone || out[0].After != time.Second || c.ToneFails != 1 {
		t.Errorf("tone timer while transferring: %v %v, %d failures; want it armed again, no request", kinds(out), err, c.ToneFails)
	}
	c, _, _ = Decide(c, Event{Kind: EvTransferFailed, Verified: true}, env)
	if c.State != StateQueued || c.Timers[TimerTone] != out[0].Token {
		t.Errorf("transfer failed: %s timers %v, want queued with the tone timer kept", c.State, c.Timers)
	}
}

// A queue's max wait that ends in a goodbye lets the goodbye play: the timers of the wait (the
// hold music's guard) go with it, where one of them firing during the goodbye hung up at once.
func TestMaxWaitGoodbyeIsNotCutByTheHoldTimer(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	hold := c.Timers[TimerHold]
	if hold == 0 {
		t.Fatalf("queued with timers %v: want the hold music's guard armed", c.Timers)
	}
	c, cmds, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: c.Timers[TimerMaxWait]}, env)
	if err != nil || c.State != StateTerminating || c.PromptCtx == "" {
		t.Fatalf("max wait: %s %v %v, want the goodbye playing", c.State, kinds(cmds), err)
	}
	if _, ok := c.Timers[TimerHold]; ok || len(c.Timers) != 1 || c.Timers[TimerMenu] == 0 {
		t.Errorf("timers during the goodbye %v: want only the hang-up's guard", c.Timers)
	}
	if _, cmds, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: hold}, env); !errors.Is(err, ErrIgnored) {
		t.Errorf("the wait's hold timer during the goodbye: %v %v, want ignored (no hang-up over the goodbye)", kinds(cmds), err)
	}
}

// A transfer request Graph never processed (throttled after the client's retries, no token)
// never reached its target: it says nothing of the target, and callbot has not tried it. A
// caller waiting at the menu for its fallback, as many do, was hung up with the "transfer
// failed" goodbye after three of them (a Graph throttling episode hung up every such caller);
// they do not count, and the transfers that did reach the target still do.
func TestTransfersGraphNeverProcessedDoNotEndTheCall(t *testing.T) {
	env := loopFlow(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished})
	toTransfer := func() {
		t.Helper()
		for c.State == StateInMenu {
			if c.PromptCtx != "" {
				c, _, _ = Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
			}
			c, _, _ = Decide(c, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: c.Timers[TimerMenu]}, env)
		}
		if c.State != StateTransferring {
			t.Fatalf("after no input: %s, want the fallback's transfer", c.State)
		}
	}
	for i := range 5 {
		toTransfer()
		var err error
		if c, _, err = Decide(c, Event{Kind: EvTransferFailed, Verified: true, NotSent: true}, env); err != nil || c.State != StateInMenu {
			t.Fatalf("transfer %d not processed by Graph: %s %q %v, want back at the menu", i+1, c.State, c.Outcome, err)
		}
	}
	for i := range maxUnattendedTransfers {
		toTransfer()
		c, _, _ = Decide(c, Event{Kind: EvTransferFailed, Verified: true, Result: graph.ResultInfo{Code: 500, Subcode: 7000}}, env)
		if want := i+1 == maxUnattendedTransfers; (c.State == StateTerminating) != want {
			t.Fatalf("transfer %d that reached its target failed: %s %q, want goodbye %v", i+1, c.State, c.Outcome, want)
		}
	}
}

// A blind transfer Graph had taken (transferring) whose call is then gone from Graph, its
// terminated notification lost (the reconciler finds it), most likely completed: the agent is
// released as after a transfer (the connected guard, idle time restarted), not as a caller who
// left while they rang (offerable at once, keeping their place among the longest idle, while
// they may be talking to the caller). Without Graph's word that the transfer was under way, the
// caller most likely left while it was being set up, but the agent is held until presence has
// been read again all the same.
func TestTransferringCallGoneFromGraph(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	c, _, err := Decide(c, Event{Kind: EvAgentOffer, Agent: "a1"}, env)
	if err != nil {
		t.Fatal(err)
	}
	gone := Event{Kind: EvEnded, Reason: ReasonGone}
	early, cmds, err := Decide(c, gone, env)
	if err != nil || early.Outcome != OutcomeCallerHangup || len(cmds) != 1 || cmds[0].AgentOutcome != AgentConnected {
		t.Errorf("gone before Graph said transferring: %s %+v %v, want caller_hangup, the agent held as after a transfer until presence tells", early.Outcome, cmds, err)
	}
	hungUp, cmds, err := Decide(c, Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 5010}}, env)
	if err != nil || hungUp.Outcome != OutcomeCallerHangup || len(cmds) != 1 || cmds[0].AgentOutcome != AgentAbandoned {
		t.Errorf("caller hung up while it was set up (notified): %s %+v %v, want caller_hangup, the agent free at once", hungUp.Outcome, cmds, err)
	}
	c, _, err = Decide(c, Event{Kind: EvTransferring}, env)
	if err != nil {
		t.Fatal(err)
	}
	late, cmds, err := Decide(c, gone, env)
	if err != nil || late.Outcome != OutcomeTransferred || len(cmds) != 1 || cmds[0].Kind != CmdReleaseAgent || cmds[0].AgentOutcome != AgentConnected {
		t.Errorf("gone once Graph said transferring: %s %+v %v, want transferred, the agent released as connected", late.Outcome, cmds, err)
	}
}

// A hangup that fails (throttled, failing, timed out: Graph did not end the call) is sent again
// soon by the hang-up timer brought forward, with backoff (1, 2, 4, 8, 16 s, then the hang-up
// grace), or after Graph's Retry-After when longer; never at once. A failure repeated, or of a
// hangup callbot no longer waits on, changes nothing.
func TestFailedHangupIsSentAgainWithBackoff(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "9", Seq: 1})
	if c.State != StateTerminating || c.HangupCtx != "" {
		t.Fatalf("key 9: %s HangupCtx %q, want terminating, the goodbye playing and no hangup yet", c.State, c.HangupCtx)
	}
	c, out, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
	if err != nil || len(out) != 2 || out[0].Kind != CmdHangup || out[0].ClientContext == "" || out[0].ClientContext != c.HangupCtx {
		t.Fatalf("goodbye played: %v %+v, %v; want a hangup callbot waits on", kinds(out), out, err)
	}
	hangup := out[0]
	if !Stale(c, Event{Kind: EvHangupFailed, ClientContext: "h1"}) || Stale(c, Event{Kind: EvHangupFailed, ClientContext: hangup.ClientContext}) {
		t.Error("Stale: an earlier hangup's failure must be, the current one's not")
	}
	var waits []time.Duration
	for i := range 7 {
		ev := Event{Kind: EvHangupFailed, ClientContext: hangup.ClientContext}
		if i == 2 {
			ev.RetryAfter = 5 * time.Second // Graph asks for more than the backoff's 4 s
		}
		next, out, err := Decide(c, ev, env)
		if err != nil || !slices.Equal(kinds(out), []string{"setTimer"}) || out[0].Timer != TimerMenu || next.Timers[TimerMenu] != out[0].Token {
			t.Fatalf("failure %d: %v %v, want the hang-up timer armed again, no request at once", i+1, kinds(out), err)
		}
		if _, _, err := Decide(next, ev, env); !errors.Is(err, ErrIgnored) {
			t.Errorf("failure %d repeated: %v, want ignored", i+1, err)
		}
		waits = append(waits, out[0].After)
		c, out, err = Decide(next, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: next.Timers[TimerMenu]}, env)
		if err != nil || !slices.Equal(kinds(out), []string{"hangup", "setTimer"}) || out[0].ClientContext != c.HangupCtx ||
			out[0].ClientContext == hangup.ClientContext || out[1].After != env.HangupGrace {
			t.Fatalf("hang-up timer %d: %v %v, want a new hangup and the grace", i+1, kinds(out), err)
		}
		if _, _, err := Decide(c, ev, env); !errors.Is(err, ErrIgnored) {
			t.Errorf("failure %d after the next hangup was sent: %v, want ignored", i+1, err)
		}
		hangup = out[0]
	}
	want := []time.Duration{time.Second, 2 * time.Second, 5 * time.Second, 8 * time.Second, 16 * time.Second, 30 * time.Second, 30 * time.Second}
	if !slices.Equal(waits, want) {
		t.Errorf("sent again after %v, want %v", waits, want)
	}
	ended, _, err := Decide(c, Event{Kind: EvEnded}, env)
	if err != nil || ended.State != StateTerminated || ended.Outcome != OutcomeDisconnected {
		t.Fatalf("ended: %s %s %v", ended.State, ended.Outcome, err)
	}
	if _, _, err := Decide(ended, Event{Kind: EvHangupFailed, ClientContext: hangup.ClientContext}, env); !errors.Is(err, ErrIgnored) || !Stale(ended, Event{Kind: EvHangupFailed, ClientContext: hangup.ClientContext}) {
		t.Errorf("a hangup failing once the call ended: %v, want ignored", err)
	}
}

// A hangup Graph refuses (a 4xx other than 404 and 429) is sent again quickly three times at
// most: the fourth refusal leaves the hang-up grace armed with the last hangup as it was.
func TestRefusedHangupIsRetriedABoundedNumberOfTimes(t *testing.T) {
	env := testEnv(t)
	c, _ := step(t, env, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "9", Seq: 1})
	c, out, _ := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, env)
	for i := range 4 {
		grace := c.Timers[TimerMenu]
		next, retry, err := Decide(c, Event{Kind: EvHangupFailed, ClientContext: out[0].ClientContext, Refused: true}, env)
		if err != nil {
			t.Fatalf("refusal %d: %v", i+1, err)
		}
		if i == 3 {
			if len(retry) != 0 || next.Timers[TimerMenu] != grace || next.HangupRefusals != maxHangupRefusals+1 {
				t.Errorf("fourth refusal: %v, timers %v (grace %d), %d refusals; want no quick retry, the grace kept", kinds(retry), next.Timers, grace, next.HangupRefusals)
			}
			break
		}
		if len(retry) != 1 || retry[0].After != time.Second<<i {
			t.Fatalf("refusal %d: %+v, want a retry after %v", i+1, retry, time.Second<<i)
		}
		c, out, _ = Decide(next, Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: next.Timers[TimerMenu]}, env)
	}
}

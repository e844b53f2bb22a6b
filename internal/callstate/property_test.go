package callstate

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// A model of Graph, a caller and the agents, driven by the commands Decide returns. It produces
// the notifications Graph would send; the network delivers them in order, or (chaos) in any
// order among those already sent and with duplicates. Timers fire only when no notification is
// in flight, as a timer's seconds are long next to a notification's milliseconds.

type note struct {
	ev Event
	id int
}

type model struct {
	t      *testing.T
	rng    *rand.Rand
	chaos  bool
	env    Env
	c      Call
	graph  graph.CallState // where Graph has the call
	sub    bool            // tones subscribed
	tones  []string        // keys the caller will press, one per menu prompt heard
	hangup bool            // the caller hangs up once queued
	agents []bool          // per agent: accepts (true) or declines
	free   []bool
	queued bool
	timers map[TimerKind]int64
	flight []note
	nextID int
	seq    int64
	// what happened
	transfersInFlight int
	violations        []string
	steps             int
	versions          []Call  // every record the call had, in order
	events            []Event // every event delivered
}

func (m *model) send(ev Event) {
	m.nextID++
	m.flight = append(m.flight, note{ev: ev, id: m.nextID})
}

func (m *model) apply(ev Event) {
	m.events = append(m.events, ev)
	next, cmds, err := Decide(m.c, ev, m.env)
	if err != nil {
		if err == ErrIgnored {
			return
		}
		m.t.Fatalf("%s in %s: %v", ev.Kind, m.c.State, err)
	}
	if m.c.State.Terminal() && next.State != m.c.State {
		m.violations = append(m.violations, "left terminated")
	}
	m.c = next
	m.versions = append(m.versions, next)
	for _, cmd := range cmds {
		m.command(cmd)
	}
}

func (m *model) command(cmd Command) {
	gone := m.graph == graph.CallTerminated
	switch cmd.Kind {
	case CmdAnswer:
		m.graph = graph.CallEstablished
		m.send(Event{Kind: EvEstablished})
	case CmdSubscribeToTone:
		m.sub = true
	case CmdPlayPrompt:
		if gone {
			return
		}
		if m.c.State != StateQueued { // hold music plays longer than anything else takes
			m.send(Event{Kind: EvPromptDone, ClientContext: cmd.ClientContext})
		}
		// the caller presses the next key while hearing a menu
		if m.c.State == StateInMenu && m.sub && len(m.tones) > 0 {
			m.seq++
			m.send(Event{Kind: EvTone, Digit: m.tones[0], Seq: m.seq})
			m.tones = m.tones[1:]
		}
	case CmdTransfer:
		if gone {
			m.apply(Event{Kind: EvEnded, Reason: "call gone"})
			return
		}
		if m.transfersInFlight > 0 {
			m.violations = append(m.violations, "transfer sent while another is in progress")
		}
		m.transfersInFlight++
		m.graph = graph.CallTransferring
		m.send(Event{Kind: EvTransferring})
		a := m.agentIndex(cmd.Target.ID)
		if a >= 0 && m.agents[a] {
			m.graph = graph.CallTerminated
			m.send(Event{Kind: EvTransferAccepted})
			m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 0, Subcode: 7015}})
		} else {
			m.graph = graph.CallEstablished
			m.transfersInFlight--
			if a >= 0 {
				m.agents[a] = true // declines once, then takes the next offer
			}
			m.send(Event{Kind: EvTransferFailed, Result: graph.ResultInfo{Code: 500, Subcode: 7000}})
		}
	case CmdHangup:
		if !gone {
			m.graph = graph.CallTerminated
			m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 7000}})
		}
	case CmdEnqueue:
		m.queued = true
		if m.hangup {
			m.graph = graph.CallTerminated
			m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}})
		}
	case CmdLeaveQueue:
		m.queued = false
	case CmdReleaseAgent:
		if a := m.agentIndex(cmd.Agent); a >= 0 {
			m.free[a] = true
		}
	case CmdSetTimer:
		m.timers[cmd.Timer] = cmd.Token
	case CmdCheckCall: // as Machine.checkCall
		switch {
		case m.graph == graph.CallTerminated && m.c.State == StateTransferring:
		case m.graph == graph.CallTerminated:
			m.apply(Event{Kind: EvEnded, Reason: "gone from graph"})
		default:
			m.apply(Event{Kind: EvCallState, GraphState: m.graph, Verified: cmd.Settles})
		}
	}
}

// directTarget is the flow's direct-transfer target (key 3): agent-0 answers it, so that direct
// transfers succeed too (declined once, then taken) and their notifications get reordered.
const directTarget = "22222222-0000-4000-8000-000000000001"

func (m *model) agentIndex(id string) int {
	if id == directTarget {
		return 0
	}
	for i := range m.agents {
		if id == agentID(i) {
			return i
		}
	}
	return -1
}

func agentID(i int) string { return fmt.Sprintf("agent-%d", i) }

// run drives the call until nothing is left to happen.
func (m *model) run() {
	m.apply(Event{Kind: EvIncoming, Incoming: &Incoming{GraphID: "c", TenantID: "t"}})
	for m.steps = 0; m.steps < 500; m.steps++ {
		canOffer := m.queued && m.c.State == StateQueued && slices.Contains(m.free, true)
		switch {
		case len(m.flight) > 0 && !(m.chaos && canOffer && m.rng.IntN(3) == 0):
			i := 0
			if m.chaos {
				i = m.rng.IntN(len(m.flight))
			}
			n := m.flight[i]
			if !m.chaos || m.rng.IntN(4) > 0 { // chaos: one time in four the note stays, to arrive again
				m.flight = slices.Delete(m.flight, i, i+1)
			}
			m.apply(n.ev)
		case canOffer:
			a := slices.Index(m.free, true)
			m.free[a] = false
			m.queued = false
			m.apply(Event{Kind: EvAgentOffer, Agent: agentID(a)})
			if m.c.State != StateTransferring {
				m.free[a] = true
			}
		case len(m.timers) > 0:
			kinds := make([]TimerKind, 0, len(m.timers))
			for k := range m.timers {
				kinds = append(kinds, k)
			}
			slices.Sort(kinds)
			k := kinds[0]
			tok := m.timers[k]
			delete(m.timers, k)
			m.apply(Event{Kind: EvTimeout, Timer: k, TimerToken: tok})
		default:
			return
		}
	}
	m.t.Fatalf("history did not settle in 500 steps: state %s", m.c.State)
}

func newModel(t *testing.T, seed uint64, chaos bool) *model {
	rng := rand.New(rand.NewPCG(seed, 99))
	env := testEnv(t)
	env.TransferTimeout = time.Minute
	m := &model{t: t, rng: rng, chaos: chaos, env: env, timers: map[TimerKind]int64{}}
	// the caller's script comes from the seed alone, so both runs face the same caller
	script := rand.New(rand.NewPCG(seed, 1))
	keys := []string{"1", "1", "7", "9", "3", "5"}
	for n := script.IntN(4); n > 0; n-- {
		m.tones = append(m.tones, keys[script.IntN(len(keys))])
	}
	m.hangup = script.IntN(5) == 0
	for n := 1 + script.IntN(3); n > 0; n-- {
		m.agents = append(m.agents, script.IntN(2) == 0)
		m.free = append(m.free, true)
	}
	// the queue's first agent and the flow's direct-transfer target (agentIndex) are agent-0
	return m
}

func outcome(m *model) string {
	return fmt.Sprintf("%s/%s", m.c.State, m.c.Outcome)
}

// Over thousands of generated call histories, duplicated and reordered notifications lead to
// the same outcome as in-order delivery, terminated stays terminated, and callbot never sends a
// transfer while another is in progress.
func TestDuplicatedAndReorderedNotifications(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 300
	}
	directDone := 0 // histories that end transferred by the menu's direct transfer
	for seed := uint64(1); seed <= uint64(n); seed++ {
		inOrder := newModel(t, seed, false)
		inOrder.run()
		chaos := newModel(t, seed, true)
		chaos.run()
		if inOrder.c.Outcome == OutcomeTransferred && inOrder.c.Target != "" {
			directDone++
		}
		if got, want := outcome(chaos), outcome(inOrder); got != want {
			t.Fatalf("seed %d: outcome %s with duplicates and reordering, %s in order (tones %v, hangup %v, agents %v)",
				seed, got, want, newModel(t, seed, false).tones, inOrder.hangup, newModel(t, seed, false).agents)
		}
		for _, m := range []*model{inOrder, chaos} {
			if len(m.violations) > 0 {
				t.Fatalf("seed %d (chaos %v): %v", seed, m.chaos, m.violations)
			}
			if !m.c.State.Terminal() {
				t.Fatalf("seed %d (chaos %v): call left in %s", seed, m.chaos, m.c.State)
			}
			checkStale(t, seed, m)
		}
	}
	// The generator must produce the histories that matter: a direct transfer's acceptance and
	// end reordered, not only the queue's.
	t.Logf("%d of %d histories ended by a direct transfer", directDone, n)
	if directDone < n/50 {
		t.Errorf("%d of %d histories ended by a direct transfer: the generator hardly makes any", directDone, n)
	}
}

// checkStale: an event Stale calls ignorable on a version of the call is ignored by every later
// version too. This is what lets the machine ignore an event on a cached record that may be
// behind the stored one. Every delivered event is tried on every version.
func checkStale(t *testing.T, seed uint64, m *model) {
	t.Helper()
	for i, v := range m.versions {
		for _, ev := range m.events {
			if ev.Kind == EvIncoming || !Stale(v, ev) {
				continue
			}
			for _, later := range m.versions[i:] {
				if _, _, err := Decide(later, ev, m.env); err != ErrIgnored {
					t.Fatalf("seed %d (chaos %v): %s is stale on version %d (%s, seq %d) but %s (seq %d) takes it: %v",
						seed, m.chaos, ev.Kind, i, v.State, v.Seq, later.State, later.Seq, err)
				}
			}
		}
	}
}

// Stale must also say false where a later version can still take the event, or the cache would
// drop events it has to act on: the current prompt, invite, timer, the next key press.
func TestStaleKeepsLiveEvents(t *testing.T) {
	c := Call{State: StateInMenu, Seq: 7, PromptCtx: "p7", InviteCtx: "i6", LastTone: 2, LastRoster: 3,
		Timers: map[TimerKind]int64{TimerMenu: 5}}
	for _, tc := range []struct {
		ev    Event
		stale bool
	}{
		{Event{Kind: EvPromptDone, ClientContext: "p7"}, false}, // the prompt playing now
		{Event{Kind: EvPromptDone, ClientContext: "p8"}, false}, // a prompt a later version plays
		{Event{Kind: EvPromptDone, ClientContext: "p4"}, true},  // superseded
		{Event{Kind: EvPromptDone, ClientContext: "c6"}, true},  // a cancel's completion
		{Event{Kind: EvPromptDone, ClientContext: ""}, true},
		{Event{Kind: EvPromptDone, ClientContext: "foreign"}, true},
		{Event{Kind: EvInviteDone, ClientContext: "i6"}, false},
		{Event{Kind: EvInviteDone, ClientContext: "i3"}, true},
		{Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: 5}, false},
		{Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: 4}, true},
		{Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: 9}, false}, // armed by a later version
		{Event{Kind: EvTone, Seq: 3}, false},
		{Event{Kind: EvTone, Seq: 2}, true},
		{Event{Kind: EvRoster, Seq: 4}, false},
		{Event{Kind: EvRoster, Seq: 3}, true},
		{Event{Kind: EvEstablished}, false},
		{Event{Kind: EvEnded}, false},
	} {
		if got := Stale(c, tc.ev); got != tc.stale {
			t.Errorf("Stale(%s %q timer %d seq %d) = %v, want %v", tc.ev.Kind, tc.ev.ClientContext, tc.ev.TimerToken, tc.ev.Seq, got, tc.stale)
		}
	}
	c.State = StateTerminated
	if !Stale(c, Event{Kind: EvEstablished}) {
		t.Error("an ended call must take no event")
	}
}

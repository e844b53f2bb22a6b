package callstate

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// A model of Graph, a caller and the agents, driven by the commands Decide returns. It produces
// the notifications Graph would send; the network delivers them in order, or (chaos) in any
// order among those already sent and with duplicates. Time passes only when no notification is
// in flight, as a timer's seconds are long next to a notification's milliseconds: then the
// earliest of callbot's timers and the world's own events (an invited agent answering or
// declining, leaving the conversation, the caller hanging up) happens. The world's events come
// from the seed alone, at times that are no timer's, so both runs face the same world.

type armed struct {
	tok int64
	at  time.Duration
}

// inviteScript is how the world answers callbot's invites, drawn from the seed.
type inviteScript struct {
	failMode    int           // an agent who does not take the invite: 0 declines, 1 does not answer, 2 its completion is lost
	rosterFirst bool          // an agent who joins: the roster before the invite's completion
	loseDone    bool          // the completion of an invite the agent took is lost
	loseJoin    bool          // the roster showing the agent join is lost
	loseLeave   bool          // the roster showing the agent leave is lost
	talk        time.Duration // how long the agent and the caller talk
	callerEnds  bool          // the caller, not the agent, ends the conversation
	hangAfter   time.Duration // the caller hangs up this long after the first invite (0: never)
	groupRoster bool          // the first invite makes the call a group call: a roster of the caller alone
	readFails   bool          // callbot's first roster read gets no answer (Graph fails it)
	notSent     bool          // Graph never processes the first invite (429 after the client's retries)
}

type note struct {
	ev  Event
	id  int
	own bool // the answer to a request of callbot's own (a roster read, an invite Graph never processed), not a notification
}

type model struct {
	t      *testing.T
	rng    *rand.Rand
	chaos  bool
	seed   uint64
	env    Env
	c      Call
	graph  graph.CallState // where Graph has the call
	sub    bool            // tones subscribed
	tones  []string        // keys the caller will press, one per menu prompt heard
	hangup bool            // the caller hangs up once queued
	agents []bool          // per agent: accepts (true) or declines
	free   []bool
	queued bool
	timers map[TimerKind]armed
	now    time.Duration // time since the call came in
	flight []note
	late   []note // chaos: notifications held up (or repeated) until after time next passes
	nextID int
	seq    int64
	// conference hand-off (a queue with handoff: invite)
	inv       inviteScript
	ringing   int    // the invited agent whose phone rings, or -1
	ringCtx   string // the ringing invite's clientContext
	ringAt    time.Duration
	inCall    int // the agent in the conference with the caller, or -1
	unrung    int // the agent whose current invite Graph never processed, or -1
	leaveAt   time.Duration
	hangSet   bool // the caller hangs up at hangAt
	hangAt    time.Duration
	rosterSeq int64 // rosterSequenceNumber of Graph's last roster update
	reads     int   // roster reads callbot made
	// what happened
	invites           int      // invites sent
	releases          []string // the agents released, and how (but abandoned)
	joins             int      // times an invited agent joined
	transfersInFlight int
	violations        []string
	steps             int
	versions          []Call  // every record the call had, in order
	events            []Event // every event delivered
	// deadTarget: the flow's direct transfer (key 3) never succeeds, and the start menu's
	// fallback is that transfer (a caller who stops pressing keys goes to it again and again)
	deadTarget bool
	// subFails: the first tone subscriptions fail (after the Graph client's retries), as many
	subFails int
	keysLate bool // a key was applied after a subscription had failed
	// hangFails: the first hangups fail (throttled after the Graph client's retries), as many
	hangFails int
	// hangFailAt: when a hangup first failed (hangFailed)
	hangFailed bool
	hangFailAt time.Duration
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
	if ev.Kind == EvTone && m.c.ToneFails > 0 {
		m.keysLate = true
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
		if m.subFails > 0 && !gone {
			m.subFails--
			m.apply(Event{Kind: EvToneFailed, ClientContext: cmd.ClientContext}) // as Machine.send
			return
		}
		m.sub = true
	case CmdPlayPrompt:
		if gone {
			return
		}
		if m.c.State != StateQueued && m.c.State != StateInviting { // hold music plays longer than anything else takes
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
		dead := m.deadTarget && cmd.Target.ID == directTarget
		if a >= 0 && m.agents[a] && !dead {
			m.graph = graph.CallTerminated
			m.send(Event{Kind: EvTransferAccepted})
			m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 0, Subcode: 7015}})
		} else {
			m.graph = graph.CallEstablished
			m.transfersInFlight--
			if a >= 0 && !dead {
				m.agents[a] = true // declines once, then takes the next offer
			}
			m.send(Event{Kind: EvTransferFailed, Result: graph.ResultInfo{Code: 500, Subcode: 7000}})
		}
	case CmdHangup:
		if m.inCall >= 0 {
			m.violations = append(m.violations, "callbot hung up on the caller and the agent talking")
		}
		if m.hangFails > 0 && !gone {
			// as Machine.send: the failure comes back on the request's own path, after the save
			m.hangFails--
			if !m.hangFailed {
				m.hangFailed, m.hangFailAt = true, m.now
			}
			m.nextID++
			m.flight = append(m.flight, note{ev: Event{Kind: EvHangupFailed, ClientContext: cmd.ClientContext}, id: m.nextID, own: true})
			return
		}
		if !gone {
			m.graph = graph.CallTerminated
			m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 7000}})
			m.ringing, m.inCall = -1, -1
		}
	case CmdInvite:
		m.invite(cmd)
	case CmdCheckRoster: // as Machine.checkRoster: the roster when read, answered on its own path
		if gone {
			m.send(Event{Kind: EvEnded, Reason: "gone from graph"})
			return
		}
		m.reads++
		if m.reads == 1 && m.inv.readFails && !(m.c.State == StateInviting && m.inCall >= 0) {
			// Graph fails the read: the invite's recheck gives up on the agent, or the next
			// roster check reads again. (Not while the agent is in the call and callbot has
			// seen neither the invite's completion nor a roster: giving up then is by design.)
			return
		}
		ps := []string{"caller"}
		if m.inCall >= 0 {
			ps = append(ps, agentID(m.inCall))
		}
		m.nextID++
		m.flight = append(m.flight, note{ev: Event{Kind: EvRoster, Participants: ps, Seq: m.rosterSeq, ClientContext: cmd.ClientContext}, id: m.nextID, own: true})
	case CmdEnqueue:
		if m.inCall >= 0 {
			m.violations = append(m.violations, "caller sent back to the queue while the agent is in the call")
		}
		m.queued = true
		if m.hangup {
			m.graph = graph.CallTerminated
			m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}})
		}
	case CmdLeaveQueue:
		m.queued = false
	case CmdReleaseAgent:
		if a := m.agentIndex(cmd.Agent); a >= 0 {
			if a == m.inCall && cmd.AgentOutcome == AgentFailed {
				m.violations = append(m.violations, "agent released as failed while in the call")
			}
			m.free[a] = true
		}
		notSent := cmd.AgentOutcome == AgentAbandoned && cmd.After == notSentHold
		switch a := m.agentIndex(cmd.Agent); {
		case a >= 0 && a == m.unrung && cmd.AgentOutcome == AgentFailed:
			m.violations = append(m.violations, "agent released as declining an invite Graph never processed")
		case notSent && a != m.unrung:
			m.violations = append(m.violations, "agent released as never rung after an invite that reached them")
		}
		m.unrung = -1
		// an offer racing the caller's hang-up (abandoned): either order is right; a request
		// Graph never processed is released as abandoned too, but held back
		if cmd.AgentOutcome != AgentAbandoned || notSent {
			m.releases = append(m.releases, fmt.Sprintf("%s %v %v", cmd.Agent, cmd.AgentOutcome, cmd.After))
		}
	case CmdSetTimer:
		m.timers[cmd.Timer] = armed{tok: cmd.Token, at: m.now + cmd.After}
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

// invite: Graph rings the agent; the world answers at ringAt (ringDone).
func (m *model) invite(cmd Command) {
	if m.graph == graph.CallTerminated {
		m.send(Event{Kind: EvInviteDone, ClientContext: cmd.ClientContext, Failed: true}) // Graph refuses it
		return
	}
	if m.ringing >= 0 || m.inCall >= 0 {
		m.violations = append(m.violations, "invite sent while an agent rings or is in the call")
	}
	a := m.agentIndex(cmd.Target.ID)
	if a < 0 {
		m.t.Fatalf("invite of unknown agent %q", cmd.Target.ID)
	}
	if m.inv.notSent {
		// Graph never processes it (throttled after the client's retries): the agent does not
		// ring, and callbot hears of it on the request's own path (Machine.send), not by a
		// notification
		m.inv.notSent, m.unrung = false, a
		m.nextID++
		m.flight = append(m.flight, note{ev: Event{Kind: EvInviteDone, ClientContext: cmd.ClientContext, Failed: true, NotSent: true}, id: m.nextID, own: true})
		return
	}
	m.unrung = -1
	m.invites++
	if !m.hangSet && m.inv.hangAfter > 0 {
		m.hangSet, m.hangAt = true, m.now+m.inv.hangAfter
	}
	m.ringing, m.ringCtx = a, cmd.ClientContext
	if m.invites == 1 && m.inv.groupRoster {
		m.rosterSeq++
		m.send(Event{Kind: EvRoster, Participants: []string{"caller"}, Seq: m.rosterSeq})
	}
	switch {
	case m.agents[a]:
		m.ringAt = m.now + 8500*time.Millisecond
	case m.inv.failMode == 0:
		m.ringAt = m.now + 3500*time.Millisecond
	default:
		m.ringAt = m.now + 30500*time.Millisecond
	}
}

// ringDone: the invited agent joins, or the invite fails.
func (m *model) ringDone() {
	a, ctx := m.ringing, m.ringCtx
	m.ringing = -1
	if !m.agents[a] {
		m.agents[a] = true // declines once, then takes the next offer
		if m.inv.failMode < 2 {
			m.send(Event{Kind: EvInviteDone, ClientContext: ctx, Failed: true})
		}
		return
	}
	m.inCall, m.leaveAt = a, m.now+m.inv.talk
	m.joins++
	if m.joins > 1 { // notifications are lost rarely: not again when the agent joins again
		m.inv.loseDone, m.inv.loseJoin, m.inv.loseLeave = false, false, false
	}
	m.rosterSeq++
	join := Event{Kind: EvRoster, Participants: []string{"caller", agentID(a)}, Seq: m.rosterSeq}
	done := Event{Kind: EvInviteDone, ClientContext: ctx}
	if m.inv.rosterFirst && !m.inv.loseJoin {
		m.send(join)
	}
	if !m.inv.loseDone {
		m.send(done)
	}
	if !m.inv.rosterFirst && !m.inv.loseJoin {
		m.send(join)
	}
}

// conversationEnds: the agent leaves, or the caller hangs up.
func (m *model) conversationEnds() {
	if m.inv.callerEnds {
		m.callerHangsUp()
		return
	}
	m.inCall = -1
	m.rosterSeq++
	if !m.inv.loseLeave {
		m.send(Event{Kind: EvRoster, Participants: []string{"caller"}, Seq: m.rosterSeq})
	}
}

func (m *model) callerHangsUp() {
	m.hangSet = false
	m.graph = graph.CallTerminated
	m.send(Event{Kind: EvEnded, Result: graph.ResultInfo{Code: 200, Subcode: 540000}})
	if m.ringing >= 0 {
		m.send(Event{Kind: EvInviteDone, ClientContext: m.ringCtx, Failed: true})
	}
	m.ringing, m.inCall = -1, -1
}

// nextWorld is the world's next event, its time, and whether it ends a conversation (the agent
// leaves, the caller hangs up).
func (m *model) nextWorld() (time.Duration, func(), bool, bool) {
	var at time.Duration
	var do func()
	var ends bool
	pick := func(t time.Duration, f func(), e bool) {
		if do == nil || t < at {
			at, do, ends = t, f, e
		}
	}
	if m.graph != graph.CallTerminated {
		if m.ringing >= 0 {
			pick(m.ringAt, m.ringDone, false)
		}
		if m.inCall >= 0 {
			pick(m.leaveAt, m.conversationEnds, true)
		}
		if m.hangSet {
			pick(m.hangAt, m.callerHangsUp, true)
		}
	}
	return at, do, ends, do != nil
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
			// chaos: one notification in eight is repeated, or held up, past the next timer or
			// world event (Graph redelivers one whose first delivery failed, seconds later). Held
			// up only the conference hand-off's: a key press held up past the menu's timeout, or
			// a caller's hang-up past an agent's offer, is another history, not another order.
			// Nor while the caller is set to hang up at a given time: a failure held up delays
			// the next invite, and the agent joins after the caller left rather than before.
			// The answer to a request of callbot's own is neither: callbot gives up on a roster
			// read after a while, by design, and a request Graph never processed fails within
			// the command's timeout, long before its timer.
			if m.chaos && !n.own && m.rng.IntN(8) == 0 {
				m.late = append(m.late, n)
				if (n.ev.Kind == EvInviteDone || n.ev.Kind == EvRoster) && !m.hangSet {
					if m.rng.IntN(2) == 0 {
						continue // held up
					}
				}
			}
			m.apply(n.ev)
		case canOffer:
			a := slices.Index(m.free, true)
			m.free[a] = false
			m.queued = false
			m.apply(Event{Kind: EvAgentOffer, Agent: agentID(a)})
			if m.c.State != StateTransferring && m.c.State != StateInviting {
				m.free[a] = true
			}
		default:
			// time passes: the earliest timer or world event happens
			kinds := make([]TimerKind, 0, len(m.timers))
			for k := range m.timers {
				kinds = append(kinds, k)
			}
			slices.SortFunc(kinds, func(a, b TimerKind) int {
				if c := cmp.Compare(m.timers[a].at, m.timers[b].at); c != 0 {
					return c
				}
				return cmp.Compare(a, b)
			})
			at, do, ends, world := m.nextWorld()
			first := world && (len(kinds) == 0 || at < m.timers[kinds[0]].at)
			if first && ends && len(m.late) > 0 {
				// Held-up notifications are overtaken by callbot's timers and the agent's
				// answer, not by the end of a conversation: one that comes after the call ended
				// (the invite's success), or after the agent left while the invite's completion
				// was lost, carries what callbot could not have known in time, and the outcome
				// differs by no fault of callbot's.
				m.flight, m.late = m.late, nil
				continue
			}
			m.flight, m.late = append(m.flight, m.late...), nil // they arrive after this
			switch {
			case first:
				m.now = max(m.now, at)
				m.env.Now = t0.Add(m.now)
				do()
			case len(kinds) > 0:
				k := kinds[0]
				tm := m.timers[k]
				delete(m.timers, k)
				m.now = max(m.now, tm.at)
				m.env.Now = t0.Add(m.now)
				m.apply(Event{Kind: EvTimeout, Timer: k, TimerToken: tm.tok})
			case len(m.flight) == 0:
				return
			}
		}
	}
	m.t.Fatalf("seed %d (chaos %v): history did not settle in 500 steps: state %s%s", m.seed, m.chaos, m.c.State, history(m))
}

func newModel(t *testing.T, seed uint64, chaos bool) *model {
	rng := rand.New(rand.NewPCG(seed, 99))
	env := testEnv(t)
	env.TransferTimeout = time.Minute
	m := &model{t: t, rng: rng, chaos: chaos, seed: seed, env: env, timers: map[TimerKind]armed{}, ringing: -1, inCall: -1, unrung: -1}
	// the caller's script comes from the seed alone, so both runs face the same caller
	script := rand.New(rand.NewPCG(seed, 1))
	keys := []string{"1", "1", "7", "9", "3", "5", "4", "4", "4"} // 4: the queue with the conference hand-off
	for n := script.IntN(4); n > 0; n-- {
		m.tones = append(m.tones, keys[script.IntN(len(keys))])
	}
	m.hangup = script.IntN(5) == 0
	for n := 1 + script.IntN(3); n > 0; n-- {
		m.agents = append(m.agents, script.IntN(2) == 0)
		m.free = append(m.free, true)
	}
	// the queue's first agent and the flow's direct-transfer target (agentIndex) are agent-0
	m.inv = inviteScript{
		failMode:    script.IntN(3),
		rosterFirst: script.IntN(2) == 0,
		loseDone:    script.IntN(5) == 0,
		loseJoin:    script.IntN(5) == 0,
		loseLeave:   script.IntN(4) == 0,
		talk:        time.Duration(5+script.IntN(200))*time.Second + 250*time.Millisecond,
		callerEnds:  script.IntN(4) == 0,
	}
	if script.IntN(4) == 0 { // at any time, half the time while the first agent's phone rings
		m.inv.hangAfter = time.Duration(script.IntN(240)>>(script.IntN(2)*3))*time.Second + 750*time.Millisecond
	}
	m.inv.groupRoster = script.IntN(2) == 0
	m.inv.readFails = script.IntN(4) == 0
	m.inv.notSent = script.IntN(4) == 0
	if script.IntN(5) == 0 {
		m.deadTarget = true
		m.env.Flow = fallbackTransfer(m.env.Flow)
	}
	if script.IntN(4) == 0 {
		m.subFails = 1 + script.IntN(2)
	}
	if script.IntN(4) == 0 {
		m.hangFails = 1 + script.IntN(3)
	}
	return m
}

func outcome(m *model) string {
	return fmt.Sprintf("%s/%s/agent connected %v", m.c.State, m.c.Outcome, !m.c.ConnectedAt.IsZero())
}

// Over thousands of generated call histories, duplicated and reordered notifications lead to
// the same outcome as in-order delivery (the call's state and outcome, whether an invited agent
// was connected, and how the agents were released), terminated stays terminated, and callbot
// never sends a transfer while another is in progress, nor an invite while one rings, nor sends
// the caller back to the queue, hangs up, or marks the agent failed while the agent talks to
// the caller; an agent whose invite Graph never processed is released as never rung, and one
// whose invite reached them is not.
func TestDuplicatedAndReorderedNotifications(t *testing.T) {
	n := 3000
	if testing.Short() {
		n = 300
	}
	directDone := 0 // histories that end transferred by the menu's direct transfer
	// conference hand-off histories: with an invite, ended with the agent connected, with an
	// invite that sent the caller back to the queue
	invited, connected, requeued := 0, 0, 0
	unrung := 0      // histories with an invite Graph never processed, its agent released as never rung
	deadEnded := 0   // histories ended by callbot after the dead direct transfer failed unattended
	keysLate := 0    // histories with a key applied after the tone subscription had failed
	hangRetried := 0 // histories whose hangup failed, and was sent again
	for seed := uint64(1); seed <= uint64(n); seed++ {
		inOrder := newModel(t, seed, false)
		inOrder.run()
		chaos := newModel(t, seed, true)
		chaos.run()
		if inOrder.c.Outcome == OutcomeTransferred && inOrder.c.Target != "" {
			directDone++
		}
		if inOrder.invites > 0 {
			invited++
			if !inOrder.c.ConnectedAt.IsZero() {
				connected++
			}
			if inviteRequeued(inOrder) {
				requeued++
			}
		}
		if slices.ContainsFunc(inOrder.releases, func(r string) bool { return strings.HasSuffix(r, " abandoned "+notSentHold.String()) }) {
			unrung++
		}
		got, want := outcome(chaos), outcome(inOrder)
		if got == want && !slices.Equal(chaos.releases, inOrder.releases) {
			got, want = fmt.Sprintf("%s, agents released %v", got, chaos.releases), fmt.Sprintf("%s, agents released %v", want, inOrder.releases)
		}
		if got != want {
			t.Fatalf("seed %d: outcome %s with duplicates and reordering, %s in order (tones %v, hangup %v, agents %v, invites %+v)\nin order: %s\nchaos: %s",
				seed, got, want, newModel(t, seed, false).tones, inOrder.hangup, newModel(t, seed, false).agents, inOrder.inv,
				history(inOrder), history(chaos))
		}
		if inOrder.c.Outcome == OutcomeTransferFailed {
			deadEnded++
		}
		if inOrder.keysLate {
			keysLate++
		}
		if inOrder.hangFailed {
			hangRetried++
		}
		for _, m := range []*model{inOrder, chaos} {
			if n := unattendedFailures(m); m.c.Outcome == OutcomeTransferFailed && n != maxUnattendedTransfers {
				t.Fatalf("seed %d (chaos %v): ended %s after %d direct transfers failed with no key pressed since, want %d%s",
					seed, m.chaos, m.c.Outcome, n, maxUnattendedTransfers, history(m))
			}
			if len(m.violations) > 0 {
				t.Fatalf("seed %d (chaos %v): %v", seed, m.chaos, m.violations)
			}
			if !m.c.State.Terminal() {
				t.Fatalf("seed %d (chaos %v): call left in %s", seed, m.chaos, m.c.State)
			}
			if m.hangFailed && m.c.EndedAt.Sub(t0.Add(m.hangFailAt)) >= m.env.HangupGrace {
				// three failures at most: sent again after 1, 2 and 4 s
				t.Fatalf("seed %d (chaos %v): the call ended %v after its hangup failed, want well within the hang-up grace (%v)%s",
					seed, m.chaos, m.c.EndedAt.Sub(t0.Add(m.hangFailAt)), m.env.HangupGrace, history(m))
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
	// and callers who stop pressing keys at a menu whose fallback is a transfer that always fails
	t.Logf("%d of %d histories ended by callbot after the direct transfer failed unattended", deadEnded, n)
	if deadEnded < n/50 {
		t.Errorf("%d of %d histories ended after unattended failed transfers: the generator hardly makes any", deadEnded, n)
	}
	// and callers whose keys work only once a failed tone subscription was made again
	t.Logf("%d of %d histories applied a key after the tone subscription had failed", keysLate, n)
	if keysLate < n/50 {
		t.Errorf("%d of %d histories applied a key after a failed tone subscription: the generator hardly makes any", keysLate, n)
	}
	// and hangups Graph throttled
	t.Logf("%d of %d histories had a hangup fail", hangRetried, n)
	if hangRetried < n/50 {
		t.Errorf("%d of %d histories had a hangup fail: the generator hardly makes any", hangRetried, n)
	}
	// and the conference hand-off's: invites completed and failed, rosters of the agent joining
	// and leaving, roster reads, reordered
	t.Logf("%d of %d histories invited an agent: %d ended with the agent connected, %d went back to the queue after an invite",
		invited, n, connected, requeued)
	if invited < n/6 || connected < n/10 || requeued < n/20 {
		t.Errorf("%d of %d histories invited an agent, %d connected, %d requeued after an invite: the generator hardly makes any",
			invited, n, connected, requeued)
	}
	// and invites Graph never processed, whose agent is released as never rung
	t.Logf("%d of %d histories released an agent whose invite Graph never processed", unrung, n)
	if unrung < n/50 {
		t.Errorf("%d of %d histories released an agent whose invite Graph never processed: the generator hardly makes any", unrung, n)
	}
}

// unattendedFailures counts the direct transfers that failed since the caller last pressed a
// key, as the records show: a move out of transferring to a direct target back to the menu, or
// to the goodbye; a key press applied (LastTone rising) starts the count again.
func unattendedFailures(m *model) int {
	n := 0
	for i := 1; i < len(m.versions); i++ {
		prev, cur := m.versions[i-1], m.versions[i]
		if cur.LastTone > prev.LastTone {
			n = 0
		}
		if prev.State == StateTransferring && prev.Target != "" && (cur.State == StateInMenu || cur.State == StateTerminating) {
			n++
		}
	}
	return n
}

// inviteRequeued: the call went from inviting back to the queue.
func inviteRequeued(m *model) bool {
	for i := 1; i < len(m.versions); i++ {
		if m.versions[i-1].State == StateInviting && m.versions[i].State == StateQueued {
			return true
		}
	}
	return false
}

// history is the events a model delivered, for a failure's message.
func history(m *model) string {
	var b strings.Builder
	for _, ev := range m.events {
		fmt.Fprintf(&b, "\n  %s", ev.Kind)
		switch ev.Kind {
		case EvRoster:
			fmt.Fprintf(&b, " %v seq %d %s", ev.Participants, ev.Seq, ev.ClientContext)
		case EvInviteDone, EvPromptDone:
			fmt.Fprintf(&b, " %s failed %v not sent %v", ev.ClientContext, ev.Failed, ev.NotSent)
		case EvToneFailed, EvHangupFailed:
			fmt.Fprintf(&b, " %s", ev.ClientContext)
		case EvTimeout:
			fmt.Fprintf(&b, " %s %d", ev.Timer, ev.TimerToken)
		case EvTone:
			fmt.Fprintf(&b, " %s", ev.Digit)
		case EvAgentOffer:
			fmt.Fprintf(&b, " %s", ev.Agent)
		case EvEnded:
			fmt.Fprintf(&b, " %d %s", ev.Result.Subcode, ev.Reason)
		}
	}
	return b.String()
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
	c := Call{State: StateInMenu, Seq: 7, PromptCtx: "p7", InviteCtx: "i6", ToneCtx: "t5", LastTone: 2, RosterCtx: "r6",
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
		{Event{Kind: EvToneFailed, ClientContext: "t5"}, false}, // the subscription waited on
		{Event{Kind: EvToneFailed, ClientContext: "t8"}, false}, // one a later version sends
		{Event{Kind: EvToneFailed, ClientContext: "t2"}, true},  // an earlier one's
		{Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: 5}, false},
		{Event{Kind: EvTimeout, Timer: TimerMenu, TimerToken: 4}, true},
		{Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: 9}, false}, // armed by a later version
		{Event{Kind: EvTone, Seq: 3}, false},
		{Event{Kind: EvTone, Seq: 2}, true},
		{Event{Kind: EvRoster}, false},                      // notified: rosters carry no order
		{Event{Kind: EvRoster, ClientContext: "r6"}, false}, // the read waited on
		{Event{Kind: EvRoster, ClientContext: "r9"}, false}, // a read a later version makes
		{Event{Kind: EvRoster, ClientContext: "r3"}, true},  // an earlier read
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

package callstate

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

// Errors of the machine.
var (
	// ErrIgnored: the event has no effect in the call's state (duplicate, late, stale).
	ErrIgnored = errors.New("event ignored")
	// ErrInvalidTransition: the decision broke the transition table; a bug, never input.
	// Decide returns it as a *TransitionError.
	ErrInvalidTransition = errors.New("invalid transition")
)

// TransitionError is the ErrInvalidTransition of one decision: the move the table has no row for.
type TransitionError struct {
	From State
	On   EventKind
	To   State
}

func (e *TransitionError) Error() string {
	return fmt.Sprintf("%v: %s --%s--> %s", ErrInvalidTransition, e.From, e.On, e.To)
}

// Unwrap makes errors.Is(err, ErrInvalidTransition) true.
func (e *TransitionError) Unwrap() error { return ErrInvalidTransition }

// Env is what a decision depends on besides the call and the event.
type Env struct {
	Flow            *ivr.Flow
	Now             time.Time
	CallbackURI     string        // where Graph sends this call's notifications
	TransferTimeout time.Duration // no transfer outcome in this time: treated as failed
	HangupGrace     time.Duration // a goodbye prompt longer than this is cut
	// FlowSince is when Flow took effect in this instance (its start). A caller queued before
	// it, or within goneQueueWindow after it, in a queue Flow does not have was queued under a
	// flow this one replaced: that queue is gone. One queued later was queued by an instance
	// whose flow is newer than this one's (a rolling update adding the queue).
	FlowSince time.Time
}

// Decide is the pure heart of callbot: given a call, an event and the environment, it returns
// the call's next record and the commands that carry the change out. It returns ErrIgnored for
// an event the call's state has no row for, or that is a duplicate or stale.
func Decide(c Call, ev Event, env Env) (Call, []Command, error) {
	if !handles(c.State, ev.Kind) {
		return c, nil, ErrIgnored
	}
	d := decision{c: c, env: env, from: c.State}
	if err := d.apply(ev); err != nil {
		return c, nil, err
	}
	if !legal(d.from, ev.Kind, d.c.State) {
		return c, nil, &TransitionError{From: d.from, On: ev.Kind, To: d.c.State}
	}
	return d.c, d.cmds, nil
}

// Stale reports whether ev is ignored on c and on every later version of c, so a copy of c that
// may be behind the stored record is enough to ignore it: the call has ended (terminal stays
// terminal), or ev answers a prompt, invite, tone subscription, timer, key press or roster that
// c has already moved past. Tokens and sequence numbers only grow (clientContexts and timer
// tokens are drawn from Call.Seq; LastTone only rises), so such an event cannot
// match a later version.
// The machine uses it to ignore an event on its cached record without reading Redis.
func Stale(c Call, ev Event) bool {
	if c.State.Terminal() {
		return true
	}
	switch ev.Kind {
	case EvPromptDone:
		return pastToken(c, ev.ClientContext, c.PromptCtx)
	case EvInviteDone:
		return pastToken(c, ev.ClientContext, c.InviteCtx)
	case EvToneFailed:
		return pastToken(c, ev.ClientContext, c.ToneCtx)
	case EvHangupFailed:
		return pastToken(c, ev.ClientContext, c.HangupCtx)
	case EvTransferFailed:
		return ev.Verified && ev.ClientContext != "" && pastToken(c, ev.ClientContext, c.TransferCtx)
	case EvTimeout:
		return ev.TimerToken == 0 || (ev.TimerToken <= c.Seq && ev.TimerToken != c.Timers[ev.Timer])
	case EvTone:
		return ev.Seq != 0 && ev.Seq <= c.LastTone
	case EvRoster:
		// a roster read applies only while the call waits for it; a notified roster is never
		// stale by itself (rosterSequenceNumber does not order rosters: see apply)
		return ev.ClientContext != "" && pastToken(c, ev.ClientContext, c.RosterCtx)
	}
	return false
}

// pastToken: clientContext is not the one c waits for and can never be: it is empty, not one
// callbot makes (a letter and a number drawn from Call.Seq), or drawn at or before c.Seq.
func pastToken(c Call, clientContext, current string) bool {
	if clientContext == current && current != "" {
		return false
	}
	if len(clientContext) < 2 {
		return true
	}
	n, err := strconv.ParseInt(clientContext[1:], 10, 64)
	return err != nil || n <= c.Seq
}

type decision struct {
	c    Call
	env  Env
	from State
	cmds []Command
}

func (d *decision) emit(c Command) { d.cmds = append(d.cmds, c) }

func (d *decision) next() int64 { d.c.Seq++; return d.c.Seq }

// play sends prompts and remembers the clientContext whose completion callbot waits for.
func (d *decision) play(prompts []graph.MediaPrompt) {
	if len(prompts) == 0 {
		d.c.PromptCtx = ""
		return
	}
	d.c.PromptCtx = "p" + strconv.FormatInt(d.next(), 10)
	d.emit(Command{Kind: CmdPlayPrompt, Prompts: prompts, ClientContext: d.c.PromptCtx})
}

// silence cancels a prompt that may still be playing (barge-in, leaving a menu).
func (d *decision) silence() {
	if d.c.PromptCtx != "" {
		d.emit(Command{Kind: CmdCancelMedia, ClientContext: "c" + strconv.FormatInt(d.next(), 10)})
		d.c.PromptCtx = ""
	}
}

func (d *decision) timer(kind TimerKind, after time.Duration) {
	tok := d.next()
	d.c.Timers = maps.Clone(d.c.Timers) // the record may share the map with the caller's copy
	if d.c.Timers == nil {
		d.c.Timers = map[TimerKind]int64{}
	}
	d.c.Timers[kind] = tok
	d.emit(Command{Kind: CmdSetTimer, Timer: kind, Token: tok, After: after})
}

func (d *decision) prompts(ids ...string) []graph.MediaPrompt {
	var out []graph.MediaPrompt
	for _, id := range ids {
		if p, ok := d.env.Flow.Prompt(id); ok && id != "" {
			out = append(out, p)
		}
	}
	return out
}

func (d *decision) apply(ev Event) error {
	c := &d.c
	switch ev.Kind {
	case EvIncoming:
		in := ev.Incoming
		*c = Call{ID: in.GraphID, Tenant: in.TenantID, State: StateAnswering, Caller: in.Caller,
			Dialled: in.Dialled, ChainID: in.ChainID, Scenario: in.ScenarioID, CreatedAt: d.env.Now}
		d.answer()
		return nil

	case EvEstablished:
		d.established()
		return nil

	case EvAdopt:
		// Graph has the call established, answered by callbot, whose record is gone (lost with
		// Redis data: a failover, a crash within the AOF's second). Where the caller was is lost
		// with it: the menu starts again, rather than leave them in a call nobody serves.
		// Its version, tokens and command numbers start above any the lost record had: another
		// instance's cached copy of that record must neither pass the save's version check nor
		// take this one's prompts and timers for past ones (Stale), and the lost record's late
		// acknowledgements must not retire this one's commands.
		in := ev.Incoming
		base := d.env.Now.UnixMilli()
		*c = Call{ID: in.GraphID, Tenant: in.TenantID, State: StateAnswering, Scenario: in.ScenarioID, CreatedAt: d.env.Now,
			Version: base, Seq: base, CmdSeq: base}
		d.established()
		return nil

	case EvCallState:
		if c.State == StateTransferring && ev.ClientContext != "" && ev.ClientContext != c.TransferCtx {
			// a read made for an earlier attempt (or before the transfer), answered late: Graph
			// may not have had this attempt's request yet when it was read, so "established"
			// then is no failure of it (a slow read, queued on the call's executor ahead of the
			// new transfer, released the new agent as failed while Graph transferred the caller
			// to them)
			return ErrIgnored
		}
		switch {
		case ev.Unreadable && c.State == StateTransferring:
			// Graph did not answer a read that was to settle the transfer (a request that failed
			// ambiguously, a failure notified, no outcome in time; throttled, failing): ask again
			// soon, not at the transfer's timeout, the caller perhaps in silence meanwhile: a
			// second later, then doubling up to a recheck (a read every 5 s after the client's
			// own retries left callers 20 s and more in silence under a throttling Graph, the
			// rolling-deploy soak)
			c.ReadFails++
			d.timer(TimerTransfer, unreadableRecheck(c.ReadFails))
		case ev.Unreadable && c.State == StateAnswering && d.env.Now.Before(c.CreatedAt.Add(graph.AnswerDeadline)):
			// Graph did not answer the read that was to tell whether an answer that failed
			// ambiguously took (throttled, failing): ask again soon, not at the answer's 10 s
			// check, which left one read at most before Graph's 15 s deadline, too late for a
			// second answer when that read was slow or throttled as well (2 of 2,400 callers
			// never answered in the rolling-deploy soak with a throttling Graph)
			if ev.NotSent && c.Answers > 0 {
				// a re-drive gave up an answer it could not check (machine.tookEffect): it may
				// never have left the instance that decided it, and must not count against
				// maxAnswers, or the read to come finds the call incoming and answers no more
				c.Answers--
			}
			if c.Answers < maxAnswers && d.env.Now.Sub(c.CreatedAt) >= unverifiedAnswerAfter {
				// Graph has not said the call is established, this long after it came in (and
				// the answer), and will not say whether it is still incoming before its deadline:
				// answer again without the read. A caller whose answer Graph failed (500), and
				// whose reads Graph throttled for 14 s, was never answered (the rolling-deploy
				// soak, mode graph). A refusal of this answer may mean the first one took: it is
				// no refusal of the call (Command.Unverified).
				d.answerUnverified(true)
				return nil
			}
			d.timer(TimerAnswer, answerRecheck)
		case ev.Unreadable:
			return ErrIgnored
		case c.State == StateAnswering && ev.GraphState == graph.CallEstablished:
			d.established()
		case c.State == StateAnswering && ev.GraphState == graph.CallIncoming && d.env.Now.Before(c.CreatedAt.Add(graph.AnswerDeadline)) &&
			(c.Answers < maxAnswers || ev.NotSent):
			// the answer request failed ambiguously or was lost, and Graph says the call was not
			// answered: answering again cannot answer twice. One Graph did not process (throttled,
			// never sent) does not count: under throttling two answers both refused left the
			// caller ringing until Graph dropped the call, with time left for a third
			if ev.NotSent && c.Answers > 0 {
				c.Answers--
			}
			d.answer()
		case c.State == StateTransferring && ev.GraphState == graph.CallEstablished && (ev.Verified || c.Transferring):
			d.transferFailed(false)
		case c.State == StateTransferring && ev.GraphState == graph.CallTransferring && !c.Transferring:
			c.Transferring = true // as EvTransferring: the notification was lost, or is late
			if c.Timers[TimerTransfer] != 0 {
				d.timer(TimerTransfer, d.env.TransferTimeout) // no more rechecks: the outcome comes, or this asks
			}
		case c.State == StateTransferring && ev.GraphState == graph.CallEstablished:
			// Checking a failure notification, Graph has the call established, but it never said
			// the current attempt was under way: the notification may be a repeat of an earlier
			// attempt's, and this attempt's request may not have reached Graph yet (another
			// instance sends it). Look again soon, and let that look settle it.
			d.timer(TimerTransfer, transferRecheck)
		default:
			return ErrIgnored // Graph agrees with callbot, or has not decided yet
		}
		return nil

	case EvTone:
		if ev.Seq != 0 && ev.Seq <= c.LastTone {
			return ErrIgnored // duplicate or late key press
		}
		c.LastTone = max(c.LastTone, ev.Seq) // a tone without a sequenceId must not lower it
		c.UnattendedFails = 0                // someone is there
		if c.ToneFails > 0 {
			// a subscription that failed ambiguously took effect after all: no more retries
			c.ToneCtx = ""
			c.Timers = maps.Clone(c.Timers)
			delete(c.Timers, TimerTone)
		}
		d.silence()
		d.menuStep(d.env.Flow.Digit(c.Menu, ev.Digit))
		return nil

	case EvPromptDone:
		if ev.ClientContext == "" || ev.ClientContext != c.PromptCtx {
			return ErrIgnored // a cancelled, stale or duplicated operation
		}
		c.PromptCtx = ""
		switch c.State {
		case StateInMenu:
			d.timer(TimerMenu, d.menuTimeout())
		case StateInviting, StateQueued:
			if c.State == StateQueued && d.queueGone() {
				d.leaveGoneQueue()
				return nil
			}
			if ev.Failed {
				// never loop on a prompt Graph refuses: try the hold music again in a while
				d.timer(TimerHold, 5*time.Second)
			} else {
				d.hold(nil)
			}
		case StateTerminating:
			d.hangup()
		}
		return nil

	case EvTimeout:
		if ev.TimerToken == 0 || ev.TimerToken != c.Timers[ev.Timer] {
			return ErrIgnored // superseded or cancelled timer
		}
		c.Timers = maps.Clone(c.Timers)
		delete(c.Timers, ev.Timer)
		if ev.Timer == TimerTone {
			switch c.State {
			case StateTerminating:
				return ErrIgnored // the call is being hung up: no keys to wait for
			case StateTransferring:
				// Graph has the caller in a transfer and would refuse it: once that is over
				// (back at a menu or in the queue), not counted as a failure
				d.timer(TimerTone, toneRetry(max(c.ToneFails, 1)))
				return nil
			}
			d.subscribe()
			return nil
		}
		switch c.State {
		case StateInMenu:
			if ev.Timer != TimerMenu {
				return ErrIgnored
			}
			d.menuStep(d.env.Flow.NoInput(c.Menu))
		case StateQueued:
			if (ev.Timer == TimerHold || ev.Timer == TimerMaxWait) && d.queueGone() {
				d.leaveGoneQueue()
				return nil
			}
			if ev.Timer == TimerHold {
				d.hold(nil)
				return nil
			}
			if ev.Timer != TimerMaxWait {
				return ErrIgnored
			}
			if d.queueUnknown() {
				// a queue of a newer flow than this instance's: its max wait and what follows
				// it are the newer flow's, for an instance that has it
				d.timer(TimerMaxWait, unknownQueueRetry)
				return nil
			}
			q := d.env.Flow.Queues[c.Queue]
			if q != nil && q.MaxWait == 0 {
				// armed under a flow that limited the wait, which an edit has lifted since:
				// the caller waits on (they were hung up: no on-timeout without a max wait)
				return nil
			}
			d.emit(Command{Kind: CmdLeaveQueue, Queue: c.Queue})
			d.silence()
			act := ivr.Action{Kind: ivr.ActionDisconnect}
			if q != nil && q.OnTimeout.Kind != ivr.ActionNone {
				act = q.OnTimeout
			}
			d.act(act, nil)
		case StateAnswering:
			d.emit(Command{Kind: CmdCheckCall})
			d.timer(TimerAnswer, answerCheck)
		case StateInviting:
			switch {
			case ev.Timer == TimerHold:
				d.hold(nil)
			case ev.Timer == TimerTransfer && c.RosterCtx == "":
				// No word from Graph in time: the agent's phone rang out, or the completion and
				// the roster were lost while the agent talks to the caller. Look before giving up
				// (the invite's own completion still counts meanwhile).
				d.checkRoster()
				d.timer(TimerTransfer, transferRecheck)
			case ev.Timer == TimerTransfer:
				// the roster could not be read either: the agent did not join (and was never
				// rung, if Graph never processed the invite)
				d.transferFailed(c.InviteNotSent)
			default:
				return ErrIgnored
			}
		case StateConnected:
			if ev.Timer != TimerRoster {
				return ErrIgnored
			}
			// the roster that shows the agent leaving may be lost: look now and then
			d.checkRoster()
			d.timer(TimerRoster, rosterCheck)
		case StateTransferring:
			if ev.Timer != TimerTransfer {
				return ErrIgnored
			}
			// no outcome in time: ask Graph (a lost notification), and keep watching. Until Graph
			// has said the attempt is under way, that read is what settles it (a request that
			// failed ambiguously, a failure that may be an earlier attempt's): one Graph does not
			// answer (throttled, failing) is asked again a recheck later, not a transfer timeout
			// later, with the caller in silence and the agent reserved meanwhile
			d.emit(Command{Kind: CmdCheckCall, Settles: true})
			if c.Transferring {
				d.timer(TimerTransfer, d.env.TransferTimeout)
			} else {
				d.timer(TimerTransfer, transferRecheck)
			}
		case StateTerminating:
			// the goodbye never finished, or the hangup got no terminated notification (Graph
			// refused it, or the notification was lost): hang up again, and keep watching
			d.c.PromptCtx = ""
			d.hangup()
		}
		return nil

	case EvAgentOffer:
		if ev.OfferQueue != "" && ev.OfferQueue != c.Queue {
			// an entry left in a queue the caller has moved on from (their max wait passed them
			// on; its removal comes after the save, or a save that lost its race wrote it
			// again): that queue's agent is not theirs
			return ErrIgnored
		}
		c.Agent = ev.Agent
		c.Offers++
		target := graph.Party{Kind: graph.KindUser, ID: ev.Agent}
		if q := d.env.Flow.Queues[c.Queue]; q != nil && q.Handoff == ivr.HandoffInvite {
			// conference hand-off: the agent is invited and callbot stays; the caller keeps
			// hearing hold music while the agent's phone rings
			c.State, c.Joined, c.InviteNotSent = StateInviting, false, false
			c.InviteCtx = "i" + strconv.FormatInt(d.next(), 10)
			d.emit(Command{Kind: CmdInvite, Target: target, ClientContext: c.InviteCtx})
			d.timer(TimerTransfer, d.env.TransferTimeout)
			return nil
		}
		c.PromptCtx = "" // hold music stops mattering: the transfer takes the caller's media
		d.transfer(target)
		return nil

	case EvInviteDone:
		if ev.ClientContext == "" || ev.ClientContext != c.InviteCtx {
			return ErrIgnored // an earlier attempt's, or a repeat
		}
		if ev.Failed {
			notSent := ev.NotSent && !c.InviteNotSent
			if notSent {
				// Graph never processed the request (throttled, no token): the agent never rang,
				// and is released as after a transfer Graph never processed, once the roster (or
				// its recheck) confirms they are not in the call. Noted even while the roster is
				// being read already (the invite's timer came first): that read settles it.
				c.InviteNotSent = true
			}
			if c.RosterCtx != "" {
				if notSent {
					return nil
				}
				return ErrIgnored // a repeat, or a second invite's: the roster is being read
			}
			// The agent did not join, or so says a completion that may be a second invite's
			// (a re-drive sent it again) while the agent rings, or talks to the caller, after
			// the first: read the roster, and act on what it shows, also when Graph never
			// processed this invite (another instance's re-drive of it may have). A success
			// completion still counts meanwhile.
			d.checkRoster()
			d.timer(TimerTransfer, transferRecheck)
			return nil
		}
		c.InviteCtx = ""
		d.connected()
		return nil

	case EvRoster:
		// A roster read (ClientContext set) is Graph's whole roster when it was read: it applies
		// while the call still waits for that read (a read decided later, or the agent joining,
		// supersedes it). A notified roster is Graph's at some time, in no known order with the
		// others: a participant's rosterSequenceNumber is the update in which that participant
		// was last updated, so the roster that shows the agent gone lists only numbers older
		// than the one that showed them (https://learn.microsoft.com/en-us/graph/api/resources/participant),
		// as a late roster from before they joined does. One that shows the agent joins them; one
		// that does not, once the call is connected, is checked with a roster read: also before a
		// roster showed them (Joined), when the invite's completion connected the call, since the
		// roster that showed them may be late or lost while the one that shows them gone came
		// (ignored, it left the caller with nobody until the roster check a minute later).
		read := ev.ClientContext != ""
		if read && ev.ClientContext != c.RosterCtx {
			return ErrIgnored // the call moved on since the read was decided
		}
		if read {
			c.RosterCtx = ""
		}
		present := slices.Contains(ev.Participants, strings.ToLower(c.Agent))
		switch {
		case present && c.Joined:
			return ErrIgnored
		case !present && !read && c.State == StateConnected:
			// the agent left, or this roster is older than the one that showed them (or than
			// their joining, which the invite's completion reported): ask Graph (a read already
			// under way may have been made before they left: this one replaces it). Before any
			// roster showed them, not at once: the completion came a moment ago, and a roster
			// read then that does not list them yet would hang up on the new conversation; the
			// roster check is brought forward instead.
			if !c.Joined {
				d.timer(TimerRoster, rosterSettle)
				return nil
			}
			d.checkRoster()
			return nil
		case present:
			if c.State == StateConnected && !c.Joined && c.RosterCtx != "" {
				// The first roster to show the agent supersedes a read made before it (one a
				// roster without them decided, brought forward: Graph may not have listed them
				// yet when it was read, and it hung up on the conversation this roster shows).
				// The roster without them may also be one from after they left, delivered first:
				// the check, brought forward again, reads once they are listed.
				c.RosterCtx = ""
				d.timer(TimerRoster, rosterSettle)
			}
			c.Joined = true
			if c.State == StateInviting {
				// The agent is in the call: connected, whether or not the invite's completion
				// comes (late, or lost), and whatever a failure said (a second invite's). Waiting
				// for it left a caller whose agent had already left in a call with nobody, or
				// sent them back to the queue mid-conversation.
				c.InviteCtx = ""
				d.connected()
			}
		case c.State == StateInviting && read:
			// the invite failed or timed out, and Graph confirms the agent is not in the call
			d.transferFailed(c.InviteNotSent)
		case c.State == StateConnected:
			// A read without the agent (a notified roster without them is checked above), made
			// once the invite's completion or a roster said they joined: they left the
			// conversation. callbot ends the call, the agent wraps up.
			c.State, c.Outcome, c.Timers = StateTerminating, OutcomeConnected, nil
			d.hangup()
			d.emit(Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentWrapUp, After: d.wrapUp()})
			c.Agent = ""
		default:
			return ErrIgnored // a roster from before the agent joined
		}
		return nil

	case EvTransferAccepted:
		c.Outcome = OutcomeTransferred // the target took the call; the bot leg ends next
		return nil

	case EvTransferring:
		if c.Transferring {
			return ErrIgnored // a repeat
		}
		c.Transferring = true // Graph took the current attempt: a failure from now on is about it
		return nil

	case EvTransferFailed:
		if !ev.Verified {
			// A failure notification does not say which attempt it is about, and one from an
			// earlier attempt may arrive late or twice: ask Graph where the call is now.
			d.emit(Command{Kind: CmdCheckCall})
			return nil
		}
		if ev.ClientContext != "" && ev.ClientContext != c.TransferCtx {
			// the failed request of another attempt: its result applied again (Redis refused it
			// and had taken it) after the caller was offered again, to another agent
			return ErrIgnored
		}
		d.transferFailed(ev.NotSent)
		return nil

	case EvToneFailed:
		if ev.ClientContext == "" || ev.ClientContext != c.ToneCtx {
			return ErrIgnored // a repeat, or a request callbot no longer waits on
		}
		// Without a subscription the caller's keys do nothing for the rest of the call (menus
		// reach only their fallbacks): subscribe again later, with backoff, a few times.
		c.ToneCtx = ""
		if c.ToneFails++; c.ToneFails <= maxToneRetries {
			d.timer(TimerTone, toneRetry(c.ToneFails))
		}
		return nil

	case EvHangupFailed:
		if ev.ClientContext == "" || ev.ClientContext != c.HangupCtx {
			return ErrIgnored // a repeat, or a hangup callbot no longer waits on
		}
		// Graph did not end the call (throttled, failing, refused; a 404, the call gone, ends it
		// instead): the caller hears silence after the goodbye until it does. Hang up again
		// soon, with backoff, by the hang-up timer (durable: any instance fires it), rather than
		// at the hang-up grace armed with the hangup, 30 s on. A hangup Graph refuses is tried
		// so a few times only; the grace then goes on hanging up, as it does for a terminated
		// notification lost.
		c.HangupCtx = ""
		c.HangupFails++
		if ev.Refused {
			if c.HangupRefusals++; c.HangupRefusals > maxHangupRefusals {
				return nil // given up (Machine.handle logs and counts it): the grace stays armed
			}
		}
		d.timer(TimerMenu, d.hangupRetry(c.HangupFails, ev.RetryAfter))
		return nil

	case EvEnded:
		if c.State == StateTransferring && ev.Command != "" && ev.Command != CmdTransfer.String() {
			// Graph answered 404 to a command decided before the offer (hold music, a prompt's
			// cancellation) that reached it after the transfer took: callbot's leg ends when
			// the agent takes the caller. Ended here as a caller who hung up, the agent was
			// freed at once and offered another caller while talking to this one. The
			// terminated notification says how the call ended; if it is lost, the transfer's
			// timer reads the call.
			return ErrIgnored
		}
		d.ended(ev)
		return nil

	case EvCommandFailed:
		c.State, c.EndedAt, c.Outcome = StateTerminated, d.env.Now, OutcomeFailed
		return nil

	case EvAbort:
		// A bug left the call where only Graph's notifications move it on, its timer (the guard
		// against their loss) was refused by the table, and Graph shows the caller alone with
		// callbot: rather than leave them there for ever, callbot hangs up (and again, every
		// hang-up grace, until the call ends). An agent still reserved is freed: after their
		// wrap-up if they talked to the caller, at once after an offer. Only the record Graph was
		// read for: one that moved on meanwhile (the agent answered their invite, and talks to
		// the caller now) is not what Graph showed.
		if ev.Version != c.Version {
			return ErrIgnored
		}
		outcome, release := OutcomeFailed, Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentAbandoned}
		if c.State == StateConnected {
			outcome, release.AgentOutcome, release.After = OutcomeConnected, AgentWrapUp, d.wrapUp()
		}
		c.State, c.Outcome, c.Timers, c.PromptCtx = StateTerminating, outcome, nil, ""
		c.Transferring, c.TransferCtx, c.InviteCtx, c.RosterCtx, c.InviteNotSent = false, "", "", "", false
		d.hangup()
		if c.Agent != "" {
			d.emit(release)
			c.Agent = ""
		}
		return nil
	}
	return ErrIgnored
}

// Guards against lost notifications: Graph does not promise delivery, and a caller must never
// wait in silence for a notification that will not come.
const (
	answerCheck = 10 * time.Second // no established this long after answer: ask Graph
	// answerRecheck: a read of a call being answered that Graph did not answer is made again
	// this long after, within Graph's answer deadline
	answerRecheck = time.Second
	// unverifiedAnswerAfter: a call being answered that Graph has not said is established this
	// long after it came in, and that Graph does not let callbot read, is answered again
	// without the read (the answer that Graph may have taken would have been notified by now)
	unverifiedAnswerAfter = 10 * time.Second
	// transferRecheck: a failure notification could not be told from an earlier attempt's; ask
	// Graph again this long after, and take what it says then
	transferRecheck = 5 * time.Second
	// notSentHold: an agent whose transfer Graph never processed is not offered a call this
	// long (as long as a decline's default cool-down, but keeping their place among the longest
	// idle), so that a release a dead instance left is re-driven (a lease later: 8 s by default)
	// before the same agent can be reserved for the same caller again: a late release would free
	// them in the middle of that offer
	notSentHold = 10 * time.Second
	promptGuard = 2 * time.Minute  // a menu prompt's end not reported: treat as no input after this
	holdGuard   = 10 * time.Minute // hold music's end not reported: play it again after this
	// goneQueueDelay: a caller whose transfer to an agent failed, in a queue the flow no longer
	// has, goes to the start menu this long after (the hold timer's move)
	goneQueueDelay = time.Second
	// goneQueueWindow: how long a rolling update that changes the flow may take. A caller queued
	// this long after an instance's flow took effect, in a queue that flow lacks, is in a queue
	// of a newer flow (queueGone).
	goneQueueWindow = 10 * time.Minute
	// unknownQueueRetry: a caller in a queue of a newer flow than this instance's waits this
	// long for its hold music or max wait, for an instance that has the newer flow
	unknownQueueRetry = 5 * time.Second
	// rosterCheck: while connected, read the roster this often, in case the roster that shows
	// the agent leaving was lost (a caller would stay in a call with nobody until they hang up)
	rosterCheck = time.Minute
	// rosterSettle: a notified roster without the agent, before any roster showed them (the
	// invite's completion connected the call), brings the roster check this close
	rosterSettle = 5 * time.Second
)

// unreadableRecheck is the wait before the n-th read (n from 1) of a transfer in doubt that
// Graph did not answer comes again: a second, doubling, at most transferRecheck.
func unreadableRecheck(n int) time.Duration {
	if n < 1 || n > 3 {
		return transferRecheck
	}
	return time.Second << (n - 1) // 1, 2, 4 s
}

// A tone subscription that failed (after the Graph client's own retries) is tried again
// toneRetryFirst later, then twice as long after each failure, at most toneRetryMax apart, up
// to maxToneRetries times (1, 2, 4, 8, 16, 30 s: a minute in all), never at once: a failure
// that lasts (a permission missing) must not become a loop of requests.
const (
	toneRetryFirst = time.Second
	toneRetryMax   = 30 * time.Second
	maxToneRetries = 6
)

// toneRetry is how long after its n-th failure (from 1) the tone subscription is tried again.
func toneRetry(n int) time.Duration {
	return min(toneRetryFirst<<min(n-1, 16), toneRetryMax)
}

// A hangup that failed (after the Graph client's own retries: throttled, failing, timed out,
// refused) is sent again hangupRetryFirst later, then twice as long after each further failure
// (1, 2, 4, 8, 16 s...), or after the Retry-After Graph gave if that is longer, never later than
// the hang-up grace: a throttling episode must not leave the caller in silence after the goodbye
// until the grace (30 s) hangs up again. One Graph refused (a 4xx other than 404 and 429) is
// sent again so at most maxHangupRefusals times; the refusal after that gives up the quick
// retries (logged and counted), the grace still hanging up every 30 s.
const (
	hangupRetryFirst  = time.Second
	maxHangupRefusals = 3
)

// hangupRetry is how long after its n-th failure (from 1) the hangup is sent again: the backoff,
// or Graph's Retry-After if longer, at most the hang-up grace.
func (d *decision) hangupRetry(n int, retryAfter time.Duration) time.Duration {
	limit := d.env.HangupGrace
	if limit <= 0 {
		limit = 30 * time.Second
	}
	return min(max(hangupRetryFirst<<min(n-1, 16), retryAfter), limit)
}

// maxUnattendedTransfers is how many direct transfers in a row may fail with no key pressed
// since before callbot says goodbye and hangs up. A failed direct transfer takes the caller back
// to the start menu; if that menu's fallback (taken after no input) is the failing transfer, a
// caller who presses nothing (a phone left off the hook, a dialler) would go round the menu and
// the transfer until they hang up. Three: a caller who waits on the line for the fallback, as
// many do, gets it tried three times (the target may have been busy) and hears the menu in full
// twice in between; one who presses any key starts the count again, so is never cut off by it. A
// transfer Graph never processed (throttled, no token) did not try the target, and does not count:
// a throttling episode must not hang up every caller waiting for a menu's fallback.
const maxUnattendedTransfers = 3

// maxAnswers bounds answer requests for one call (the first, and one after Graph showed the call
// still incoming); Graph's 15 s deadline leaves no room for more.
const maxAnswers = 2

func (d *decision) answer() { d.answerUnverified(false) }

// answerUnverified answers the call; unverified: without Graph having shown it still incoming
// since an answer that may have taken (Command.Unverified).
func (d *decision) answerUnverified(unverified bool) {
	d.c.Answers++
	d.emit(Command{Kind: CmdAnswer, Answer: graph.AnswerRequest{CallbackURI: d.env.CallbackURI, PrefetchMedia: d.env.Flow.AllPrompts()},
		Unverified: unverified})
	d.timer(TimerAnswer, answerCheck)
}

// established starts the IVR once the call is up.
func (d *decision) established() {
	d.c.AnsweredAt = d.env.Now
	d.subscribe()
	d.menuStep(d.env.Flow.Begin())
}

// subscribe asks Graph to report the caller's keys, and waits on that request (ToneCtx): its
// failure is retried later (EvToneFailed).
func (d *decision) subscribe() {
	d.c.ToneCtx = "t" + strconv.FormatInt(d.next(), 10)
	d.emit(Command{Kind: CmdSubscribeToTone, ClientContext: d.c.ToneCtx})
}

// clearTimers disarms the call's timers but the tone subscription's retry, which outlives the
// state that armed it: the caller's keys matter whenever they are back at a menu.
func (d *decision) clearTimers() {
	if tok := d.c.Timers[TimerTone]; tok != 0 {
		d.c.Timers = map[TimerKind]int64{TimerTone: tok}
		return
	}
	d.c.Timers = nil
}

// hold plays pre and then the queue's hold music, with a guard timer that plays it again if its
// end is never reported.
func (d *decision) hold(pre []graph.MediaPrompt) {
	if len(pre) == 0 && d.queueUnknown() {
		// the hold music is that of a newer flow than this instance's: a moment's silence, and
		// the hold timer, which any instance may fire, plays it
		d.timer(TimerHold, unknownQueueRetry)
		return
	}
	d.play(append(pre, d.holdMusic()...))
	if d.c.PromptCtx != "" {
		d.timer(TimerHold, holdGuard)
	}
}

func (d *decision) menuTimeout() time.Duration {
	if m := d.env.Flow.Menus[d.c.Menu.Menu]; m != nil && m.Timeout > 0 {
		return m.Timeout
	}
	return 5 * time.Second
}

func (d *decision) wrapUp() time.Duration {
	if q := d.env.Flow.Queues[d.c.Queue]; q != nil {
		return q.WrapUp
	}
	return 0
}

func (d *decision) holdMusic() []graph.MediaPrompt {
	if q := d.env.Flow.Queues[d.c.Queue]; q != nil {
		return d.prompts(q.Hold)
	}
	return nil
}

// menuStep carries out what the IVR interpreter decided.
func (d *decision) menuStep(st ivr.Step) {
	d.c.Menu = st.Position
	d.clearTimers()
	if st.Action.Kind == ivr.ActionNone {
		d.c.State = StateInMenu
		d.play(st.Prompts)
		if len(st.Prompts) == 0 {
			d.timer(TimerMenu, d.menuTimeout())
		} else {
			d.timer(TimerMenu, d.menuTimeout()+promptGuard) // re-armed when the prompt's end is reported
		}
		return
	}
	a := st.Action
	if a.Kind == ivr.ActionDisconnect {
		a.Prompt = "" // the interpreter already put the goodbye prompt in st.Prompts
	}
	d.act(a, st.Prompts)
}

// act performs a terminal action of the flow: queue, transfer or disconnect, after playing pre.
// The caller has silenced any prompt still playing.
func (d *decision) act(a ivr.Action, pre []graph.MediaPrompt) {
	c := &d.c
	switch a.Kind {
	case ivr.ActionQueue:
		q := d.env.Flow.Queues[a.Target]
		c.State, c.Queue, c.QueuedAt = StateQueued, a.Target, d.env.Now
		c.QueueScore = d.env.Now.UnixMilli()
		d.clearTimers()
		ps := pre
		if q != nil {
			ps = append(ps, d.prompts(q.Welcome)...)
		}
		d.hold(ps)
		d.emit(Command{Kind: CmdEnqueue, Queue: a.Target, Score: c.QueueScore})
		if q != nil && q.MaxWait > 0 {
			d.timer(TimerMaxWait, q.MaxWait)
		}
	case ivr.ActionTransfer:
		c.Target, c.Queue = a.Target, ""
		d.play(pre)
		c.Offers++
		d.transfer(a.TransferParty())
	default: // disconnect
		// the timers of where the caller was (a queue's hold-music guard) go: in terminating any
		// timer hangs up at once, which would cut the goodbye
		c.State, c.Outcome, c.Queue, c.Timers = StateTerminating, OutcomeDisconnected, "", nil
		ps := append(pre, d.prompts(a.Prompt)...)
		if len(ps) == 0 {
			d.hangup()
			return
		}
		d.play(ps)
		d.timer(TimerMenu, d.env.HangupGrace) // a goodbye longer than this is cut
	}
}

// transfer starts a transfer attempt to target, with a clientContext of its own, and watches for
// its outcome. Graph has not said this attempt is under way yet (Transferring).
func (d *decision) transfer(target graph.Party) {
	d.c.State, d.c.Transferring, d.c.ReadFails = StateTransferring, false, 0
	d.c.TransferCtx = "x" + strconv.FormatInt(d.next(), 10)
	d.emit(Command{Kind: CmdTransfer, Target: target, ClientContext: d.c.TransferCtx})
	d.timer(TimerTransfer, d.env.TransferTimeout)
}

// connected: the invited agent is in the call. The hold music stops, and the roster is read
// now and then in case the agent's leaving is not notified.
func (d *decision) connected() {
	d.c.State, d.c.ConnectedAt, d.c.RosterCtx, d.c.InviteNotSent = StateConnected, d.env.Now, "", false
	d.clearTimers()
	d.silence() // the hold music must not play over the conversation
	d.timer(TimerRoster, rosterCheck)
}

// checkRoster reads the call's participants from Graph; the read comes back as an EvRoster with
// its token, which applies only while the call still waits for it.
func (d *decision) checkRoster() {
	d.c.RosterCtx = "r" + strconv.FormatInt(d.next(), 10)
	d.emit(Command{Kind: CmdCheckRoster, ClientContext: d.c.RosterCtx})
}

// hangup ends the call, and arms a timer that hangs up again if no terminated notification
// comes: a hangup Graph refused or lost must not leave the caller in a call nobody serves. The
// hangup has a clientContext of its own (HangupCtx): its failure (EvHangupFailed) brings that
// timer forward, a failure of an earlier one does not.
func (d *decision) hangup() {
	d.c.HangupCtx = "h" + strconv.FormatInt(d.next(), 10)
	d.emit(Command{Kind: CmdHangup, ClientContext: d.c.HangupCtx})
	d.timer(TimerMenu, d.env.HangupGrace)
}

// queueUnknown reports whether the caller's queue is one this instance's flow does not have:
// one the flow no longer has (queueGone), or one a newer flow has, in a rolling update that
// adds it.
func (d *decision) queueUnknown() bool {
	return d.c.Queue != "" && d.env.Flow.Queues[d.c.Queue] == nil
}

// queueGone reports whether the caller's queue is one the flow no longer has: the flow was
// edited and callbot restarted while they waited (they were queued before this instance's flow
// took effect, or in the rolling update that followed, by an instance still on the old flow).
// No dispatcher serves such a queue (each serves its flow's queues) and its hold music went
// with it: a caller left there waited in silence until they hung up. A caller queued later in
// a queue this flow lacks is in a queue of a newer flow (an instance not yet updated): not gone.
func (d *decision) queueGone() bool {
	return d.queueUnknown() && d.c.QueuedAt.Before(d.env.FlowSince.Add(goneQueueWindow))
}

// leaveGoneQueue takes a caller out of a queue the flow no longer has (queueGone) and back to
// the start menu, without the greeting, as a caller at a menu the flow no longer has: they
// choose again from what the flow offers now.
func (d *decision) leaveGoneQueue() {
	d.emit(Command{Kind: CmdLeaveQueue, Queue: d.c.Queue})
	d.silence()
	d.c.Queue, d.c.QueueScore, d.c.QueuedAt = "", 0, time.Time{}
	d.menuStep(d.env.Flow.Restart())
}

// transferFailed puts a caller whose transfer (or invite) failed back where it came from: the
// head of its queue (its original arrival score), or the start of the menu for a direct
// transfer (unless that was the maxUnattendedTransfers-th to fail with no key pressed since:
// goodbye; one Graph never processed does not count). The agent cools down and counts as idle from now, unless notSent: Graph never
// processed the request (throttled, no token), so the agent never rang and keeps their place
// among the longest idle, held back notSentHold all the same (a request that fails at once, for
// want of a token, must not become a tight loop of offers, nor a late release free the agent
// mid-offer).
func (d *decision) transferFailed(notSent bool) {
	c := &d.c
	c.Outcome, c.Transferring, c.TransferCtx, c.InviteCtx, c.RosterCtx, c.InviteNotSent = "", false, "", "", "", false
	if c.Agent != "" {
		release := Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentFailed}
		if notSent {
			release.AgentOutcome, release.After = AgentAbandoned, notSentHold
		}
		d.emit(release)
		c.Agent = ""
		c.State = StateQueued
		if d.queueGone() {
			// not back in a queue no dispatcher serves: to the start menu once the hold timer
			// fires (the table has no move from a hand-off to a menu)
			d.clearTimers()
			d.silence()
			d.timer(TimerHold, goneQueueDelay)
			return
		}
		maxWait := c.Timers[TimerMaxWait]
		d.clearTimers()
		d.hold(nil)
		d.emit(Command{Kind: CmdEnqueue, Queue: c.Queue, Score: c.QueueScore})
		if q := d.env.Flow.Queues[c.Queue]; q != nil && q.MaxWait > 0 {
			left := q.MaxWait - d.env.Now.Sub(c.QueuedAt)
			d.timer(TimerMaxWait, max(left, time.Second))
		} else if q == nil && maxWait != 0 {
			// a queue of a newer flow, whose max wait this instance cannot tell: the max-wait
			// timer armed when the caller joined stays armed (the hand-off left it), for an
			// instance that has the flow
			c.Timers = maps.Clone(c.Timers)
			if c.Timers == nil {
				c.Timers = map[TimerKind]int64{}
			}
			c.Timers[TimerMaxWait] = maxWait
		}
		return
	}
	c.Target = ""
	if !notSent {
		// a request Graph never processed did not try the target: it does not count
		c.UnattendedFails++
	}
	if c.UnattendedFails >= maxUnattendedTransfers {
		// Nobody has pressed a key through this many failed transfers: end the call with the
		// flow's goodbye rather than go round again. The outcome says why.
		d.act(ivr.Action{Kind: ivr.ActionDisconnect, Prompt: d.env.Flow.Goodbye(c.Menu.Menu)}, nil)
		c.Outcome = OutcomeTransferFailed
		return
	}
	d.menuStep(d.env.Flow.Restart())
}

func (d *decision) ended(ev Event) {
	c := &d.c
	from := c.State
	c.State, c.EndedAt, c.Timers, c.PromptCtx = StateTerminated, d.env.Now, nil, ""
	c.EndCode, c.EndSubcode = int64(ev.Result.Code), int64(ev.Result.Subcode)
	transferred := ev.Result.Subcode == 7015 || ev.Reason == "AppTransferred" || c.Outcome == OutcomeTransferred
	if from == StateTransferring && c.Transferring && ev.Reason == ReasonGone {
		// Graph had taken the transfer, and the call is gone from it with its terminated
		// notification lost: most likely transferred (the agent may be talking to the caller)
		transferred = true
	}
	switch from {
	case StateQueued:
		d.emit(Command{Kind: CmdLeaveQueue, Queue: c.Queue})
		c.Outcome = OutcomeCallerHangup
	case StateTransferring:
		if transferred {
			c.Outcome = OutcomeTransferred
			if c.Agent != "" {
				d.emit(Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentConnected})
			}
		} else {
			c.Outcome = OutcomeCallerHangup
			if c.Agent != "" {
				release := Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentAbandoned}
				if ev.Reason == ReasonGone {
					// gone with no word of how: the agent may have the caller after all (the
					// transfer's notifications lost too). Released as after a transfer: held
					// until presence has been read again, which tells
					release.AgentOutcome = AgentConnected
				}
				d.emit(release)
			}
		}
	case StateInviting:
		c.Outcome = OutcomeCallerHangup
		if c.Agent != "" {
			d.emit(Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentAbandoned})
		}
	case StateConnected:
		c.Outcome = OutcomeConnected
		if c.Agent != "" {
			d.emit(Command{Kind: CmdReleaseAgent, Agent: c.Agent, AgentOutcome: AgentWrapUp, After: d.wrapUp()})
		}
	case StateTerminating:
		if c.Outcome == "" {
			c.Outcome = OutcomeDisconnected
		}
	default:
		if ev.Result.Code >= 400 {
			c.Outcome = OutcomeFailed
		} else {
			c.Outcome = OutcomeCallerHangup
		}
	}
}

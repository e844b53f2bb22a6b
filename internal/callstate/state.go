package callstate

import (
	"fmt"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

// State is where a call is in callbot's life cycle.
type State uint8

// States, in the order a call normally passes them.
const (
	StateNone         State = iota // no record yet
	StateAnswering                 // answer sent, waiting for established
	StateInMenu                    // established; prompts and tones of the IVR menu
	StateQueued                    // waiting in a queue, hold music playing
	StateTransferring              // transfer to an agent or user sent, waiting for the outcome
	StateInviting                  // agent invited into the call (conference hand-off), ringing
	StateConnected                 // the agent joined; callbot stays in the call until it ends
	StateTerminating               // callbot hung up or rejected, waiting for Graph to confirm
	StateTerminated                // over; terminal
)

var stateNames = [...]string{"none", "answering", "in_menu", "queued", "transferring", "inviting", "connected", "terminating", "terminated"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return "state(" + string(rune('0'+s)) + ")"
}

// MarshalText writes the state's name: records in Redis stay readable across versions that add
// states.
func (s State) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

// UnmarshalText reads a state's name.
func (s *State) UnmarshalText(b []byte) error {
	for i, n := range stateNames {
		if n == string(b) {
			*s = State(i)
			return nil
		}
	}
	return fmt.Errorf("unknown call state %q", b)
}

// Terminal reports whether no event can move a call out of s.
func (s State) Terminal() bool { return s == StateTerminated }

// EventKind is what happened to a call.
type EventKind uint8

// Events.
const (
	EvIncoming         EventKind = iota + 1 // Graph: created, state incoming
	EvEstablished                           // Graph: state established (without a failure result)
	EvTone                                  // Graph: toneInfo
	EvPromptDone                            // Graph: playPrompt operation finished (or failed)
	EvTimeout                               // a durable timer fired
	EvAgentOffer                            // the dispatcher reserved an agent for this queued call
	EvTransferAccepted                      // Graph: transferAccepted
	EvTransferFailed                        // Graph: established again with a failure result, or the transfer request failed
	EvEnded                                 // Graph: terminated / deleted, or the call is gone (404)
	EvCommandFailed                         // a Graph command other than transfer failed
	EvCallState                             // the call's state as read from Graph (GET), after a doubt
	EvInviteDone                            // Graph: the invite operation finished (Failed: the agent did not join)
	EvRoster                                // Graph: the call's participants changed (Participants, Seq)
	EvTransferring                          // Graph: state transferring (it took the transfer request)
	EvAdopt                                 // a call Graph has established but callbot has no record of (lost with Redis data): the menu starts again (Incoming)
	EvAbort                                 // a timer of the call was refused by the table (a bug) and Graph shows the caller alone with callbot: hang up (Machine.giveUp)
	EvToneFailed                            // the subscribeToTone request ClientContext failed (after the Graph client's retries)
	EvHangupFailed                          // the hangup ClientContext failed (after the Graph client's retries): Graph did not end the call
)

var eventNames = [...]string{"", "incoming", "established", "tone", "prompt_done", "timeout", "agent_offer",
	"transfer_accepted", "transfer_failed", "ended", "command_failed", "call_state", "invite_done", "roster", "transferring", "adopt", "abort",
	"tone_failed", "hangup_failed"}

func (e EventKind) String() string {
	if int(e) < len(eventNames) {
		return eventNames[e]
	}
	return "event?"
}

// TimerKind names a durable timer.
type TimerKind string

// Timers.
const (
	TimerMenu     TimerKind = "menu"     // no input in a menu
	TimerMaxWait  TimerKind = "maxwait"  // a queue's max-wait
	TimerTransfer TimerKind = "transfer" // no transfer outcome from Graph in time
	TimerHold     TimerKind = "hold"     // hold music could not play, or its end was never reported: play it again
	TimerAnswer   TimerKind = "answer"   // no established after answer: ask Graph
	TimerRoster   TimerKind = "roster"   // connected: read the roster, in case the agent's leaving was not notified
	TimerTone     TimerKind = "tone"     // the tone subscription failed: subscribe again
)

// Event is the input of the machine.
type Event struct {
	Kind EventKind
	// Call is the incoming call (EvIncoming).
	Incoming *Incoming
	// Digit and Seq for EvTone.
	Digit string
	Seq   int64
	// ClientContext of the finished operation (EvPromptDone, EvInviteDone) or of the failed
	// request (EvToneFailed, EvHangupFailed, a Verified EvTransferFailed); Failed when it did not play. On EvCallState, what the read of the
	// call was made for: the transfer attempt (Call.TransferCtx), or the state the call was in
	// when no transfer was under way; a read made for another attempt says nothing of the
	// current one ("" applies to any).
	ClientContext string
	Failed        bool
	// Timer that fired and its token (EvTimeout).
	Timer      TimerKind
	TimerToken int64
	// Agent reserved for the call (EvAgentOffer), and the queue whose entry the reservation took
	// (OfferQueue; "" takes the call in whichever queue it waits).
	Agent      string
	OfferQueue string
	// Participants are the user ids in a roster update (EvRoster), of participants not removed.
	// A roster read from Graph (CmdCheckRoster) rather than notified carries the read's
	// ClientContext: it is the whole roster at the time of the read, and applies only while the
	// call still waits for that read (Call.RosterCtx). Rosters carry no order: Graph's
	// rosterSequenceNumber is each participant's, not the roster's.
	Participants []string
	// GraphState is the call's state read from Graph (EvCallState).
	GraphState graph.CallState
	// Unreadable: Graph did not answer the read (EvCallState; throttled, failing), so
	// GraphState says nothing.
	Unreadable bool
	// Verified: a transfer failure known to be about the current attempt (the request was
	// refused, or Graph shows the call established again), not a late or repeated notification.
	// On EvCallState: the read settles the current attempt (it follows the attempt's own
	// request or timer), so a call established again means the attempt failed.
	Verified bool
	// NotSent: a transfer or invite request Graph never processed (EvTransferFailed,
	// EvInviteDone): throttled (429), or never sent (no token). The agent never rang: not their
	// failure. On EvCallState while answering: the answer the read follows was not processed by
	// Graph (throttled, never sent), or (Unreadable) a re-drive gave up an answer it could not
	// check; neither counts against maxAnswers.
	NotSent bool
	// Refused: a failed request Graph refused (a 4xx other than 404 and 429: sent again, it most
	// likely gets the same answer), on EvHangupFailed. RetryAfter is how long Graph asked callbot
	// to wait before sending it again (its Retry-After), 0 when it did not say.
	Refused    bool
	RetryAfter time.Duration
	// Version is the version of the record EvAbort was decided for (Machine.giveUp read Graph for
	// it): a call that moved on meanwhile (an agent who answered their invite) is not given up on.
	Version int64
	// Result carried by Graph (EvEnded, EvTransferFailed), and the command that failed
	// (EvCommandFailed) or that Graph answered 404 (an EvEnded callbot makes: Reason says so).
	Result  graph.ResultInfo
	Reason  string
	Command string
}

// Incoming describes a new call.
type Incoming struct {
	GraphID    string
	TenantID   string
	Caller     graph.Party
	Dialled    string // application instance or application id the caller dialled
	ChainID    string
	ScenarioID string
}

// Outcome of a call, recorded when it ends.
const (
	OutcomeTransferred  = "transferred"   // handed to an agent or user
	OutcomeCallerHangup = "caller_hangup" // caller left before reaching an agent
	OutcomeDisconnected = "disconnected"  // the flow ended the call
	OutcomeFailed       = "failed"        // a Graph failure ended the call
	OutcomeConnected    = "connected"     // talked with an agent invited into the call (conference hand-off)
	// OutcomeTransferFailed: callbot ended the call after the flow's direct transfer had failed
	// maxUnattendedTransfers times in a row with no key pressed since: a caller nobody is
	// serving (a phone left off the hook, a dialler), who would otherwise go round the menu and
	// the failing transfer until they hang up.
	OutcomeTransferFailed = "transfer_failed"
)

// ReasonGone is the Reason of an EvEnded callbot makes when Graph answers 404 for the call (it
// no longer has it) and no terminated notification told how it ended.
const ReasonGone = "gone from graph"

// Call is the record of one call, stored in Redis.
type Call struct {
	ID       string       `json:"id"` // as Graph wrote it; outbound URLs use it
	Tenant   string       `json:"tenant"`
	State    State        `json:"state"`
	Version  int64        `json:"-"` // store version; compare-and-set on save
	Caller   graph.Party  `json:"caller"`
	Dialled  string       `json:"dialled,omitempty"`
	ChainID  string       `json:"chain,omitempty"`
	Scenario string       `json:"scenario,omitempty"`
	Menu     ivr.Position `json:"menu"`
	// PromptCtx is the clientContext of the prompt callbot waits on; completions of other
	// prompts (stale, duplicated) are ignored.
	PromptCtx string `json:"promptCtx,omitempty"`
	Seq       int64  `json:"seq"`      // counter for clientContext and timer tokens
	LastTone  int64  `json:"lastTone"` // highest toneInfo.sequenceId applied
	// ToneCtx is the clientContext of the tone subscription callbot waits on, "" once it failed
	// (a TimerTone subscribes again, at most maxToneRetries times, counted by ToneFails) or a
	// key press showed an earlier one working. A record saved before these fields has neither.
	ToneCtx   string `json:"toneCtx,omitempty"`
	ToneFails int    `json:"toneFails,omitempty"`
	// HangupCtx is the clientContext of the hangup callbot waits on (terminating), "" before the
	// first (a goodbye still playing) and once it failed: the hang-up timer then hangs up again
	// soon, with backoff (HangupFails: failed hangups; HangupRefusals: those Graph refused, a
	// 4xx other than 404 and 429, retried so at most maxHangupRefusals times). A record saved
	// before these fields has none: its hang-up grace hangs up again.
	HangupCtx      string `json:"hangupCtx,omitempty"`
	HangupFails    int    `json:"hangupFails,omitempty"`
	HangupRefusals int    `json:"hangupRefusals,omitempty"`
	// Timers holds the token of each live timer; a timer firing with another token is stale.
	Timers     map[TimerKind]int64 `json:"timers,omitempty"`
	Queue      string              `json:"queue,omitempty"`
	QueueScore int64               `json:"queueScore,omitempty"` // arrival order in the queue; kept on requeue
	Agent      string              `json:"agent,omitempty"`      // agent reserved / transferred to
	Target     string              `json:"target,omitempty"`     // direct transfer target (menu option)
	Offers     int                 `json:"offers,omitempty"`     // transfer attempts
	// ReadFails counts the reads of the current transfer attempt, in doubt, that Graph did not
	// answer (throttled, failing): each waits longer before the next (unreadableRecheck).
	ReadFails int `json:"readFails,omitempty"`
	Answers   int `json:"answers,omitempty"` // answer requests sent
	// UnattendedFails counts the direct transfers that failed since the caller last pressed a
	// key (any key press resets it; one Graph never processed does not count); at
	// maxUnattendedTransfers callbot ends the call.
	UnattendedFails int `json:"unattendedFails,omitempty"`
	// InviteCtx is the clientContext of the invite callbot waits on (conference hand-off);
	// Joined is set once a roster showed the agent in the call. RosterCtx is the token of the
	// roster read callbot waits on; set while inviting, the invite's failure (or its timer) waits
	// on that read to be confirmed; set while connected, the read says whether the agent left.
	InviteCtx   string    `json:"inviteCtx,omitempty"`
	Joined      bool      `json:"joined,omitempty"`
	RosterCtx   string    `json:"rosterCtx,omitempty"`
	ConnectedAt time.Time `json:"connectedAt,omitzero"`
	// InviteNotSent: Graph never processed the current invite (throttled, no token), so the
	// agent never rang: if the roster read (or its recheck) finds they did not join, they are
	// released as after a transfer Graph never processed, not as after a decline.
	InviteNotSent bool `json:"inviteNotSent,omitempty"`
	// Transferring is set when Graph reported the current transfer attempt under way: only then
	// can a failure notification be about it (one from an earlier attempt may arrive late).
	Transferring bool `json:"transferring,omitempty"`
	// TransferCtx is the clientContext of the current transfer attempt's request.
	TransferCtx string    `json:"transferCtx,omitempty"`
	CreatedAt   time.Time `json:"createdAt"`
	AnsweredAt  time.Time `json:"answeredAt,omitzero"`
	QueuedAt    time.Time `json:"queuedAt,omitzero"`
	EndedAt     time.Time `json:"endedAt,omitzero"`
	Outcome     string    `json:"outcome,omitempty"`
	// Outbox holds the commands decided with this record and not yet acknowledged as done;
	// CmdSeq numbers them. AckedStorage and AckedGraph are the acknowledgement watermarks of the
	// two kinds of command (storage commands run in order right after the save, Graph commands
	// in order on the call's executor); they live beside the record in Redis, with the batches
	// acknowledged ahead of them (one instance may finish a batch before another instance has
	// finished, or sent, an older one: such a batch joins the watermark once the older is done).
	Outbox       []Pending `json:"outbox,omitempty"`
	CmdSeq       int64     `json:"cmdSeq,omitempty"`
	AckedStorage int64     `json:"-"`
	AckedGraph   int64     `json:"-"`
	EndCode      int64     `json:"endCode,omitempty"`
	EndSubcode   int64     `json:"endSubcode,omitempty"`
}

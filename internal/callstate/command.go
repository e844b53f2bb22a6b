package callstate

import (
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// CommandKind is an effect the machine decided on.
type CommandKind uint8

// Commands. The first group goes to Graph (asynchronously, in order per call); the second to
// callbot's own storage (synchronously, after the state change is saved).
const (
	CmdAnswer CommandKind = iota + 1
	CmdReject
	CmdPlayPrompt
	CmdSubscribeToTone
	CmdCancelMedia
	CmdTransfer
	CmdHangup
	CmdCheckCall // read the call's state from Graph (EvCallState), when a notification may be lost or stale
	CmdInvite    // invite Target into the call (conference hand-off)
	// CmdCheckRoster reads the call's participants from Graph (EvRoster with ClientContext), when
	// an invite's outcome or the agent's leaving may not have been notified
	CmdCheckRoster

	CmdEnqueue      // put the call in Queue at Score
	CmdLeaveQueue   // take the call out of Queue
	CmdReleaseAgent // the agent's offer is over (AgentOutcome says how)
	CmdSetTimer     // arm Timer with Token to fire After from now
)

var commandNames = [...]string{"", "answer", "reject", "playPrompt", "subscribeToTone", "cancelMediaProcessing",
	"transfer", "hangup", "checkCall", "invite", "checkRoster", "enqueue", "leaveQueue", "releaseAgent", "setTimer"}

func (k CommandKind) String() string {
	if int(k) < len(commandNames) {
		return commandNames[k]
	}
	return "command?"
}

// Graph reports whether the command is sent to Graph.
func (k CommandKind) Graph() bool { return k >= CmdAnswer && k <= CmdCheckRoster }

// AgentOutcome says how an offer to an agent ended.
type AgentOutcome string

// Agent outcomes.
const (
	AgentConnected AgentOutcome = "connected" // the caller reached the agent
	AgentFailed    AgentOutcome = "failed"    // declined, not answered or failed: the agent cools down
	AgentAbandoned AgentOutcome = "abandoned" // the caller left while the agent was offered
	AgentWrapUp    AgentOutcome = "wrapup"    // a conversation ended; the agent wraps up for Command.After
)

// Command is one effect. Only the fields of its kind are set.
type Command struct {
	Kind          CommandKind         `json:"k"`
	Answer        graph.AnswerRequest `json:"answer,omitzero"`
	Reject        graph.RejectReason  `json:"reject,omitempty"`
	Prompts       []graph.MediaPrompt `json:"prompts,omitempty"`
	ClientContext string              `json:"cc,omitempty"`
	Target        graph.Party         `json:"target,omitzero"`
	Queue         string              `json:"queue,omitempty"`
	Score         int64               `json:"score,omitempty"`
	Agent         string              `json:"agent,omitempty"`
	AgentOutcome  AgentOutcome        `json:"outcome,omitempty"`
	Timer         TimerKind           `json:"timer,omitempty"`
	Token         int64               `json:"token,omitempty"`
	After         time.Duration       `json:"after,omitempty"`
	// Settles, on CmdCheckCall: what Graph says settles the current transfer attempt (the check
	// is its timer's), rather than checking a failure notification that may be an earlier one's.
	Settles bool `json:"settles,omitempty"`
	// Unverified, on CmdAnswer: sent without Graph having shown the call still incoming since an
	// earlier answer that may have taken (its reads unanswered near the deadline). Graph's
	// refusal of it may mean the call is established: the call is read, not ended.
	Unverified bool `json:"unverified,omitempty"`
	// Again marks a command the re-drive sends a second time, not knowing whether the first
	// reached Graph. Not stored: only the re-driving instance needs it.
	Again bool `json:"-"`
}

// Idempotent reports whether sending the command twice does no harm. Answer, reject, redirect
// and transfer act on the call itself: a repeat after an ambiguous failure could act twice, so
// before re-driving one, callbot asks Graph where the call is.
func (k CommandKind) Idempotent() bool {
	switch k {
	case CmdAnswer, CmdReject, CmdTransfer, CmdInvite:
		return false
	}
	return true
}

// Pending is a command decided and saved with the call's state but not yet known to be done:
// the call's outbox. Seq orders it among the call's commands; Version is the record version
// whose transition decided it.
type Pending struct {
	Seq     int64   `json:"seq"`
	Version int64   `json:"ver"`
	Cmd     Command `json:"cmd"`
}

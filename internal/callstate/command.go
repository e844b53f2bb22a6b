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

	CmdEnqueue      // put the call in Queue at Score
	CmdLeaveQueue   // take the call out of Queue
	CmdReleaseAgent // the agent's offer is over (AgentOutcome says how)
	CmdSetTimer     // arm Timer with Token to fire After from now
)

var commandNames = [...]string{"", "answer", "reject", "playPrompt", "subscribeToTone", "cancelMediaProcessing",
	"transfer", "hangup", "enqueue", "leaveQueue", "releaseAgent", "setTimer"}

func (k CommandKind) String() string {
	if int(k) < len(commandNames) {
		return commandNames[k]
	}
	return "command?"
}

// Graph reports whether the command is sent to Graph.
func (k CommandKind) Graph() bool { return k >= CmdAnswer && k <= CmdHangup }

// AgentOutcome says how an offer to an agent ended.
type AgentOutcome string

// Agent outcomes.
const (
	AgentConnected AgentOutcome = "connected" // the caller reached the agent
	AgentFailed    AgentOutcome = "failed"    // declined, not answered or failed: the agent cools down
	AgentAbandoned AgentOutcome = "abandoned" // the caller left while the agent was offered
)

// Command is one effect. Only the fields of its kind are set.
type Command struct {
	Kind          CommandKind
	Answer        graph.AnswerRequest
	Reject        graph.RejectReason
	Prompts       []graph.MediaPrompt
	ClientContext string
	Target        graph.Party
	Queue         string
	Score         int64
	Agent         string
	AgentOutcome  AgentOutcome
	Timer         TimerKind
	Token         int64
	After         time.Duration
}

package callstate

import (
	"context"

	"github.com/callbot/callbot/internal/graph"
)

// CallControl is what the machine needs from Graph to act on a call. Every method takes the
// call id as Graph wrote it. Errors are *graph.Error for a Graph failure (errors.Is(err,
// graph.ErrCallGone) for 404) or a transport/context error.
//
// Implementations must not blindly retry answer, reject, redirect or transfer after an
// ambiguous failure (timeout, 5xx): the caller reconciles with the next state notification.
type CallControl interface {
	Answer(ctx context.Context, callID string, req graph.AnswerRequest) error
	Reject(ctx context.Context, callID string, reason graph.RejectReason) error
	// PlayPrompt queues prompts (at most 20) and returns the operation Graph created.
	PlayPrompt(ctx context.Context, callID string, prompts []graph.MediaPrompt, clientContext string) (graph.Operation, error)
	SubscribeToTone(ctx context.Context, callID, clientContext string) (graph.Operation, error)
	CancelMediaProcessing(ctx context.Context, callID, clientContext string) (graph.Operation, error)
	// Transfer hands the call to target (blind transfer).
	Transfer(ctx context.Context, callID string, target graph.Party, clientContext string) error
	// Redirect forwards a call that is not answered yet; timeoutSec is 15-90, 0 for Graph's default.
	Redirect(ctx context.Context, callID string, targets []graph.Party, timeoutSec int, callbackURI string) error
	Hangup(ctx context.Context, callID string) error
	// InviteParticipants brings a participant into the call, the bot staying in it.
	InviteParticipants(ctx context.Context, callID string, req graph.InviteRequest) (graph.Operation, error)
	// GetCall reads the call's state from Graph; callbot asks before repeating a command that
	// acts on the call (answer, transfer) whose first attempt may or may not have taken effect.
	GetCall(ctx context.Context, callID string) (graph.CallState, error)
	// Participants reads the call's roster from Graph (GET .../participants): whether an invited
	// agent is in the call, when its invite's outcome or the agent's leaving was not notified.
	Participants(ctx context.Context, callID string) ([]graph.Participant, error)
	// KeepAlive tells Graph the call is still wanted; without one every 15-45 minutes Graph ends
	// the call (408/8537).
	KeepAlive(ctx context.Context, callID string) error
}

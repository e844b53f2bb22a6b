package graph

import (
	"context"
	"errors"
	"time"
)

// This file holds the vocabulary of outbound actions beyond the ones callstate.CallControl
// names (recordResponse, participants/invite, hold music, create call, consultative transfer,
// redirect options), the per-request context values the adapter reads (tenant, first sight of
// an incoming call), and the classification of failures callers use to decide whether to
// reconcile with GET /communications/calls/{id} before acting again.

// Documented limits of the outbound actions, from the Graph v1.0 reference:
// https://learn.microsoft.com/en-us/graph/api/call-playprompt (prompts, clientContext),
// https://learn.microsoft.com/en-us/graph/api/call-record (recordResponse),
// https://learn.microsoft.com/en-us/graph/api/call-redirect (targets, timeout) and
// https://learn.microsoft.com/en-us/graph/api/participant-invite (up to 5 invitees).
const (
	MaxPrompts            = 20  // playPrompt prompts
	MaxRecordPrompts      = 1   // recordResponse prompts
	MaxRedirectTargets    = 25  // redirect (simultaneous ring) targets
	MinRedirectTimeoutSec = 15  // redirect timeout, seconds
	MaxRedirectTimeoutSec = 90  // redirect timeout, seconds
	MinRecordSeconds      = 1   // recordResponse silence timeouts and max duration
	MaxRecordSeconds      = 120 // recordResponse silence timeouts and max duration
	MaxClientContext      = 256 // clientContext length, characters
	MaxInvitees           = 5   // participants/invite participants
)

// AnswerDeadline is how long after the incoming notification Graph waits for answer, reject
// or redirect before it drops the call (15 s; 5 s for policy-based recording).
const AnswerDeadline = 15 * time.Second

// ErrInvalidArgument is wrapped by errors returned before any request is sent because an
// argument breaks a documented Graph limit. Repeating the same request gives the same error.
var ErrInvalidArgument = errors.New("invalid argument")

// ErrNotSent is wrapped by errors of requests that never reached Graph: the connection failed
// before the request was written, or no token could be obtained. Graph did not act on them.
var ErrNotSent = errors.New("request not sent")

// RecordRequest is a recordResponse action: record what the caller says (at most 2 minutes),
// optionally after a prompt.
type RecordRequest struct {
	// Prompts holds at most MaxRecordPrompts prompt played before recording.
	Prompts []MediaPrompt
	// BargeInAllowed lets the caller start speaking (or press a stop tone) during the prompt.
	BargeInAllowed bool
	// InitialSilenceTimeoutSec, MaxSilenceTimeoutSec and MaxRecordDurationSec are each 1 to
	// 120 seconds, or 0 for Graph's default (5 s).
	InitialSilenceTimeoutSec int
	MaxSilenceTimeoutSec     int
	MaxRecordDurationSec     int
	// PlayBeep is sent as given: false means no beep (Graph's own default is true).
	PlayBeep bool
	// StopTones end the recording: "0"-"9", "*", "#", "A"-"D".
	StopTones []string
	// ClientContext (at most MaxClientContext characters) is echoed in the operation.
	ClientContext string
}

// Invitee is one participant of a participants/invite action.
type Invitee struct {
	Party Party
	// ReplacesCallID, when set, names a call of the bot with this participant that the
	// invitation replaces (the participant moves from that call into this one).
	ReplacesCallID string
}

// InviteRequest is a participants/invite action (group calls only).
type InviteRequest struct {
	Participants  []Invitee // 1 to MaxInvitees
	ClientContext string
}

// TransferRequest is a transfer action: blind when ReplacesCallID is empty, consultative when it
// names the bot's call with the target.
type TransferRequest struct {
	Target Party
	// ReplacesCallID is the bot's call with Target that the transfer replaces (consultative).
	ReplacesCallID string
	// LanguageID and Region are optional hints on the target (Graph's PSTN examples send them).
	LanguageID, Region string
	// Transferee and TransfereeParticipantID name the participant to transfer when the bot
	// transfers out of a group call; leave them empty for a peer-to-peer call.
	Transferee              *Party
	TransfereeParticipantID string
	// ClientContext is sent although the v1.0 schema lacks it (Graph's PSTN examples send it).
	ClientContext string
}

// RoutingPolicy is a redirect routingPolicy value.
type RoutingPolicy string

// Routing policies Graph documents.
const (
	RoutingNone                         RoutingPolicy = "none"
	RoutingNoMissedCall                 RoutingPolicy = "noMissedCall"
	RoutingDisableForwardingExceptPhone RoutingPolicy = "disableForwardingExceptPhone"
	RoutingDisableForwarding            RoutingPolicy = "disableForwarding"
	RoutingPreferSkypeForBusiness       RoutingPolicy = "preferSkypeForBusiness"
)

// RedirectRequest is a redirect action on a call not answered yet.
type RedirectRequest struct {
	// Targets holds 1 to MaxRedirectTargets parties; more than one ring simultaneously and the
	// first to pick up wins. Phone targets need the call to have reached an application instance.
	Targets []Party
	// TimeoutSec is 15 to 90, or 0 for Graph's default (55 s for one target, 60 s for more).
	TimeoutSec int
	// CallbackURI receives the call's later notifications; may be empty.
	CallbackURI string
	// RoutingPolicies (e.g. RoutingDisableForwarding so an agent's own forwarding rules do not
	// take the call elsewhere) are sent although the v1.0 schema lacks them.
	RoutingPolicies []RoutingPolicy
}

// CreateCallRequest is an outbound call with service-hosted media: to a PSTN number (Source
// must then be the application instance that owns a number, and TenantID set) or to Teams users.
type CreateCallRequest struct {
	// Source is the application instance (resource account) placing the call; leave it zero to
	// call as the bot application itself (Teams targets only).
	Source Party
	// Targets holds the parties called (at least one).
	Targets []Party
	// TenantID is the tenant of the call; required for PSTN targets.
	TenantID string
	// CallbackURI (https) receives the call's notifications.
	CallbackURI string
	// ContentSharingNotifications asks for contentSharingSession notifications.
	ContentSharingNotifications bool
	// PrefetchMedia lists prompts Graph should cache for the call.
	PrefetchMedia []MediaPrompt
}

type tenantKey struct{}

// WithTenantID returns a context naming the tenant a request acts for (the tenant of the call,
// from the validated callback token). A multi-tenant adapter fetches its token for that tenant.
func WithTenantID(ctx context.Context, tenantID string) context.Context {
	if tenantID == "" {
		return ctx
	}
	return context.WithValue(ctx, tenantKey{}, tenantID)
}

// TenantID returns the tenant stored by WithTenantID, or "".
func TenantID(ctx context.Context) string {
	s, _ := ctx.Value(tenantKey{}).(string)
	return s
}

type incomingAtKey struct{}

// WithIncomingAt returns a context recording when callbot first saw the incoming call, so that
// answer can be bounded by AnswerDeadline from that moment and its latency measured from it.
func WithIncomingAt(ctx context.Context, t time.Time) context.Context {
	if t.IsZero() {
		return ctx
	}
	return context.WithValue(ctx, incomingAtKey{}, t)
}

// IncomingAt returns the time stored by WithIncomingAt, if any.
func IncomingAt(ctx context.Context) (time.Time, bool) {
	t, ok := ctx.Value(incomingAtKey{}).(time.Time)
	return t, ok
}

// Outcome classifies a failed outbound request by whether Graph may have acted on it.
type Outcome int

// Outcomes, from Classify.
const (
	// Succeeded: no error.
	Succeeded Outcome = iota
	// NotProcessed: Graph did not act (429 Too Many Requests, or ErrNotSent). Repeating is safe.
	NotProcessed
	// Refused: Graph (or argument validation) refused the request and did not act: a 4xx other
	// than 429, or ErrInvalidArgument. Repeating gives the same answer; a 404 means the call is gone.
	Refused
	// Ambiguous: the request may or may not have taken effect (a 5xx, a timeout, a connection
	// lost after the request was written, any unknown error). Before repeating an action that is
	// not idempotent (answer, reject, redirect, transfer, invite, create call, playPrompt,
	// recordResponse) reconcile with GET /communications/calls/{id} or the next notification.
	Ambiguous
)

func (o Outcome) String() string {
	switch o {
	case Succeeded:
		return "succeeded"
	case NotProcessed:
		return "not processed"
	case Refused:
		return "refused"
	case Ambiguous:
		return "ambiguous"
	}
	return "unknown"
}

// Classify says whether Graph may have acted on a request that returned err:
//
//	err                                          outcome
//	nil                                          Succeeded
//	wraps ErrInvalidArgument                     Refused
//	wraps ErrNotSent                             NotProcessed
//	*Error with status 429                       NotProcessed
//	*Error with another status below 500         Refused
//	*Error with status 500 and above             Ambiguous
//	anything else (timeout, connection reset...) Ambiguous
func Classify(err error) Outcome {
	if err == nil {
		return Succeeded
	}
	if errors.Is(err, ErrInvalidArgument) {
		return Refused
	}
	if errors.Is(err, ErrNotSent) {
		return NotProcessed
	}
	var ge *Error
	if errors.As(err, &ge) {
		switch {
		case ge.Status == 429:
			return NotProcessed
		case ge.Status < 500:
			return Refused
		}
	}
	return Ambiguous
}

// IsAmbiguous reports whether a failed request may have taken effect (Classify(err) ==
// Ambiguous): the caller must reconcile (GET the call or wait for its next notification)
// before repeating an action that is not idempotent.
func IsAmbiguous(err error) bool { return Classify(err) == Ambiguous }

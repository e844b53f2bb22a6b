package msgraph

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"path"
	"strings"
	"unicode/utf8"

	abs "github.com/microsoft/kiota-abstractions-go"
	"github.com/microsoftgraph/msgraph-sdk-go/communications"
	"github.com/microsoftgraph/msgraph-sdk-go/models"

	"github.com/callbot/callbot/internal/graph"
)

// ErrInvalidArgument is wrapped by errors returned before any request is sent because an
// argument breaks a documented Graph limit (too many prompts, targets or presence ids, a
// redirect timeout outside 15-90 s, a clientContext over 256 characters, a party without an id,
// an unknown reject reason...). It is graph.ErrInvalidArgument, so graph.Classify sees it.
var ErrInvalidArgument = graph.ErrInvalidArgument

func invalid(op, callID, format string, args ...any) error {
	return fmt.Errorf("%s call %s: %w: %s", op, callID, ErrInvalidArgument, fmt.Sprintf(format, args...))
}

// checkClientContext enforces Graph's 256-character limit on clientContext.
func checkClientContext(op, callID, clientContext string) error {
	if n := utf8.RuneCountInString(clientContext); n > graph.MaxClientContext {
		return invalid(op, callID, "clientContext has %d characters, at most %d", n, graph.MaxClientContext)
	}
	return nil
}

func (c *Client) call(callID string) *communications.CallsCallItemRequestBuilder {
	return c.comms.Calls().ByCallId(callID)
}

// callURL is the URL of a call, or of one of its actions: ".../communications/calls/{id}/action".
// The SDK's builders made from a URL (New...RequestBuilder(rawUrl, adapter)) parse it once per
// request, where the builders chained from Calls().ByCallId() expand kiota's URI template twice
// (for the authentication provider's host check, then for the request): 14% less client CPU per
// request (BenchmarkPlayPrompt, BenchmarkAnswer), on the commands every call sends.
func (c *Client) callURL(callID, action string) string {
	u := c.callsURL + "/" + escapeSegment(callID)
	if action != "" {
		u += "/" + action
	}
	return u
}

// escapeSegment percent-encodes s as kiota's URI template does a path parameter (RFC 6570 simple
// expansion): every byte but the unreserved characters A-Z a-z 0-9 - . _ ~.
func escapeSegment(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch ch := s[i]; {
		case 'a' <= ch && ch <= 'z', 'A' <= ch && ch <= 'Z', '0' <= ch && ch <= '9', ch == '-', ch == '.', ch == '_', ch == '~':
			b.WriteByte(ch)
		default:
			b.WriteByte('%')
			b.WriteByte(hex[ch>>4])
			b.WriteByte(hex[ch&15])
		}
	}
	return b.String()
}

// Answer answers an incoming call with service-hosted media (POST /communications/calls/{id}/answer):
// acceptedModalities ["audio"], serviceHostedMediaConfig pre-fetching req.PrefetchMedia, and
// req.CallbackURI for the call's later notifications. Graph replies 202 with no body.
//
// Graph drops a call not answered within 15 s of the incoming notification, so Answer is bounded
// by min(Config.Timeout, 14 s) and, when ctx carries graph.WithIncomingAt, by 14 s after that
// moment. A successful answer's latency is recorded in AnswerLatency. A 429 or a request that
// never left is sent once more if the deadline allows; any other failure is returned at once.
// Errors: *graph.Error for a Graph failure, else a transport or context error (graph.Classify
// says whether Graph may have acted).
func (c *Client) Answer(ctx context.Context, callID string, req graph.AnswerRequest) error {
	return c.AnswerWithOptions(ctx, callID, req, AnswerOptions{})
}

// AnswerOptions are the answer fields callbot's IVR does not need.
type AnswerOptions struct {
	// AppHostedMediaBlob, when set, answers with application-hosted media (the media session
	// configuration blob of the bot's own media stack) instead of service-hosted media;
	// AnswerRequest.PrefetchMedia is then ignored.
	AppHostedMediaBlob string
	// ContentSharingNotifications sends callOptions (incomingCallOptions) asking for
	// contentSharingSession notifications.
	ContentSharingNotifications bool
	// ParticipantCapacity is the number of participants a policy-recording bot handles; 0 omits it.
	ParticipantCapacity int
}

// AnswerWithOptions is Answer with the options callbot's IVR does not use. Errors as Answer.
func (c *Client) AnswerWithOptions(ctx context.Context, callID string, req graph.AnswerRequest, opts AnswerOptions) error {
	if opts.ParticipantCapacity < 0 || opts.ParticipantCapacity > math.MaxInt32 {
		return invalid("answer", callID, "participant capacity %d", opts.ParticipantCapacity)
	}
	now := c.now()
	start := now
	deadline := now.Add(min(c.timeout, graph.AnswerDeadline-answerMargin))
	if t, ok := graph.IncomingAt(ctx); ok {
		start = t
		if d := t.Add(graph.AnswerDeadline - answerMargin); d.Before(deadline) {
			deadline = d
		}
	}
	ctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()

	body := communications.NewCallsItemAnswerPostRequestBody()
	body.SetAcceptedModalities([]models.Modality{models.AUDIO_MODALITY})
	if req.CallbackURI != "" {
		body.SetCallbackUri(ptr(req.CallbackURI))
	}
	if opts.AppHostedMediaBlob != "" {
		media := models.NewAppHostedMediaConfig()
		media.SetBlob(ptr(opts.AppHostedMediaBlob))
		body.SetMediaConfig(media)
	} else {
		body.SetMediaConfig(serviceHostedMedia(req.PrefetchMedia))
	}
	if opts.ContentSharingNotifications {
		co := models.NewIncomingCallOptions()
		co.SetIsContentSharingNotificationEnabled(ptr(true))
		body.SetCallOptions(co)
	}
	if opts.ParticipantCapacity > 0 {
		body.SetParticipantCapacity(ptr(int32(opts.ParticipantCapacity)))
	}
	_, err := c.do(ctx, "answer", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return communications.NewCallsItemAnswerRequestBuilder(c.callURL(callID, "answer"), c.adapter).Post(ctx, body,
			&communications.CallsItemAnswerRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	if err == nil {
		c.answerLatency.Observe(c.now().Sub(start))
	}
	return err
}

func serviceHostedMedia(prefetch []graph.MediaPrompt) *models.ServiceHostedMediaConfig {
	media := models.NewServiceHostedMediaConfig()
	if len(prefetch) > 0 {
		infos := make([]models.MediaInfoable, len(prefetch))
		for i, p := range prefetch {
			infos[i] = mediaInfo(p)
		}
		media.SetPreFetchMedia(infos)
	}
	return media
}

// Reject rejects an incoming call (POST /communications/calls/{id}/reject) with reason none,
// busy or forbidden ("" means none). Errors: ErrInvalidArgument for another reason, else as Answer.
func (c *Client) Reject(ctx context.Context, callID string, reason graph.RejectReason) error {
	if reason == "" {
		reason = graph.RejectNone
	}
	parsed, _ := models.ParseRejectReason(string(reason))
	rr, ok := parsed.(*models.RejectReason)
	if !ok || rr == nil {
		return invalid("reject", callID, "unknown reject reason %q", reason)
	}
	body := communications.NewCallsItemRejectPostRequestBody()
	body.SetReason(rr)
	_, err := c.do(ctx, "reject", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return communications.NewCallsItemRejectRequestBuilder(c.callURL(callID, "reject"), c.adapter).Post(ctx, body,
			&communications.CallsItemRejectRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// PlayPrompt queues 1 to 20 service-hosted prompts (POST /communications/calls/{id}/playPrompt)
// and returns the playPromptOperation Graph created, its status normalised (Graph sends
// "running"; the SDK would drop it). Only a 429 or a request that never left is sent again: a
// repeat after an ambiguous failure could queue the prompts twice, so the caller cancels media
// processing first. Errors: ErrInvalidArgument for 0 or more than 20 prompts, a prompt without
// URI or a clientContext over 256 characters, else as Answer.
func (c *Client) PlayPrompt(ctx context.Context, callID string, prompts []graph.MediaPrompt, clientContext string) (graph.Operation, error) {
	if len(prompts) == 0 || len(prompts) > graph.MaxPrompts {
		return graph.Operation{}, invalid("playPrompt", callID, "%d prompts, want 1 to %d", len(prompts), graph.MaxPrompts)
	}
	if err := checkClientContext("playPrompt", callID, clientContext); err != nil {
		return graph.Operation{}, err
	}
	list, err := mediaPrompts("playPrompt", callID, prompts)
	if err != nil {
		return graph.Operation{}, err
	}
	body := communications.NewCallsItemPlayPromptPostRequestBody()
	body.SetPrompts(list)
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, "playPrompt", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsItemPlayPromptRequestBuilder(c.callURL(callID, "playPrompt"), c.adapter).Post(ctx, body,
			&communications.CallsItemPlayPromptRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation("playPrompt", callID, r)
}

// SubscribeToTone asks Graph to report DTMF tones as call notifications
// (POST /communications/calls/{id}/subscribeToTone) and returns the operation (normally
// completed). Idempotent: retried after transient failures. Errors as PlayPrompt.
func (c *Client) SubscribeToTone(ctx context.Context, callID, clientContext string) (graph.Operation, error) {
	if err := checkClientContext("subscribeToTone", callID, clientContext); err != nil {
		return graph.Operation{}, err
	}
	body := communications.NewCallsItemSubscribeToTonePostRequestBody()
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, "subscribeToTone", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsItemSubscribeToToneRequestBuilder(c.callURL(callID, "subscribeToTone"), c.adapter).Post(ctx, body,
			&communications.CallsItemSubscribeToToneRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation("subscribeToTone", callID, r)
}

// CancelMediaProcessing cancels the running and queued playPrompt/recordResponse operations
// (POST /communications/calls/{id}/cancelMediaProcessing) and returns the operation.
// Idempotent: retried after transient failures. Errors as PlayPrompt.
func (c *Client) CancelMediaProcessing(ctx context.Context, callID, clientContext string) (graph.Operation, error) {
	if err := checkClientContext("cancelMediaProcessing", callID, clientContext); err != nil {
		return graph.Operation{}, err
	}
	body := communications.NewCallsItemCancelMediaProcessingPostRequestBody()
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, "cancelMediaProcessing", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsItemCancelMediaProcessingRequestBuilder(c.callURL(callID, "cancelMediaProcessing"), c.adapter).Post(ctx, body,
			&communications.CallsItemCancelMediaProcessingRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation("cancelMediaProcessing", callID, r)
}

// Transfer blind-transfers the call to target (POST /communications/calls/{id}/transfer):
// transferTarget is an invitationParticipantInfo with endpointType "default" and the identity
// graph.IdentitySetFor(target) (a Teams user, or a phone number for PSTN). clientContext is
// sent although the v1.0 schema lacks it (Graph's PSTN examples send it). The outcome arrives
// as notifications. Errors: ErrInvalidArgument for a target without id, else as Answer.
func (c *Client) Transfer(ctx context.Context, callID string, target graph.Party, clientContext string) error {
	return c.TransferWith(ctx, callID, graph.TransferRequest{Target: target, ClientContext: clientContext})
}

// TransferConsultative transfers the call to target replacing replacesCallID, the bot's own
// call with target (consultative transfer: the target already talks to the bot). Errors as
// Transfer.
func (c *Client) TransferConsultative(ctx context.Context, callID string, target graph.Party, replacesCallID, clientContext string) error {
	if replacesCallID == "" {
		return invalid("transfer", callID, "consultative transfer without replacesCallId")
	}
	return c.TransferWith(ctx, callID, graph.TransferRequest{
		Target: target, ReplacesCallID: replacesCallID, ClientContext: clientContext,
	})
}

// TransferWith sends a transfer with every option of graph.TransferRequest: consultative
// (ReplacesCallID), target language and region hints, and the transferee when transferring out
// of a group call. Never repeated after an ambiguous failure. Errors as Transfer.
func (c *Client) TransferWith(ctx context.Context, callID string, req graph.TransferRequest) error {
	if req.Target.ID == "" {
		return invalid("transfer", callID, "transfer target has no id")
	}
	if req.Transferee != nil && req.Transferee.ID == "" {
		return invalid("transfer", callID, "transferee has no id")
	}
	if err := checkClientContext("transfer", callID, req.ClientContext); err != nil {
		return err
	}
	info := participantInfo(req.Target)
	// The v1.0 invitationParticipantInfo model has no endpointType, languageId or region.
	addData(info, "endpointType", "default")
	if req.LanguageID != "" {
		addData(info, "languageId", req.LanguageID)
	}
	if req.Region != "" {
		addData(info, "region", req.Region)
	}
	if req.ReplacesCallID != "" {
		info.SetReplacesCallId(ptr(req.ReplacesCallID))
	}
	body := communications.NewCallsItemTransferPostRequestBody()
	body.SetTransferTarget(info)
	if req.Transferee != nil {
		body.SetTransferee(plainParticipantInfo(*req.Transferee, req.TransfereeParticipantID))
	}
	if req.ClientContext != "" {
		addData(body, "clientContext", req.ClientContext)
	}
	_, err := c.do(ctx, "transfer", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return communications.NewCallsItemTransferRequestBuilder(c.callURL(callID, "transfer"), c.adapter).Post(ctx, body,
			&communications.CallsItemTransferRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// Redirect forwards a call that is not answered yet (POST /communications/calls/{id}/redirect)
// to 1-25 targets (more than one rings them simultaneously). timeoutSec is 15-90, or 0 to leave
// Graph's default; callbackURI may be empty. Errors: ErrInvalidArgument for bad targets or
// timeout, else as Answer.
func (c *Client) Redirect(ctx context.Context, callID string, targets []graph.Party, timeoutSec int, callbackURI string) error {
	return c.RedirectWith(ctx, callID, graph.RedirectRequest{Targets: targets, TimeoutSec: timeoutSec, CallbackURI: callbackURI})
}

var routingPolicies = map[graph.RoutingPolicy]bool{
	graph.RoutingNone: true, graph.RoutingNoMissedCall: true, graph.RoutingDisableForwardingExceptPhone: true,
	graph.RoutingDisableForwarding: true, graph.RoutingPreferSkypeForBusiness: true,
}

// RedirectWith is Redirect with routing policies (sent as routingPolicies, which the v1.0 SDK
// body lacks). Phone targets are allowed: Graph accepts them for calls that reached an
// application instance with a number. Never repeated after an ambiguous failure. Errors as
// Redirect, and ErrInvalidArgument for an unknown routing policy.
func (c *Client) RedirectWith(ctx context.Context, callID string, req graph.RedirectRequest) error {
	if len(req.Targets) == 0 || len(req.Targets) > graph.MaxRedirectTargets {
		return invalid("redirect", callID, "%d targets, want 1 to %d", len(req.Targets), graph.MaxRedirectTargets)
	}
	if req.TimeoutSec != 0 && (req.TimeoutSec < graph.MinRedirectTimeoutSec || req.TimeoutSec > graph.MaxRedirectTimeoutSec) {
		return invalid("redirect", callID, "timeout %ds, want %d to %d", req.TimeoutSec,
			graph.MinRedirectTimeoutSec, graph.MaxRedirectTimeoutSec)
	}
	list := make([]models.InvitationParticipantInfoable, len(req.Targets))
	for i, t := range req.Targets {
		if t.ID == "" {
			return invalid("redirect", callID, "redirect target %d has no id", i)
		}
		list[i] = participantInfo(t)
	}
	policies := make([]any, len(req.RoutingPolicies))
	for i, p := range req.RoutingPolicies {
		if !routingPolicies[p] {
			return invalid("redirect", callID, "unknown routing policy %q", p)
		}
		policies[i] = string(p)
	}
	body := communications.NewCallsItemRedirectPostRequestBody()
	body.SetTargets(list)
	if req.TimeoutSec != 0 {
		body.SetTimeout(ptr(int32(req.TimeoutSec)))
	}
	if req.CallbackURI != "" {
		body.SetCallbackUri(ptr(req.CallbackURI))
	}
	if len(policies) > 0 {
		addData(body, "routingPolicies", policies)
	}
	_, err := c.do(ctx, "redirect", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return communications.NewCallsItemRedirectRequestBuilder(c.callURL(callID, "redirect"), c.adapter).Post(ctx, body,
			&communications.CallsItemRedirectRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// Hangup leaves the call (DELETE /communications/calls/{id}; 204). Idempotent: retried after
// transient failures. Errors as Answer; a call that is already gone (perhaps by an earlier
// attempt) gives a *graph.Error matching graph.ErrCallGone.
func (c *Client) Hangup(ctx context.Context, callID string) error {
	_, err := c.do(ctx, "hangup", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return communications.NewCallsCallItemRequestBuilder(c.callURL(callID, ""), c.adapter).Delete(ctx,
			&communications.CallsCallItemRequestBuilderDeleteRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// KeepAlive tells Graph the bot still holds the call (POST /communications/calls/{id}/keepAlive);
// without one at least every 45 minutes Graph drops the call. A 404 (errors.Is(err,
// graph.ErrCallGone)) means the call is gone. Idempotent: retried after transient failures.
// Errors as Answer.
func (c *Client) KeepAlive(ctx context.Context, callID string) error {
	_, err := c.do(ctx, "keepAlive", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return communications.NewCallsItemKeepAliveRequestBuilder(c.callURL(callID, "keepAlive"), c.adapter).Post(ctx,
			&communications.CallsItemKeepAliveRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// GetCall reads the call's current state (GET /communications/calls/{id}), normalised with
// graph.ParseCallState; use it to reconcile after an ambiguous failure. A 404 gives a
// *graph.Error with Status 404 (errors.Is(err, graph.ErrCallGone)). Idempotent: retried after
// transient failures. Errors otherwise as Answer.
func (c *Client) GetCall(ctx context.Context, callID string) (graph.CallState, error) {
	r, err := c.do(ctx, "getCall", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsCallItemRequestBuilder(c.callURL(callID, ""), c.adapter).Get(ctx,
			&communications.CallsCallItemRequestBuilderGetRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return "", err
	}
	var call struct {
		State string `json:"state"`
	}
	if err := json.Unmarshal(r.body, &call); err != nil {
		return "", fmt.Errorf("getCall call %s: decode response: %w", callID, err)
	}
	if call.State == "" {
		return "", fmt.Errorf("getCall call %s: response has no state", callID)
	}
	return graph.ParseCallState(call.State), nil
}

// Participants reads the call's roster (GET /communications/calls/{id}/participants): who is
// in the call now, the bot included. callbot reads it when an invite's outcome or an agent's
// leaving may not have been notified. Graph serves it for group calls (a call an invited agent
// joined) and refuses it for peer-to-peer calls. A 404 gives a *graph.Error matching
// graph.ErrCallGone. Idempotent: retried after transient failures. Errors otherwise as Answer.
func (c *Client) Participants(ctx context.Context, callID string) ([]graph.Participant, error) {
	r, err := c.do(ctx, "listParticipants", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsItemParticipantsRequestBuilder(c.callURL(callID, "participants"), c.adapter).Get(ctx,
			&communications.CallsItemParticipantsRequestBuilderGetRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return nil, err
	}
	var list struct {
		Value []graph.Participant `json:"value"`
	}
	if err := json.Unmarshal(r.body, &list); err != nil {
		return nil, fmt.Errorf("listParticipants call %s: decode response: %w", callID, err)
	}
	if list.Value == nil {
		return nil, fmt.Errorf("listParticipants call %s: response has no value", callID)
	}
	return list.Value, nil
}

// Presences reads the Teams presence of up to graph.MaxPresenceIDs users in one request
// (POST /communications/getPresencesByUserId). Availability and activity are returned as Graph
// wrote them. No request is made for an empty list. Idempotent: retried after transient
// failures. Errors: ErrInvalidArgument for more than
// graph.MaxPresenceIDs ids (no request is sent), *graph.Error for a Graph failure, else a
// transport or context error.
func (c *Client) Presences(ctx context.Context, userIDs []string) ([]graph.Presence, error) {
	if len(userIDs) > graph.MaxPresenceIDs {
		return nil, fmt.Errorf("getPresencesByUserId: %w: %d ids, at most %d per request",
			ErrInvalidArgument, len(userIDs), graph.MaxPresenceIDs)
	}
	if len(userIDs) == 0 {
		return nil, nil
	}
	body := communications.NewGetPresencesByUserIdPostRequestBody()
	body.SetIds(userIDs)
	r, err := c.do(ctx, "getPresencesByUserId", "", func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.comms.GetPresencesByUserId().PostAsGetPresencesByUserIdPostResponse(ctx, body,
			&communications.GetPresencesByUserIdRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return nil, err
	}
	var resp struct {
		Value []graph.Presence `json:"value"`
	}
	if err := json.Unmarshal(r.body, &resp); err != nil {
		return nil, fmt.Errorf("getPresencesByUserId: decode response: %w", err)
	}
	return resp.Value, nil
}

// operation decodes a commsOperation from a 2xx reply. When Graph sent no body (202), the
// operation id is taken from the Location header, if any, and the status is left empty.
func operation(op, callID string, r reply) (graph.Operation, error) {
	var o graph.Operation
	if len(strings.TrimSpace(string(r.body))) == 0 {
		if loc := r.header.Get("Location"); loc != "" {
			o.ID = path.Base(loc)
		}
		return o, nil
	}
	if err := json.Unmarshal(r.body, &o); err != nil {
		return graph.Operation{}, fmt.Errorf("%s call %s: decode operation: %w", op, callID, err)
	}
	if o.Status != "" {
		o.Status = graph.ParseOperationStatus(string(o.Status))
	}
	return o, nil
}

func mediaInfo(p graph.MediaPrompt) models.MediaInfoable {
	m := models.NewMediaInfo()
	m.SetOdataType(ptr("#microsoft.graph.mediaInfo"))
	m.SetUri(ptr(p.URI))
	if p.ResourceID != "" {
		m.SetResourceId(ptr(p.ResourceID))
	}
	return m
}

// participantInfo builds the invitationParticipantInfo naming p.
func participantInfo(p graph.Party) *models.InvitationParticipantInfo {
	info := models.NewInvitationParticipantInfo()
	info.SetOdataType(ptr("#microsoft.graph.invitationParticipantInfo"))
	info.SetIdentity(identitySet(p))
	return info
}

// plainParticipantInfo builds the participantInfo naming p (a transferee, a call's source).
func plainParticipantInfo(p graph.Party, participantID string) *models.ParticipantInfo {
	info := models.NewParticipantInfo()
	info.SetOdataType(ptr("#microsoft.graph.participantInfo"))
	info.SetIdentity(identitySet(p))
	if participantID != "" {
		info.SetParticipantId(ptr(participantID))
	}
	return info
}

// identitySet builds the identity set naming p. User and application identities go in a plain
// identitySet; phone, applicationInstance, guest and encrypted exist only on
// communicationsIdentitySet.
func identitySet(p graph.Party) models.IdentitySetable {
	s := graph.IdentitySetFor(p)
	if s.Phone != nil || s.ApplicationInstance != nil || s.Guest != nil || s.Encrypted != nil {
		cs := models.NewCommunicationsIdentitySet()
		setIdentity(cs.SetPhone, s.Phone)
		setIdentity(cs.SetApplicationInstance, s.ApplicationInstance)
		setIdentity(cs.SetGuest, s.Guest)
		setIdentity(cs.SetEncrypted, s.Encrypted)
		setIdentity(cs.SetUser, s.User)
		setIdentity(cs.SetApplication, s.Application)
		return cs
	}
	is := models.NewIdentitySet()
	is.SetOdataType(ptr("#microsoft.graph.identitySet"))
	setIdentity(is.SetUser, s.User)
	setIdentity(is.SetApplication, s.Application)
	return is
}

// mediaPrompts builds the mediaPrompt list of playPrompt or recordResponse.
func mediaPrompts(op, callID string, prompts []graph.MediaPrompt) ([]models.Promptable, error) {
	list := make([]models.Promptable, len(prompts))
	for i, p := range prompts {
		if p.URI == "" {
			return nil, invalid(op, callID, "prompt %d has no uri", i)
		}
		list[i] = mediaPrompt(p)
	}
	return list, nil
}

func mediaPrompt(p graph.MediaPrompt) *models.MediaPrompt {
	mp := models.NewMediaPrompt()
	mp.SetMediaInfo(mediaInfo(p))
	return mp
}

func setIdentity(set func(models.Identityable), id *graph.Identity) {
	if id == nil {
		return
	}
	m := models.NewIdentity()
	m.SetOdataType(ptr("#microsoft.graph.identity"))
	m.SetId(ptr(id.ID))
	if id.DisplayName != "" {
		m.SetDisplayName(ptr(id.DisplayName))
	}
	if id.TenantID != "" {
		// models.Identity (v1.0) has no tenantId property.
		addData(m, "tenantId", id.TenantID)
	}
	set(m)
}

// addData sets an extra wire property the v1.0 model lacks.
func addData(m interface {
	GetAdditionalData() map[string]any
	SetAdditionalData(map[string]any)
}, key string, value any) {
	d := make(map[string]any, len(m.GetAdditionalData())+1)
	for k, v := range m.GetAdditionalData() {
		d[k] = v
	}
	d[key] = value
	m.SetAdditionalData(d)
}

func ptr[T any](v T) *T { return &v }

package msgraph

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"strings"

	abs "github.com/microsoft/kiota-abstractions-go"
	"github.com/microsoftgraph/msgraph-sdk-go/communications"
	"github.com/microsoftgraph/msgraph-sdk-go/models"

	"github.com/callbot/callbot/internal/graph"
)

// Limits Graph documents for call actions.
const (
	maxPrompts         = 20
	minRedirectTimeout = 15
	maxRedirectTimeout = 90
	maxRedirectTargets = 25
)

// ErrInvalidArgument is wrapped by errors returned before any request is sent because an
// argument breaks a documented Graph limit (too many prompts or presence ids, a party without
// an id, an unknown reject reason...).
var ErrInvalidArgument = errors.New("invalid argument")

func invalid(op, callID, format string, args ...any) error {
	return fmt.Errorf("%s call %s: %w: %s", op, callID, ErrInvalidArgument, fmt.Sprintf(format, args...))
}

func (c *Client) call(callID string) *communications.CallsCallItemRequestBuilder {
	return c.comms.Calls().ByCallId(callID)
}

// Answer answers an incoming call with service-hosted media (POST /communications/calls/{id}/answer):
// acceptedModalities ["audio"], serviceHostedMediaConfig pre-fetching req.PrefetchMedia, and
// req.CallbackURI for the call's later notifications. Graph replies 202 with no body.
// Errors: *graph.Error for a Graph failure, else a transport or context error.
func (c *Client) Answer(ctx context.Context, callID string, req graph.AnswerRequest) error {
	body := communications.NewCallsItemAnswerPostRequestBody()
	body.SetAcceptedModalities([]models.Modality{models.AUDIO_MODALITY})
	if req.CallbackURI != "" {
		body.SetCallbackUri(ptr(req.CallbackURI))
	}
	media := models.NewServiceHostedMediaConfig()
	if len(req.PrefetchMedia) > 0 {
		infos := make([]models.MediaInfoable, len(req.PrefetchMedia))
		for i, p := range req.PrefetchMedia {
			infos[i] = mediaInfo(p)
		}
		media.SetPreFetchMedia(infos)
	}
	body.SetMediaConfig(media)
	_, err := c.do(ctx, "answer", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return c.call(callID).Answer().Post(ctx, body,
			&communications.CallsItemAnswerRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
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
		return c.call(callID).Reject().Post(ctx, body,
			&communications.CallsItemRejectRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// PlayPrompt queues 1 to 20 service-hosted prompts (POST /communications/calls/{id}/playPrompt)
// and returns the playPromptOperation Graph created, its status normalised (Graph sends
// "running"; the SDK would drop it). Errors: ErrInvalidArgument for 0 or more than 20 prompts,
// else as Answer.
func (c *Client) PlayPrompt(ctx context.Context, callID string, prompts []graph.MediaPrompt, clientContext string) (graph.Operation, error) {
	if len(prompts) == 0 || len(prompts) > maxPrompts {
		return graph.Operation{}, invalid("playPrompt", callID, "%d prompts, want 1 to %d", len(prompts), maxPrompts)
	}
	body := communications.NewCallsItemPlayPromptPostRequestBody()
	list := make([]models.Promptable, len(prompts))
	for i, p := range prompts {
		mp := models.NewMediaPrompt()
		mp.SetMediaInfo(mediaInfo(p))
		list[i] = mp
	}
	body.SetPrompts(list)
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, "playPrompt", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).PlayPrompt().Post(ctx, body,
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
// completed). Errors as Answer.
func (c *Client) SubscribeToTone(ctx context.Context, callID, clientContext string) (graph.Operation, error) {
	body := communications.NewCallsItemSubscribeToTonePostRequestBody()
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, "subscribeToTone", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).SubscribeToTone().Post(ctx, body,
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
// Errors as Answer.
func (c *Client) CancelMediaProcessing(ctx context.Context, callID, clientContext string) (graph.Operation, error) {
	body := communications.NewCallsItemCancelMediaProcessingPostRequestBody()
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, "cancelMediaProcessing", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).CancelMediaProcessing().Post(ctx, body,
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
	if target.ID == "" {
		return invalid("transfer", callID, "transfer target has no id")
	}
	info := participantInfo(target)
	// The v1.0 invitationParticipantInfo model has no endpointType property.
	addData(info, "endpointType", "default")
	body := communications.NewCallsItemTransferPostRequestBody()
	body.SetTransferTarget(info)
	if clientContext != "" {
		addData(body, "clientContext", clientContext)
	}
	_, err := c.do(ctx, "transfer", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return c.call(callID).Transfer().Post(ctx, body,
			&communications.CallsItemTransferRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// Redirect forwards a call that is not answered yet (POST /communications/calls/{id}/redirect)
// to 1-25 targets (more than one rings them simultaneously). timeoutSec is 15-90, or 0 to leave
// Graph's default; callbackURI may be empty. Errors: ErrInvalidArgument for bad targets or
// timeout, else as Answer.
func (c *Client) Redirect(ctx context.Context, callID string, targets []graph.Party, timeoutSec int, callbackURI string) error {
	if len(targets) == 0 || len(targets) > maxRedirectTargets {
		return invalid("redirect", callID, "%d targets, want 1 to %d", len(targets), maxRedirectTargets)
	}
	if timeoutSec != 0 && (timeoutSec < minRedirectTimeout || timeoutSec > maxRedirectTimeout) {
		return invalid("redirect", callID, "timeout %ds, want %d to %d", timeoutSec, minRedirectTimeout, maxRedirectTimeout)
	}
	list := make([]models.InvitationParticipantInfoable, len(targets))
	for i, t := range targets {
		if t.ID == "" {
			return invalid("redirect", callID, "redirect target %d has no id", i)
		}
		list[i] = participantInfo(t)
	}
	body := communications.NewCallsItemRedirectPostRequestBody()
	body.SetTargets(list)
	if timeoutSec != 0 {
		t := int32(timeoutSec)
		body.SetTimeout(&t)
	}
	if callbackURI != "" {
		body.SetCallbackUri(ptr(callbackURI))
	}
	_, err := c.do(ctx, "redirect", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return c.call(callID).Redirect().Post(ctx, body,
			&communications.CallsItemRedirectRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// Hangup leaves the call (DELETE /communications/calls/{id}; 204). Errors as Answer; a call
// that is already gone gives a *graph.Error matching graph.ErrCallGone.
func (c *Client) Hangup(ctx context.Context, callID string) error {
	_, err := c.do(ctx, "hangup", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return c.call(callID).Delete(ctx,
			&communications.CallsCallItemRequestBuilderDeleteRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// KeepAlive tells Graph the bot still holds the call (POST /communications/calls/{id}/keepAlive);
// without one at least every 45 minutes Graph drops the call. A 404 (errors.Is(err,
// graph.ErrCallGone)) means the call is gone. Errors as Answer.
func (c *Client) KeepAlive(ctx context.Context, callID string) error {
	_, err := c.do(ctx, "keepAlive", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		return c.call(callID).KeepAlive().Post(ctx,
			&communications.CallsItemKeepAliveRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
	})
	return err
}

// GetCall reads the call's current state (GET /communications/calls/{id}), normalised with
// graph.ParseCallState; use it to reconcile after an ambiguous failure. A 404 gives a
// *graph.Error with Status 404 (errors.Is(err, graph.ErrCallGone)). Errors otherwise as Answer.
func (c *Client) GetCall(ctx context.Context, callID string) (graph.CallState, error) {
	r, err := c.do(ctx, "getCall", callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).Get(ctx,
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

// Presences reads the Teams presence of up to graph.MaxPresenceIDs users in one request
// (POST /communications/getPresencesByUserId). Availability and activity are returned as Graph
// wrote them. No request is made for an empty list. Errors: ErrInvalidArgument for more than
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

// participantInfo builds the invitationParticipantInfo naming p. User and application
// identities go in a plain identitySet; phone, applicationInstance, guest and encrypted exist
// only on communicationsIdentitySet.
func participantInfo(p graph.Party) *models.InvitationParticipantInfo {
	s := graph.IdentitySetFor(p)
	info := models.NewInvitationParticipantInfo()
	info.SetOdataType(ptr("#microsoft.graph.invitationParticipantInfo"))
	if s.Phone != nil || s.ApplicationInstance != nil || s.Guest != nil || s.Encrypted != nil {
		cs := models.NewCommunicationsIdentitySet()
		setIdentity(cs.SetPhone, s.Phone)
		setIdentity(cs.SetApplicationInstance, s.ApplicationInstance)
		setIdentity(cs.SetGuest, s.Guest)
		setIdentity(cs.SetEncrypted, s.Encrypted)
		setIdentity(cs.SetUser, s.User)
		setIdentity(cs.SetApplication, s.Application)
		info.SetIdentity(cs)
		return info
	}
	is := models.NewIdentitySet()
	is.SetOdataType(ptr("#microsoft.graph.identitySet"))
	setIdentity(is.SetUser, s.User)
	setIdentity(is.SetApplication, s.Application)
	info.SetIdentity(is)
	return info
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

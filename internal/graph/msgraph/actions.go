package msgraph

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"path"
	"strings"

	abs "github.com/microsoft/kiota-abstractions-go"
	"github.com/microsoftgraph/msgraph-sdk-go/communications"
	"github.com/microsoftgraph/msgraph-sdk-go/models"

	"github.com/callbot/callbot/internal/graph"
)

// stopTones are the DTMF tones recordResponse accepts as stopTones.
var stopTones = map[string]bool{
	"0": true, "1": true, "2": true, "3": true, "4": true, "5": true, "6": true, "7": true, "8": true,
	"9": true, "*": true, "#": true, "A": true, "B": true, "C": true, "D": true,
}

// RecordResponse records what the caller says, after at most one prompt
// (POST /communications/calls/{id}/recordResponse), and returns the recordOperation Graph
// created (normally running; the recording's location arrives with its completion
// notification). Like PlayPrompt it is sent again only after a 429 or a request that never
// left. Errors: ErrInvalidArgument for more than one prompt, a timeout or duration outside
// 1-120 s (0 means Graph's default), an unknown stop tone or a clientContext over 256
// characters, else as Answer.
func (c *Client) RecordResponse(ctx context.Context, callID string, req graph.RecordRequest) (graph.Operation, error) {
	const op = "recordResponse"
	if len(req.Prompts) > graph.MaxRecordPrompts {
		return graph.Operation{}, invalid(op, callID, "%d prompts, at most %d", len(req.Prompts), graph.MaxRecordPrompts)
	}
	for _, s := range []struct {
		name string
		v    int
	}{
		{"initial silence timeout", req.InitialSilenceTimeoutSec},
		{"max silence timeout", req.MaxSilenceTimeoutSec},
		{"max record duration", req.MaxRecordDurationSec},
	} {
		if s.v != 0 && (s.v < graph.MinRecordSeconds || s.v > graph.MaxRecordSeconds) {
			return graph.Operation{}, invalid(op, callID, "%s %ds, want %d to %d", s.name, s.v,
				graph.MinRecordSeconds, graph.MaxRecordSeconds)
		}
	}
	for _, t := range req.StopTones {
		if !stopTones[t] {
			return graph.Operation{}, invalid(op, callID, "unknown stop tone %q", t)
		}
	}
	if err := checkClientContext(op, callID, req.ClientContext); err != nil {
		return graph.Operation{}, err
	}
	prompts, err := mediaPrompts(op, callID, req.Prompts)
	if err != nil {
		return graph.Operation{}, err
	}

	body := communications.NewCallsItemRecordResponsePostRequestBody()
	if len(prompts) > 0 {
		body.SetPrompts(prompts)
	}
	body.SetBargeInAllowed(ptr(req.BargeInAllowed))
	body.SetPlayBeep(ptr(req.PlayBeep))
	if req.InitialSilenceTimeoutSec != 0 {
		body.SetInitialSilenceTimeoutInSeconds(ptr(int32(req.InitialSilenceTimeoutSec)))
	}
	if req.MaxSilenceTimeoutSec != 0 {
		body.SetMaxSilenceTimeoutInSeconds(ptr(int32(req.MaxSilenceTimeoutSec)))
	}
	if req.MaxRecordDurationSec != 0 {
		body.SetMaxRecordDurationInSeconds(ptr(int32(req.MaxRecordDurationSec)))
	}
	if len(req.StopTones) > 0 {
		body.SetStopTones(req.StopTones)
	}
	if req.ClientContext != "" {
		body.SetClientContext(ptr(req.ClientContext))
	}
	r, err := c.do(ctx, op, callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsItemRecordResponseRequestBuilder(c.callURL(callID, "recordResponse"), c.adapter).Post(ctx, body,
			&communications.CallsItemRecordResponseRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation(op, callID, r)
}

// InviteParticipants invites 1 to 5 participants into a group call
// (POST /communications/calls/{id}/participants/invite); an invitee with ReplacesCallID moves
// from the bot's other call into this one. Returns the inviteParticipantsOperation (normally
// running; completion arrives as a notification). Never repeated after an ambiguous failure.
// Errors: ErrInvalidArgument for no or more than 5 participants, one without id or a
// clientContext over 256 characters, else as Answer.
func (c *Client) InviteParticipants(ctx context.Context, callID string, req graph.InviteRequest) (graph.Operation, error) {
	const op = "invite"
	if len(req.Participants) == 0 || len(req.Participants) > graph.MaxInvitees {
		return graph.Operation{}, invalid(op, callID, "%d participants, want 1 to %d", len(req.Participants), graph.MaxInvitees)
	}
	if err := checkClientContext(op, callID, req.ClientContext); err != nil {
		return graph.Operation{}, err
	}
	list := make([]models.InvitationParticipantInfoable, len(req.Participants))
	for i, p := range req.Participants {
		if p.Party.ID == "" {
			return graph.Operation{}, invalid(op, callID, "participant %d has no id", i)
		}
		info := participantInfo(p.Party)
		if p.ReplacesCallID != "" {
			info.SetReplacesCallId(ptr(p.ReplacesCallID))
		}
		list[i] = info
	}
	body := communications.NewCallsItemParticipantsInvitePostRequestBody()
	body.SetParticipants(list)
	if req.ClientContext != "" {
		body.SetClientContext(ptr(req.ClientContext))
	}
	r, err := c.do(ctx, op, callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).Participants().Invite().Post(ctx, body,
			&communications.CallsItemParticipantsInviteRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation(op, callID, r)
}

// StartHoldMusic puts a participant on hold with music
// (POST /communications/calls/{id}/participants/{pid}/startHoldMusic): prompt, or Graph's
// default music when prompt.URI is empty. Only one participant of a call can be on hold.
// Returns the startHoldMusicOperation (completion arrives as a notification). Errors:
// ErrInvalidArgument for an empty participant id or a clientContext over 256 characters, else
// as Answer.
func (c *Client) StartHoldMusic(ctx context.Context, callID, participantID string, prompt graph.MediaPrompt, clientContext string) (graph.Operation, error) {
	const op = "startHoldMusic"
	if participantID == "" {
		return graph.Operation{}, invalid(op, callID, "no participant id")
	}
	if err := checkClientContext(op, callID, clientContext); err != nil {
		return graph.Operation{}, err
	}
	body := communications.NewCallsItemParticipantsItemStartHoldMusicPostRequestBody()
	if prompt.URI != "" {
		body.SetCustomPrompt(mediaPrompt(prompt))
	}
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, op, callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).Participants().ByParticipantId(participantID).StartHoldMusic().Post(ctx, body,
			&communications.CallsItemParticipantsItemStartHoldMusicRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation(op, callID, r)
}

// StopHoldMusic takes a participant off hold
// (POST /communications/calls/{id}/participants/{pid}/stopHoldMusic) and returns the
// stopHoldMusicOperation. Errors as StartHoldMusic.
func (c *Client) StopHoldMusic(ctx context.Context, callID, participantID, clientContext string) (graph.Operation, error) {
	const op = "stopHoldMusic"
	if participantID == "" {
		return graph.Operation{}, invalid(op, callID, "no participant id")
	}
	if err := checkClientContext(op, callID, clientContext); err != nil {
		return graph.Operation{}, err
	}
	body := communications.NewCallsItemParticipantsItemStopHoldMusicPostRequestBody()
	if clientContext != "" {
		body.SetClientContext(ptr(clientContext))
	}
	r, err := c.do(ctx, op, callID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.call(callID).Participants().ByParticipantId(participantID).StopHoldMusic().Post(ctx, body,
			&communications.CallsItemParticipantsItemStopHoldMusicRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return graph.Operation{}, err
	}
	return operation(op, callID, r)
}

// CreateCall places an outbound call with service-hosted audio (POST /communications/calls)
// and returns the id of the call Graph created; its progress arrives as notifications at
// req.CallbackURI. A PSTN target needs req.Source to be the application instance owning a
// number and req.TenantID. Never repeated after an ambiguous failure: look for the call's
// notifications before calling again. Errors: ErrInvalidArgument for no target, a target
// without id, a source that is not an application instance, a PSTN target without source or
// tenant, or a callback URI that is not https; else as Answer.
func (c *Client) CreateCall(ctx context.Context, req graph.CreateCallRequest) (string, error) {
	const op = "createCall"
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%s: %w: %s", op, ErrInvalidArgument, fmt.Sprintf(format, args...))
	}
	if len(req.Targets) == 0 {
		return "", bad("no targets")
	}
	if u, err := url.Parse(req.CallbackURI); err != nil || u.Scheme != "https" || u.Host == "" {
		return "", bad("callback uri %q is not an absolute https URL", req.CallbackURI)
	}
	hasSource := req.Source != (graph.Party{})
	if hasSource && (req.Source.Kind != graph.KindApplicationInstance || req.Source.ID == "") {
		return "", bad("source must be an application instance with an id, not %s", req.Source.Kind)
	}
	targets := make([]models.InvitationParticipantInfoable, len(req.Targets))
	for i, t := range req.Targets {
		if t.ID == "" {
			return "", bad("target %d has no id", i)
		}
		if t.Kind == graph.KindPhone && (!hasSource || req.TenantID == "") {
			return "", bad("a phone target needs an application instance source and a tenant id")
		}
		targets[i] = participantInfo(t)
	}
	for i, p := range req.PrefetchMedia {
		if p.URI == "" {
			return "", bad("prefetch prompt %d has no uri", i)
		}
	}

	call := models.NewCall()
	call.SetOdataType(ptr("#microsoft.graph.call"))
	call.SetCallbackUri(ptr(req.CallbackURI))
	call.SetTargets(targets)
	call.SetRequestedModalities([]models.Modality{models.AUDIO_MODALITY})
	call.SetMediaConfig(serviceHostedMedia(req.PrefetchMedia))
	if hasSource {
		call.SetSource(plainParticipantInfo(req.Source, ""))
	}
	if req.TenantID != "" {
		call.SetTenantId(ptr(req.TenantID))
	}
	if req.ContentSharingNotifications {
		co := models.NewOutgoingCallOptions()
		co.SetIsContentSharingNotificationEnabled(ptr(true))
		call.SetCallOptions(co)
	}
	r, err := c.do(ctx, op, "", func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := c.comms.Calls().Post(ctx, call,
			&communications.CallsRequestBuilderPostRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if err != nil {
		return "", err
	}
	var created struct {
		ID string `json:"id"`
	}
	if len(strings.TrimSpace(string(r.body))) > 0 {
		if err := json.Unmarshal(r.body, &created); err != nil {
			return "", fmt.Errorf("%s: decode response: %w", op, err)
		}
	}
	if created.ID == "" {
		if loc := r.header.Get("Location"); loc != "" {
			created.ID = path.Base(loc)
		}
	}
	if created.ID == "" {
		return "", fmt.Errorf("%s: response names no call id", op)
	}
	return created.ID, nil
}

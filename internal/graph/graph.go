// Package graph is callbot's vocabulary for Microsoft Graph cloud communications, without the
// SDK: decoding of the commsNotifications the webhook receives, identities, media prompts,
// operations and presence, validation of the callback token Graph signs, and the webhook
// handler itself. The SDK adapter lives in graph/msgraph; the simulator in graph/graphsim.
package graph

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// IdentityKind names the member of an identitySet that identifies a party.
type IdentityKind string

// Identity kinds used by callbot. Graph knows more (onPremises, acsUser...); those decode into
// IdentitySet.Other.
const (
	KindUser                IdentityKind = "user"
	KindApplication         IdentityKind = "application"
	KindApplicationInstance IdentityKind = "applicationInstance"
	KindPhone               IdentityKind = "phone"
	KindGuest               IdentityKind = "guest"
	KindEncrypted           IdentityKind = "encrypted"
)

// Identity is one member of an identitySet.
type Identity struct {
	ID          string `json:"id,omitempty"`
	DisplayName string `json:"displayName,omitempty"`
	TenantID    string `json:"tenantId,omitempty"`
}

// IdentitySet is Graph's identitySet / communicationsIdentitySet.
type IdentitySet struct {
	User                *Identity `json:"user,omitempty"`
	Application         *Identity `json:"application,omitempty"`
	ApplicationInstance *Identity `json:"applicationInstance,omitempty"`
	Phone               *Identity `json:"phone,omitempty"`
	Guest               *Identity `json:"guest,omitempty"`
	Encrypted           *Identity `json:"encrypted,omitempty"`
}

// Party is a participant of a call as far as callbot needs to know it: the first identity found
// in an identitySet, in the order phone, user, applicationInstance, application, guest, encrypted.
type Party struct {
	Kind        IdentityKind `json:"kind"`
	ID          string       `json:"id"`
	DisplayName string       `json:"displayName,omitempty"`
	TenantID    string       `json:"tenantId,omitempty"`
}

// Primary returns the party an identity set names, or false when it names none callbot knows.
func (s IdentitySet) Primary() (Party, bool) {
	for _, c := range []struct {
		k  IdentityKind
		id *Identity
	}{
		{KindPhone, s.Phone}, {KindUser, s.User}, {KindApplicationInstance, s.ApplicationInstance},
		{KindApplication, s.Application}, {KindGuest, s.Guest}, {KindEncrypted, s.Encrypted},
	} {
		if c.id != nil {
			return Party{Kind: c.k, ID: c.id.ID, DisplayName: c.id.DisplayName, TenantID: c.id.TenantID}, true
		}
	}
	return Party{}, false
}

// IdentitySetFor builds the identity set naming p.
func IdentitySetFor(p Party) IdentitySet {
	id := &Identity{ID: p.ID, DisplayName: p.DisplayName, TenantID: p.TenantID}
	var s IdentitySet
	switch p.Kind {
	case KindPhone:
		s.Phone = id
	case KindApplication:
		s.Application = id
	case KindApplicationInstance:
		s.ApplicationInstance = id
	case KindGuest:
		s.Guest = id
	case KindEncrypted:
		s.Encrypted = id
	default:
		s.User = id
	}
	return s
}

// Masked returns a form of the party safe for logs: phone numbers keep their last two digits.
func (p Party) Masked() string {
	if p.Kind != KindPhone {
		return string(p.Kind) + ":" + p.ID
	}
	return "phone:" + MaskPhone(p.ID)
}

// MaskPhone hides all but the last two digits of a phone number.
func MaskPhone(n string) string {
	if len(n) <= 2 {
		return strings.Repeat("*", len(n))
	}
	return strings.Repeat("*", len(n)-2) + n[len(n)-2:]
}

// ParticipantInfo is Graph's participantInfo / invitationParticipantInfo.
type ParticipantInfo struct {
	ODataType    string      `json:"@odata.type,omitempty"`
	Identity     IdentitySet `json:"identity"`
	EndpointType string      `json:"endpointType,omitempty"`
	Region       string      `json:"region,omitempty"`
	LanguageID   string      `json:"languageId,omitempty"`
	ID           string      `json:"id,omitempty"`
}

// MediaPrompt is a service-hosted audio file: a WAV (16 kHz, 16-bit, mono) at URI, cached by
// Graph under ResourceID.
type MediaPrompt struct {
	URI        string `json:"uri"`
	ResourceID string `json:"resourceId,omitempty"`
}

// Number is an integer that Graph sends either as a JSON number or as a string ("200").
type Number int64

// UnmarshalJSON accepts 200, "200", null and "".
func (n *Number) UnmarshalJSON(b []byte) error {
	s := strings.TrimSpace(string(b))
	if s == "null" {
		return nil
	}
	if len(s) >= 2 && s[0] == '"' {
		if err := json.Unmarshal(b, &s); err != nil {
			return err
		}
		if s == "" {
			return nil
		}
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		f, ferr := strconv.ParseFloat(s, 64)
		if ferr != nil || f != float64(int64(f)) {
			return fmt.Errorf("not an integer: %s", b)
		}
		v = int64(f)
	}
	*n = Number(v)
	return nil
}

// ResultInfo is Graph's resultInfo. The struct tag "subcode" also matches "subCode": encoding/json
// compares keys case-insensitively.
type ResultInfo struct {
	Code    Number `json:"code"`
	Subcode Number `json:"subcode"`
	Message string `json:"message,omitempty"`
}

// OperationStatus is a commsOperation status, normalised to lower camel case.
type OperationStatus string

// Operation statuses.
const (
	OpNotStarted OperationStatus = "notStarted"
	OpRunning    OperationStatus = "running"
	OpCompleted  OperationStatus = "completed"
	OpFailed     OperationStatus = "failed"
)

// ParseOperationStatus accepts any casing ("Running", "completed").
func ParseOperationStatus(s string) OperationStatus {
	switch strings.ToLower(s) {
	case "notstarted":
		return OpNotStarted
	case "running":
		return OpRunning
	case "completed":
		return OpCompleted
	case "failed":
		return OpFailed
	}
	return OperationStatus(s)
}

// Final reports whether no further notification will come for an operation in this status.
func (s OperationStatus) Final() bool { return s == OpCompleted || s == OpFailed }

// Operation is the result of a media or participant action (playPrompt, subscribeToTone...).
type Operation struct {
	ID            string          `json:"id"`
	Status        OperationStatus `json:"status"`
	ClientContext string          `json:"clientContext,omitempty"`
	Result        *ResultInfo     `json:"resultInfo,omitempty"`
}

// Presence is one user's Teams presence as getPresencesByUserId returns it.
type Presence struct {
	UserID       string `json:"id"`
	Availability string `json:"availability"`
	Activity     string `json:"activity"`
}

// Routable reports whether an agent with this presence may be offered a call: availability
// Available or AvailableIdle, and no activity that means the person is taken.
func (p Presence) Routable() bool {
	switch strings.ToLower(p.Availability) {
	case "available", "availableidle":
	default:
		return false
	}
	switch strings.ToLower(p.Activity) {
	case "inacall", "inaconferencecall", "inameeting", "presenting", "donotdisturb", "offwork", "outofoffice", "urgentinterruptionsonly":
		return false
	}
	return true
}

// MaxPresenceIDs is the most user ids one getPresencesByUserId request may carry.
const MaxPresenceIDs = 650

// RejectReason is the reason given when rejecting an incoming call.
type RejectReason string

// Reject reasons.
const (
	RejectNone      RejectReason = "none"
	RejectBusy      RejectReason = "busy"
	RejectForbidden RejectReason = "forbidden"
)

// AnswerRequest is what callbot sends to answer an incoming call with service-hosted media.
type AnswerRequest struct {
	CallbackURI   string
	PrefetchMedia []MediaPrompt
}

// Error is a failed Graph request: the HTTP status and the Graph error body.
type Error struct {
	Op        string // "answer", "transfer", ...
	Status    int
	Code      string
	Message   string
	RequestID string
	// ClientRequestID is the client-request-id callbot sent with the request: with RequestID,
	// what Microsoft support asks for.
	ClientRequestID string
	RetryAfter      time.Duration
}

func (e *Error) Error() string {
	s := fmt.Sprintf("graph %s: status %d", e.Op, e.Status)
	if e.Code != "" {
		s += " " + e.Code
	}
	if e.Message != "" {
		s += ": " + e.Message
	}
	switch {
	case e.RequestID != "" && e.ClientRequestID != "":
		s += " (request-id " + e.RequestID + ", client-request-id " + e.ClientRequestID + ")"
	case e.RequestID != "":
		s += " (request-id " + e.RequestID + ")"
	case e.ClientRequestID != "":
		s += " (client-request-id " + e.ClientRequestID + ")"
	}
	return s
}

// ErrCallGone is matched (errors.Is) by an *Error with status 404: the call no longer exists.
var ErrCallGone = errors.New("call not found in graph")

// Is makes errors.Is(err, ErrCallGone) true for a 404.
func (e *Error) Is(target error) bool { return target == ErrCallGone && e.Status == 404 }

// CallKey is the form of a call id used as a storage key: Graph writes the same call id as a
// lowercase GUID with hyphens and as 32 uppercase hex digits, so keys are lowercase without
// hyphens. The id as Graph gave it is kept for outbound URLs.
func CallKey(id string) string {
	return strings.ToLower(strings.ReplaceAll(id, "-", ""))
}

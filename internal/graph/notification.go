package graph

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// ChangeType is a commsNotification changeType.
type ChangeType string

// Change types.
const (
	Created ChangeType = "created"
	Updated ChangeType = "updated"
	Deleted ChangeType = "deleted"
)

// ResourceKind says what a notification's resourceUrl points at.
type ResourceKind int

// Resource kinds.
const (
	ResourceOther        ResourceKind = iota
	ResourceCall                      // /communications/calls/{id}
	ResourceOperation                 // /communications/calls/{id}/operations/{opId}
	ResourceParticipants              // /communications/calls/{id}/participants[/{pid}]
)

// CallState is a Graph callState, normalised to lower camel case.
type CallState string

// Call states Graph documents.
const (
	CallIncoming         CallState = "incoming"
	CallEstablishing     CallState = "establishing"
	CallRinging          CallState = "ringing"
	CallEstablished      CallState = "established"
	CallHold             CallState = "hold"
	CallTransferring     CallState = "transferring"
	CallTransferAccepted CallState = "transferAccepted"
	CallRedirecting      CallState = "redirecting"
	CallTerminating      CallState = "terminating"
	CallTerminated       CallState = "terminated"
)

var callStates = map[string]CallState{}

func init() {
	for _, s := range []CallState{CallIncoming, CallEstablishing, CallRinging, CallEstablished, CallHold,
		CallTransferring, CallTransferAccepted, CallRedirecting, CallTerminating, CallTerminated} {
		callStates[strings.ToLower(string(s))] = s
	}
}

// ParseCallState accepts any casing; an unknown value is returned as given.
func ParseCallState(s string) CallState {
	if c, ok := callStates[strings.ToLower(s)]; ok {
		return c
	}
	return CallState(s)
}

// ToneInfo is a DTMF key press. SequenceID increases with every press in a call.
type ToneInfo struct {
	SequenceID Number `json:"sequenceId"`
	Tone       string `json:"tone"`
}

// Digit returns the key as one character: "0"-"9", "*", "#", "A"-"D", or "" for flash and
// unknown tones.
func (t ToneInfo) Digit() string {
	s := strings.ToLower(t.Tone)
	switch {
	case len(s) == 5 && strings.HasPrefix(s, "tone") && s[4] >= '0' && s[4] <= '9':
		return s[4:]
	case s == "star":
		return "*"
	case s == "pound":
		return "#"
	case s == "a" || s == "b" || s == "c" || s == "d":
		return strings.ToUpper(s)
	}
	return ""
}

// ToneName is the inverse of Digit: "1" -> "tone1", "*" -> "star".
func ToneName(digit string) string {
	switch digit {
	case "*":
		return "star"
	case "#":
		return "pound"
	}
	if len(digit) == 1 && digit[0] >= '0' && digit[0] <= '9' {
		return "tone" + digit
	}
	return strings.ToLower(digit)
}

// MediaState is a call's mediaState.
type MediaState struct {
	Audio string `json:"audio,omitempty"`
}

// CallResource is resourceData of type #microsoft.graph.call. Every field is optional: an
// update often carries only the state.
type CallResource struct {
	ODataType         string            `json:"@odata.type,omitempty"`
	ODataID           string            `json:"@odata.id,omitempty"`
	ID                string            `json:"id,omitempty"`
	State             CallState         `json:"state,omitempty"`
	Direction         string            `json:"direction,omitempty"`
	Source            *ParticipantInfo  `json:"source,omitempty"`
	Targets           []ParticipantInfo `json:"targets,omitempty"`
	TenantID          string            `json:"tenantId,omitempty"`
	MyParticipantID   string            `json:"myParticipantId,omitempty"`
	CallChainID       string            `json:"callChainId,omitempty"`
	CallbackURI       string            `json:"callbackUri,omitempty"`
	ToneInfo          *ToneInfo         `json:"toneInfo,omitempty"`
	ResultInfo        *ResultInfo       `json:"resultInfo,omitempty"`
	TerminationReason string            `json:"terminationReason,omitempty"`
	MediaState        *MediaState       `json:"mediaState,omitempty"`
	AnsweredBy        *ParticipantInfo  `json:"answeredBy,omitempty"`
}

// UnmarshalJSON normalises the state's casing.
func (c *CallResource) UnmarshalJSON(b []byte) error {
	type plain CallResource
	if err := json.Unmarshal(b, (*plain)(c)); err != nil {
		return err
	}
	c.State = ParseCallState(string(c.State))
	return nil
}

// OperationResource is resourceData of an operation type (playPromptOperation...).
type OperationResource struct {
	ODataType     string          `json:"@odata.type,omitempty"`
	ID            string          `json:"id,omitempty"`
	Status        OperationStatus `json:"status,omitempty"`
	ClientContext string          `json:"clientContext,omitempty"`
	ResultInfo    *ResultInfo     `json:"resultInfo,omitempty"`
	// CompletionReason is sent by beta and in some v1.0 examples of record operations.
	CompletionReason   string `json:"completionReason,omitempty"`
	RecordingLocation  string `json:"recordingLocation,omitempty"`
	RecordingAccessTok string `json:"recordingAccessToken,omitempty"`
}

// Participant is one member of a roster update.
type Participant struct {
	ODataType            string          `json:"@odata.type,omitempty"`
	ID                   string          `json:"id,omitempty"`
	Info                 ParticipantInfo `json:"info"`
	IsMuted              bool            `json:"isMuted,omitempty"`
	IsInLobby            bool            `json:"isInLobby,omitempty"`
	RosterSequenceNumber Number          `json:"rosterSequenceNumber,omitempty"`
}

// Notification is one decoded commsNotification.
type Notification struct {
	ChangeType  ChangeType
	ResourceURL string
	Kind        ResourceKind
	// CallID is the call id as written in resourceUrl (or resourceData.id when that is the
	// only place it appears); use CallKey(CallID) to compare ids.
	CallID      string
	OperationID string
	// DataType is resourceData's @odata.type, e.g. "#microsoft.graph.call".
	DataType     string
	Call         *CallResource      // Kind == ResourceCall
	Operation    *OperationResource // Kind == ResourceOperation
	Participants []Participant      // Kind == ResourceParticipants
	CallbackURI  string
}

// Data types callbot dispatches on.
const (
	TypeCall                 = "#microsoft.graph.call"
	TypeNotifications        = "#microsoft.graph.commsNotifications"
	TypePlayPromptOperation  = "#microsoft.graph.playPromptOperation"
	TypeRecordOperation      = "#microsoft.graph.recordOperation"
	TypeParticipant          = "#microsoft.graph.participant"
	TypeInviteParticipantsOp = "#microsoft.graph.inviteParticipantsOperation"
)

// ErrLegacyFormat is returned for a body that is JSON but not a commsNotifications envelope:
// the first notification of a call may come in the old Skype format, and answering 204 makes
// Graph resend it in Graph format.
var ErrLegacyFormat = errors.New("not a commsNotifications body")

// DecodeError says what is wrong with a notification body.
type DecodeError struct {
	Index int // index in value[], or -1 for the envelope
	Err   error
}

func (e *DecodeError) Error() string {
	if e.Index < 0 {
		return "decode notifications: " + e.Err.Error()
	}
	return fmt.Sprintf("decode notification %d: %s", e.Index, e.Err.Error())
}

func (e *DecodeError) Unwrap() error { return e.Err }

type wireNotification struct {
	ODataType    string          `json:"@odata.type"`
	ChangeType   string          `json:"changeType"`
	ResourceURL  string          `json:"resourceUrl"`
	Resource     string          `json:"resource"`
	ResourceData json.RawMessage `json:"resourceData"`
	CallbackURI  string          `json:"callbackUri"`
}

// Decode parses a webhook body. It returns ErrLegacyFormat for JSON that is not a
// commsNotifications envelope and a *DecodeError for anything malformed. Notifications of
// unknown resource or data types are returned with Kind ResourceOther, so the caller can log
// and ignore them.
func Decode(body []byte) ([]Notification, error) {
	var env struct {
		ODataType string            `json:"@odata.type"`
		Value     []json.RawMessage `json:"value"`
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if err := dec.Decode(&env); err != nil {
		return nil, &DecodeError{Index: -1, Err: err}
	}
	if dec.More() {
		return nil, &DecodeError{Index: -1, Err: errors.New("trailing data after JSON object")}
	}
	if env.Value == nil {
		if env.ODataType == "" || !strings.EqualFold(env.ODataType, TypeNotifications) {
			return nil, ErrLegacyFormat
		}
		return nil, &DecodeError{Index: -1, Err: errors.New("value is missing")}
	}
	out := make([]Notification, 0, len(env.Value))
	for i, raw := range env.Value {
		n, err := decodeOne(raw)
		if err != nil {
			return nil, &DecodeError{Index: i, Err: err}
		}
		out = append(out, n)
	}
	return out, nil
}

func decodeOne(raw json.RawMessage) (Notification, error) {
	var w wireNotification
	if err := json.Unmarshal(raw, &w); err != nil {
		return Notification{}, err
	}
	n := Notification{ChangeType: ChangeType(strings.ToLower(w.ChangeType)), CallbackURI: w.CallbackURI}
	switch n.ChangeType {
	case Created, Updated, Deleted:
	default:
		return n, fmt.Errorf("unknown changeType %q", w.ChangeType)
	}
	n.ResourceURL = w.ResourceURL
	if n.ResourceURL == "" {
		n.ResourceURL = w.Resource
	}
	if n.ResourceURL == "" {
		return n, errors.New("resourceUrl is missing")
	}
	n.Kind, n.CallID, n.OperationID = parseResourceURL(n.ResourceURL)

	data := bytes.TrimSpace(w.ResourceData)
	switch {
	case len(data) == 0 || bytes.Equal(data, []byte("null")):
	case data[0] == '[':
		var ps []Participant
		if err := json.Unmarshal(data, &ps); err != nil {
			return n, fmt.Errorf("resourceData: %w", err)
		}
		if len(ps) > 0 {
			n.DataType = ps[0].ODataType
		}
		if n.Kind == ResourceParticipants {
			n.Participants = ps
		}
	case data[0] == '{':
		var head struct {
			ODataType string `json:"@odata.type"`
		}
		if err := json.Unmarshal(data, &head); err != nil {
			return n, fmt.Errorf("resourceData: %w", err)
		}
		n.DataType = head.ODataType
		switch n.Kind {
		case ResourceCall:
			n.Call = new(CallResource)
			if err := json.Unmarshal(data, n.Call); err != nil {
				return n, fmt.Errorf("resourceData: %w", err)
			}
			if n.CallbackURI == "" {
				n.CallbackURI = n.Call.CallbackURI
			}
		case ResourceOperation:
			n.Operation = new(OperationResource)
			if err := json.Unmarshal(data, n.Operation); err != nil {
				return n, fmt.Errorf("resourceData: %w", err)
			}
			n.Operation.Status = ParseOperationStatus(string(n.Operation.Status))
			if n.Operation.ID == "" {
				n.Operation.ID = n.OperationID
			}
		}
	default:
		return n, errors.New("resourceData is neither an object nor an array")
	}
	if n.Kind == ResourceCall && n.Call == nil {
		n.Call = &CallResource{}
	}
	if n.Kind == ResourceCall && n.CallID == "" {
		n.CallID = n.Call.ID
	}
	if n.Kind != ResourceOther && n.CallID == "" {
		return n, errors.New("resourceUrl names no call id")
	}
	return n, nil
}

// parseResourceURL reads "/communications/calls/{id}[/operations/{op}|/participants...]",
// with or without the leading slash, and the legacy "/app/calls/{id}".
func parseResourceURL(u string) (ResourceKind, string, string) {
	if i := strings.IndexAny(u, "?#"); i >= 0 {
		u = u[:i]
	}
	parts := strings.Split(strings.Trim(u, "/"), "/")
	for i := 0; i+1 < len(parts); i++ {
		if !strings.EqualFold(parts[i], "calls") {
			continue
		}
		id := parts[i+1]
		rest := parts[i+2:]
		switch {
		case len(rest) == 0:
			return ResourceCall, id, ""
		case len(rest) == 2 && strings.EqualFold(rest[0], "operations"):
			return ResourceOperation, id, rest[1]
		case strings.EqualFold(rest[0], "participants"):
			return ResourceParticipants, id, ""
		}
		return ResourceOther, id, ""
	}
	return ResourceOther, "", ""
}

// Ended reports whether n says the call is over: a deleted call resource, or state terminated.
func (n Notification) Ended() bool {
	return n.Kind == ResourceCall && (n.ChangeType == Deleted || n.Call.State == CallTerminated)
}

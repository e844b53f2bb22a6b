package graph

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"unicode/utf8"
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

// callStates are the documented states, and callStatesLower their lower-case forms.
var (
	callStates = []CallState{CallIncoming, CallEstablishing, CallRinging, CallEstablished, CallHold,
		CallTransferring, CallTransferAccepted, CallRedirecting, CallTerminating, CallTerminated}
	callStatesLower = lowerAll(callStates)
)

// ParseCallState accepts any casing; an unknown value is returned as given.
func ParseCallState(s string) CallState {
	if i := indexLower(s, callStatesLower); i >= 0 {
		return callStates[i]
	}
	return CallState(s)
}

func lowerAll[S ~string](ss []S) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = strings.ToLower(string(s))
	}
	return out
}

// indexLower returns the index of strings.ToLower(s) in lowers, or -1. It compares ASCII
// without strings.ToLower, which copies any string with an upper-case letter ("transferAccepted").
// Other bytes go through strings.ToLower, which maps some non-ASCII letters to ASCII ones (the
// Kelvin sign to "k").
func indexLower(s string, lowers []string) int {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			s = strings.ToLower(s)
			for j, l := range lowers {
				if s == l {
					return j
				}
			}
			return -1
		}
	}
next:
	for j, l := range lowers {
		if len(l) != len(s) {
			continue
		}
		for i := 0; i < len(s); i++ {
			c := s[i]
			if 'A' <= c && c <= 'Z' {
				c += 'a' - 'A'
			}
			if c != l[i] {
				continue next
			}
		}
		return j
	}
	return -1
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

// Participant is one member of a roster update. RemovedState is set on a participant removed
// from the roster (Graph's removedState: "the reason why a participant resource was removed
// from a roster", https://learn.microsoft.com/en-us/graph/api/resources/removedstate): listed,
// but no longer in the call.
type Participant struct {
	ODataType            string          `json:"@odata.type,omitempty"`
	ID                   string          `json:"id,omitempty"`
	Info                 ParticipantInfo `json:"info"`
	IsMuted              bool            `json:"isMuted,omitempty"`
	IsInLobby            bool            `json:"isInLobby,omitempty"`
	RemovedState         *RemovedState   `json:"removedState,omitempty"`
	RosterSequenceNumber Number          `json:"rosterSequenceNumber,omitempty"`
}

// RemovedState is Graph's removedState: why a participant was removed from a roster.
type RemovedState struct {
	Reason string `json:"reason,omitempty"`
}

// Removed reports whether the roster lists p as removed (RemovedState), not in the call.
func (p Participant) Removed() bool { return p.RemovedState != nil }

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

// Decode parses a webhook body. It returns ErrLegacyFormat for JSON that is not a
// commsNotifications envelope and a *DecodeError for anything malformed. Notifications of
// unknown resource or data types are returned with Kind ResourceOther, so the caller can log
// and ignore them.
//
// Decode runs on every webhook request. decodeFast decodes the body in one pass into concrete
// structs; a body it cannot decode exactly as decodeExact would (malformed JSON, a participants
// roster, a repeated raw member) goes to decodeExact, the plain decoder that holds each
// notification and resourceData as raw JSON and decodes them again by kind. Errors and rare
// shapes come out as before; decodeReference in the tests holds Decode to the decoder that
// preceded decodeFast.
func Decode(body []byte) ([]Notification, error) {
	ns, err := decodeFast(body)
	if err == errNotFast {
		return decodeExact(body)
	}
	return ns, err
}

// DecodeEach is Decode for a request whose envelope is sound but some of whose notifications
// are not: it returns the notifications that decode, in order, and a *DecodeError for each that
// does not, so that one malformed notification does not take the others of its request with it
// (Graph drops a request answered 400). The envelope's errors (not JSON, value missing, the
// legacy format) are returned as Decode returns them. A body that decodes whole costs what
// Decode costs; one with a malformed notification is decoded again, notification by notification.
func DecodeEach(body []byte) ([]Notification, []error, error) {
	ns, err := Decode(body)
	var de *DecodeError
	if err == nil || !errors.As(err, &de) || de.Index < 0 {
		return ns, nil, err
	}
	var env struct {
		Value []json.RawMessage `json:"value"`
	}
	if err := json.Unmarshal(body, &env); err != nil { // Decode read the envelope: not expected
		return nil, nil, &DecodeError{Index: -1, Err: err}
	}
	var bad []error
	out := make([]Notification, 0, len(env.Value))
	for i, raw := range env.Value {
		n, err := decodeOne(raw)
		if err != nil {
			bad = append(bad, &DecodeError{Index: i, Err: err})
			continue
		}
		out = append(out, n)
	}
	return out, bad, nil
}

// fastEnvelope, fastNotification and fastData are the whole body in the shapes encoding/json can
// fill in one pass. They decode every member decodeExact decodes, with the same Go types, so a body
// that decodes without error here decodes without error there, to the same values.
type fastEnvelope struct {
	ODataType string             `json:"@odata.type"`
	Value     []fastNotification `json:"value"`
}

type fastNotification struct {
	ODataType    string    `json:"@odata.type"` // unused, but a non-string is an error there too
	ChangeType   string    `json:"changeType"`
	ResourceURL  string    `json:"resourceUrl"`
	Resource     string    `json:"resource"`
	ResourceData *fastData `json:"resourceData"` // nil when absent or null
	CallbackURI  string    `json:"callbackUri"`
}

// callFields is CallResource without its UnmarshalJSON, so fastData can embed it.
type callFields CallResource

// fastData is an object resourceData of any kind: a call's members and an operation's. No
// operation member has the name of a call member in any casing, so each JSON key matches the
// field it matches in CallResource or OperationResource, or none. Before the notification's
// resourceUrl is known, it cannot be known which of the two the object is.
type fastData struct {
	callFields
	Status             OperationStatus `json:"status"`
	ClientContext      string          `json:"clientContext"`
	CompletionReason   string          `json:"completionReason"`
	RecordingLocation  string          `json:"recordingLocation"`
	RecordingAccessTok string          `json:"recordingAccessToken"`
}

// errNotFast is decodeFast's answer for a body it leaves to decodeExact.
var errNotFast = errors.New("not decoded in one pass")

// decodeFast decodes body in one pass, or returns errNotFast when decodeExact must: for JSON
// errors (including members of a type the notification's kind would not have decoded), for an
// array resourceData, and for repeated raw members (see repeatsRawMember).
func decodeFast(body []byte) ([]Notification, error) {
	var env fastEnvelope
	if !decodeWhole(body, &env) || repeatsRawMember(body) {
		return nil, errNotFast
	}
	if env.Value == nil {
		return nil, envelopeWithoutValue(env.ODataType)
	}
	out := make([]Notification, len(env.Value))
	for i := range env.Value {
		if err := fastNotificationOf(&env.Value[i], &out[i]); err != nil {
			return nil, &DecodeError{Index: i, Err: err}
		}
	}
	return out, nil
}

// fastNotificationOf fills n from w as decodeOne would from the same JSON.
func fastNotificationOf(w *fastNotification, n *Notification) error {
	n.ChangeType, n.CallbackURI = parseChangeType(w.ChangeType), w.CallbackURI
	if n.ChangeType == "" {
		return fmt.Errorf("unknown changeType %q", w.ChangeType)
	}
	n.ResourceURL = w.ResourceURL
	if n.ResourceURL == "" {
		n.ResourceURL = w.Resource
	}
	if n.ResourceURL == "" {
		return errors.New("resourceUrl is missing")
	}
	n.Kind, n.CallID, n.OperationID = parseResourceURL(n.ResourceURL)
	if d := w.ResourceData; d != nil {
		n.DataType = d.ODataType
		switch n.Kind {
		case ResourceCall:
			n.Call = (*CallResource)(&d.callFields)
			n.Call.State = ParseCallState(string(n.Call.State))
			if n.CallbackURI == "" {
				n.CallbackURI = n.Call.CallbackURI
			}
		case ResourceOperation:
			n.Operation = &OperationResource{
				ODataType:          d.ODataType,
				ID:                 d.ID,
				Status:             ParseOperationStatus(string(d.Status)),
				ClientContext:      d.ClientContext,
				ResultInfo:         d.ResultInfo,
				CompletionReason:   d.CompletionReason,
				RecordingLocation:  d.RecordingLocation,
				RecordingAccessTok: d.RecordingAccessTok,
			}
			if n.Operation.ID == "" {
				n.Operation.ID = n.OperationID
			}
		}
	}
	return checkCall(n)
}

// decodeWhole decodes body, one JSON value between optional whitespace, into v, and reports
// whether it did without error. It is json.Unmarshal with a pooled json.Decoder, whose scanner
// stack, error context and buffer are kept from one body to the next: about ten allocations
// fewer per body.
func decodeWhole(body []byte, v any) bool {
	body = bytes.TrimRight(body, " \t\r\n")
	d := jsonDecoders.Get().(*pooledDecoder)
	d.r.Reset(body)
	start := d.dec.InputOffset()
	if d.dec.Decode(v) != nil || d.dec.InputOffset()-start != int64(len(body)) {
		// A decoder that failed may hold an error or unread bytes: let it go.
		return false
	}
	// It has read all of body, and a buffer as large as body.
	if len(body) <= maxPooledBody {
		jsonDecoders.Put(d)
	}
	return true
}

type pooledDecoder struct {
	r   bytes.Reader
	dec *json.Decoder
}

var jsonDecoders = sync.Pool{New: func() any {
	d := new(pooledDecoder)
	d.dec = json.NewDecoder(&d.r)
	return d
}}

// repeatsRawMember reports whether body, which encoding/json accepted, may name "value" twice in
// its top-level object or "resourceData" twice in one notification. decodeExact holds those two
// members as json.RawMessage, so the last of two wins whole; decoded in place, the second is
// merged into the first. Such bodies are left to decodeExact. A key with an escape or a non-ASCII
// byte counts as a match: encoding/json unescapes keys and matches them case-insensitively, by
// Unicode rules ("reſourceData" is resourceData).
func repeatsRawMember(b []byte) bool {
	depth, values, datas := 0, 0, 0
	inValue := false // in the member of the top-level object that may be "value"
	for i := 0; i < len(b); i++ {
		switch b[i] {
		case '{', '[':
			depth++
			if depth == 3 {
				datas = 0
			}
		case '}', ']':
			depth--
		case '"':
			start, plain := i+1, true
			for i++; i < len(b) && b[i] != '"'; i++ {
				if b[i] == '\\' {
					i++
					plain = false
				} else if b[i] >= utf8.RuneSelf {
					plain = false
				}
			}
			key := b[start:min(i, len(b))]
			j := i + 1
			for j < len(b) && (b[j] == ' ' || b[j] == '\t' || b[j] == '\n' || b[j] == '\r') {
				j++
			}
			if j >= len(b) || b[j] != ':' {
				continue // a string value
			}
			switch {
			case depth == 1:
				inValue = !plain || bytes.EqualFold(key, []byte("value"))
				if inValue {
					values++
				}
			case depth == 3 && inValue && (!plain || bytes.EqualFold(key, []byte("resourceData"))):
				datas++
			}
			if values > 1 || datas > 1 {
				return true
			}
		}
	}
	return false
}

// parseChangeType returns the change type s names in any casing, or "".
func parseChangeType(s string) ChangeType {
	if i := indexLower(s, changeTypesLower); i >= 0 {
		return changeTypes[i]
	}
	return ""
}

var (
	changeTypes      = []ChangeType{Created, Updated, Deleted}
	changeTypesLower = lowerAll(changeTypes)
)

// envelopeWithoutValue is the error for an envelope whose value is missing or null.
func envelopeWithoutValue(odataType string) error {
	if odataType == "" || !strings.EqualFold(odataType, TypeNotifications) {
		return ErrLegacyFormat
	}
	return &DecodeError{Index: -1, Err: errors.New("value is missing")}
}

// checkCall completes a notification whose resourceData has been read: a call notification
// always has Call, and a call, operation or roster notification a call id.
func checkCall(n *Notification) error {
	if n.Kind == ResourceCall && n.Call == nil {
		n.Call = &CallResource{}
	}
	if n.Kind == ResourceCall && n.CallID == "" {
		n.CallID = n.Call.ID
	}
	if n.Kind != ResourceOther && n.CallID == "" {
		return errors.New("resourceUrl names no call id")
	}
	return nil
}

type wireNotification struct {
	ODataType    string          `json:"@odata.type"`
	ChangeType   string          `json:"changeType"`
	ResourceURL  string          `json:"resourceUrl"`
	Resource     string          `json:"resource"`
	ResourceData json.RawMessage `json:"resourceData"`
	CallbackURI  string          `json:"callbackUri"`
}

// decodeExact is the plain decoder: the envelope with each notification as raw JSON, then each
// notification with its resourceData raw, then the resourceData as the type its resourceUrl
// names. It decodes the body four or five times over, which is why Decode tries decodeFast first.
func decodeExact(body []byte) ([]Notification, error) {
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
		return nil, envelopeWithoutValue(env.ODataType)
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
	n := Notification{ChangeType: parseChangeType(w.ChangeType), CallbackURI: w.CallbackURI}
	if n.ChangeType == "" {
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
	return n, checkCall(&n)
}

// parseResourceURL reads "/communications/calls/{id}[/operations/{op}|/participants...]",
// with or without the leading slash, and the legacy "/app/calls/{id}": the segment after the
// first "calls" segment that is not the last is the call id.
func parseResourceURL(u string) (ResourceKind, string, string) {
	if i := strings.IndexAny(u, "?#"); i >= 0 {
		u = u[:i]
	}
	u = strings.Trim(u, "/")
	for {
		seg, rest, more := strings.Cut(u, "/")
		if !more {
			return ResourceOther, "", ""
		}
		if !strings.EqualFold(seg, "calls") {
			u = rest
			continue
		}
		id, rest, more := strings.Cut(rest, "/")
		if !more {
			return ResourceCall, id, ""
		}
		sub, op, more := strings.Cut(rest, "/")
		switch {
		case more && !strings.Contains(op, "/") && strings.EqualFold(sub, "operations"):
			return ResourceOperation, id, op
		case strings.EqualFold(sub, "participants"):
			return ResourceParticipants, id, ""
		}
		return ResourceOther, id, ""
	}
}

// Ended reports whether n says the call is over: a deleted call resource, or state terminated.
func (n Notification) Ended() bool {
	return n.Kind == ResourceCall && (n.ChangeType == Deleted || n.Call.State == CallTerminated)
}

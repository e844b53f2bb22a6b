package graph

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
)

// decodeReference is Decode as it was before the single-pass decoder (commit 5afeb2c): a
// json.Decoder for the envelope, then one json.Unmarshal per notification and two or three per
// resourceData. It is kept, with its own copies of the types whose decoding changed, as the
// specification the differential tests hold Decode to. Do not "fix" it: a difference in
// behaviour belongs in Decode, with a test saying why.
func decodeReference(body []byte) ([]Notification, error) {
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
		n, err := refDecodeOne(raw)
		if err != nil {
			return nil, &DecodeError{Index: i, Err: err}
		}
		out = append(out, n)
	}
	return out, nil
}

type refWireNotification struct {
	ODataType    string          `json:"@odata.type"`
	ChangeType   string          `json:"changeType"`
	ResourceURL  string          `json:"resourceUrl"`
	Resource     string          `json:"resource"`
	ResourceData json.RawMessage `json:"resourceData"`
	CallbackURI  string          `json:"callbackUri"`
}

// The reference's own resource types: same fields as the exported ones, without their methods,
// so a faster UnmarshalJSON added to an exported type cannot leak into the reference.
type (
	refCallResource      CallResource
	refOperationResource OperationResource
	refParticipant       Participant
)

func (c *refCallResource) UnmarshalJSON(b []byte) error {
	type plain refCallResource
	if err := json.Unmarshal(b, (*plain)(c)); err != nil {
		return err
	}
	c.State = refParseCallState(string(c.State))
	return nil
}

var refCallStates = map[string]CallState{}

func init() {
	for _, s := range []CallState{CallIncoming, CallEstablishing, CallRinging, CallEstablished, CallHold,
		CallTransferring, CallTransferAccepted, CallRedirecting, CallTerminating, CallTerminated} {
		refCallStates[strings.ToLower(string(s))] = s
	}
}

func refParseCallState(s string) CallState {
	if c, ok := refCallStates[strings.ToLower(s)]; ok {
		return c
	}
	return CallState(s)
}

func refParseOperationStatus(s string) OperationStatus {
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

func refDecodeOne(raw json.RawMessage) (Notification, error) {
	var w refWireNotification
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
	n.Kind, n.CallID, n.OperationID = refParseResourceURL(n.ResourceURL)

	data := bytes.TrimSpace(w.ResourceData)
	switch {
	case len(data) == 0 || bytes.Equal(data, []byte("null")):
	case data[0] == '[':
		var ps []refParticipant
		if err := json.Unmarshal(data, &ps); err != nil {
			return n, fmt.Errorf("resourceData: %w", err)
		}
		if len(ps) > 0 {
			n.DataType = ps[0].ODataType
		}
		if n.Kind == ResourceParticipants {
			n.Participants = make([]Participant, len(ps))
			for i, p := range ps {
				n.Participants[i] = Participant(p)
			}
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
			c := new(refCallResource)
			if err := json.Unmarshal(data, c); err != nil {
				return n, fmt.Errorf("resourceData: %w", err)
			}
			n.Call = (*CallResource)(c)
			if n.CallbackURI == "" {
				n.CallbackURI = n.Call.CallbackURI
			}
		case ResourceOperation:
			op := new(refOperationResource)
			if err := json.Unmarshal(data, op); err != nil {
				return n, fmt.Errorf("resourceData: %w", err)
			}
			n.Operation = (*OperationResource)(op)
			n.Operation.Status = refParseOperationStatus(string(n.Operation.Status))
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

func refParseResourceURL(u string) (ResourceKind, string, string) {
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

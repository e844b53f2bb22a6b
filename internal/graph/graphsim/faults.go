package graphsim

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
)

// FaultKind names what a fault rule does.
type FaultKind string

// Fault kinds. Request faults act on the simulator's endpoints (Graph, token, key metadata);
// notification faults act on what the simulator posts to the bot.
const (
	// FaultLatency delays the answer to a request by Fault.Latency; the request then runs
	// normally.
	FaultLatency FaultKind = "latency"
	// FaultStatus answers a request with Fault.Status and an error body (Graph's for Graph
	// endpoints, Entra ID's for the token endpoint), with Retry-After when Fault.RetryAfter > 0,
	// after Fault.Latency. The request has no effect.
	FaultStatus FaultKind = "status"
	// FaultDrop never posts the notification.
	FaultDrop FaultKind = "drop"
	// FaultDuplicate posts the notification twice, one copy right after the other.
	FaultDuplicate FaultKind = "duplicate"
	// FaultReorder holds the notification back and posts it right after the next notification
	// of the same call, or after Fault.Latency (default 1s) when no other comes, or at once when
	// the call has ended and nothing else is queued.
	FaultReorder FaultKind = "reorder"
	// FaultBatch holds the notification back and posts it in one request with the call's next
	// notification (both in `value`, in order), as Graph may. Several batched notifications in
	// a row go in one request; one for which nothing follows within Fault.Latency (default 1s),
	// or that the call's end leaves last, goes alone.
	FaultBatch FaultKind = "batch"
	// FaultExpiredToken signs the notification's bearer token with exp 10 minutes in the past
	// (beyond the usual 5-minute clock-skew allowance).
	FaultExpiredToken FaultKind = "expired-token"
	// FaultUnpublishedKey signs the notification's bearer token with a key /botauth/keys does
	// not (yet) publish: the key the next RolloverKey will publish.
	FaultUnpublishedKey FaultKind = "unpublished-key"
	// FaultRollover is not a rule: AddFault with this kind rolls the callback signing key over
	// at once (see RolloverKey).
	FaultRollover FaultKind = "rollover"
)

// IsNotification reports whether the kind acts on notifications rather than requests.
func (k FaultKind) IsNotification() bool {
	switch k {
	case FaultDrop, FaultDuplicate, FaultReorder, FaultBatch, FaultExpiredToken, FaultUnpublishedKey:
		return true
	}
	return false
}

// DefaultReorderHold is how long a reordered or batched notification waits for the next one at
// most.
const DefaultReorderHold = time.Second

// Fault is a fault-injection rule. A rule applies to the next Count matching events, each with
// Probability (0 means 1); with Count 0 it applies with Probability to every matching event
// until it is removed. Decisions come from a random source seeded with Options.Seed and the
// rule's sequence number, so a run that sees the same events in the same order injects the
// same faults.
type Fault struct {
	// ID is assigned by AddFault ("f1", "f2"...).
	ID   string
	Kind FaultKind
	// Action is the endpoint a request fault applies to: a Graph call action ("answer",
	// "reject", "redirect", "transfer", "playPrompt", "subscribeToTone",
	// "cancelMediaProcessing", "keepAlive"), "invite" (participants/invite), "participants"
	// (GET .../participants), "get" and "delete" (of a call),
	// "getPresencesByUserId", "token", "botauth-keys" or "botauth-openid-configuration"; any
	// case; "*" matches them all. Not used by notification faults.
	Action string
	// CallID, when set, limits the rule to requests and notifications of that call.
	CallID string
	// State, when set, limits a notification fault to notifications carrying that call state
	// ("incoming", "established", "terminated"...) or operation status ("completed",
	// "failed"). Roster updates carry no state: only rules without State apply to them.
	State string
	// Status (400-599) and RetryAfter are the answer of a FaultStatus.
	Status     int
	RetryAfter time.Duration
	// Latency is the delay of FaultLatency and FaultStatus, and the longest hold of
	// FaultReorder and FaultBatch.
	Latency time.Duration
	// Count and Probability decide which matching events the rule applies to. Faults returns
	// the count left.
	Count       int
	Probability float64

	seq      uint64
	rng      *rand.Rand
	failNext bool // added by FailNext, which replaces its own rule for the action
}

// InjectedFault records one fault the simulator injected.
type InjectedFault struct {
	Time time.Time `json:"time"`
	Rule string    `json:"rule,omitempty"` // the rule's ID; "" for a rollover
	Kind FaultKind `json:"kind"`
	// Action, RequestID and Status describe a request fault.
	Action    string `json:"action,omitempty"`
	RequestID string `json:"requestId,omitempty"`
	Status    int    `json:"status,omitempty"`
	// CallID, ChangeType, ResourceURL and State describe a notification fault (CallID also a
	// request fault on a call).
	CallID      string `json:"callId,omitempty"`
	ChangeType  string `json:"changeType,omitempty"`
	ResourceURL string `json:"resourceUrl,omitempty"`
	State       string `json:"state,omitempty"`
	// Kid is the new signing key of a rollover.
	Kid string `json:"kid,omitempty"`
}

// ErrInvalidFault is wrapped by AddFault's errors.
var ErrInvalidFault = errors.New("graphsim: invalid fault")

// ErrDropped is what PlaceCall returns (with the call) when a fault dropped the `created`
// notification.
var ErrDropped = errors.New("graphsim: notification dropped by an injected fault")

// knownActions are the actions request faults can name, by lower-case name.
var knownActions = func() map[string]string {
	m := map[string]string{}
	for k, a := range callActions {
		m[k] = a.name
	}
	for _, a := range []string{"invite", "participants", "get", "delete", "getPresencesByUserId", "token", "botauth-keys", "botauth-openid-configuration"} {
		m[strings.ToLower(a)] = a
	}
	return m
}()

func invalidFault(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrInvalidFault, fmt.Sprintf(format, args...))
}

// validate checks a rule and normalises its action's spelling.
func (f *Fault) validate() error {
	switch f.Kind {
	case FaultLatency, FaultStatus:
		if f.Action == "" {
			return invalidFault("a %s fault needs an action (one of %s, or *)", f.Kind, actionList())
		}
		if f.Action != "*" {
			name, ok := knownActions[strings.ToLower(f.Action)]
			if !ok {
				return invalidFault("unknown action %q (one of %s, or *)", f.Action, actionList())
			}
			f.Action = name
		}
		if f.State != "" {
			return invalidFault("state applies to notification faults only")
		}
		if f.Kind == FaultStatus && (f.Status < 400 || f.Status > 599) {
			return invalidFault("status %d is not between 400 and 599", f.Status)
		}
		if f.Kind == FaultLatency && f.Latency <= 0 {
			return invalidFault("a latency fault needs a positive latency")
		}
		if f.Kind == FaultLatency && (f.Status != 0 || f.RetryAfter != 0) {
			return invalidFault("status and retryAfter apply to status faults only")
		}
	case FaultDrop, FaultDuplicate, FaultReorder, FaultBatch, FaultExpiredToken, FaultUnpublishedKey:
		if f.Action != "" {
			return invalidFault("action applies to request faults only (%s acts on notifications)", f.Kind)
		}
		if f.Status != 0 || f.RetryAfter != 0 {
			return invalidFault("status and retryAfter apply to status faults only")
		}
		if f.Latency != 0 && f.Kind != FaultReorder && f.Kind != FaultBatch {
			return invalidFault("latency does not apply to %s faults", f.Kind)
		}
	case "":
		return invalidFault("kind is required (latency, status, drop, duplicate, reorder, batch, expired-token, unpublished-key or rollover)")
	default:
		return invalidFault("unknown kind %q (latency, status, drop, duplicate, reorder, batch, expired-token, unpublished-key or rollover)", f.Kind)
	}
	switch {
	case f.Latency < 0 || f.RetryAfter < 0:
		return invalidFault("latency and retryAfter must not be negative")
	case f.Count < 0:
		return invalidFault("count %d is negative", f.Count)
	case f.Probability < 0 || f.Probability > 1:
		return invalidFault("probability %v is not between 0 and 1", f.Probability)
	case f.Count == 0 && f.Probability == 0:
		return invalidFault("set count (the next N matching events) or probability, or both")
	}
	return nil
}

func actionList() string {
	names := make([]string, 0, len(knownActions))
	for _, n := range knownActions {
		names = append(names, n)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// AddFault adds a fault-injection rule and returns its ID. Rules are tried in the order they
// were added; the first one that applies to an event wins (a request gets at most one latency
// and one status fault, a notification at most one fault). A FaultRollover rolls the key over
// at once and returns the new key id instead. Errors wrap ErrInvalidFault.
func (s *Sim) AddFault(f Fault) (string, error) {
	if f.Kind == FaultRollover {
		return s.RolloverKey()
	}
	if err := f.validate(); err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.addFault(&f)
	return f.ID, nil
}

// addFault adds a validated rule. Called with s.mu held.
func (s *Sim) addFault(f *Fault) {
	s.faultSeq++
	f.seq = s.faultSeq
	f.ID = "f" + strconv.FormatUint(f.seq, 10)
	f.rng = rand.New(rand.NewPCG(s.seed, f.seq))
	s.faults = append(s.faults, f)
}

// RemoveFault removes one rule; it reports whether the rule existed.
func (s *Sim) RemoveFault(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.faults)
	s.faults = slices.DeleteFunc(s.faults, func(f *Fault) bool { return f.ID == id })
	return len(s.faults) != n
}

// ClearFaults removes every rule (FailNext's too). The record of injected faults stays.
func (s *Sim) ClearFaults() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = nil
}

// Faults returns the rules in force, with the count they have left.
func (s *Sim) Faults() []Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Fault, len(s.faults))
	for i, f := range s.faults {
		out[i] = *f
		out[i].rng = nil
	}
	return out
}

// Injected returns every fault injected so far, in order.
func (s *Sim) Injected() []InjectedFault {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.injectLog)
}

// FailNext makes the next n requests to action fail with status and a Graph error body (and a
// Retry-After header when retryAfter > 0), without effect. Actions: "answer", "reject",
// "redirect", "transfer", "playPrompt", "subscribeToTone", "cancelMediaProcessing",
// "keepAlive", "invite", "participants", "get", "delete", "getPresencesByUserId", "token" (any case). n <= 0 clears.
// Requests that fail authentication do not consume a failure. It is a shorthand for AddFault
// with FaultStatus and Count n, replacing the rule an earlier FailNext added for the action;
// an unknown action or a status outside 400-599 is ignored.
func (s *Sim) FailNext(action string, status int, retryAfter time.Duration, n int) {
	f := &Fault{Kind: FaultStatus, Action: action, Status: status, RetryAfter: retryAfter, Count: n, failNext: true}
	valid := f.validate() == nil
	s.mu.Lock()
	defer s.mu.Unlock()
	s.faults = slices.DeleteFunc(s.faults, func(g *Fault) bool {
		return g.failNext && strings.EqualFold(g.Action, action)
	})
	if n > 0 && valid {
		s.addFault(f)
	}
}

// take decides whether rule f applies to one matching event, and consumes one count if it
// does. Called with s.mu held.
func (s *Sim) take(f *Fault) bool {
	if f.Probability > 0 && f.Probability < 1 && f.rng.Float64() >= f.Probability {
		return false
	}
	if f.Count > 0 {
		f.Count--
		if f.Count == 0 {
			s.faults = slices.DeleteFunc(s.faults, func(g *Fault) bool { return g == f })
		}
	}
	return true
}

// requestFaults picks the latency and status faults for a request. Called with s.mu held.
func (s *Sim) requestFaults(action, callID string) (latency, status *Fault) {
	for _, f := range slices.Clone(s.faults) {
		if f.Kind.IsNotification() || (f.Action != "*" && !strings.EqualFold(f.Action, action)) {
			continue
		}
		if f.CallID != "" && (callID == "" || graph.CallKey(f.CallID) != graph.CallKey(callID)) {
			continue
		}
		switch {
		case f.Kind == FaultLatency && latency == nil:
			if s.take(f) {
				c := *f
				latency = &c
			}
		case f.Kind == FaultStatus && status == nil:
			if s.take(f) {
				c := *f
				status = &c
			}
		}
	}
	return latency, status
}

// requestFault applies the request faults for action: it waits out a latency fault, then answers
// with a status fault if one applies (an Entra ID error body when aad is set) and reports
// true. The faults are recorded.
func (s *Sim) requestFault(w http.ResponseWriter, r *http.Request, action string, aad bool) bool {
	info := reqInfoFrom(r)
	s.mu.Lock()
	lat, st := s.requestFaults(action, info.callID)
	now := time.Now()
	for _, f := range []*Fault{lat, st} {
		if f != nil {
			s.injectLog = append(s.injectLog, InjectedFault{Time: now, Rule: f.ID, Kind: f.Kind, Action: action,
				RequestID: info.requestID, Status: f.Status, CallID: info.callID})
		}
	}
	s.mu.Unlock()
	delay := time.Duration(0)
	if lat != nil {
		delay += lat.Latency
	}
	if st != nil {
		delay += st.Latency
	}
	if delay > 0 {
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
		case <-s.ctx.Done():
		}
		t.Stop()
	}
	if st == nil {
		return false
	}
	setRetryAfter(w, st.RetryAfter)
	if aad {
		s.aadError(w, r, st.Status, aadErrorCode(st.Status), 500011, "graphsim: injected failure")
	} else {
		s.graphError(w, r, st.Status, errorCode(st.Status), "graphsim: injected failure for "+action)
	}
	return true
}

func aadErrorCode(status int) string {
	switch {
	case status == http.StatusTooManyRequests || status >= 500:
		return "temporarily_unavailable"
	case status == http.StatusUnauthorized:
		return "invalid_client"
	}
	return "invalid_request"
}

// noteFault picks the fault for a notification about to be posted and records it. held says
// a reordered notification of the call is waiting already: it is neither reordered nor batched
// then; batching says notifications wait to go in one request: this one may join them, but is
// not reordered. Called with s.mu held.
func (s *Sim) noteFault(c *call, n *outNote, held, batching bool) FaultKind {
	for _, f := range slices.Clone(s.faults) {
		if !f.Kind.IsNotification() || (f.Kind == FaultReorder && (held || batching)) || (f.Kind == FaultBatch && held) {
			continue
		}
		if f.CallID != "" && graph.CallKey(f.CallID) != c.key {
			continue
		}
		if f.State != "" && !strings.EqualFold(f.State, n.state) {
			continue
		}
		if !s.take(f) {
			continue
		}
		if f.Kind == FaultReorder || f.Kind == FaultBatch {
			n.hold = f.Latency
			if n.hold <= 0 {
				n.hold = DefaultReorderHold
			}
		}
		s.injectLog = append(s.injectLog, InjectedFault{Time: time.Now(), Rule: f.ID, Kind: f.Kind, CallID: c.id,
			ChangeType: string(n.changeType), ResourceURL: n.resourceURL, State: n.state})
		return f.Kind
	}
	return ""
}

package graphsim

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"go.uber.org/zap"
)

// CallerSpec describes a simulated caller.
type CallerSpec struct {
	// From is the caller: Kind graph.KindPhone with an E.164 number, or graph.KindUser with an
	// Entra object id.
	From graph.Party
	// To is the object id of the resource account (application instance) dialled.
	To string
	// Digits are pressed one by one: the first DigitDelay after the call's first prompt starts
	// playing, the next ones DigitDelay apart. Keys: 0-9, *, #, A-D.
	Digits     string
	DigitDelay time.Duration // default 100ms
	// HangUpAfter makes the caller hang up this long after the call was answered, unless it
	// ended before; 0 = never.
	HangUpAfter time.Duration
}

// Call outcomes. There is no outcome of its own for an agent invited into the call: the bot
// stays in the call and ends it, so such a call ends as OutcomeBotHangUp (or
// OutcomeCallerHangUp when the caller hangs up first) with CallResult.Agent set.
const (
	OutcomeTransferred  = "transferred"
	OutcomeCallerHangUp = "caller-hangup"
	OutcomeBotHangUp    = "bot-hangup"
	OutcomeRejected     = "rejected"
	OutcomeRedirected   = "redirected"
	OutcomeNotAnswered  = "not-answered"
	// OutcomeDropped: the bot sent no keepAlive within Options.KeepAliveTimeout (408/8537).
	OutcomeDropped = "dropped"
)

// CallResult is what a caller experienced.
type CallResult struct {
	ID         string      `json:"id"`
	ScenarioID string      `json:"scenarioId"`
	From       graph.Party `json:"from"`
	To         string      `json:"to"`
	Answered   bool        `json:"answered"`
	PlacedAt   time.Time   `json:"placedAt"`
	AnsweredAt time.Time   `json:"answeredAt,omitzero"`
	EndedAt    time.Time   `json:"endedAt,omitzero"`
	// Prompts are the URIs of the prompts played to the caller, in order; a prompt counts when
	// it starts playing.
	Prompts []string `json:"prompts"`
	// Tones are the digits pressed and delivered to the bot.
	Tones []string `json:"tones"`
	// TransferAttempts are the agent ids the call was transferred to, one per attempt.
	TransferAttempts []string `json:"transferAttempts"`
	// Invites are the agent ids the bot invited into the call, one per attempt.
	Invites []string `json:"invites"`
	// Agent took the call by transfer or redirect, or joined it by invite ("" if none); the
	// last one when several did.
	Agent string `json:"agent,omitempty"`
	// ConnectedAt is when Agent was connected: the transfer accepted, the redirect answered or
	// the invite joined.
	ConnectedAt time.Time `json:"connectedAt,omitzero"`
	// Outcome is "" while the call lives, then one of the Outcome constants.
	Outcome    string `json:"outcome,omitempty"`
	EndCode    int    `json:"endCode,omitempty"`
	EndSubcode int    `json:"endSubcode,omitempty"`
}

func (r CallResult) clone() CallResult {
	r.Prompts = slices.Clone(r.Prompts)
	r.Tones = slices.Clone(r.Tones)
	r.TransferAttempts = slices.Clone(r.TransferAttempts)
	r.Invites = slices.Clone(r.Invites)
	return r
}

// Call is a simulated caller's handle on their call.
type Call struct {
	s *Sim
	c *call
}

// PlaceCall makes a caller dial spec.To: the call is created in state incoming and its
// `created` notification posted to Options.WebhookURL. PlaceCall returns once the bot
// acknowledged that notification. When delivery fails (after retries) or ctx ends first, it
// returns the call together with the error (wrapping ErrDropped when a fault dropped the
// notification): the call exists and ends as not-answered when Options.AnswerTimeout passes.
// The error is ErrNoWebhook, ErrInvalidSpec or ErrClosed when no call was created.
func (s *Sim) PlaceCall(ctx context.Context, spec CallerSpec) (*Call, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if s.opts.WebhookURL == "" {
		return nil, ErrNoWebhook
	}
	if spec.From.ID == "" || spec.From.Kind == "" {
		return nil, fmt.Errorf("%w: From needs a Kind and an ID", ErrInvalidSpec)
	}
	if spec.To == "" {
		return nil, fmt.Errorf("%w: To (the resource account id) is required", ErrInvalidSpec)
	}
	if err := checkDigits(spec.Digits); err != nil {
		return nil, err
	}
	if spec.DigitDelay <= 0 {
		spec.DigitDelay = DefaultDigitDelay
	}
	if spec.From.Kind == graph.KindUser && spec.From.TenantID == "" {
		spec.From.TenantID = s.opts.TenantID
	}
	id := newID()
	c := &call{
		id: id, key: graph.CallKey(id), scenarioID: newID(), chainID: newID(), myParticipantID: newID(),
		callerPartID: newID(), from: spec.From, to: spec.To, spec: spec, state: graph.CallIncoming,
		wake: make(chan struct{}, 1), done: make(chan struct{}),
	}
	c.res = CallResult{ID: id, ScenarioID: c.scenarioID, From: spec.From, To: spec.To, PlacedAt: time.Now()}
	ack := make(chan error, 1)

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	s.calls[c.key] = c
	s.order = append(s.order, c)
	s.sendCall(c, graph.Created, callData{
		ID: id, State: graph.CallIncoming, Direction: "incoming", Source: c.source(), Targets: c.targets(s),
		RequestedModalities: []string{"audio"}, TenantID: s.opts.TenantID,
		MyParticipantID: c.myParticipantID, CallChainID: c.chainID, CallbackURI: s.opts.WebhookURL,
	}, ack)
	s.afterCall(c, s.opts.AnswerTimeout, func() {
		if c.state == graph.CallIncoming {
			s.finish(c, OutcomeNotAnswered, 408, 1106, nil)
		}
	})
	s.wg.Add(1)
	go s.runOutbox(c)
	s.mu.Unlock()
	s.log.Debug("call placed", zap.String("call_id", id), zap.String("scenario_id", c.scenarioID),
		zap.String("tenant_id", s.opts.TenantID), zap.String("from", spec.From.Masked()), zap.String("to", spec.To))

	cl := &Call{s: s, c: c}
	select {
	case err := <-ack:
		if err != nil {
			return cl, fmt.Errorf("place call %s: %w", id, err)
		}
		return cl, nil
	case <-ctx.Done():
		return cl, fmt.Errorf("place call %s: %w", id, ctx.Err())
	case <-s.ctx.Done():
		return cl, fmt.Errorf("place call %s: %w", id, ErrClosed)
	}
}

func checkDigits(d string) error {
	for _, r := range d {
		if !strings.ContainsRune("0123456789*#ABCDabcd", r) {
			return fmt.Errorf("%w: %q is not a DTMF key", ErrInvalidSpec, r)
		}
	}
	return nil
}

// ID is the Graph call id (a lowercase GUID).
func (cl *Call) ID() string { return cl.c.id }

// Press presses keys now, one after the other. Tones reach the bot only while the call is
// established and the bot has subscribed to tones; otherwise they are lost, as on Graph. It
// returns ErrCallEnded, or ErrNotInCall when the call is not established (incoming,
// transferring...).
func (cl *Call) Press(digits string) error {
	if err := checkDigits(digits); err != nil {
		return err
	}
	s := cl.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	for _, r := range digits {
		if err := s.press(cl.c, strings.ToUpper(string(r))); err != nil {
			return err
		}
	}
	return nil
}

// HangUp hangs up: the bot gets deleted/terminated with 200/540000 (phone caller) or 200/4097
// (Teams user). It returns ErrCallEnded if the call had ended.
func (cl *Call) HangUp() error {
	s := cl.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if cl.c.ended {
		return ErrCallEnded
	}
	s.callerHangUp(cl.c)
	return nil
}

// Done is closed once the call has ended and its last notification was delivered (or given
// up), or when the simulator closes.
func (cl *Call) Done() <-chan struct{} { return cl.c.done }

// Result returns a snapshot of what the caller experienced so far.
func (cl *Call) Result() CallResult {
	cl.s.mu.Lock()
	defer cl.s.mu.Unlock()
	return cl.c.res.clone()
}

// Calls returns the results of every call placed, in order.
func (s *Sim) Calls() []CallResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]CallResult, len(s.order))
	for i, c := range s.order {
		out[i] = c.res.clone()
	}
	return out
}

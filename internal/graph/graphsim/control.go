package graphsim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"go.uber.org/zap"
)

// DefaultResourceAccount is the resource account a call placed through the control API dials
// when it names none.
const DefaultResourceAccount = "7629bdce-046c-4903-86b4-a8f718277e1a"

// ControlPrefix is the path prefix of the control API.
const ControlPrefix = "/_sim/"

// control serves the control API: JSON over the simulator's HTTPS server, without
// authentication (the server listens on loopback unless told otherwise). Its requests are not
// recorded in Requests: they are not Graph traffic.
func (s *Sim) control() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_sim/{$}", s.ctlInfo)
	mux.HandleFunc("POST /_sim/calls", s.ctlPlaceCall)
	mux.HandleFunc("GET /_sim/calls", s.ctlListCalls)
	mux.HandleFunc("GET /_sim/calls/{id}", s.ctlGetCall)
	mux.HandleFunc("POST /_sim/calls/{id}/press", s.ctlPress)
	mux.HandleFunc("POST /_sim/calls/{id}/hangup", s.ctlHangUp)
	mux.HandleFunc("GET /_sim/agents", s.ctlListAgents)
	mux.HandleFunc("PUT /_sim/agents/{id}", s.ctlPutAgent)
	mux.HandleFunc("GET /_sim/agents/{id}", s.ctlGetAgent)
	mux.HandleFunc("PUT /_sim/agents/{id}/presence", s.ctlPutPresence)
	mux.HandleFunc("PUT /_sim/agents/{id}/answer", s.ctlPutAnswer)
	mux.HandleFunc("GET /_sim/requests", s.ctlRequests)
	mux.HandleFunc("GET /_sim/deliveries", s.ctlDeliveries)
	mux.HandleFunc("GET /_sim/faults", s.ctlListFaults)
	mux.HandleFunc("POST /_sim/faults", s.ctlAddFault)
	mux.HandleFunc("DELETE /_sim/faults", s.ctlClearFaults)
	mux.HandleFunc("DELETE /_sim/faults/{id}", s.ctlRemoveFault)
	mux.HandleFunc("/_sim/", func(w http.ResponseWriter, r *http.Request) {
		ctlError(w, http.StatusNotFound, "no control endpoint %s %s (see docs/graphsim.md)", r.Method, r.URL.Path)
	})
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			ctlError(w, http.StatusServiceUnavailable, "graphsim is shutting down")
			return
		}
		s.handlers.Add(1)
		s.mu.Unlock()
		defer s.handlers.Done()
		w.Header().Set("Cache-Control", "no-store")
		mux.ServeHTTP(w, r)
		s.log.Debug("control request", zap.String("method", r.Method), zap.String("path", r.URL.Path))
	})
}

// ctlError writes {"error": message}.
func ctlError(w http.ResponseWriter, status int, format string, args ...any) {
	writeJSON(w, status, map[string]string{"error": fmt.Sprintf(format, args...)})
}

// readJSON decodes a request body strictly: unknown fields and trailing data are errors.
func readJSON(r *http.Request, v any) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("read body: %w", err)
	}
	if len(bytes.TrimSpace(body)) == 0 {
		return errors.New("the request body is empty: send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("invalid JSON body: %w", err)
	}
	if dec.More() {
		return errors.New("invalid JSON body: data after the object")
	}
	return nil
}

// parseDuration reads an optional duration field ("" is 0).
func parseDuration(field, v string) (time.Duration, error) {
	if v == "" {
		return 0, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a duration like 500ms or 2s", field, v)
	}
	if d < 0 {
		return 0, fmt.Errorf("%s: %q is negative", field, v)
	}
	return d, nil
}

func formatDuration(d time.Duration) string {
	if d == 0 {
		return ""
	}
	return d.String()
}

// EnvVar is one environment variable.
type EnvVar struct{ Name, Value string }

// BotEnv returns the CALLBOT_* environment that points `callbot serve` at the simulator:
// Graph, authority and callback-token metadata URLs, the CA file (caFile, or the path last
// given to WriteCAFile), the app registration and the accepted issuer; and CALLBOT_PUBLIC_URL
// when the webhook URL ends in /api/calls, as callbot's does.
func (s *Sim) BotEnv(caFile string) []EnvVar {
	if caFile == "" {
		s.mu.Lock()
		caFile = s.caFile
		s.mu.Unlock()
	}
	env := []EnvVar{
		{"CALLBOT_GRAPH_URL", s.GraphURL()},
		{"CALLBOT_AUTHORITY_HOST", s.AuthorityHost()},
		{"CALLBOT_OPENID_CONFIG_URL", s.OpenIDConfigURL()},
		{"CALLBOT_CA_FILE", caFile},
		{"CALLBOT_TENANT_ID", s.opts.TenantID},
		{"CALLBOT_CLIENT_ID", s.opts.ClientID},
		{"CALLBOT_CLIENT_SECRET", s.opts.ClientSecret},
		{"CALLBOT_TOKEN_ISSUERS", s.opts.Issuer},
	}
	if base, ok := strings.CutSuffix(s.opts.WebhookURL, "/api/calls"); ok && base != "" {
		env = append(env, EnvVar{"CALLBOT_PUBLIC_URL", base})
	}
	return env
}

func (s *Sim) ctlInfo(w http.ResponseWriter, _ *http.Request) {
	env := map[string]string{}
	for _, e := range s.BotEnv("") {
		env[e.Name] = e.Value
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"url": s.URL(), "graphUrl": s.GraphURL(), "authorityHost": s.AuthorityHost(),
		"openIdConfigUrl": s.OpenIDConfigURL(), "webhookUrl": s.opts.WebhookURL,
		"tenantId": s.opts.TenantID, "clientId": s.opts.ClientID, "issuer": s.opts.Issuer,
		"seed": s.seed, "callbackKeyId": s.CallbackKeyID(), "env": env,
	})
}

// callerJSON is a CallerSpec in the control API.
type callerJSON struct {
	From        graph.Party `json:"from"`
	To          string      `json:"to"`
	Digits      string      `json:"digits"`
	DigitDelay  string      `json:"digitDelay"`
	HangUpAfter string      `json:"hangUpAfter"`
}

func (c callerJSON) spec() (CallerSpec, error) {
	switch c.From.Kind {
	case graph.KindPhone, graph.KindUser, graph.KindGuest, graph.KindEncrypted, graph.KindApplication, graph.KindApplicationInstance:
	case "":
		return CallerSpec{}, errors.New(`from: give the caller as {"kind":"phone","id":"+14255550100"} or {"kind":"user","id":"<entra object id>"}`)
	default:
		return CallerSpec{}, fmt.Errorf("from.kind: %q is not phone, user, guest, encrypted, application or applicationInstance", c.From.Kind)
	}
	if c.From.ID == "" {
		return CallerSpec{}, errors.New("from.id is required")
	}
	if c.To == "" {
		c.To = DefaultResourceAccount
	}
	if err := checkDigits(c.Digits); err != nil {
		return CallerSpec{}, fmt.Errorf("digits: %w", err)
	}
	dd, err := parseDuration("digitDelay", c.DigitDelay)
	if err != nil {
		return CallerSpec{}, err
	}
	hu, err := parseDuration("hangUpAfter", c.HangUpAfter)
	if err != nil {
		return CallerSpec{}, err
	}
	return CallerSpec{From: c.From, To: c.To, Digits: c.Digits, DigitDelay: dd, HangUpAfter: hu}, nil
}

func (s *Sim) ctlPlaceCall(w http.ResponseWriter, r *http.Request) {
	var in callerJSON
	if err := readJSON(r, &in); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	spec, err := in.spec()
	if err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	cl, err := s.PlaceCall(r.Context(), spec)
	switch {
	case cl == nil && errors.Is(err, ErrNoWebhook):
		ctlError(w, http.StatusConflict, "the simulator has no webhook URL to post incoming calls to (Options.WebhookURL, -webhook)")
		return
	case cl == nil && errors.Is(err, ErrClosed):
		ctlError(w, http.StatusServiceUnavailable, "graphsim is shutting down")
		return
	case cl == nil:
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	out := map[string]string{"id": cl.ID()}
	if err != nil {
		// The call exists; the bot did not acknowledge its `created` notification.
		out["deliveryError"] = err.Error()
	}
	w.Header().Set("Location", ControlPrefix+"calls/"+cl.ID())
	writeJSON(w, http.StatusCreated, out)
}

// callJSON is a call in the control API: what the caller experienced, and the call's state.
type callJSON struct {
	CallResult
	State string `json:"state"`
}

// findCall finds a call, live or ended, by id in any of its written forms. Called with s.mu
// held.
func (s *Sim) findCall(id string) *call { return s.calls[graph.CallKey(id)] }

func (s *Sim) ctlListCalls(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	out := make([]callJSON, len(s.order))
	for i, c := range s.order {
		out[i] = callJSON{c.res.clone(), string(c.state)}
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func (s *Sim) ctlGetCall(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	c := s.findCall(r.PathValue("id"))
	var out callJSON
	if c != nil {
		out = callJSON{c.res.clone(), string(c.state)}
	}
	s.mu.Unlock()
	if c == nil {
		ctlError(w, http.StatusNotFound, "no call %s", r.PathValue("id"))
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// callHandle returns the caller's handle on a call, or answers 404.
func (s *Sim) callHandle(w http.ResponseWriter, r *http.Request) *Call {
	s.mu.Lock()
	c := s.findCall(r.PathValue("id"))
	s.mu.Unlock()
	if c == nil {
		ctlError(w, http.StatusNotFound, "no call %s", r.PathValue("id"))
		return nil
	}
	return &Call{s: s, c: c}
}

// callErrorStatus maps the caller-side errors to a status.
func callErrorStatus(err error) int {
	switch {
	case errors.Is(err, ErrCallEnded), errors.Is(err, ErrNotInCall):
		return http.StatusConflict
	case errors.Is(err, ErrClosed):
		return http.StatusServiceUnavailable
	}
	return http.StatusBadRequest
}

func (s *Sim) ctlPress(w http.ResponseWriter, r *http.Request) {
	cl := s.callHandle(w, r)
	if cl == nil {
		return
	}
	var in struct {
		Digits string `json:"digits"`
	}
	if err := readJSON(r, &in); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	if in.Digits == "" {
		ctlError(w, http.StatusBadRequest, `digits is required, e.g. {"digits":"1#"}`)
		return
	}
	if err := cl.Press(in.Digits); err != nil {
		ctlError(w, callErrorStatus(err), "%v", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (s *Sim) ctlHangUp(w http.ResponseWriter, r *http.Request) {
	cl := s.callHandle(w, r)
	if cl == nil {
		return
	}
	if err := cl.HangUp(); err != nil {
		ctlError(w, callErrorStatus(err), "%v", err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// agentView is an agent in the control API.
type agentView struct {
	AgentJSON
	Presence graph.Presence `json:"presence"`
	Stats    AgentStats     `json:"stats"`
}

// agentView returns an agent's view, or false for an unknown id. Called with s.mu held.
func (s *Sim) agentView(id string) (agentView, bool) {
	a := s.agents[strings.ToLower(id)]
	if a == nil {
		return agentView{}, false
	}
	spec := a.spec
	spec.Answer = a.answer
	return agentView{AgentJSON: agentJSONOf(spec), Presence: s.presenceOf(a.spec.ID), Stats: a.stats}, true
}

func (s *Sim) ctlListAgents(w http.ResponseWriter, _ *http.Request) {
	s.mu.Lock()
	keys := make([]string, 0, len(s.agents))
	for k := range s.agents {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]agentView, 0, len(keys))
	for _, k := range keys {
		v, _ := s.agentView(k)
		out = append(out, v)
	}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func (s *Sim) ctlGetAgent(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	v, ok := s.agentView(r.PathValue("id"))
	s.mu.Unlock()
	if !ok {
		ctlError(w, http.StatusNotFound, "no agent %s (add one with PUT %sagents/{id})", r.PathValue("id"), ControlPrefix)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (s *Sim) ctlPutAgent(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var in AgentJSON
	if err := readJSON(r, &in); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	if in.ID == "" {
		in.ID = id
	}
	if !strings.EqualFold(in.ID, id) {
		ctlError(w, http.StatusBadRequest, "id %q in the body is not the agent %q of the path", in.ID, id)
		return
	}
	spec, err := in.Spec()
	if err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	s.mu.Lock()
	_, existed := s.agents[strings.ToLower(id)]
	s.mu.Unlock()
	s.AddAgent(spec)
	s.mu.Lock()
	v, _ := s.agentView(id)
	s.mu.Unlock()
	status := http.StatusOK
	if !existed {
		status = http.StatusCreated
	}
	writeJSON(w, status, v)
}

func (s *Sim) ctlPutPresence(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Availability string `json:"availability"`
		Activity     string `json:"activity"`
	}
	if err := readJSON(r, &in); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	if in.Activity == "" {
		in.Activity = in.Availability
	}
	if err := checkPresence(in.Availability, in.Activity); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	// Any user may have a presence, agent or not: getPresencesByUserId answers for everyone.
	id := r.PathValue("id")
	s.SetPresence(id, in.Availability, in.Activity)
	writeJSON(w, http.StatusOK, s.Presence(id))
}

func (s *Sim) ctlPutAnswer(w http.ResponseWriter, r *http.Request) {
	var in struct {
		Answer string `json:"answer"`
	}
	if err := readJSON(r, &in); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	a, err := ParseAgentAnswer(in.Answer)
	if err != nil {
		ctlError(w, http.StatusBadRequest, "answer: %v", err)
		return
	}
	id := r.PathValue("id")
	s.mu.Lock()
	ag := s.agents[strings.ToLower(id)]
	if ag != nil {
		ag.answer = a
	}
	v, _ := s.agentView(id)
	s.mu.Unlock()
	if ag == nil {
		ctlError(w, http.StatusNotFound, "no agent %s (add one with PUT %sagents/{id})", id, ControlPrefix)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// requestJSON is a recorded request in the control API. The Authorization header is redacted.
type requestJSON struct {
	Time      time.Time         `json:"time"`
	Method    string            `json:"method"`
	Path      string            `json:"path"`
	Query     string            `json:"query,omitempty"`
	Action    string            `json:"action"`
	CallID    string            `json:"callId,omitempty"`
	RequestID string            `json:"requestId"`
	Status    int               `json:"status"`
	Headers   map[string]string `json:"headers"`
	Body      json.RawMessage   `json:"body,omitempty"`
}

// rawBody is a body as JSON: itself when it is JSON, else a JSON string.
func rawBody(b []byte) json.RawMessage {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil
	}
	if json.Valid(b) {
		return json.RawMessage(b)
	}
	q, _ := json.Marshal(string(b))
	return q
}

func flatHeaders(h http.Header) map[string]string {
	out := make(map[string]string, len(h))
	for k, v := range h {
		out[k] = strings.Join(v, ", ")
	}
	if a, ok := out["Authorization"]; ok {
		scheme, _, _ := strings.Cut(a, " ")
		out["Authorization"] = scheme + " [redacted]"
	}
	return out
}

func (s *Sim) ctlRequests(w http.ResponseWriter, r *http.Request) {
	callID, action := r.URL.Query().Get("call"), r.URL.Query().Get("action")
	var rs []Request
	if callID != "" {
		rs = s.RequestsFor(callID)
	} else {
		rs = s.Requests()
	}
	out := []requestJSON{}
	for _, q := range rs {
		if action != "" && !strings.EqualFold(q.Action, action) {
			continue
		}
		out = append(out, requestJSON{Time: q.Time, Method: q.Method, Path: q.Path, Query: q.Query, Action: q.Action,
			CallID: q.CallID, RequestID: q.RequestID, Status: q.Status, Headers: flatHeaders(q.Header), Body: rawBody(q.Body)})
	}
	writeJSON(w, http.StatusOK, out)
}

// deliveryJSON is a notification delivery attempt in the control API.
type deliveryJSON struct {
	Time        time.Time       `json:"time"`
	CallID      string          `json:"callId"`
	URL         string          `json:"url"`
	Attempt     int             `json:"attempt"`
	ChangeType  string          `json:"changeType"`
	ResourceURL string          `json:"resourceUrl"`
	State       string          `json:"state"`
	Status      int             `json:"status"`
	Err         string          `json:"error,omitempty"`
	Fault       FaultKind       `json:"fault,omitempty"`
	Body        json.RawMessage `json:"body"`
}

func (s *Sim) ctlDeliveries(w http.ResponseWriter, r *http.Request) {
	key := ""
	if id := r.URL.Query().Get("call"); id != "" {
		key = graph.CallKey(id)
	}
	out := []deliveryJSON{}
	for _, d := range s.Deliveries() {
		if key != "" && graph.CallKey(d.CallID) != key {
			continue
		}
		out = append(out, deliveryJSON{Time: d.Time, CallID: d.CallID, URL: d.URL, Attempt: d.Attempt, ChangeType: d.ChangeType,
			ResourceURL: d.ResourceURL, State: d.State, Status: d.Status, Err: d.Err, Fault: d.Fault, Body: rawBody(d.Body)})
	}
	writeJSON(w, http.StatusOK, out)
}

// faultJSON is a Fault in the control API: durations are strings ("250ms").
type faultJSON struct {
	ID          string    `json:"id,omitempty"`
	Kind        FaultKind `json:"kind"`
	Action      string    `json:"action,omitempty"`
	CallID      string    `json:"call,omitempty"`
	State       string    `json:"state,omitempty"`
	Status      int       `json:"status,omitempty"`
	RetryAfter  string    `json:"retryAfter,omitempty"`
	Latency     string    `json:"latency,omitempty"`
	Count       int       `json:"count,omitempty"`
	Probability float64   `json:"probability,omitempty"`
}

func faultJSONOf(f Fault) faultJSON {
	return faultJSON{ID: f.ID, Kind: f.Kind, Action: f.Action, CallID: f.CallID, State: f.State, Status: f.Status,
		RetryAfter: formatDuration(f.RetryAfter), Latency: formatDuration(f.Latency), Count: f.Count, Probability: f.Probability}
}

func (j faultJSON) fault() (Fault, error) {
	ra, err := parseDuration("retryAfter", j.RetryAfter)
	if err != nil {
		return Fault{}, err
	}
	lat, err := parseDuration("latency", j.Latency)
	if err != nil {
		return Fault{}, err
	}
	return Fault{Kind: j.Kind, Action: j.Action, CallID: j.CallID, State: j.State, Status: j.Status,
		RetryAfter: ra, Latency: lat, Count: j.Count, Probability: j.Probability}, nil
}

func (s *Sim) ctlListFaults(w http.ResponseWriter, _ *http.Request) {
	rules := []faultJSON{}
	for _, f := range s.Faults() {
		rules = append(rules, faultJSONOf(f))
	}
	injected := s.Injected()
	if injected == nil {
		injected = []InjectedFault{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"rules": rules, "injected": injected})
}

func (s *Sim) ctlAddFault(w http.ResponseWriter, r *http.Request) {
	var in faultJSON
	if err := readJSON(r, &in); err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	if in.ID != "" {
		ctlError(w, http.StatusBadRequest, "id is assigned by the simulator")
		return
	}
	if in.Kind == FaultRollover {
		if in != (faultJSON{Kind: FaultRollover}) {
			ctlError(w, http.StatusBadRequest, "a rollover takes no other field")
			return
		}
		kid, err := s.RolloverKey()
		if err != nil {
			ctlError(w, http.StatusInternalServerError, "%v", err)
			return
		}
		writeJSON(w, http.StatusCreated, map[string]string{"kid": kid})
		return
	}
	f, err := in.fault()
	if err != nil {
		ctlError(w, http.StatusBadRequest, "%v", err)
		return
	}
	id, err := s.AddFault(f)
	if err != nil {
		ctlError(w, http.StatusBadRequest, "%s", strings.TrimPrefix(err.Error(), ErrInvalidFault.Error()+": "))
		return
	}
	w.Header().Set("Location", ControlPrefix+"faults/"+id)
	writeJSON(w, http.StatusCreated, map[string]string{"id": id})
}

func (s *Sim) ctlClearFaults(w http.ResponseWriter, _ *http.Request) {
	s.ClearFaults()
	w.WriteHeader(http.StatusNoContent)
}

func (s *Sim) ctlRemoveFault(w http.ResponseWriter, r *http.Request) {
	if !s.RemoveFault(r.PathValue("id")) {
		ctlError(w, http.StatusNotFound, "no fault rule %s", r.PathValue("id"))
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

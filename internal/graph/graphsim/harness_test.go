package graphsim

import (
	"bytes"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/golang-jwt/jwt/v5"
	"go.uber.org/zap/zaptest"
)

const (
	testTenant  = "632899f8-2ea1-4604-8413-27bd2892079f"
	testClient  = "0efc74f7-41c3-47a4-8775-7259bfef4241"
	testSecret  = "s3cret"
	testAppInst = "7629bdce-046c-4903-86b4-a8f718277e1a"
	agentA      = "550fae72-d251-43ec-868c-373732c2704f"
	agentB      = "98da8a1a-1b87-452c-a713-65d3f10b1253"
	promptURI   = "https://cdn.contoso.com/welcome.wav"
)

var phoneCaller = graph.Party{Kind: graph.KindPhone, ID: "+493012345678"}

// fastOptions keeps every scenario well under a second.
func fastOptions() Options {
	return Options{
		TenantID: testTenant, ClientID: testClient, ClientSecret: testSecret,
		PromptDuration: 20 * time.Millisecond,
		StepDelay:      5 * time.Millisecond,
		AnswerTimeout:  3 * time.Second,
		RingTimeout:    100 * time.Millisecond,
	}
}

// seen is one notification as the fake bot received it.
type seen struct {
	Path       string
	ScenarioID string
	N          graph.Notification
	Raw        []byte
}

// fakeBot is a tiny calling bot: an httptest server that verifies the callback token against
// the simulator's JWKS, decodes notifications with graph.Decode and reacts by calling the
// simulator's Graph endpoints with net/http.
type fakeBot struct {
	t     *testing.T
	s     *Sim
	srv   *httptest.Server
	react func(b *fakeBot, n graph.Notification)

	mu      sync.Mutex
	notes   map[string][]seen
	keys    map[string]*rsa.PublicKey
	token   string
	authErr []error
	status  func(n int) int   // optional: status to answer the n-th request (1-based)
	lenient bool              // callers hang up at random: do not insist on Graph statuses
	refetch bool              // fetch the keys again when a token names an unknown kid
	ops     map[string]string // call key -> id of the last invite operation the bot started
	count   int
}

// newHarness starts a fake bot and a simulator whose webhook is the bot's /api/calls.
func newHarness(t *testing.T, opts Options, react func(b *fakeBot, n graph.Notification)) (*Sim, *fakeBot) {
	t.Helper()
	b := &fakeBot{t: t, react: react, notes: map[string][]seen{}}
	newBotServer(b)
	opts.WebhookURL = b.srv.URL + "/api/calls"
	if opts.Logger == nil {
		opts.Logger = zaptest.NewLogger(t)
	}
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	b.s = s
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		b.srv.Close()
		checkDeliveriesDecode(t, s)
	})
	return s, b
}

// checkDeliveriesDecode asserts that every notification the simulator sent decodes with
// graph.Decode into what its delivery record says. The records of a batched request follow one
// another, one for each notification it carried.
func checkDeliveriesDecode(t *testing.T, s *Sim) {
	t.Helper()
	ds := s.Deliveries()
	inBatch := 0 // the record's place in its request
	for i, d := range ds {
		ns, err := graph.Decode(d.Body)
		if err != nil {
			t.Errorf("delivery %d: graph.Decode: %v\n%s", i, err, d.Body)
			continue
		}
		if i > 0 && d.Fault == FaultBatch && ds[i-1].Fault == FaultBatch && ds[i-1].Time.Equal(d.Time) && bytes.Equal(ds[i-1].Body, d.Body) {
			inBatch++
		} else {
			inBatch = 0
		}
		if (len(ns) != 1 && d.Fault != FaultBatch) || inBatch >= len(ns) {
			t.Errorf("delivery %d (%s): %d notifications, record %d of its request", i, d.Fault, len(ns), inBatch)
			continue
		}
		n := ns[inBatch]
		if string(n.ChangeType) != d.ChangeType || n.ResourceURL != d.ResourceURL || graph.CallKey(n.CallID) != graph.CallKey(d.CallID) {
			t.Errorf("delivery %d: decoded %+v, record %+v", i, n, d)
		}
		switch n.Kind {
		case graph.ResourceCall:
			if string(n.Call.State) != d.State || n.DataType != graph.TypeCall {
				t.Errorf("delivery %d: state %q type %q, record %q", i, n.Call.State, n.DataType, d.State)
			}
		case graph.ResourceOperation:
			if string(n.Operation.Status) != d.State || n.Operation.ID != n.OperationID ||
				(n.DataType != graph.TypePlayPromptOperation && n.DataType != graph.TypeInviteParticipantsOp) {
				t.Errorf("delivery %d: operation %s %+v", i, n.DataType, n.Operation)
			}
		case graph.ResourceParticipants:
			if d.State != "" || n.ChangeType != graph.Updated || n.DataType != graph.TypeParticipant || len(n.Participants) < 2 {
				t.Errorf("delivery %d: roster %s %+v, record state %q", i, n.DataType, n.Participants, d.State)
			}
			for j, p := range n.Participants {
				if _, ok := p.Info.Identity.Primary(); !ok || p.ID == "" || p.ODataType != graph.TypeParticipant || p.RosterSequenceNumber <= 0 {
					t.Errorf("delivery %d: participant %d: %+v", i, j, p)
				}
			}
		default:
			t.Errorf("delivery %d: kind %v", i, n.Kind)
		}
	}
}

func newBotServer(b *fakeBot) *httptest.Server {
	b.srv = httptest.NewServer(b)
	return b.srv
}

func (b *fakeBot) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	b.count++
	n := b.count
	b.mu.Unlock()
	if b.status != nil {
		if st := b.status(n); st != 0 {
			w.WriteHeader(st)
			return
		}
	}
	if err := b.verify(r); err != nil {
		b.mu.Lock()
		b.authErr = append(b.authErr, err)
		b.mu.Unlock()
		http.Error(w, err.Error(), http.StatusForbidden)
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	ns, err := graph.Decode(body)
	if err != nil {
		b.t.Errorf("bot: decode: %v\n%s", err, body)
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	for _, n := range ns {
		b.mu.Lock()
		k := graph.CallKey(n.CallID)
		b.notes[k] = append(b.notes[k], seen{Path: r.URL.Path, ScenarioID: r.Header.Get("Scenario-Id"), N: n, Raw: body})
		b.mu.Unlock()
		if b.react != nil {
			b.react(b, n)
		}
	}
	w.WriteHeader(http.StatusAccepted)
}

// verify checks the callback token as callbot's webhook does: RS256 against the keys named by
// the simulator's OpenID document, audience, issuer, lifetime, tid.
func (b *fakeBot) verify(r *http.Request) error {
	scheme, tok, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if scheme != "Bearer" || tok == "" {
		return fmt.Errorf("no bearer token")
	}
	keys, err := b.jwks()
	if err != nil {
		return err
	}
	_, err = verifyCallbackToken(tok, keys, testClient, DefaultIssuer, testTenant)
	if err != nil && b.refetch && strings.Contains(err.Error(), "unknown kid") {
		b.mu.Lock()
		b.keys = nil
		b.mu.Unlock()
		if keys, err = b.jwks(); err != nil {
			return err
		}
		_, err = verifyCallbackToken(tok, keys, testClient, DefaultIssuer, testTenant)
	}
	return err
}

func verifyCallbackToken(tok string, keys map[string]*rsa.PublicKey, aud, iss, tid string) (jwt.MapClaims, error) {
	claims := jwt.MapClaims{}
	_, err := jwt.ParseWithClaims(tok, claims, func(t *jwt.Token) (any, error) {
		kid, _ := t.Header["kid"].(string)
		if k := keys[kid]; k != nil {
			return k, nil
		}
		return nil, fmt.Errorf("unknown kid %q", kid)
	}, jwt.WithValidMethods([]string{"RS256"}), jwt.WithAudience(aud), jwt.WithIssuer(iss), jwt.WithExpirationRequired())
	if err != nil {
		return nil, err
	}
	if claims["tid"] != tid {
		return nil, fmt.Errorf("tid %v", claims["tid"])
	}
	return claims, nil
}

// jwks fetches the callback signing keys the way a webhook does: OpenID document, then jwks_uri.
func (b *fakeBot) jwks() (map[string]*rsa.PublicKey, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.keys != nil {
		return b.keys, nil
	}
	keys, err := fetchJWKS(b.s.Client(), b.s.OpenIDConfigURL())
	if err == nil {
		b.keys = keys
	}
	return keys, err
}

func fetchJWKS(c *http.Client, configURL string) (map[string]*rsa.PublicKey, error) {
	var meta struct {
		Issuer  string `json:"issuer"`
		JWKSURI string `json:"jwks_uri"`
	}
	if err := getJSON(c, configURL, &meta); err != nil {
		return nil, err
	}
	return fetchKeys(c, meta.JWKSURI)
}

// fetchKeys reads a JWKS.
func fetchKeys(c *http.Client, jwksURI string) (map[string]*rsa.PublicKey, error) {
	var set struct {
		Keys []struct{ Kty, Use, Kid, N, E string } `json:"keys"`
	}
	if err := getJSON(c, jwksURI, &set); err != nil {
		return nil, err
	}
	keys := map[string]*rsa.PublicKey{}
	for _, k := range set.Keys {
		n, err1 := base64.RawURLEncoding.DecodeString(k.N)
		e, err2 := base64.RawURLEncoding.DecodeString(k.E)
		if k.Kty != "RSA" || k.Use != "sig" || k.Kid == "" || err1 != nil || err2 != nil {
			return nil, fmt.Errorf("bad jwk %+v", k)
		}
		keys[k.Kid] = &rsa.PublicKey{N: new(big.Int).SetBytes(n), E: int(new(big.Int).SetBytes(e).Int64())}
	}
	return keys, nil
}

func getJSON(c *http.Client, u string, v any) error {
	resp, err := c.Get(u)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", u, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// fetchToken runs the client-credentials grant against the simulator.
func fetchToken(t *testing.T, s *Sim, clientID, secret string) (int, map[string]any) {
	t.Helper()
	form := url.Values{
		"grant_type":    {"client_credentials"},
		"client_id":     {clientID},
		"client_secret": {secret},
		"scope":         {"https://graph.microsoft.com/.default openid offline_access profile"},
	}
	resp, err := s.Client().PostForm(s.URL()+"/"+testTenant+"/oauth2/v2.0/token", form)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, out
}

func (b *fakeBot) accessToken() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.token == "" {
		st, out := fetchToken(b.t, b.s, testClient, testSecret)
		if st != http.StatusOK {
			b.t.Errorf("token: %d %v", st, out)
		}
		b.token, _ = out["access_token"].(string)
	}
	return b.token
}

// call sends a Graph request the way the bot would: bearer token and JSON body.
func (b *fakeBot) call(method, path string, body any) (int, []byte, http.Header) {
	return doGraph(b.t, b.s, b.accessToken(), method, path, body)
}

func doGraph(t *testing.T, s *Sim, token, method, path string, body any) (int, []byte, http.Header) {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, s.GraphURL()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("client-request-id", "crid-"+method)
	resp, err := s.Client().Do(req)
	if err != nil {
		s.mu.Lock()
		closed := s.closed
		s.mu.Unlock()
		// A bot still reacting to a notification delivered before the simulator closed finds
		// nothing listening (TestConcurrentCallsAndClose): what a closed Graph does, no fault.
		if !closed {
			t.Errorf("%s %s: %v", method, path, err)
		}
		return 0, nil, nil
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out, resp.Header
}

func (b *fakeBot) action(callID, action string, body any, want int) []byte {
	st, out, _ := b.call(http.MethodPost, "/communications/calls/"+callID+"/"+action, body)
	if st != want && !b.lenient {
		b.t.Errorf("%s %s: status %d, want %d: %s", action, callID, st, want, out)
	}
	return out
}

func (b *fakeBot) answer(callID string) {
	b.action(callID, "answer", map[string]any{
		"callbackUri":        b.srv.URL + "/api/calls/cb/" + callID,
		"acceptedModalities": []string{"audio"},
		"mediaConfig":        map[string]any{"@odata.type": "#microsoft.graph.serviceHostedMediaConfig"},
	}, http.StatusAccepted)
}

func (b *fakeBot) playPrompt(callID, ctx string, uris ...string) string {
	var prompts []any
	for _, u := range uris {
		prompts = append(prompts, map[string]any{"@odata.type": "#microsoft.graph.mediaPrompt", "mediaInfo": map[string]any{"uri": u}})
	}
	out := b.action(callID, "playPrompt", map[string]any{"clientContext": ctx, "prompts": prompts}, http.StatusOK)
	var op struct{ ID, Status string }
	_ = json.Unmarshal(out, &op)
	if op.Status != "running" && !b.lenient {
		b.t.Errorf("playPrompt status %q: %s", op.Status, out)
	}
	return op.ID
}

func (b *fakeBot) transfer(callID, agent string) {
	b.action(callID, "transfer", map[string]any{"transferTarget": map[string]any{
		"endpointType": "default",
		"identity":     map[string]any{"user": map[string]any{"id": agent}},
	}}, http.StatusAccepted)
}

// invite invites one agent into the call and returns the operation id from the response, after
// checking it against the Location header.
func (b *fakeBot) invite(callID, agent, clientContext string, want int) string {
	st, out, hdr := b.call(http.MethodPost, "/communications/calls/"+callID+"/participants/invite", map[string]any{
		"participants": []any{map[string]any{
			"@odata.type": "#microsoft.graph.invitationParticipantInfo",
			"identity": map[string]any{"@odata.type": "#microsoft.graph.identitySet",
				"user": map[string]any{"@odata.type": "#microsoft.graph.identity", "id": agent, "identityProvider": "AAD"}},
		}},
		"clientContext": clientContext,
	})
	if st != want {
		if !b.lenient {
			b.t.Errorf("invite %s: status %d, want %d: %s", callID, st, want, out)
		}
		return ""
	}
	if st != http.StatusOK {
		return ""
	}
	var op struct {
		Type          string `json:"@odata.type"`
		ID, Status    string
		ClientContext string
	}
	_ = json.Unmarshal(out, &op)
	if op.Type != graph.TypeInviteParticipantsOp || graph.ParseOperationStatus(op.Status) != graph.OpRunning || op.ClientContext != clientContext ||
		!operationAt(b.s, hdr.Get("Location"), callID, op.ID) {
		b.t.Errorf("invite response %s, Location %q", out, hdr.Get("Location"))
	}
	b.mu.Lock()
	if b.ops == nil {
		b.ops = map[string]string{}
	}
	b.ops[graph.CallKey(callID)] = op.ID
	b.mu.Unlock()
	return op.ID
}

// operationAt reports whether location is the URL of operation opID of call callID, whichever
// form of the call id the bot used (Graph writes ids in two forms: graph.CallKey).
func operationAt(s *Sim, location, callID, opID string) bool {
	prefix := s.GraphURL() + "/communications/calls/"
	rest, ok := strings.CutPrefix(location, prefix)
	id, op, ok2 := strings.Cut(rest, "/operations/")
	return ok && ok2 && graph.CallKey(id) == graph.CallKey(callID) && op == opID
}

// opID is the id of the last invite operation the bot started in the call.
func (b *fakeBot) opID(callID string) string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.ops[graph.CallKey(callID)]
}

// hangUp deletes the call as the bot.
func (b *fakeBot) hangUp(callID string) {
	if st, out, _ := b.call(http.MethodDelete, "/communications/calls/"+callID, nil); st != http.StatusNoContent && !b.lenient {
		b.t.Errorf("delete: %d %s", st, out)
	}
}

// inviteBot answers, invites agent once the call is established and hangs up when the invite
// fails or the agent has left (a roster without a user).
func inviteBot(agent string) func(b *fakeBot, n graph.Notification) {
	return func(b *fakeBot, n graph.Notification) {
		switch n.Kind {
		case graph.ResourceCall:
			c := n.Call
			switch {
			case n.ChangeType == graph.Created && c.State == graph.CallIncoming:
				b.answer(n.CallID)
			case c.State == graph.CallEstablished && c.MediaState != nil && c.MediaState.Audio == "active":
				b.invite(n.CallID, agent, "handoff-"+graph.CallKey(n.CallID), http.StatusOK)
			}
		case graph.ResourceOperation:
			if n.Operation.Status == graph.OpFailed {
				b.hangUp(n.CallID)
			}
		case graph.ResourceParticipants:
			for _, p := range n.Participants {
				if p.Info.Identity.User != nil {
					return
				}
			}
			b.hangUp(n.CallID)
		}
	}
}

func (b *fakeBot) seen(callID string) []seen {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]seen(nil), b.notes[graph.CallKey(callID)]...)
}

// summary renders notifications compactly: "updated established tone1", "deleted op completed 200/0".
func summary(ss []seen) []string {
	var out []string
	for _, s := range ss {
		n := s.N
		var line string
		switch n.Kind {
		case graph.ResourceOperation:
			kind := "op"
			if n.DataType == graph.TypeInviteParticipantsOp {
				kind = "invite"
			}
			line = fmt.Sprintf("%s %s %s", n.ChangeType, kind, n.Operation.Status)
			if r := n.Operation.ResultInfo; r != nil {
				line += fmt.Sprintf(" %d/%d", r.Code, r.Subcode)
			}
		case graph.ResourceParticipants:
			var kinds []string
			for _, p := range n.Participants {
				party, _ := p.Info.Identity.Primary()
				kinds = append(kinds, string(party.Kind))
			}
			line = fmt.Sprintf("%s roster %s", n.ChangeType, strings.Join(kinds, ","))
		default:
			line = strings.TrimSpace(fmt.Sprintf("%s %s", n.ChangeType, n.Call.State))
			if n.Call.ToneInfo != nil {
				line += " " + n.Call.ToneInfo.Tone
			}
			if r := n.Call.ResultInfo; r != nil {
				line += fmt.Sprintf(" %d/%d", r.Code, r.Subcode)
			}
		}
		out = append(out, line)
	}
	return out
}

func waitDone(t *testing.T, c *Call) CallResult {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(10 * time.Second):
		t.Fatalf("call %s did not end: %+v", c.ID(), c.Result())
	}
	return c.Result()
}

// eventually polls cond until it holds or the deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// ivrBot answers, subscribes to tones and plays a prompt once established, transfers to agent
// on "1" and hangs up when a transfer fails.
func ivrBot(agent string) func(b *fakeBot, n graph.Notification) {
	return func(b *fakeBot, n graph.Notification) {
		if n.Kind != graph.ResourceCall {
			return
		}
		c := n.Call
		switch {
		case n.ChangeType == graph.Created && c.State == graph.CallIncoming:
			b.answer(n.CallID)
		case c.State == graph.CallEstablished && c.ToneInfo != nil:
			if c.ToneInfo.Digit() == "1" {
				b.transfer(n.CallID, agent)
			}
		case c.State == graph.CallEstablished && c.ResultInfo != nil:
			if st, out, _ := b.call(http.MethodDelete, "/communications/calls/"+n.CallID, nil); st != http.StatusNoContent && !b.lenient {
				b.t.Errorf("delete: %d %s", st, out)
			}
		case c.State == graph.CallEstablished && c.MediaState != nil && c.MediaState.Audio == "active":
			b.action(n.CallID, "subscribeToTone", map[string]any{"clientContext": "tones"}, http.StatusOK)
			b.playPrompt(n.CallID, "welcome", promptURI)
		}
	}
}

package msgraph_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/go-cmp/cmp"
	"github.com/google/uuid"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
	"github.com/callbot/callbot/internal/queue"
)

var (
	_ callstate.CallControl = (*msgraph.Client)(nil)
	_ queue.PresenceSource  = (*msgraph.Client)(nil)
)

const (
	tenantID     = "72f988bf-86f1-41af-91ab-2d7cd011db47"
	clientID     = "bot-app-id"
	clientSecret = "bot-secret"
	accessToken  = "fake-access-token"
	callID       = "57dab8b1-894c-409a-b240-bd8beae78896"
	// participantID is the bot's participant id in the call (hold music paths).
	participantID = "a7ebfb2d-871e-419c-87af-27290b22e8db"
)

// recorded is one request the fake Graph received.
type recorded struct {
	Method, Path string
	Header       http.Header
	Body         []byte // decompressed
	Tenant       string // tenant of the bearer token
	// Proto, ContentLength and TransferEncoding are how the request came over the wire.
	Proto            string
	ContentLength    int64
	TransferEncoding []string
}

// response is what the fake answers to a Graph request.
type response struct {
	Status int
	Header map[string]string
	Body   string
	// Drop ends the exchange after reading the request, without a response: it closes the
	// connection (HTTP/1.1) or resets the stream (HTTP/2).
	Drop bool
	// Hang waits until the client gives up, without a response.
	Hang bool
}

// fakeGraph is an https Entra ID authority (OpenID configuration + token endpoint, for any
// tenant) and Graph endpoint in one httptest.Server, recording every Graph request.
type fakeGraph struct {
	t   *testing.T
	srv *httptest.Server

	mu        sync.Mutex
	graph     []recorded
	tokens    int
	tokensBy  map[string]int    // token requests by tenant path
	issued    map[string]string // access token -> tenant
	unknown   []string
	responses map[string]response   // "METHOD /path" -> response
	queued    map[string][]response // "METHOD /path" -> responses used once each, before responses
	// cert, when set, makes the token endpoint accept a client assertion signed by its key.
	cert       *x509.Certificate
	assertions []jwt.MapClaims // header of each accepted assertion, "aud" added from its claims
	// tokenBody, when set, is the token endpoint's reply body.
	tokenBody []byte
}

// newFakeGraph offers HTTP/2 and HTTP/1.1, as Graph does.
func newFakeGraph(t *testing.T) *fakeGraph {
	t.Helper()
	return newFakeGraphProto(t, true)
}

// newFakeGraphProto offers HTTP/2 only when h2 is set: without, it stands for an egress proxy
// that speaks only HTTP/1.1.
func newFakeGraphProto(t *testing.T, h2 bool) *fakeGraph {
	t.Helper()
	f := &fakeGraph{t: t, responses: map[string]response{}, queued: map[string][]response{},
		tokensBy: map[string]int{}, issued: map[string]string{}}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.EnableHTTP2 = h2
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeGraph) respond(method, path string, r response) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.responses[method+" "+path] = r
}

// resetQueue drops the queued responses not used yet.
func (f *fakeGraph) resetQueue() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queued = map[string][]response{}
}

// respondSeq queues responses answered once each, in order, before the respond one.
func (f *fakeGraph) respondSeq(method, path string, rs ...response) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queued[method+" "+path] = append(f.queued[method+" "+path], rs...)
}

func (f *fakeGraph) requests() []recorded {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recorded(nil), f.graph...)
}

func (f *fakeGraph) tokenCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.tokens
}

func (f *fakeGraph) serve(w http.ResponseWriter, r *http.Request) {
	parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 2)
	switch {
	case strings.HasPrefix(r.URL.Path, "/v1.0/"):
		f.graphRequest(w, r)
	case len(parts) == 2 && r.Method == http.MethodGet && parts[1] == "v2.0/.well-known/openid-configuration":
		base := f.srv.URL + "/" + parts[0]
		writeJSON(w, http.StatusOK, map[string]any{
			"issuer":                 base + "/v2.0",
			"authorization_endpoint": base + "/oauth2/v2.0/authorize",
			"token_endpoint":         base + "/oauth2/v2.0/token",
		})
	case len(parts) == 2 && r.Method == http.MethodPost && parts[1] == "oauth2/v2.0/token":
		f.token(w, r, parts[0])
	default:
		f.mu.Lock()
		f.unknown = append(f.unknown, r.Method+" "+r.URL.Path)
		f.mu.Unlock()
		http.NotFound(w, r)
	}
}

func (f *fakeGraph) token(w http.ResponseWriter, r *http.Request, tenant string) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	form := r.PostForm
	authenticated := form.Get("client_secret") == clientSecret
	if f.cert != nil && form.Get("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
		header, err := f.checkAssertion(form.Get("client_assertion"), f.srv.URL+"/"+tenant+"/oauth2/v2.0/token")
		if err != nil {
			f.t.Errorf("client assertion: %v", err)
		} else {
			authenticated = true
			f.mu.Lock()
			f.assertions = append(f.assertions, header)
			f.mu.Unlock()
		}
	}
	if form.Get("client_id") != clientID || !authenticated || form.Get("grant_type") != "client_credentials" ||
		!strings.Contains(form.Get("scope"), "https://graph.microsoft.com/.default") {
		writeJSON(w, http.StatusUnauthorized, map[string]any{
			"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.",
		})
		return
	}
	tok := accessToken
	if tenant != tenantID {
		tok = "token-for-" + tenant
	}
	f.mu.Lock()
	f.tokens++
	f.tokensBy[tenant]++
	body := f.tokenBody
	if body != nil {
		var doc struct {
			AccessToken string `json:"access_token"`
		}
		if err := json.Unmarshal(body, &doc); err != nil {
			f.t.Errorf("token body: %v", err)
		}
		tok = doc.AccessToken
	}
	f.issued[tok] = tenant
	f.mu.Unlock()
	if body != nil {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": tok,
	})
}

// checkAssertion verifies a client assertion as Entra ID does, except for the certificate
// chain: signature by f.cert's key (PS256, or RS256), thumbprint header, audience = the token
// endpoint, issuer and subject = the client id. It returns the JWT header plus "aud".
func (f *fakeGraph) checkAssertion(assertion, tokenEndpoint string) (jwt.MapClaims, error) {
	claims := jwt.MapClaims{}
	tok, err := jwt.ParseWithClaims(assertion, claims, func(*jwt.Token) (any, error) { return f.cert.PublicKey, nil },
		jwt.WithValidMethods([]string{"PS256", "RS256"}), jwt.WithAudience(tokenEndpoint),
		jwt.WithIssuer(clientID), jwt.WithSubject(clientID), jwt.WithExpirationRequired())
	if err != nil {
		return nil, err
	}
	sha256Sum := sha256.Sum256(f.cert.Raw)
	sha1Sum := sha1.Sum(f.cert.Raw)
	switch {
	case tok.Header["x5t#S256"] == base64.StdEncoding.EncodeToString(sha256Sum[:]) && tok.Method.Alg() == "PS256":
	case tok.Header["x5t"] == base64.StdEncoding.EncodeToString(sha1Sum[:]) && tok.Method.Alg() == "RS256":
	default:
		return nil, fmt.Errorf("header %v names no thumbprint of the certificate for alg %s", tok.Header, tok.Method.Alg())
	}
	h := jwt.MapClaims{}
	for k, v := range tok.Header {
		h[k] = v
	}
	h["aud"] = tokenEndpoint
	return h, nil
}

func (f *fakeGraph) graphRequest(w http.ResponseWriter, r *http.Request) {
	var body io.Reader = r.Body
	if r.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = zr
	}
	b, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	path := strings.TrimPrefix(r.URL.Path, "/v1.0")
	key := r.Method + " " + path
	bearer := strings.TrimPrefix(r.Header.Get("Authorization"), "Bearer ")
	f.mu.Lock()
	tenant, authorized := f.issued[bearer]
	f.graph = append(f.graph, recorded{Method: r.Method, Path: path, Header: r.Header.Clone(), Body: b, Tenant: tenant,
		Proto: r.Proto, ContentLength: r.ContentLength, TransferEncoding: r.TransferEncoding})
	resp, ok := f.responses[key]
	if q := f.queued[key]; len(q) > 0 {
		resp, ok = q[0], true
		f.queued[key] = q[1:]
	}
	f.mu.Unlock()
	if !authorized {
		writeJSON(w, http.StatusUnauthorized, graphError("InvalidAuthenticationToken", "Access token is empty.", ""))
		return
	}
	if !ok {
		resp = response{Status: http.StatusAccepted}
		if r.Method == http.MethodDelete {
			resp.Status = http.StatusNoContent
		}
	}
	switch {
	case resp.Drop:
		// net/http closes an HTTP/1.1 connection and resets an HTTP/2 stream.
		panic(http.ErrAbortHandler)
	case resp.Hang:
		<-r.Context().Done()
		return
	}
	w.Header().Set("request-id", "req-"+uuid.NewString())
	w.Header().Set("client-request-id", r.Header.Get("client-request-id"))
	for k, v := range resp.Header {
		w.Header().Set(k, v)
	}
	if resp.Body != "" {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(resp.Status)
	io.WriteString(w, resp.Body)
}

func graphError(code, message, requestID string) map[string]any {
	return map[string]any{"error": map[string]any{
		"code": code, "message": message,
		"innerError": map[string]any{"date": "2026-01-02T03:04:05", "request-id": requestID},
	}}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// newClient returns a Client for f that trusts f's self-signed certificate via CAFile.
func newClient(t *testing.T, f *fakeGraph) *msgraph.Client {
	t.Helper()
	return newClientWith(t, f, clientSecret)
}

func newClientWith(t *testing.T, f *fakeGraph, secret string) *msgraph.Client {
	t.Helper()
	return newClientCfg(t, f, func(c *msgraph.Config) { c.ClientSecret = secret })
}

// newClientCfg returns a Client for f with the configuration adjusted by mutate.
func newClientCfg(t *testing.T, f *fakeGraph, mutate func(*msgraph.Config)) *msgraph.Client {
	t.Helper()
	c, err := msgraph.New(clientConfig(t, f, mutate))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func clientConfig(t *testing.T, f *fakeGraph, mutate func(*msgraph.Config)) msgraph.Config {
	t.Helper()
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw})
	if err := os.WriteFile(caFile, ca, 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := msgraph.Config{
		TenantID: tenantID, ClientID: clientID, ClientSecret: clientSecret,
		AuthorityHost: f.srv.URL + "/",
		GraphURL:      f.srv.URL + "/v1.0",
		CAFile:        caFile,
		Timeout:       10 * time.Second,
		Logger:        zaptest.NewLogger(t),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	return cfg
}

// payloadsDir holds the documented Graph bodies (copied from graph/payloads).
var payloadsDir = filepath.Join("..", "testdata", "payloads")

// loadedPayloads records every payload a test read, for TestMain's coverage check.
var loadedPayloads sync.Map

func payload(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(payloadsDir, name))
	if err != nil {
		t.Fatal(err)
	}
	loadedPayloads.Store(name, true)
	return b
}

// notSentByCallbot lists the documented request bodies no method of this package sends, and why.
var notSentByCallbot = map[string]string{
	"request-subscription-presence-bulk.json": "presence subscriptions are delegated-only " +
		"(https://learn.microsoft.com/en-us/graph/changenotifications-for-presence); " +
		"callbot polls getPresencesByUserId with app permissions",
}

// TestMain runs the tests and then, when all of them ran and passed, checks that every
// documented request body (request-*.json) was compared with what a method sends and every
// documented response (response-*.json) was decoded by some test.
func TestMain(m *testing.M) {
	code := m.Run()
	if code != 0 || flag.Lookup("test.run").Value.String() != "" || flag.Lookup("test.skip").Value.String() != "" {
		os.Exit(code)
	}
	entries, err := os.ReadDir(payloadsDir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, "request-") && !strings.HasPrefix(name, "response-") {
			continue
		}
		if _, ok := loadedPayloads.Load(name); ok {
			continue
		}
		if _, ok := notSentByCallbot[name]; ok {
			continue
		}
		fmt.Fprintf(os.Stderr, "FAIL: no test compares or decodes %s\n", name)
		code = 1
	}
	os.Exit(code)
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

// sameIdentitySetType rewrites "#microsoft.graph.communicationsIdentitySet" as
// "#microsoft.graph.identitySet". callbot puts phone and applicationInstance identities in a
// communicationsIdentitySet, the v1.0 type that declares them (a subtype of identitySet); the
// documentation's examples annotate the same members as an identitySet.
func sameIdentitySetType(v any) any {
	switch x := v.(type) {
	case map[string]any:
		for k, e := range x {
			if k == "@odata.type" && e == "#microsoft.graph.communicationsIdentitySet" {
				x[k] = "#microsoft.graph.identitySet"
				continue
			}
			x[k] = sameIdentitySetType(e)
		}
	case []any:
		for i, e := range x {
			x[i] = sameIdentitySetType(e)
		}
	}
	return v
}

// dropExtraODataTypes removes "@odata.type" annotations from got wherever want has none at the
// same place: the SDK (and this package) annotate types the documentation's examples leave
// implicit. Every other property must match exactly, and an annotation the example has must be
// sent with the same value.
func dropExtraODataTypes(got, want any) any {
	switch g := got.(type) {
	case map[string]any:
		w, _ := want.(map[string]any)
		out := make(map[string]any, len(g))
		for k, v := range g {
			if _, ok := w[k]; k == "@odata.type" && !ok {
				continue
			}
			out[k] = dropExtraODataTypes(v, w[k])
		}
		return out
	case []any:
		w, _ := want.([]any)
		out := make([]any, len(g))
		for i, v := range g {
			var wv any
			if i < len(w) {
				wv = w[i]
			}
			out[i] = dropExtraODataTypes(v, wv)
		}
		return out
	}
	return got
}

func TestActionsSendDocumentedRequests(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ctx := context.Background()
	calls := "/communications/calls/" + callID
	f.respond("POST", "/communications/getPresencesByUserId", response{Status: 200, Body: `{"value":[]}`})
	f.respond("POST", "/communications/calls", response{Status: 201, Body: `{"@odata.type":"#microsoft.graph.call","id":"2e1a0b00-1f7f-4b4d-9f3e-2b8f1f9e0c11","state":"establishing"}`})

	tests := []struct {
		name       string
		do         func() error
		method     string
		path       string
		want       string               // payload file; "" for no body
		wantJSON   string               // inline body, for actions without a documented example
		adjustWant func(map[string]any) // drops documentation placeholders callbot never sends
	}{
		{
			name: "answer",
			do: func() error {
				return c.Answer(ctx, callID, graph.AnswerRequest{
					CallbackURI: "https://bot.contoso.com/api/calls",
					PrefetchMedia: []graph.MediaPrompt{
						{URI: "https://cdn.contoso.com/beep.wav", ResourceID: "1D6DE2D4-CD51-4309-8DAA-70768651088E"},
						{URI: "https://cdn.contoso.com/cool.wav", ResourceID: "1D6DE2D4-CD51-4309-8DAA-70768651088F"},
					},
				})
			},
			method: "POST", path: calls + "/answer", want: "request-answer-service-hosted-media.json",
		},
		{
			name:   "reject busy",
			do:     func() error { return c.Reject(ctx, callID, graph.RejectBusy) },
			method: "POST", path: calls + "/reject", want: "request-reject-busy.json",
		},
		{
			name: "playPrompt",
			do: func() error {
				_, err := c.PlayPrompt(ctx, callID, []graph.MediaPrompt{
					{URI: "https://cdn.contoso.com/beep.wav", ResourceID: "1D6DE2D4-CD51-4309-8DAA-70768651088E"},
				}, "d45324c1-fcb5-430a-902c-f20af696537c")
				return err
			},
			method: "POST", path: calls + "/playPrompt", want: "request-playprompt.json",
		},
		{
			name: "subscribeToTone",
			do: func() error {
				_, err := c.SubscribeToTone(ctx, callID, "fd1c7836-4d84-4e24-b6aa-23188688cc54")
				return err
			},
			method: "POST", path: calls + "/subscribeToTone", want: "request-subscribetotone.json",
		},
		{
			name: "cancelMediaProcessing",
			do: func() error {
				_, err := c.CancelMediaProcessing(ctx, callID, "clientContext-value")
				return err
			},
			method: "POST", path: calls + "/cancelMediaProcessing", want: "request-cancelmediaprocessing.json",
		},
		{
			name: "transfer to a Teams user",
			do: func() error {
				return c.Transfer(ctx, callID, graph.Party{
					Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f", DisplayName: "Heidi Steen",
				}, "")
			},
			method: "POST", path: calls + "/transfer", want: "request-transfer-blind-p2p.json",
		},
		{
			name: "transfer to a phone number",
			do: func() error {
				return c.Transfer(ctx, callID, graph.Party{Kind: graph.KindPhone, ID: "+12345678901"},
					"9e90d1c1-f61e-43e7-9f75-d420159aae08")
			},
			method: "POST", path: calls + "/transfer", want: "request-transfer-pstn.json",
			adjustWant: func(m map[string]any) {
				target := m["transferTarget"].(map[string]any)
				delete(target, "languageId") // "languageId-value": doc placeholders
				delete(target, "region")
			},
		},
		{
			name: "redirect to an application",
			do: func() error {
				return c.Redirect(ctx, callID, []graph.Party{
					{Kind: graph.KindApplication, ID: "22bfd41f-550e-477d-8789-f6f7bd2a5e8b", DisplayName: "test bot 2"},
				}, 0, "https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039")
			},
			method: "POST", path: calls + "/redirect", want: "request-redirect-single-target.json",
		},
		{
			name: "answer with app-hosted media and options",
			do: func() error {
				return c.AnswerWithOptions(ctx, callID, graph.AnswerRequest{CallbackURI: "callbackUri-value"},
					msgraph.AnswerOptions{
						AppHostedMediaBlob:          "<Media Session Configuration Blob>",
						ContentSharingNotifications: true,
						ParticipantCapacity:         200,
					})
			},
			method: "POST", path: calls + "/answer", want: "request-answer-generic.json",
		},
		{
			name: "recordResponse",
			do: func() error {
				_, err := c.RecordResponse(ctx, callID, graph.RecordRequest{
					Prompts:                  []graph.MediaPrompt{{URI: "https://cdn.contoso.com/beep.wav", ResourceID: "1D6DE2D4-CD51-4309-8DAA-70768651088E"}},
					BargeInAllowed:           true,
					InitialSilenceTimeoutSec: 5,
					MaxSilenceTimeoutSec:     2,
					MaxRecordDurationSec:     10,
					PlayBeep:                 true,
					StopTones:                []string{"#", "1", "*"},
					ClientContext:            "d45324c1-fcb5-430a-902c-f20af696537c",
				})
				return err
			},
			method: "POST", path: calls + "/recordResponse", want: "request-recordresponse.json",
		},
		{
			name: "invite replacing a call",
			do: func() error {
				_, err := c.InviteParticipants(ctx, callID, graph.InviteRequest{
					Participants: []graph.Invitee{{
						Party:          graph.Party{Kind: graph.KindUser, ID: "278405a3-f568-4b3e-b684-009193463064"},
						ReplacesCallID: "a7ebfb2d-871e-419c-87af-27290b22e8db",
					}},
					ClientContext: "f2fa86af-3c51-4bc2-8fc0-475452d9764f",
				})
				return err
			},
			method: "POST", path: calls + "/participants/invite", want: "request-participants-invite.json",
			adjustWant: func(m map[string]any) {
				// "identityProvider": "AAD" is not a v1.0 identity property; Graph infers it.
				user := m["participants"].([]any)[0].(map[string]any)["identity"].(map[string]any)["user"].(map[string]any)
				delete(user, "identityProvider")
			},
		},
		{
			name: "startHoldMusic",
			do: func() error {
				_, err := c.StartHoldMusic(ctx, callID, participantID, graph.MediaPrompt{URI: "https://bot.contoso.com/onHold.wav"},
					"d45324c1-fcb5-430a-902c-f20af696537c")
				return err
			},
			method: "POST", path: calls + "/participants/" + participantID + "/startHoldMusic",
			want: "request-participant-startholdmusic.json",
		},
		{
			name: "stopHoldMusic",
			do: func() error {
				_, err := c.StopHoldMusic(ctx, callID, participantID, "d45324c1-fcb5-430a-902c-f20af696537c")
				return err
			},
			method: "POST", path: calls + "/participants/" + participantID + "/stopHoldMusic",
			wantJSON: `{"clientContext":"d45324c1-fcb5-430a-902c-f20af696537c"}`,
		},
		{
			name: "create a PSTN call from an application instance",
			do: func() error {
				_, err := c.CreateCall(ctx, graph.CreateCallRequest{
					Source:      graph.Party{Kind: graph.KindApplicationInstance, ID: "3d913abb-aec0-4964-8fa6-3c6850c4f278", DisplayName: "Calling Bot"},
					Targets:     []graph.Party{{Kind: graph.KindPhone, ID: "+12345678901"}},
					TenantID:    "aa67bd4c-8475-432d-bd41-39f255720e0a",
					CallbackURI: "https://bot.contoso.com/callback",
				})
				return err
			},
			method: "POST", path: "/communications/calls", want: "request-create-call-pstn-from-app-instance.json",
			adjustWant: func(m map[string]any) {
				source := m["source"].(map[string]any)
				for k, v := range source {
					if v == nil { // the example's explicit nulls: callbot omits unset properties
						delete(source, k)
					}
				}
			},
		},
		{
			name: "create a call to a Teams user",
			do: func() error {
				_, err := c.CreateCall(ctx, graph.CreateCallRequest{
					Targets:                     []graph.Party{{Kind: graph.KindUser, ID: "112f7296-5fa4-42ca-bae8-6a692b15d4b8", DisplayName: "John"}},
					CallbackURI:                 "https://bot.contoso.com/callback",
					ContentSharingNotifications: true,
				})
				return err
			},
			method: "POST", path: "/communications/calls", want: "request-create-call-p2p-user.json",
		},
		{
			name: "consultative transfer to a Teams user",
			do: func() error {
				return c.TransferConsultative(ctx, callID, graph.Party{
					Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f", DisplayName: "Heidi Steen",
				}, "e5d39592-99bd-4db8-bca8-30fb894ec51d", "")
			},
			method: "POST", path: calls + "/transfer", want: "request-transfer-consultative-p2p.json",
		},
		{
			name: "consultative transfer to a phone number",
			do: func() error {
				return c.TransferWith(ctx, callID, graph.TransferRequest{
					Target:         graph.Party{Kind: graph.KindPhone, ID: "+12345678901"},
					ReplacesCallID: "e5d39592-99bd-4db8-bca8-30fb894ec51d",
					LanguageID:     "en-us",
					Region:         "amer",
					ClientContext:  "9e90d1c1-f61e-43e7-9f75-d420159aae08",
				})
			},
			method: "POST", path: calls + "/transfer", want: "request-transfer-consultative-pstn.json",
		},
		{
			name: "transfer out of a group call",
			do: func() error {
				return c.TransferWith(ctx, callID, graph.TransferRequest{
					Target:                  graph.Party{Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f", DisplayName: "Heidi Steen"},
					Transferee:              &graph.Party{Kind: graph.KindUser, ID: "751f6800-3180-414d-bd94-333364659951", TenantID: "72f988bf-86f1-41af-91ab-2d7cd011db47"},
					TransfereeParticipantID: "909c6581-5130-43e9-88f3-fcb3582cde37",
				})
			},
			method: "POST", path: calls + "/transfer", want: "request-transfer-from-group-call.json",
		},
		{
			name: "redirect to two users at once without forwarding",
			do: func() error {
				return c.RedirectWith(ctx, callID, graph.RedirectRequest{
					Targets: []graph.Party{
						{Kind: graph.KindUser, ID: "98da8a1a-1b87-452c-a713-65d3f10b1253", DisplayName: "test user"},
						{Kind: graph.KindUser, ID: "bf5aae9a-d11d-47a8-93b1-782504c9c3f3", DisplayName: "test user 2"},
					},
					RoutingPolicies: []graph.RoutingPolicy{graph.RoutingDisableForwarding},
					CallbackURI:     "https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039",
				})
			},
			method: "POST", path: calls + "/redirect", want: "request-redirect-simulring-users.json",
		},
		{
			name: "redirect to a phone number",
			do: func() error {
				return c.Redirect(ctx, callID, []graph.Party{{Kind: graph.KindPhone, ID: "+12345678901"}}, 0,
					"https://bot.contoso.com/api/calls/24701998-1a73-4d42-8085-bf46ed0ae039")
			},
			method: "POST", path: calls + "/redirect", want: "request-redirect-pstn.json",
		},
		{
			name:   "keepAlive",
			do:     func() error { return c.KeepAlive(ctx, callID) },
			method: "POST", path: calls + "/keepAlive",
		},
		{
			name:   "hangup",
			do:     func() error { return c.Hangup(ctx, callID) },
			method: "DELETE", path: calls,
		},
		{
			name: "presences",
			do: func() error {
				_, err := c.Presences(ctx, []string{"fa8bf3dc-eca7-46b7-bad1-db199b62afc3", "66825e03-7ef5-42da-9069-724602c31f6b"})
				return err
			},
			method: "POST", path: "/communications/getPresencesByUserId", want: "request-getpresencesbyuserid.json",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(f.requests())
			if err := tt.do(); err != nil {
				t.Fatal(err)
			}
			reqs := f.requests()[before:]
			if len(reqs) != 1 {
				t.Fatalf("got %d requests, want 1", len(reqs))
			}
			r := reqs[0]
			if r.Method != tt.method || r.Path != tt.path {
				t.Errorf("got %s %s, want %s %s", r.Method, r.Path, tt.method, tt.path)
			}
			if got := r.Header.Get("Authorization"); got != "Bearer "+accessToken {
				t.Errorf("Authorization = %q", got)
			}
			if tt.want == "" && tt.wantJSON == "" {
				if len(bytes.TrimSpace(r.Body)) != 0 {
					t.Errorf("unexpected body %s", r.Body)
				}
				return
			}
			if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type = %q", ct)
			}
			wantBody := []byte(tt.wantJSON)
			if tt.want != "" {
				wantBody = payload(t, tt.want)
			}
			want := decode(t, wantBody)
			if tt.adjustWant != nil {
				tt.adjustWant(want.(map[string]any))
			}
			got := dropExtraODataTypes(sameIdentitySetType(decode(t, r.Body)), want)
			if diff := cmp.Diff(got, want); diff != "" {
				t.Errorf("body (-got +want):\n%s\nsent: %s", diff, r.Body)
			}
		})
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.unknown != nil {
		t.Errorf("requests to unknown paths: %v", f.unknown)
	}
}

func TestMediaOperationsNormaliseStatus(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ctx := context.Background()
	calls := "/communications/calls/" + callID
	f.respond("POST", calls+"/playPrompt", response{Status: 200, Body: string(payload(t, "response-playprompt-operation-running.json")),
		Header: map[string]string{"Location": "https://graph.microsoft.com/v1.0/communications/calls/" + callID + "/operations/0fe0623f-d628-42ed-b4bd-8ac290072cc5"}})
	f.respond("POST", calls+"/subscribeToTone", response{Status: 200, Body: string(payload(t, "response-subscribetotone-operation.json"))})
	f.respond("POST", calls+"/cancelMediaProcessing", response{Status: 200, Body: `{"@odata.type":"#microsoft.graph.cancelMediaProcessingOperation","status":"Failed","id":"op-3","resultInfo":{"code":"400","subcode":8508,"message":"cancelled"}}`})

	got, err := c.PlayPrompt(ctx, callID, []graph.MediaPrompt{{URI: "https://cdn.contoso.com/beep.wav"}}, "d45324c1-fcb5-430a-902c-f20af696537c")
	if err != nil {
		t.Fatal(err)
	}
	want := graph.Operation{ID: "0fe0623f-d628-42ed-b4bd-8ac290072cc5", Status: graph.OpRunning, ClientContext: "d45324c1-fcb5-430a-902c-f20af696537c"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("playPrompt (-got +want):\n%s", diff)
	}

	got, err = c.SubscribeToTone(ctx, callID, "clientContext-value")
	if err != nil {
		t.Fatal(err)
	}
	want = graph.Operation{ID: "0fe0623f-d628-42ed-b4bd-8ac290072cc5", Status: graph.OpCompleted, ClientContext: "clientContext-value"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("subscribeToTone (-got +want):\n%s", diff)
	}

	got, err = c.CancelMediaProcessing(ctx, callID, "")
	if err != nil {
		t.Fatal(err)
	}
	want = graph.Operation{ID: "op-3", Status: graph.OpFailed, Result: &graph.ResultInfo{Code: 400, Subcode: 8508, Message: "cancelled"}}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("cancelMediaProcessing (-got +want):\n%s", diff)
	}

	f.respond("POST", calls+"/cancelMediaProcessing", response{Status: 200, Body: string(payload(t, "response-cancelmediaprocessing-operation.json"))})
	got, err = c.CancelMediaProcessing(ctx, callID, "d45324c1-fcb5-430a-902c-f20af696537c")
	if err != nil {
		t.Fatal(err)
	}
	want = graph.Operation{ID: "0fe0623f-d628-42ed-b4bd-8ac290072cc5", Status: graph.OpCompleted, ClientContext: "d45324c1-fcb5-430a-902c-f20af696537c"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("cancelMediaProcessing documented (-got +want):\n%s", diff)
	}

	f.respond("POST", calls+"/recordResponse", response{Status: 200, Body: string(payload(t, "response-record-operation-running.json"))})
	got, err = c.RecordResponse(ctx, callID, graph.RecordRequest{MaxRecordDurationSec: 10, ClientContext: "d45324c1-fcb5-430a-902c-f20af696537c"})
	if err != nil {
		t.Fatal(err)
	}
	want = graph.Operation{ID: "0fe0623f-d628-42ed-b4bd-8ac290072cc5", Status: graph.OpRunning, ClientContext: "d45324c1-fcb5-430a-902c-f20af696537c"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("recordResponse (-got +want):\n%s", diff)
	}

	// The invite response spells its status "Running".
	f.respond("POST", calls+"/participants/invite", response{Status: 200, Body: string(payload(t, "response-participants-invite-operation.json"))})
	got, err = c.InviteParticipants(ctx, callID, graph.InviteRequest{
		Participants:  []graph.Invitee{{Party: graph.Party{Kind: graph.KindUser, ID: "278405a3-f568-4b3e-b684-009193463064"}, ReplacesCallID: "a7ebfb2d-871e-419c-87af-27290b22e8db"}},
		ClientContext: "f2fa86af-3c51-4bc2-8fc0-475452d9764f",
	})
	if err != nil {
		t.Fatal(err)
	}
	want = graph.Operation{ID: "eec3812a-fdc3-4fb4-825c-a06c9f35414e", Status: graph.OpRunning, ClientContext: "f2fa86af-3c51-4bc2-8fc0-475452d9764f"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("invite (-got +want):\n%s", diff)
	}

	// Hold music: 202 with the operation in the body.
	f.respond("POST", calls+"/participants/"+participantID+"/startHoldMusic", response{Status: 202,
		Body: `{"@odata.type":"#microsoft.graph.startHoldMusicOperation","id":"op-5","status":"running","clientContext":"hold"}`})
	got, err = c.StartHoldMusic(ctx, callID, participantID, graph.MediaPrompt{}, "hold")
	if err != nil {
		t.Fatal(err)
	}
	want = graph.Operation{ID: "op-5", Status: graph.OpRunning, ClientContext: "hold"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("startHoldMusic (-got +want):\n%s", diff)
	}

	// A 202 without a body: the operation id comes from Location.
	f.respond("POST", calls+"/playPrompt", response{Status: 202,
		Header: map[string]string{"Location": "https://graph.microsoft.com/v1.0/communications/calls/" + callID + "/operations/op-4"}})
	got, err = c.PlayPrompt(ctx, callID, []graph.MediaPrompt{{URI: "https://cdn.contoso.com/beep.wav"}}, "")
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "op-4" || got.Status != "" {
		t.Errorf("playPrompt 202 = %+v, want id op-4 and no status", got)
	}
}

func TestPresences(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	f.respond("POST", "/communications/getPresencesByUserId", response{Status: 200, Body: string(payload(t, "response-getpresencesbyuserid.json"))})

	got, err := c.Presences(context.Background(), []string{"fa8bf3dc-eca7-46b7-bad1-db199b62afc3", "66825e03-7ef5-42da-9069-724602c31f6b"})
	if err != nil {
		t.Fatal(err)
	}
	want := []graph.Presence{
		{UserID: "fa8bf3dc-eca7-46b7-bad1-db199b62afc3", Availability: "Busy", Activity: "InAMeeting"},
		{UserID: "66825e03-7ef5-42da-9069-724602c31f6b", Availability: "Away", Activity: "Away"},
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("presences (-got +want):\n%s", diff)
	}
}

func TestPresencesRejectsTooManyIDsWithoutRequest(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ids := make([]string, graph.MaxPresenceIDs+1)
	for i := range ids {
		ids[i] = uuid.NewString()
	}
	_, err := c.Presences(context.Background(), ids)
	if !errors.Is(err, msgraph.ErrInvalidArgument) {
		t.Fatalf("err = %v, want ErrInvalidArgument", err)
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("%d requests reached Graph, want 0", n)
	}
	if n := f.tokenCount(); n != 0 {
		t.Errorf("%d tokens fetched, want 0", n)
	}
}

func TestGetCall(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	path := "/communications/calls/" + callID
	for state, want := range map[string]graph.CallState{
		"established":      graph.CallEstablished,
		"Established":      graph.CallEstablished,
		"transferAccepted": graph.CallTransferAccepted,
	} {
		f.respond("GET", path, response{Status: 200, Body: fmt.Sprintf(`{"@odata.type":"#microsoft.graph.call","id":%q,"state":%q,"direction":"incoming"}`, callID, state)})
		got, err := c.GetCall(context.Background(), callID)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("state %q: got %q, want %q", state, got, want)
		}
	}
	if got := f.requests()[0]; got.Method != "GET" || got.Path != path {
		t.Errorf("got %s %s, want GET %s", got.Method, got.Path, path)
	}
}

// The roster as Graph documents it (call-list-participants), and one with the invited agent.
func TestParticipants(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	path := "/communications/calls/" + callID + "/participants"
	f.respond("GET", path, response{Status: 200, Body: string(payload(t, "response-list-participants.json"))})
	got, err := c.Participants(context.Background(), callID)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].ID != "a7ebfb2d-871e-419c-87af-27290b22e8db" || got[1].Info.Identity.Application == nil ||
		got[1].Info.Identity.Application.ID != "ef43e42b-4c05-4594-9756-1edb3ccbc989" || got[0].Info.Identity.User != nil {
		t.Errorf("documented roster decoded as %+v", got)
	}
	if r := f.requests()[0]; r.Method != "GET" || r.Path != path {
		t.Errorf("got %s %s, want GET %s", r.Method, r.Path, path)
	}
	f.respond("GET", path, response{Status: 200, Body: `{"value":[{"@odata.type":"#microsoft.graph.participant","id":"p1",` +
		`"info":{"identity":{"user":{"id":"11111111-0000-4000-8000-000000000002","displayName":"Agent"}}},"rosterSequenceNumber":7}]}`})
	got, err = c.Participants(context.Background(), callID)
	if err != nil || len(got) != 1 || got[0].Info.Identity.User == nil || got[0].Info.Identity.User.ID != "11111111-0000-4000-8000-000000000002" || got[0].RosterSequenceNumber != 7 {
		t.Errorf("roster with the agent: %+v %v", got, err)
	}
	for _, bad := range []string{`{"value":{}}`, `{}`, `not json`} {
		f.respond("GET", path, response{Status: 200, Body: bad})
		if got, err := c.Participants(context.Background(), callID); err == nil {
			t.Errorf("response %s: %+v, want an error (a roster callbot cannot read is not an empty one)", bad, got)
		}
	}
	body, _ := json.Marshal(graphError("ItemNotFound", "Call not found.", "rid-404"))
	f.respond("GET", path, response{Status: 404, Body: string(body)})
	if _, err := c.Participants(context.Background(), callID); !errors.Is(err, graph.ErrCallGone) {
		t.Errorf("404: %v, want ErrCallGone", err)
	}
}

func TestNotFoundIsCallGone(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	path := "/communications/calls/" + callID
	body, _ := json.Marshal(graphError("ItemNotFound", "Call not found.", "rid-404"))
	f.respond("GET", path, response{Status: 404, Body: string(body), Header: map[string]string{"request-id": ""}}) // request-id only in the body
	f.respond("POST", path+"/keepAlive", response{Status: 404, Body: string(body)})

	_, err := c.GetCall(context.Background(), callID)
	if !errors.Is(err, graph.ErrCallGone) {
		t.Fatalf("GetCall err = %v, want ErrCallGone", err)
	}
	var ge *graph.Error
	if !errors.As(err, &ge) {
		t.Fatalf("GetCall err %T is not a *graph.Error", err)
	}
	want := &graph.Error{Op: "getCall", Status: 404, Code: "ItemNotFound", Message: "Call not found.", RequestID: "rid-404",
		ClientRequestID: f.requests()[0].Header.Get("client-request-id")} // the one callbot sent
	if want.ClientRequestID == "" {
		t.Error("no client-request-id sent")
	}
	if diff := cmp.Diff(ge, want); diff != "" {
		t.Errorf("error (-got +want):\n%s", diff)
	}
	if err := c.KeepAlive(context.Background(), callID); !errors.Is(err, graph.ErrCallGone) {
		t.Errorf("KeepAlive err = %v, want ErrCallGone", err)
	}
}

func TestServerErrorIsNotRetried(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	path := "/communications/calls/" + callID + "/transfer"
	body, _ := json.Marshal(graphError("ServiceUnavailable", "Try again later.", "rid-body"))
	f.respond("POST", path, response{Status: 503, Body: string(body),
		Header: map[string]string{"Retry-After": "7", "request-id": "rid-503"}})

	start := time.Now()
	err := c.Transfer(context.Background(), callID, graph.Party{Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f"}, "")
	var ge *graph.Error
	if !errors.As(err, &ge) {
		t.Fatalf("err = %v (%T), want *graph.Error", err, err)
	}
	want := &graph.Error{Op: "transfer", Status: 503, Code: "ServiceUnavailable", Message: "Try again later.", RequestID: "rid-503", RetryAfter: 7 * time.Second,
		ClientRequestID: f.requests()[0].Header.Get("client-request-id")}
	if diff := cmp.Diff(ge, want); diff != "" {
		t.Errorf("error (-got +want):\n%s", diff)
	}
	if errors.Is(err, graph.ErrCallGone) {
		t.Error("a 503 matches ErrCallGone")
	}
	if n := len(f.requests()); n != 1 {
		t.Errorf("%d requests reached Graph, want exactly 1 (no retry)", n)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("transfer took %v: something waited for Retry-After", d)
	}
}

func TestHeaders(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	scenario := "2f3f1d4e-1b2c-4d5e-8f90-a1b2c3d4e5f6"
	ctx := graph.WithScenarioID(context.Background(), scenario)
	if err := c.Answer(ctx, callID, graph.AnswerRequest{CallbackURI: "https://bot.contoso.com/api/calls"}); err != nil {
		t.Fatal(err)
	}
	if err := c.KeepAlive(context.Background(), callID); err != nil {
		t.Fatal(err)
	}
	reqs := f.requests()
	if got := reqs[0].Header.Values("Scenario-Id"); len(got) != 1 || got[0] != scenario {
		t.Errorf("Scenario-Id = %q, want [%s]", got, scenario)
	}
	if got := reqs[1].Header.Values("Scenario-Id"); len(got) != 0 {
		t.Errorf("Scenario-Id without one in ctx = %q, want none", got)
	}
	seen := map[string]bool{}
	for i, r := range reqs {
		ids := r.Header.Values("client-request-id")
		if len(ids) != 1 {
			t.Fatalf("request %d: client-request-id = %q, want one value", i, ids)
		}
		if _, err := uuid.Parse(ids[0]); err != nil {
			t.Errorf("request %d: client-request-id %q is not a GUID", i, ids[0])
		}
		if seen[ids[0]] {
			t.Errorf("request %d: client-request-id %s reused", i, ids[0])
		}
		seen[ids[0]] = true
	}
}

// TestWireFormat checks what the trimmed pipeline (graphHTTPClient, traceTransport) still puts
// on the wire: HTTP/2 where the server offers it and HTTP/1.1 where it does not, bodies with a
// Content-Length rather than chunked, and the headers of the SDK's middlewares (SdkVersion,
// User-Agent).
func TestWireFormat(t *testing.T) {
	for _, tc := range []struct {
		h2    bool
		proto string
	}{{true, "HTTP/2.0"}, {false, "HTTP/1.1"}} {
		t.Run(tc.proto, func(t *testing.T) { testWireFormat(t, newFakeGraphProto(t, tc.h2), tc.proto) })
	}
}

func testWireFormat(t *testing.T, f *fakeGraph, proto string) {
	c := newClient(t, f)
	ctx := context.Background()
	if err := c.Answer(ctx, callID, graph.AnswerRequest{CallbackURI: "https://bot.contoso.com/api/calls"}); err != nil {
		t.Fatal(err)
	}
	if err := c.KeepAlive(ctx, callID); err != nil {
		t.Fatal(err)
	}
	if err := c.Hangup(ctx, callID); err != nil {
		t.Fatal(err)
	}
	for _, r := range f.requests() {
		what := r.Method + " " + r.Path
		if r.Proto != proto {
			t.Errorf("%s: protocol %s, want %s", what, r.Proto, proto)
		}
		if r.ContentLength != int64(len(r.Body)) || len(r.TransferEncoding) != 0 {
			t.Errorf("%s: Content-Length %d, Transfer-Encoding %q for a %d-byte body; want the length, not chunked",
				what, r.ContentLength, r.TransferEncoding, len(r.Body))
		}
		if got := r.Header.Get("User-Agent"); got != "kiota-go/1.5.4" {
			t.Errorf("%s: User-Agent %q, want kiota-go/1.5.4", what, got)
		}
		if got := r.Header.Get("SdkVersion"); !strings.HasPrefix(got, "graph-go/1.89.0, graph-go-core/") {
			t.Errorf("%s: SdkVersion %q, want graph-go/1.89.0, graph-go-core/...", what, got)
		}
	}
	if r := f.requests()[0]; len(r.Body) == 0 {
		t.Errorf("answer sent no body")
	}
}

func TestTokenFetchedOnceAndReused(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ctx := context.Background()
	for range 3 {
		if err := c.KeepAlive(ctx, callID); err != nil {
			t.Fatal(err)
		}
	}
	f.respond("POST", "/communications/getPresencesByUserId", response{Status: 200, Body: `{"value":[]}`})
	if _, err := c.Presences(ctx, []string{"fa8bf3dc-eca7-46b7-bad1-db199b62afc3"}); err != nil {
		t.Fatal(err)
	}
	if n := len(f.requests()); n != 4 {
		t.Errorf("%d Graph requests, want 4", n)
	}
	if n := f.tokenCount(); n != 1 {
		t.Errorf("token fetched %d times, want 1", n)
	}
}

func TestBadSecretFailsWithoutGraphRequest(t *testing.T) {
	f := newFakeGraph(t)
	c := newClientWith(t, f, "wrong-secret")
	err := c.KeepAlive(context.Background(), callID)
	if err == nil {
		t.Fatal("keepAlive succeeded with a wrong client secret")
	}
	var ge *graph.Error
	if errors.As(err, &ge) {
		t.Errorf("token failure reported as a Graph error: %v", err)
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("%d requests reached Graph, want 0", n)
	}
}

func TestInvalidArgumentsSendNothing(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ctx := context.Background()
	user := graph.Party{Kind: graph.KindUser, ID: "u1"}
	appInstance := graph.Party{Kind: graph.KindApplicationInstance, ID: "3d913abb-aec0-4964-8fa6-3c6850c4f278"}
	prompt := graph.MediaPrompt{URI: "https://cdn.contoso.com/beep.wav"}
	long := strings.Repeat("é", graph.MaxClientContext+1)
	cb := "https://bot.contoso.com/callback"
	opErr := func(_ graph.Operation, err error) error { return err }
	createErr := func(_ string, err error) error { return err }
	for name, err := range map[string]error{
		"reject reason": c.Reject(ctx, callID, "maybe"),
		"no prompts": func() error {
			_, err := c.PlayPrompt(ctx, callID, nil, "")
			return err
		}(),
		"21 prompts": func() error {
			_, err := c.PlayPrompt(ctx, callID, make([]graph.MediaPrompt, 21), "")
			return err
		}(),
		"transfer without id": c.Transfer(ctx, callID, graph.Party{Kind: graph.KindUser}, ""),
		"redirect timeout":    c.Redirect(ctx, callID, []graph.Party{user}, 5, ""),
		"redirect no targets": c.Redirect(ctx, callID, nil, 0, ""),
		"redirect timeout 91": c.Redirect(ctx, callID, []graph.Party{user}, 91, ""),
		"redirect 26 targets": c.Redirect(ctx, callID, repeat(user, 26), 0, ""),
		"redirect routing policy": c.RedirectWith(ctx, callID, graph.RedirectRequest{
			Targets: []graph.Party{user}, RoutingPolicies: []graph.RoutingPolicy{"sometimes"}}),
		"playPrompt clientContext 257":  opErr(c.PlayPrompt(ctx, callID, []graph.MediaPrompt{prompt}, long)),
		"playPrompt without uri":        opErr(c.PlayPrompt(ctx, callID, []graph.MediaPrompt{{ResourceID: "r"}}, "")),
		"subscribeToTone clientContext": opErr(c.SubscribeToTone(ctx, callID, long)),
		"cancelMedia clientContext":     opErr(c.CancelMediaProcessing(ctx, callID, long)),
		"transfer clientContext":        c.Transfer(ctx, callID, user, long),
		"consultative without call":     c.TransferConsultative(ctx, callID, user, "", ""),
		"transferee without id": c.TransferWith(ctx, callID, graph.TransferRequest{
			Target: user, Transferee: &graph.Party{Kind: graph.KindUser}}),
		"record 2 prompts":           opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{Prompts: []graph.MediaPrompt{prompt, prompt}})),
		"record 121 s":               opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{MaxRecordDurationSec: 121})),
		"record silence -1":          opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{MaxSilenceTimeoutSec: -1})),
		"record initial silence 200": opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{InitialSilenceTimeoutSec: 200})),
		"record stop tone":           opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{StopTones: []string{"x"}})),
		"record clientContext":       opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{ClientContext: long})),
		"invite nobody":              opErr(c.InviteParticipants(ctx, callID, graph.InviteRequest{})),
		"invite 6": opErr(c.InviteParticipants(ctx, callID, graph.InviteRequest{
			Participants: repeat(graph.Invitee{Party: user}, 6)})),
		"invite without id": opErr(c.InviteParticipants(ctx, callID, graph.InviteRequest{
			Participants: []graph.Invitee{{Party: graph.Party{Kind: graph.KindUser}}}})),
		"hold music without participant":      opErr(c.StartHoldMusic(ctx, callID, "", prompt, "")),
		"stop hold music without participant": opErr(c.StopHoldMusic(ctx, callID, "", "")),
		"hold music clientContext":            opErr(c.StartHoldMusic(ctx, callID, participantID, prompt, long)),
		"create call no targets":              createErr(c.CreateCall(ctx, graph.CreateCallRequest{CallbackURI: cb})),
		"create call http callback": createErr(c.CreateCall(ctx, graph.CreateCallRequest{
			Targets: []graph.Party{user}, CallbackURI: "http://bot.contoso.com/cb"})),
		"create call phone without source": createErr(c.CreateCall(ctx, graph.CreateCallRequest{
			Targets: []graph.Party{{Kind: graph.KindPhone, ID: "+12345678901"}}, TenantID: tenantID, CallbackURI: cb})),
		"create call phone without tenant": createErr(c.CreateCall(ctx, graph.CreateCallRequest{
			Source: appInstance, Targets: []graph.Party{{Kind: graph.KindPhone, ID: "+12345678901"}}, CallbackURI: cb})),
		"create call user source": createErr(c.CreateCall(ctx, graph.CreateCallRequest{
			Source: user, Targets: []graph.Party{user}, CallbackURI: cb})),
		"answer negative capacity": c.AnswerWithOptions(ctx, callID, graph.AnswerRequest{}, msgraph.AnswerOptions{ParticipantCapacity: -1}),
	} {
		if !errors.Is(err, msgraph.ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("%d requests reached Graph, want 0", n)
	}
}

func repeat[T any](v T, n int) []T {
	out := make([]T, n)
	for i := range out {
		out[i] = v
	}
	return out
}

func TestInvalidArgumentLimitsAccepted(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	ctx := context.Background()
	user := graph.Party{Kind: graph.KindUser, ID: "u1"}
	prompt := graph.MediaPrompt{URI: "https://cdn.contoso.com/beep.wav"}
	edge := strings.Repeat("é", graph.MaxClientContext) // characters, not bytes
	f.respond("POST", "/communications/calls/"+callID+"/recordResponse", response{Status: 200, Body: `{"id":"op","status":"running"}`})
	for name, err := range map[string]error{
		"25 targets and 90 s": c.Redirect(ctx, callID, repeat(user, 25), 90, ""),
		"15 s":                c.Redirect(ctx, callID, []graph.Party{user}, 15, ""),
		"20 prompts":          func() error { _, err := c.PlayPrompt(ctx, callID, repeat(prompt, 20), edge); return err }(),
		"record 1 and 120 s": func() error {
			_, err := c.RecordResponse(ctx, callID, graph.RecordRequest{Prompts: []graph.MediaPrompt{prompt},
				InitialSilenceTimeoutSec: 1, MaxSilenceTimeoutSec: 120, MaxRecordDurationSec: 120,
				StopTones: []string{"#", "*", "0", "9", "A", "D"}, ClientContext: edge})
			return err
		}(),
	} {
		if err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestCreateCallID(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	req := graph.CreateCallRequest{
		Targets:     []graph.Party{{Kind: graph.KindUser, ID: "112f7296-5fa4-42ca-bae8-6a692b15d4b8"}},
		CallbackURI: "https://bot.contoso.com/callback",
	}
	for name, tc := range map[string]struct {
		resp    response
		want    string
		wantErr bool
	}{
		"body": {resp: response{Status: 201, Body: `{"@odata.type":"#microsoft.graph.call","id":"2e1a0b00","state":"establishing"}`}, want: "2e1a0b00"},
		"location": {resp: response{Status: 201, Header: map[string]string{
			"Location": "https://graph.microsoft.com/v1.0/communications/calls/491f0b00-ffff-4bc9-a43e-b226498ec22a"}},
			want: "491f0b00-ffff-4bc9-a43e-b226498ec22a"},
		"nothing": {resp: response{Status: 201}, wantErr: true},
	} {
		f.respond("POST", "/communications/calls", tc.resp)
		got, err := c.CreateCall(context.Background(), req)
		if (err != nil) != tc.wantErr || got != tc.want {
			t.Errorf("%s: got %q, %v; want %q (error %v)", name, got, err, tc.want, tc.wantErr)
		}
	}
}

func TestNewValidatesConfig(t *testing.T) {
	ok := msgraph.Config{TenantID: tenantID, ClientID: clientID, ClientSecret: clientSecret}
	if _, err := msgraph.New(ok); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for name, mutate := range map[string]func(*msgraph.Config){
		"no secret":          func(c *msgraph.Config) { c.ClientSecret = "" },
		"http graph url":     func(c *msgraph.Config) { c.GraphURL = "http://graph.example/v1.0" },
		"relative authority": func(c *msgraph.Config) { c.AuthorityHost = "login.example" },
		"missing ca file":    func(c *msgraph.Config) { c.CAFile = filepath.Join(t.TempDir(), "none.pem") },
	} {
		cfg := ok
		mutate(&cfg)
		if _, err := msgraph.New(cfg); err == nil {
			t.Errorf("%s: New accepted %+v", name, cfg)
		}
	}
}

// GraphConnections counts the pipeline's connections. Over HTTP/2 one connection carries
// requests one after another and at once, and a request abandoned is reset without closing it.
// Where only HTTP/1.1 is spoken, a request made while another is in flight opens a second
// connection, and an abandoned request closes its own.
func TestGraphConnectionsCounted(t *testing.T) {
	for _, tc := range []struct {
		name string
		h2   bool
		// connections open and opened with a request in flight, and after it was abandoned
		inFlight, abandoned [2]int64
	}{
		{"HTTP/2", true, [2]int64{1, 1}, [2]int64{1, 1}},
		{"HTTP/1.1", false, [2]int64{2, 2}, [2]int64{1, 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFakeGraphProto(t, tc.h2)
			c := newClient(t, f)
			ctx := context.Background()
			calls := "/communications/calls/" + callID
			f.respond("POST", calls+"/subscribeToTone", response{Status: 200, Body: string(payload(t, "response-subscribetotone-operation.json"))})
			for range 3 {
				if _, err := c.SubscribeToTone(ctx, callID, ""); err != nil {
					t.Fatal(err)
				}
			}
			if open, opened := c.GraphConnections(); open != 1 || opened != 1 {
				t.Fatalf("after 3 requests one after another: %d open, %d opened, want 1 and 1", open, opened)
			}

			f.respond("POST", calls+"/transfer", response{Hang: true})
			hung, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() {
				done <- c.Transfer(hung, callID, graph.Party{Kind: graph.KindUser, ID: "agent"}, "")
			}()
			for !slices.ContainsFunc(f.requests(), func(r recorded) bool { return strings.HasSuffix(r.Path, "/transfer") }) {
				time.Sleep(time.Millisecond)
			}
			if _, err := c.SubscribeToTone(ctx, callID, ""); err != nil {
				t.Fatal(err)
			}
			if open, opened := c.GraphConnections(); open != tc.inFlight[0] || opened != tc.inFlight[1] {
				t.Fatalf("with a request in flight: %d open, %d opened, want %d and %d", open, opened, tc.inFlight[0], tc.inFlight[1])
			}
			cancel()
			if err := <-done; err == nil {
				t.Fatal("the abandoned transfer succeeded")
			}
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
				open, opened := c.GraphConnections()
				if open == tc.abandoned[0] && opened == tc.abandoned[1] {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("after the abandoned request: %d open, %d opened, want %d and %d", open, opened, tc.abandoned[0], tc.abandoned[1])
				}
			}
			if _, err := c.SubscribeToTone(ctx, callID, ""); err != nil {
				t.Fatalf("a request after the abandoned one: %v", err)
			}
			if open, opened := c.GraphConnections(); open != tc.abandoned[0] || opened != tc.abandoned[1] {
				t.Fatalf("a request after the abandoned one: %d open, %d opened, want it on a kept connection (%d and %d)", open, opened, tc.abandoned[0], tc.abandoned[1])
			}
		})
	}
}

package msgraph_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

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
)

// recorded is one request the fake Graph received.
type recorded struct {
	Method, Path string
	Header       http.Header
	Body         []byte // decompressed
}

// response is what the fake answers to a Graph request.
type response struct {
	Status int
	Header map[string]string
	Body   string
}

// fakeGraph is an https Entra ID authority (OpenID configuration + token endpoint) and Graph
// endpoint in one httptest.Server, recording every Graph request.
type fakeGraph struct {
	t   *testing.T
	srv *httptest.Server

	mu        sync.Mutex
	graph     []recorded
	tokens    int
	unknown   []string
	responses map[string]response // "METHOD /path" -> response
}

func newFakeGraph(t *testing.T) *fakeGraph {
	t.Helper()
	f := &fakeGraph{t: t, responses: map[string]response{}}
	f.srv = httptest.NewTLSServer(http.HandlerFunc(f.serve))
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeGraph) respond(method, path string, r response) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.responses[method+" "+path] = r
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
	switch {
	case r.Method == http.MethodGet && r.URL.Path == "/"+tenantID+"/v2.0/.well-known/openid-configuration":
		base := f.srv.URL + "/" + tenantID
		writeJSON(w, http.StatusOK, map[string]any{
			"issuer":                 base + "/v2.0",
			"authorization_endpoint": base + "/oauth2/v2.0/authorize",
			"token_endpoint":         base + "/oauth2/v2.0/token",
		})
	case r.Method == http.MethodPost && r.URL.Path == "/"+tenantID+"/oauth2/v2.0/token":
		f.token(w, r)
	case strings.HasPrefix(r.URL.Path, "/v1.0/"):
		f.graphRequest(w, r)
	default:
		f.mu.Lock()
		f.unknown = append(f.unknown, r.Method+" "+r.URL.Path)
		f.mu.Unlock()
		http.NotFound(w, r)
	}
}

func (f *fakeGraph) token(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if r.PostForm.Get("client_id") != clientID || r.PostForm.Get("client_secret") != clientSecret ||
		r.PostForm.Get("grant_type") != "client_credentials" ||
		!strings.Contains(r.PostForm.Get("scope"), "https://graph.microsoft.com/.default") {
		writeJSON(w, http.StatusUnauthorized, map[string]any{
			"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided.",
		})
		return
	}
	f.mu.Lock()
	f.tokens++
	f.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{
		"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": accessToken,
	})
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
	f.mu.Lock()
	f.graph = append(f.graph, recorded{Method: r.Method, Path: path, Header: r.Header.Clone(), Body: b})
	resp, ok := f.responses[r.Method+" "+path]
	f.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer "+accessToken {
		writeJSON(w, http.StatusUnauthorized, graphError("InvalidAuthenticationToken", "Access token is empty.", ""))
		return
	}
	if !ok {
		resp = response{Status: http.StatusAccepted}
		if r.Method == http.MethodDelete {
			resp.Status = http.StatusNoContent
		}
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
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	ca := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: f.srv.Certificate().Raw})
	if err := os.WriteFile(caFile, ca, 0o600); err != nil {
		t.Fatal(err)
	}
	c, err := msgraph.New(msgraph.Config{
		TenantID: tenantID, ClientID: clientID, ClientSecret: secret,
		AuthorityHost: f.srv.URL + "/",
		GraphURL:      f.srv.URL + "/v1.0",
		CAFile:        caFile,
		Timeout:       10 * time.Second,
		Logger:        zaptest.NewLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func payload(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "testdata", "payloads", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func decode(t *testing.T, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
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

	tests := []struct {
		name       string
		do         func() error
		method     string
		path       string
		want       string               // payload file; "" for no body
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
			if tt.want == "" {
				if len(bytes.TrimSpace(r.Body)) != 0 {
					t.Errorf("unexpected body %s", r.Body)
				}
				return
			}
			if ct := r.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") {
				t.Errorf("Content-Type = %q", ct)
			}
			want := decode(t, payload(t, tt.want))
			if tt.adjustWant != nil {
				tt.adjustWant(want.(map[string]any))
			}
			got := dropExtraODataTypes(decode(t, r.Body), want)
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
	want := &graph.Error{Op: "getCall", Status: 404, Code: "ItemNotFound", Message: "Call not found.", RequestID: "rid-404"}
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
	want := &graph.Error{Op: "transfer", Status: 503, Code: "ServiceUnavailable", Message: "Try again later.", RequestID: "rid-503", RetryAfter: 7 * time.Second}
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
	} {
		if !errors.Is(err, msgraph.ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", name, err)
		}
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("%d requests reached Graph, want 0", n)
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

package graph

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"
)

type recordingSink struct {
	got    [][]Notification
	tenant string
	scen   string
	err    error
}

func (s *recordingSink) Notify(ctx context.Context, tenant string, ns []Notification) error {
	s.got = append(s.got, ns)
	s.tenant = tenant
	s.scen = ScenarioID(ctx)
	return s.err
}

func TestWebhook(t *testing.T) {
	ks := newKeyServer(t)
	good := signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))
	forged := signRS(t, genKey(t), "k1", goodClaims(time.Now()))
	incoming, _ := os.ReadFile("testdata/payloads/notification-incoming.json")
	otherTenant := strings.Replace(string(incoming), `"state": "incoming",`, `"state": "incoming", "tenantId": "9e9e9e9e-0000-4000-8000-000000000000",`, 1)

	for _, c := range []struct {
		name      string
		auth      string
		body      string
		sinkErr   error
		status    int
		delivered bool
	}{
		{"accepted", "Bearer " + good, string(incoming), nil, http.StatusAccepted, true},
		{"no token", "", string(incoming), nil, http.StatusUnauthorized, false},
		{"forged token", "Bearer " + forged, string(incoming), nil, http.StatusForbidden, false},
		{"malformed body", "Bearer " + good, `{"value":[{"changeType":"updated"}]}`, nil, http.StatusBadRequest, false},
		{"not json", "Bearer " + good, `<xml/>`, nil, http.StatusBadRequest, false},
		{"legacy format", "Bearer " + good, `{"id":"abc","type":"call"}`, nil, http.StatusNoContent, false},
		{"tenant mismatch", "Bearer " + good, otherTenant, nil, http.StatusForbidden, false},
		{"too large", "Bearer " + good, `{"value":[` + strings.Repeat(" ", 2<<20) + `]}`, nil, http.StatusRequestEntityTooLarge, false},
		{"storage down", "Bearer " + good, string(incoming), ErrUnavailable, http.StatusServiceUnavailable, true},
		{"storage bug", "Bearer " + good, string(incoming), errors.New("boom"), http.StatusInternalServerError, true},
		{"call of another tenant", "Bearer " + good, string(incoming), fmt.Errorf("call k: %w", ErrWrongTenant), http.StatusForbidden, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			sink := &recordingSink{err: c.sinkErr}
			h := &Webhook{Auth: newTestVerifier(t, ks, nil), Sink: sink, Log: zaptest.NewLogger(t)}
			r := httptest.NewRequest("POST", "/api/calls", strings.NewReader(c.body))
			if c.auth != "" {
				r.Header.Set("Authorization", c.auth)
			}
			r.Header.Set("Scenario-Id", "2b6bd1ef-0c77-4b35-9f0d-a1b2c3d4e5f6")
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != c.status {
				t.Fatalf("status %d, want %d (%s)", w.Code, c.status, w.Body)
			}
			if got := len(sink.got) > 0; got != c.delivered {
				t.Fatalf("delivered = %v, want %v", got, c.delivered)
			}
			if got := w.Header().Get("WWW-Authenticate"); (c.status == http.StatusUnauthorized) != (got == "Bearer") {
				t.Errorf("WWW-Authenticate %q with status %d, want Bearer on a 401 only", got, c.status)
			}
			if c.status >= 400 && !strings.Contains(w.Body.String(), `"error"`) {
				t.Errorf("error body %q says nothing", w.Body)
			}
			if c.delivered && (sink.tenant != testTenant || sink.scen != "2b6bd1ef-0c77-4b35-9f0d-a1b2c3d4e5f6") {
				t.Errorf("tenant %q scenario %q not passed on", sink.tenant, sink.scen)
			}
		})
	}
}

func BenchmarkWebhook(b *testing.B) {
	ks := newKeyServer(b)
	good := "Bearer " + signRS(b, ks.keys["k1"], "k1", goodClaims(time.Now()))
	body, _ := os.ReadFile("testdata/payloads/notification-tone.json")
	v, _ := NewVerifier(VerifierConfig{OpenIDConfigURL: ks.srv.URL + "/openid", Audience: testAudience})
	h := &Webhook{Auth: v, Sink: &discardSink{}, Log: zaptest.NewLogger(b)}
	b.ReportAllocs()
	for b.Loop() {
		r := httptest.NewRequest("POST", "/api/calls", strings.NewReader(string(body)))
		r.Header.Set("Authorization", good)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusAccepted {
			b.Fatal(w.Code)
		}
	}
}

type discardSink struct{}

func (discardSink) Notify(context.Context, string, []Notification) error { return nil }

// Body buffers are reused: what one request delivered must not change when the next is read.
func TestWebhookBodyBufferReuse(t *testing.T) {
	ks := newKeyServer(t)
	good := "Bearer " + signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))
	sink := &recordingSink{}
	h := &Webhook{Auth: newTestVerifier(t, ks, nil), Sink: sink, Log: zaptest.NewLogger(t)}
	var want [][]Notification
	for _, f := range []string{"notification-incoming.json", "notification-tone.json", "notification-playprompt-completed.json",
		"notification-terminated.json", "notification-incoming.json"} {
		body, err := os.ReadFile("testdata/payloads/" + f)
		if err != nil {
			t.Fatal(err)
		}
		ns, err := Decode(body)
		if err != nil {
			t.Fatal(err)
		}
		want = append(want, ns)
		r := httptest.NewRequest("POST", "/api/calls", strings.NewReader(string(body)))
		if len(want)%2 == 0 {
			r.ContentLength = -1 // chunked: read without knowing the size
		}
		r.Header.Set("Authorization", good)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusAccepted {
			t.Fatalf("%s: status %d (%s)", f, w.Code, w.Body)
		}
	}
	if diff := cmp.Diff(sink.got, want); diff != "" {
		t.Errorf("delivered notifications changed (-got +want):\n%s", diff)
	}
}

// failingBody is a request body whose read fails as a timed-out connection's does.
type failingBody struct{}

func (failingBody) Read([]byte) (int, error) { return 0, os.ErrDeadlineExceeded }
func (failingBody) Close() error             { return nil }

// A body callbot could not read (a timeout, a connection cut) is not Graph's fault: the answer
// is 503 with Retry-After, so Graph sends the notification again; a 400 would make Graph drop it.
func TestWebhookBodyNotReadAsksForRetry(t *testing.T) {
	ks := newKeyServer(t)
	sink := &recordingSink{}
	h := &Webhook{Auth: newTestVerifier(t, ks, nil), Sink: sink, Log: zaptest.NewLogger(t)}
	r := httptest.NewRequest("POST", "/api/calls", nil)
	r.Body = failingBody{}
	r.Header.Set("Authorization", "Bearer "+signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now())))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") == "" || len(sink.got) > 0 {
		t.Fatalf("status %d, Retry-After %q, delivered %d; want 503 with Retry-After and nothing applied", w.Code, w.Header().Get("Retry-After"), len(sink.got))
	}
}

// slowAuth accepts every token after a delay: a verification that waited for the signing keys.
type slowAuth struct{ delay time.Duration }

func (a slowAuth) VerifyRequest(*http.Request) (Claims, error) {
	time.Sleep(a.delay)
	return Claims{TenantID: testTenant, Expiry: time.Now().Add(time.Hour)}, nil
}

// The server's read deadline counts from the request's start. A token that waited for the
// signing keys past it left the body unreadable, and a notification Graph sent in time was
// refused. The body now gets time of its own once the token is verified.
func TestWebhookBodyReadAfterASlowTokenCheck(t *testing.T) {
	sink := &recordingSink{}
	srv := httptest.NewUnstartedServer(&Webhook{Auth: slowAuth{delay: slowVerify + 300*time.Millisecond}, Sink: sink, Log: zaptest.NewLogger(t)})
	srv.Config.ReadTimeout = slowVerify
	srv.Start()
	t.Cleanup(srv.Close)
	incoming, err := os.ReadFile("testdata/payloads/notification-incoming.json")
	if err != nil {
		t.Fatal(err)
	}
	// larger than what the server reads with the headers, so the handler reads from the socket
	body := strings.Replace(string(incoming), "{", "{"+strings.Repeat(" ", 16<<10), 1)
	resp, err := http.Post(srv.URL+"/api/calls", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || len(sink.got) != 1 {
		t.Fatalf("status %d, delivered %d; want the notification taken", resp.StatusCode, len(sink.got))
	}
}

// A notification callbot cannot decode must not take the others of its request down with it:
// Graph drops a request answered 400, so a key press batched with a malformed notification was
// lost for good. The malformed one is skipped (it would never decode), the others applied, 202;
// a request with nothing decodable still gets 400.
func TestWebhookMalformedNotificationDoesNotDropItsBatch(t *testing.T) {
	ks := newKeyServer(t)
	good := "Bearer " + signRS(t, ks.keys["k1"], "k1", goodClaims(time.Now()))
	tone := `{"changeType":"updated","resourceUrl":"/communications/calls/57dab8b1-894c-409a-b240-bd8beae78896",` +
		`"resourceData":{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}}`
	prompt := `{"changeType":"deleted","resourceUrl":"/communications/calls/57dab8b1-894c-409a-b240-bd8beae78896/operations/0FE0",` +
		`"resourceData":{"@odata.type":"#microsoft.graph.playPromptOperation","status":"completed","clientContext":"p7"}}`
	for _, c := range []struct {
		name   string
		value  string
		status int
		want   []string // CallID/ClientContext of what the sink got
	}{
		{"unknown changeType", tone + `,{"changeType":"moved","resourceUrl":"/communications/calls/x"},` + prompt, http.StatusAccepted, []string{"tone1", "p7"}},
		{"no call id", `{"changeType":"updated","resourceUrl":"/communications/calls//operations/x"},` + tone, http.StatusAccepted, []string{"tone1"}},
		{"wrong member type", tone + `,{"changeType":"updated","resourceUrl":"/communications/calls/x","resourceData":{"toneInfo":"tone2"}}`, http.StatusAccepted, []string{"tone1"}},
		{"null entry", `null,` + prompt, http.StatusAccepted, []string{"p7"}},
		{"nothing decodable", `{"changeType":"moved","resourceUrl":"/communications/calls/x"},null`, http.StatusBadRequest, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			sink := &recordingSink{}
			h := &Webhook{Auth: newTestVerifier(t, ks, nil), Sink: sink, Log: zaptest.NewLogger(t)}
			r := httptest.NewRequest("POST", "/api/calls", strings.NewReader(`{"@odata.type":"#microsoft.graph.commsNotifications","value":[`+c.value+`]}`))
			r.Header.Set("Authorization", good)
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != c.status {
				t.Fatalf("status %d, want %d (%s)", w.Code, c.status, w.Body)
			}
			var got []string
			for _, ns := range sink.got {
				for _, n := range ns {
					switch {
					case n.Call != nil && n.Call.ToneInfo != nil:
						got = append(got, n.Call.ToneInfo.Tone)
					case n.Operation != nil:
						got = append(got, n.Operation.ClientContext)
					default:
						got = append(got, "?"+n.ResourceURL)
					}
				}
			}
			if diff := cmp.Diff(c.want, got); diff != "" {
				t.Errorf("notifications applied (-want +got):\n%s", diff)
			}
		})
	}
}

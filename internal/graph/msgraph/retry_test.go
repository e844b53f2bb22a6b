package msgraph_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

// fakeClock is a clock whose Sleep returns at once, advancing the clock and recording the wait.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	sleeps []time.Duration
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Now()} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Sleep(ctx context.Context, d time.Duration) error {
	c.mu.Lock()
	c.sleeps = append(c.sleeps, d)
	c.now = c.now.Add(d)
	c.mu.Unlock()
	return ctx.Err()
}

// takeSleeps returns the waits so far and forgets them, and sets the clock back to the real
// time: the deadlines the client checks its waits against are on the real clock.
func (c *fakeClock) takeSleeps() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sleeps
	c.sleeps = nil
	c.now = time.Now()
	return s
}

// newRetryClient returns a client for f on a fake clock, with no jitter: the n-th backoff is
// exactly half of min(250ms*2^(n-1), 2s).
func newRetryClient(t *testing.T, f *fakeGraph, mutate func(*msgraph.Config)) (*msgraph.Client, *fakeClock) {
	t.Helper()
	c := newClientCfg(t, f, mutate)
	clk := newFakeClock()
	msgraph.SetClock(c, clk.Now, clk.Sleep, func(time.Duration) time.Duration { return 0 })
	return c, clk
}

func retryAfterResp(status int, retryAfter string) response {
	r := response{Status: status, Body: `{"error":{"code":"Throttled","message":"slow down"}}`}
	if retryAfter != "" {
		r.Header = map[string]string{"Retry-After": retryAfter}
	}
	return r
}

// retryAction is one action as the retry tests drive it.
type retryAction struct {
	name         string
	method, path string
	ok           response
	do           func(ctx context.Context, c *msgraph.Client) error
}

func retryActions() []retryAction {
	calls := "/communications/calls/" + callID
	op := response{Status: 200, Body: `{"@odata.type":"#microsoft.graph.commsOperation","id":"op-1","status":"completed"}`}
	user := graph.Party{Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f"}
	prompt := graph.MediaPrompt{URI: "https://cdn.contoso.com/beep.wav"}
	opErr := func(_ graph.Operation, err error) error { return err }
	return []retryAction{
		{"answer", "POST", calls + "/answer", response{Status: 202}, func(ctx context.Context, c *msgraph.Client) error {
			return c.Answer(ctx, callID, graph.AnswerRequest{CallbackURI: "https://bot.contoso.com/api/calls"})
		}},
		{"reject", "POST", calls + "/reject", response{Status: 202}, func(ctx context.Context, c *msgraph.Client) error {
			return c.Reject(ctx, callID, graph.RejectBusy)
		}},
		{"redirect", "POST", calls + "/redirect", response{Status: 202}, func(ctx context.Context, c *msgraph.Client) error {
			return c.Redirect(ctx, callID, []graph.Party{user}, 20, "")
		}},
		{"transfer", "POST", calls + "/transfer", response{Status: 202}, func(ctx context.Context, c *msgraph.Client) error {
			return c.Transfer(ctx, callID, user, "")
		}},
		{"invite", "POST", calls + "/participants/invite", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.InviteParticipants(ctx, callID, graph.InviteRequest{Participants: []graph.Invitee{{Party: user}}}))
		}},
		{"createCall", "POST", "/communications/calls", response{Status: 201, Body: `{"id":"new-call"}`}, func(ctx context.Context, c *msgraph.Client) error {
			_, err := c.CreateCall(ctx, graph.CreateCallRequest{Targets: []graph.Party{user}, CallbackURI: "https://bot.contoso.com/api/calls"})
			return err
		}},
		{"playPrompt", "POST", calls + "/playPrompt", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.PlayPrompt(ctx, callID, []graph.MediaPrompt{prompt}, ""))
		}},
		{"recordResponse", "POST", calls + "/recordResponse", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.RecordResponse(ctx, callID, graph.RecordRequest{MaxRecordDurationSec: 10}))
		}},
		{"startHoldMusic", "POST", calls + "/participants/" + participantID + "/startHoldMusic", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.StartHoldMusic(ctx, callID, participantID, prompt, ""))
		}},
		{"stopHoldMusic", "POST", calls + "/participants/" + participantID + "/stopHoldMusic", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.StopHoldMusic(ctx, callID, participantID, ""))
		}},
		{"getCall", "GET", calls, response{Status: 200, Body: `{"id":"x","state":"established"}`}, func(ctx context.Context, c *msgraph.Client) error {
			_, err := c.GetCall(ctx, callID)
			return err
		}},
		{"listParticipants", "GET", calls + "/participants", response{Status: 200, Body: `{"value":[]}`}, func(ctx context.Context, c *msgraph.Client) error {
			_, err := c.Participants(ctx, callID)
			return err
		}},
		{"keepAlive", "POST", calls + "/keepAlive", response{Status: 200}, func(ctx context.Context, c *msgraph.Client) error {
			return c.KeepAlive(ctx, callID)
		}},
		{"getPresencesByUserId", "POST", "/communications/getPresencesByUserId", response{Status: 200, Body: `{"value":[]}`}, func(ctx context.Context, c *msgraph.Client) error {
			_, err := c.Presences(ctx, []string{"fa8bf3dc-eca7-46b7-bad1-db199b62afc3"})
			return err
		}},
		{"subscribeToTone", "POST", calls + "/subscribeToTone", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.SubscribeToTone(ctx, callID, ""))
		}},
		{"cancelMediaProcessing", "POST", calls + "/cancelMediaProcessing", op, func(ctx context.Context, c *msgraph.Client) error {
			return opErr(c.CancelMediaProcessing(ctx, callID, ""))
		}},
		{"hangup", "DELETE", calls, response{Status: 204}, func(ctx context.Context, c *msgraph.Client) error {
			return c.Hangup(ctx, callID)
		}},
	}
}

// idempotent are the actions repeated after ambiguous transient failures.
var idempotent = map[string]bool{
	"getCall": true, "listParticipants": true, "keepAlive": true, "getPresencesByUserId": true, "subscribeToTone": true,
	"cancelMediaProcessing": true, "hangup": true,
}

func TestRetryPolicyTable(t *testing.T) {
	for _, a := range retryActions() {
		want := msgraph.RetryPolicy{MaxAttempts: 2}
		if idempotent[a.name] {
			want = msgraph.RetryPolicy{MaxAttempts: 3, Idempotent: true}
		}
		if got := msgraph.RetryPolicyFor(a.name); got != want {
			t.Errorf("RetryPolicyFor(%q) = %+v, want %+v", a.name, got, want)
		}
	}
	if got := msgraph.RetryPolicyFor("somethingNew"); got != (msgraph.RetryPolicy{MaxAttempts: 1}) {
		t.Errorf("unknown action policy = %+v, want a single attempt", got)
	}
}

// TestRetriesPerAction sends every action against scripted failures and checks how many
// requests reached Graph, the waits between them and the result.
func TestRetriesPerAction(t *testing.T) {
	const (
		b1 = 125 * time.Millisecond // first backoff without jitter
		b2 = 250 * time.Millisecond
	)
	type result struct {
		requests int
		sleeps   []time.Duration
		status   int // of the *graph.Error returned; 0 for success, -1 for another error
		outcome  graph.Outcome
	}
	cases := []struct {
		name         string
		seq          []response // answered before the action's success response
		safe, unsafe result     // expected for idempotent / other actions
	}{
		{
			name:   "429 with Retry-After then success",
			seq:    []response{retryAfterResp(429, "1")},
			safe:   result{2, []time.Duration{time.Second}, 0, graph.Succeeded},
			unsafe: result{2, []time.Duration{time.Second}, 0, graph.Succeeded},
		},
		{
			name:   "429 without Retry-After then success",
			seq:    []response{retryAfterResp(429, "")},
			safe:   result{2, []time.Duration{b1}, 0, graph.Succeeded},
			unsafe: result{2, []time.Duration{b1}, 0, graph.Succeeded},
		},
		{
			name:   "429 three times",
			seq:    []response{retryAfterResp(429, "1"), retryAfterResp(429, "1"), retryAfterResp(429, "1")},
			safe:   result{3, []time.Duration{time.Second, time.Second}, 429, graph.NotProcessed},
			unsafe: result{2, []time.Duration{time.Second}, 429, graph.NotProcessed},
		},
		{
			name:   "429 with a Retry-After past the deadline",
			seq:    []response{retryAfterResp(429, "30")},
			safe:   result{1, nil, 429, graph.NotProcessed},
			unsafe: result{1, nil, 429, graph.NotProcessed},
		},
		{
			name:   "503 then success",
			seq:    []response{retryAfterResp(503, "")},
			safe:   result{2, []time.Duration{b1}, 0, graph.Succeeded},
			unsafe: result{1, nil, 503, graph.Ambiguous},
		},
		{
			name:   "503 with Retry-After then success",
			seq:    []response{retryAfterResp(503, "2")},
			safe:   result{2, []time.Duration{2 * time.Second}, 0, graph.Succeeded},
			unsafe: result{1, nil, 503, graph.Ambiguous},
		},
		{
			name:   "502 then 504 then success",
			seq:    []response{retryAfterResp(502, ""), retryAfterResp(504, "")},
			safe:   result{3, []time.Duration{b1, b2}, 0, graph.Succeeded},
			unsafe: result{1, nil, 502, graph.Ambiguous},
		},
		{
			name:   "504 three times",
			seq:    []response{retryAfterResp(504, ""), retryAfterResp(504, ""), retryAfterResp(504, "")},
			safe:   result{3, []time.Duration{b1, b2}, 504, graph.Ambiguous},
			unsafe: result{1, nil, 504, graph.Ambiguous},
		},
		{
			name:   "500 is not transient",
			seq:    []response{retryAfterResp(500, "")},
			safe:   result{1, nil, 500, graph.Ambiguous},
			unsafe: result{1, nil, 500, graph.Ambiguous},
		},
		{
			name:   "404 is final",
			seq:    []response{retryAfterResp(404, "")},
			safe:   result{1, nil, 404, graph.Refused},
			unsafe: result{1, nil, 404, graph.Refused},
		},
		{
			name:   "connection lost after the request was written",
			seq:    []response{{Drop: true}},
			safe:   result{2, []time.Duration{b1}, 0, graph.Succeeded},
			unsafe: result{1, nil, -1, graph.Ambiguous},
		},
	}
	for _, a := range retryActions() {
		t.Run(a.name, func(t *testing.T) {
			f := newFakeGraph(t)
			c, clk := newRetryClient(t, f, nil)
			f.respond(a.method, a.path, a.ok)
			for _, tc := range cases {
				f.resetQueue()
				f.respondSeq(a.method, a.path, tc.seq...)
				clk.takeSleeps()
				before := len(f.requests())
				err := a.do(context.Background(), c)

				got := result{requests: len(f.requests()) - before, sleeps: clk.takeSleeps(), outcome: graph.Classify(err)}
				var ge *graph.Error
				switch {
				case errors.As(err, &ge):
					got.status = ge.Status
				case err != nil:
					got.status = -1
				}
				want := tc.unsafe
				if idempotent[a.name] {
					want = tc.safe
				}
				if a.method == "GET" && tc.seq[0].Drop && len(got.sleeps) == 0 {
					// net/http itself resends a GET whose reused connection was closed
					// before the response, without the client's backoff.
					want.sleeps = nil
				}
				if diff := cmp.Diff(got, want, cmp.AllowUnexported(result{})); diff != "" {
					t.Errorf("%s: (-got +want)\n%s\nerr: %v", tc.name, diff, err)
				}
				if got.outcome == graph.Ambiguous && !graph.IsAmbiguous(err) {
					t.Errorf("%s: IsAmbiguous(%v) = false", tc.name, err)
				}
			}
		})
	}
}

func TestRetryAfterHTTPDate(t *testing.T) {
	f := newFakeGraph(t)
	c, clk := newRetryClient(t, f, nil)
	path := "/communications/calls/" + callID
	f.respond("GET", path, response{Status: 200, Body: `{"state":"established"}`})
	date := clk.Now().Add(5 * time.Second).UTC().Format(http.TimeFormat) // whole seconds
	f.respondSeq("GET", path, retryAfterResp(503, date))
	if _, err := c.GetCall(context.Background(), callID); err != nil {
		t.Fatal(err)
	}
	sleeps := clk.takeSleeps()
	if len(sleeps) != 1 || sleeps[0] < 4*time.Second || sleeps[0] > 5*time.Second {
		t.Errorf("waited %v, want one wait of 4-5 s (Retry-After %s)", sleeps, date)
	}
	if n := len(f.requests()); n != 2 {
		t.Errorf("%d requests, want 2", n)
	}
}

func TestRetryRespectsCallerDeadline(t *testing.T) {
	f := newFakeGraph(t)
	c, clk := newRetryClient(t, f, nil)
	path := "/communications/calls/" + callID + "/keepAlive"
	f.respond("POST", path, response{Status: 200})

	// 3 s of Retry-After plus a second for the new attempt do not fit in 2.5 s.
	f.respondSeq("POST", path, retryAfterResp(429, "3"))
	ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
	defer cancel()
	err := c.KeepAlive(ctx, callID)
	var ge *graph.Error
	if !errors.As(err, &ge) || ge.Status != 429 || ge.RetryAfter != 3*time.Second {
		t.Fatalf("err = %v, want the 429 with its Retry-After", err)
	}
	if s := clk.takeSleeps(); len(s) != 0 {
		t.Errorf("waited %v past the deadline", s)
	}
	if n := len(f.requests()); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}

	// 1 s does.
	f.respondSeq("POST", path, retryAfterResp(429, "1"))
	if err := c.KeepAlive(ctx, callID); err != nil {
		t.Fatal(err)
	}
	if s := clk.takeSleeps(); !cmp.Equal(s, []time.Duration{time.Second}) {
		t.Errorf("waited %v, want [1s]", s)
	}

	// A cancelled context ends the wait and returns the failure.
	f.respondSeq("POST", path, retryAfterResp(503, ""))
	cctx, ccancel := context.WithCancel(context.Background())
	msgraph.SetClock(c, nil, func(context.Context, time.Duration) error { ccancel(); return context.Canceled }, nil)
	before := len(f.requests())
	err = c.KeepAlive(cctx, callID)
	if !errors.As(err, &ge) || ge.Status != 503 {
		t.Errorf("err = %v, want the 503", err)
	}
	if n := len(f.requests()) - before; n != 1 {
		t.Errorf("%d requests after cancellation, want 1", n)
	}
}

// closingListener accepts TCP connections and closes them at once, so that a TLS handshake
// fails before any request is written. It returns the listener's address and a connection count.
func closingListener(t *testing.T) (string, *atomic.Int32) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	var n atomic.Int32
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			conn.Close()
		}
	}()
	return l.Addr().String(), &n
}

func TestRequestNotSentIsRetried(t *testing.T) {
	f := newFakeGraph(t)
	addr, conns := closingListener(t)
	c, clk := newRetryClient(t, f, func(cfg *msgraph.Config) { cfg.GraphURL = "https://" + addr + "/v1.0" })
	ctx := context.Background()

	for _, tc := range []struct {
		name  string
		do    func() error
		sends int32
	}{
		{"answer", func() error { return c.Answer(ctx, callID, graph.AnswerRequest{}) }, 2},
		{"transfer", func() error {
			return c.Transfer(ctx, callID, graph.Party{Kind: graph.KindUser, ID: "u1"}, "")
		}, 2},
		{"keepAlive", func() error { return c.KeepAlive(ctx, callID) }, 3},
	} {
		conns.Store(0)
		clk.takeSleeps()
		err := tc.do()
		if !errors.Is(err, graph.ErrNotSent) {
			t.Errorf("%s: err = %v, want ErrNotSent", tc.name, err)
		}
		if o := graph.Classify(err); o != graph.NotProcessed {
			t.Errorf("%s: Classify = %v, want not processed", tc.name, o)
		}
		if n := conns.Load(); n != tc.sends {
			t.Errorf("%s: %d connections, want %d", tc.name, n, tc.sends)
		}
		if s := clk.takeSleeps(); len(s) != int(tc.sends-1) {
			t.Errorf("%s: waits %v, want %d", tc.name, s, tc.sends-1)
		}
	}
}

func TestTokenFailureIsNotRetried(t *testing.T) {
	f := newFakeGraph(t)
	c, clk := newRetryClient(t, f, func(cfg *msgraph.Config) { cfg.ClientSecret = "wrong-secret" })
	err := c.KeepAlive(context.Background(), callID)
	if !errors.Is(err, graph.ErrNotSent) {
		t.Errorf("err = %v, want ErrNotSent", err)
	}
	if n := f.tokenCount(); n != 0 {
		t.Errorf("%d tokens issued", n)
	}
	if s := clk.takeSleeps(); len(s) != 0 {
		t.Errorf("waited %v: a token failure was retried", s)
	}
	if n := len(f.requests()); n != 0 {
		t.Errorf("%d Graph requests, want 0", n)
	}
}

func TestBackoffJitter(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	clk := newFakeClock()
	msgraph.SetClock(c, clk.Now, clk.Sleep, nil) // real jitter
	path := "/communications/calls/" + callID + "/keepAlive"
	f.respond("POST", path, response{Status: 200})
	for range 20 {
		clk.takeSleeps()
		f.respondSeq("POST", path, retryAfterResp(504, ""), retryAfterResp(504, ""))
		if err := c.KeepAlive(context.Background(), callID); err != nil {
			t.Fatal(err)
		}
		s := clk.takeSleeps()
		if len(s) != 2 || s[0] < 125*time.Millisecond || s[0] >= 250*time.Millisecond ||
			s[1] < 250*time.Millisecond || s[1] >= 500*time.Millisecond {
			t.Fatalf("waits %v, want [125ms,250ms) then [250ms,500ms)", s)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want graph.Outcome
	}{
		{nil, graph.Succeeded},
		{&graph.Error{Status: 429}, graph.NotProcessed},
		{&graph.Error{Status: 400}, graph.Refused},
		{&graph.Error{Status: 404}, graph.Refused},
		{&graph.Error{Status: 500}, graph.Ambiguous},
		{&graph.Error{Status: 503, RetryAfter: time.Second}, graph.Ambiguous},
		{context.DeadlineExceeded, graph.Ambiguous},
		{errors.New("connection reset by peer"), graph.Ambiguous},
		{msgraph.ErrInvalidArgument, graph.Refused},
		{graph.ErrNotSent, graph.NotProcessed},
	} {
		if got := graph.Classify(tc.err); got != tc.want {
			t.Errorf("Classify(%v) = %v, want %v", tc.err, got, tc.want)
		}
		if got := graph.IsAmbiguous(tc.err); got != (tc.want == graph.Ambiguous) {
			t.Errorf("IsAmbiguous(%v) = %v", tc.err, got)
		}
	}
}

func TestFailureLoggedWithDiagnostics(t *testing.T) {
	f := newFakeGraph(t)
	core, logs := observer.New(zapcore.DebugLevel)
	c := newClientCfg(t, f, func(cfg *msgraph.Config) { cfg.Logger = zap.New(core) })
	diag := `{"ServerInfo":{"DataCenter":"West Europe","Slice":"E","Ring":"5","ScaleUnit":"003","RoleInstance":"AM2PEPF0001"}}`
	f.respond("POST", "/communications/calls/"+callID+"/transfer", response{Status: 403,
		Header: map[string]string{"request-id": "rid-403", "x-ms-ags-diagnostic": diag},
		Body:   `{"error":{"code":"Forbidden","message":"no permission"}}`})
	ctx := graph.WithTenantID(graph.WithScenarioID(context.Background(), "scn-1"), tenantID)
	err := c.Transfer(ctx, callID, graph.Party{Kind: graph.KindUser, ID: "u1"}, "")
	if err == nil {
		t.Fatal("transfer succeeded")
	}
	entries := logs.FilterMessage("graph request failed").All()
	if len(entries) != 1 {
		t.Fatalf("%d failure log lines, want 1: %v", len(entries), logs.All())
	}
	e := entries[0]
	// the caller gets the error and logs it: here it is debug only ("log or return, never both")
	if e.Level != zapcore.DebugLevel {
		t.Errorf("level %v, want debug", e.Level)
	}
	fields := e.ContextMap()
	sent := f.requests()[0].Header.Get("client-request-id")
	for k, want := range map[string]any{
		"op": "transfer", "call_id": callID, "scenario_id": "scn-1", "tenant_id": tenantID, "status": int64(403),
		"request_id": "rid-403", "ags_diagnostic": diag, "client_request_id": sent, "outcome": "refused",
	} {
		if fields[k] != want {
			t.Errorf("field %s = %v, want %v", k, fields[k], want)
		}
	}
	if sent == "" {
		t.Error("no client-request-id sent")
	}
	// what support needs is in the error the caller logs
	if msg := err.Error(); !strings.Contains(msg, "request-id rid-403") || !strings.Contains(msg, "client-request-id "+sent) {
		t.Errorf("error %q lacks request-id rid-403 or client-request-id %s", msg, sent)
	}
	// the retry of a 429 is logged at info with the wait
	f.respondSeq("POST", "/communications/calls/"+callID+"/keepAlive", retryAfterResp(429, "0"))
	if err := c.KeepAlive(ctx, callID); err != nil {
		t.Fatal(err)
	}
	if n := logs.FilterMessage("graph request failed, retrying").Len(); n != 1 {
		t.Errorf("%d retry log lines, want 1", n)
	}
}

// net/http's HTTP/2 client sends a request again by itself after some stream resets that can
// come after the server read all of it (PROTOCOL_ERROR), when the request can give its body
// again (GetBody). An action that must not be sent twice (answer, transfer, invite...) goes
// without GetBody: a request whose body was not written is still retried on a new connection;
// anything else is the client's to decide, and it does not resend an ambiguous one.
func TestActionsThatMustNotRepeatCannotBeResentByNetHTTP(t *testing.T) {
	for op, want := range map[string]bool{"transfer": false, "answer": false, "invite": false, "playPrompt": false, "hangup": true, "subscribeToTone": true} {
		req, err := http.NewRequest("POST", "https://graph.test/v1.0/communications/calls/x/"+op, io.NopCloser(strings.NewReader(`{"a":1}`)))
		if err != nil {
			t.Fatal(err)
		}
		got, err := msgraph.BodyResendable(op, req)
		if err != nil || got != want {
			t.Errorf("%s: body resendable by net/http = %v (%v), want %v", op, got, err, want)
		}
	}
}

// A Retry-After given as an HTTP date is waited out to the date, not rounded to the nearest
// second (which could send the retry up to half a second early).
func TestRetryAfterDateIsNotRoundedDown(t *testing.T) {
	f := newFakeGraph(t)
	c, clk := newRetryClient(t, f, nil)
	now := time.Now().Truncate(time.Second).Add(600 * time.Millisecond)
	msgraph.SetClock(c, func() time.Time { return now }, nil, nil)
	date := now.Truncate(time.Second).Add(5 * time.Second)
	path := "/communications/calls/" + callID + "/transfer"
	f.respondSeq("POST", path, retryAfterResp(429, date.UTC().Format(http.TimeFormat)), response{Status: 202})
	if err := c.Transfer(context.Background(), callID, graph.Party{Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f"}, ""); err != nil {
		t.Fatal(err)
	}
	sleeps := clk.takeSleeps()
	if len(sleeps) != 1 || now.Add(sleeps[0]).Before(date) {
		t.Errorf("waited %v after a Retry-After of %s (now %s): the retry went out before the date", sleeps, date.Format(time.TimeOnly), now.Format("15:04:05.000"))
	}
}

// A request that timed out (or whose connection was cut) is the case where Graph may have acted
// and Microsoft support needs the request's id: the error carries client-request-id.
func TestTimeoutErrorCarriesClientRequestID(t *testing.T) {
	f := newFakeGraph(t)
	c := newClientCfg(t, f, nil)
	f.respond("POST", "/communications/calls/"+callID+"/transfer", response{Hang: true})
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	err := c.Transfer(ctx, callID, graph.Party{Kind: graph.KindUser, ID: "550fae72-d251-43ec-868c-373732c2704f"}, "")
	reqs := f.requests()
	if err == nil || len(reqs) == 0 {
		t.Fatalf("transfer: %v, %d requests", err, len(reqs))
	}
	if id := reqs[0].Header.Get("client-request-id"); id == "" || !strings.Contains(err.Error(), id) {
		t.Errorf("error %q lacks the client-request-id %q", err, id)
	}
}

// An action retried after an ambiguous failure and then refused is still ambiguous: the first
// send may have acted, whatever the last answer says.
func TestRefusalAfterAnAmbiguousFailureStaysAmbiguous(t *testing.T) {
	f := newFakeGraph(t)
	c, _ := newRetryClient(t, f, nil)
	f.respondSeq("DELETE", "/communications/calls/"+callID, retryAfterResp(504, ""), retryAfterResp(429, "300"))
	err := c.Hangup(context.Background(), callID)
	if n := len(f.requests()); n != 2 {
		t.Fatalf("%d requests, want 2 (the 504, then the 429 whose Retry-After is past the deadline)", n)
	}
	if got := graph.Classify(err); got != graph.Ambiguous {
		t.Errorf("Classify(%v) = %v, want ambiguous: the 504'd send may have hung up", err, got)
	}
}

package msgraph

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptrace"
	"sync/atomic"
	"time"

	abs "github.com/microsoft/kiota-abstractions-go"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/graph"
)

// RetryPolicy says how many times one action may be sent and after which failures.
//
// Every action may be sent again after a failure Graph did not act on (graph.NotProcessed: a
// 429, or a request that never left: connection refused, reset during the TLS handshake). Only
// Idempotent actions are also sent again after a transient failure that may have taken effect
// (502, 503, 504, a connection lost after the request was written). A Retry-After header (429,
// 503; seconds or an HTTP date) is honoured; without one the wait is an exponential backoff
// with jitter. No retry is made when the wait would leave less than a second before the
// action's deadline, when the token could not be obtained (azcore retries the token endpoint
// itself), or after a 500 or any other failure.
type RetryPolicy struct {
	// MaxAttempts counts every send, the first included.
	MaxAttempts int
	// Idempotent allows a new send after an ambiguous transient failure.
	Idempotent bool
}

// retryPolicies is the table behind RetryPolicyFor, keyed by the action names used in
// graph.Error.Op:
//
//	action                   max sends  after 429 / not sent  after 502/503/504, lost connection
//	getCall                  3          yes                   yes
//	listParticipants         3          yes                   yes
//	keepAlive                3          yes                   yes
//	getPresencesByUserId     3          yes                   yes
//	subscribeToTone          3          yes                   yes (subscribing twice is harmless)
//	cancelMediaProcessing    3          yes                   yes (cancelling twice is harmless)
//	hangup                   3          yes                   yes (DELETE; a 404 then means gone)
//	playPrompt               2          yes                   no: a repeat may queue the prompt twice;
//	recordResponse           2          yes                   no  the caller cancels media first
//	startHoldMusic           2          yes                   no
//	stopHoldMusic            2          yes                   no
//	answer                   2          yes                   no: reconcile (graph.IsAmbiguous)
//	reject                   2          yes                   no
//	redirect                 2          yes                   no
//	transfer                 2          yes                   no
//	invite                   2          yes                   no
//	createCall               2          yes                   no
//
// An action missing from the table is sent once.
var retryPolicies = map[string]RetryPolicy{
	"getCall":               {MaxAttempts: 3, Idempotent: true},
	"listParticipants":      {MaxAttempts: 3, Idempotent: true},
	"keepAlive":             {MaxAttempts: 3, Idempotent: true},
	"getPresencesByUserId":  {MaxAttempts: 3, Idempotent: true},
	"subscribeToTone":       {MaxAttempts: 3, Idempotent: true},
	"cancelMediaProcessing": {MaxAttempts: 3, Idempotent: true},
	"hangup":                {MaxAttempts: 3, Idempotent: true},
	"playPrompt":            {MaxAttempts: 2},
	"recordResponse":        {MaxAttempts: 2},
	"startHoldMusic":        {MaxAttempts: 2},
	"stopHoldMusic":         {MaxAttempts: 2},
	"answer":                {MaxAttempts: 2},
	"reject":                {MaxAttempts: 2},
	"redirect":              {MaxAttempts: 2},
	"transfer":              {MaxAttempts: 2},
	"invite":                {MaxAttempts: 2},
	"createCall":            {MaxAttempts: 2},
}

// RetryPolicyFor returns the retry policy of an action ("answer", "keepAlive"... as in
// graph.Error.Op); see the table on retryPolicies.
func RetryPolicyFor(action string) RetryPolicy {
	if p, ok := retryPolicies[action]; ok {
		return p
	}
	return RetryPolicy{MaxAttempts: 1}
}

// Backoff parameters for failures without Retry-After: the n-th retry waits between half and
// all of min(backoffBase*2^(n-1), backoffMax).
const (
	backoffBase = 250 * time.Millisecond
	backoffMax  = 2 * time.Second
	// minAttemptTime is the least time a new send must have before the action's deadline.
	minAttemptTime = time.Second
)

// do sends one action under the client's deadline (c.timeout, or the earlier deadline ctx
// already has), repeating it as its RetryPolicy allows. Each send carries Scenario-Id when ctx
// has one; the SDK never sees the response: a response handler keeps the raw reply because the
// SDK's enum parsers drop the lowercase values Graph sends, so bodies are decoded by the caller
// with encoding/json. A Graph failure is returned as *graph.Error (wrapped with op and callID);
// a request that never left wraps graph.ErrNotSent.
func (c *Client) do(ctx context.Context, op, callID string, send sendFunc) (reply, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	deadline, _ := ctx.Deadline()
	policy := RetryPolicyFor(op)
	var acted error // the first failure after which Graph may have acted
	for n := 1; ; n++ {
		r, a, err := c.send(ctx, op, callID, send)
		if err == nil {
			return r, nil
		}
		if acted == nil && graph.Classify(err) == graph.Ambiguous {
			acted = err
		}
		wait, again := c.retryDelay(ctx, policy, n, err, a, deadline)
		c.logFailure(ctx, op, callID, n, r, a, err, wait, again)
		if !again {
			if acted != nil && acted != err && graph.Classify(err) != graph.Ambiguous && !errors.Is(err, graph.ErrCallGone) {
				// a later send was refused, but an earlier one may have acted: the outcome is
				// not known, whatever the last answer says
				return r, fmt.Errorf("%w; then: %v", acted, err)
			}
			return r, err
		}
		if c.sleep(ctx, wait) != nil {
			return r, err
		}
	}
}

// send makes one attempt.
func (c *Client) send(ctx context.Context, op, callID string, send sendFunc) (reply, *attempt, error) {
	a := &attempt{once: !RetryPolicyFor(op).Idempotent}
	ctx = context.WithValue(ctx, attemptKey{}, a)
	h := abs.NewRequestHeaders()
	scenario := graph.ScenarioID(ctx)
	if scenario != "" {
		h.Add("Scenario-Id", scenario)
	}
	var r reply
	handler := abs.NewRequestHandlerOption()
	handler.SetResponseHandler(func(resp any, _ abs.ErrorMappings) (any, error) {
		hr, ok := resp.(*http.Response)
		if !ok || hr == nil {
			return nil, fmt.Errorf("unexpected response type %T", resp)
		}
		defer hr.Body.Close()
		body, err := io.ReadAll(io.LimitReader(hr.Body, maxBody))
		r = reply{status: hr.StatusCode, header: hr.Header, body: body}
		if hr.StatusCode >= 300 {
			e := newError(op, hr.StatusCode, hr.Header, body, c.now())
			e.ClientRequestID = a.requestID()
			return nil, e
		}
		if err != nil {
			return nil, fmt.Errorf("read response: %w", err)
		}
		return nil, nil
	})

	start := c.now()
	err := send(ctx, h, []abs.RequestOption{handler})
	c.reach.observe(ctx, r.status, err, c.now())
	if err == nil {
		// Check first: with debug off (production) the fields, which escape to the heap, are
		// not built at all.
		if ce := c.log.Check(zap.DebugLevel, "graph request"); ce != nil {
			ce.Write(zap.String("op", op), zap.String("call_id", callID), zap.String("scenario_id", scenario),
				zap.String("tenant_id", graph.TenantID(ctx)), zap.Int("status", r.status),
				zap.String("request_id", r.header.Get("request-id")),
				zap.String("client_request_id", a.requestID()),
				zap.Duration("elapsed", c.now().Sub(start)))
		}
		return r, a, nil
	}
	if r.status == 0 && !a.sent() {
		err = fmt.Errorf("%w (%w)", err, graph.ErrNotSent)
	}
	if id := a.requestID(); r.status == 0 && id != "" {
		// a timeout or a cut connection: the id is what Microsoft support needs to trace it
		err = fmt.Errorf("%w (client-request-id %s)", err, id)
	}
	if callID == "" {
		return r, a, fmt.Errorf("%s: %w", op, err)
	}
	return r, a, fmt.Errorf("%s call %s: %w", op, callID, err)
}

// retryDelay returns how long to wait before sending an action again after its n-th send failed
// with err, and false when it must not be sent again.
func (c *Client) retryDelay(ctx context.Context, p RetryPolicy, n int, err error, a *attempt, deadline time.Time) (time.Duration, bool) {
	if n >= p.MaxAttempts || a.tokenFailed.Load() || ctx.Err() != nil {
		return 0, false
	}
	var ge *graph.Error
	isGraph := errors.As(err, &ge)
	var wait time.Duration
	switch graph.Classify(err) {
	case graph.NotProcessed:
		if isGraph && ge.RetryAfter > 0 {
			wait = ge.RetryAfter
		} else {
			wait = c.backoff(n)
		}
	case graph.Ambiguous:
		if !p.Idempotent {
			return 0, false
		}
		switch {
		case isGraph && ge.Status == http.StatusServiceUnavailable && ge.RetryAfter > 0:
			wait = ge.RetryAfter
		case isGraph && (ge.Status == http.StatusBadGateway || ge.Status == http.StatusServiceUnavailable ||
			ge.Status == http.StatusGatewayTimeout):
			wait = c.backoff(n)
		case isGraph, errors.Is(err, context.DeadlineExceeded), errors.Is(err, context.Canceled):
			return 0, false
		default: // connection lost after the request was written
			wait = c.backoff(n)
		}
	default:
		return 0, false
	}
	if !deadline.IsZero() && c.now().Add(wait+minAttemptTime).After(deadline) {
		return 0, false
	}
	return wait, true
}

// backoff is the wait before the n-th retry of a failure without Retry-After.
func (c *Client) backoff(n int) time.Duration {
	d := backoffBase << (n - 1)
	if d > backoffMax || d <= 0 {
		d = backoffMax
	}
	return d/2 + c.jitter(d/2)
}

// logFailure logs a failed send with what Microsoft support asks for (request-id,
// client-request-id, x-ms-ags-diagnostic). A send that will be repeated is logged at info: the
// caller never hears of it. The last failure is returned to the caller, which logs it with its
// own context ("log or return, never both"), so it is logged here at debug only, with the
// diagnostics header; the returned *graph.Error carries request-id and client-request-id.
func (c *Client) logFailure(ctx context.Context, op, callID string, n int, r reply, a *attempt, err error,
	wait time.Duration, again bool) {
	if !again && !c.log.Core().Enabled(zap.DebugLevel) {
		return
	}
	fields := []zap.Field{
		zap.String("op", op), zap.String("call_id", callID), zap.String("scenario_id", graph.ScenarioID(ctx)),
		zap.String("tenant_id", graph.TenantID(ctx)), zap.Int("attempt", n), zap.Int("status", r.status),
		zap.String("request_id", r.header.Get("request-id")),
		zap.String("client_request_id", a.requestID()),
		zap.String("ags_diagnostic", r.header.Get("x-ms-ags-diagnostic")),
		zap.Stringer("outcome", graph.Classify(err)), zap.Error(err),
	}
	if again {
		c.log.Info("graph request failed, retrying", append(fields, zap.Duration("retry_in", wait))...)
		return
	}
	c.log.Debug("graph request failed", fields...)
}

// attempt records what happened to one send below the SDK: whether a connection was obtained
// and the request written, and whether the token could be fetched.
type attempt struct {
	// once: the action must not be sent twice after Graph may have read it (not idempotent)
	once        bool
	gotConn     atomic.Bool
	writeFailed atomic.Bool
	tokenFailed atomic.Bool
	clientReqID atomic.Pointer[string]
}

type attemptKey struct{}

func attemptFrom(ctx context.Context) *attempt {
	a, _ := ctx.Value(attemptKey{}).(*attempt)
	return a
}

// sent reports whether the request may have reached Graph: a connection was obtained and
// writing the request did not fail. GotConn is reported before RoundTrip returns; WroteRequest
// may come later, and until it does the request counts as sent (the safe direction).
func (a *attempt) sent() bool { return a.gotConn.Load() && !a.writeFailed.Load() }

func (a *attempt) requestID() string {
	if p := a.clientReqID.Load(); p != nil {
		return *p
	}
	return ""
}

// traceTransport is the innermost transport of the Graph pipeline. It records, for the attempt
// in the request's context, the client-request-id the middleware set and, through httptrace,
// whether the request got a connection and was written. It also sets the User-Agent kiota's
// UserAgentHandler would have (see graphHTTPClient) and gives the request body a known length
// (see sizeBody).
type traceTransport struct{ base http.RoundTripper }

func (t traceTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	if a := attemptFrom(ctx); a != nil {
		if id := req.Header.Get("client-request-id"); id != "" {
			a.clientReqID.Store(&id)
		}
		ctx = httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
			GotConn: func(httptrace.GotConnInfo) { a.gotConn.Store(true) },
			WroteRequest: func(i httptrace.WroteRequestInfo) {
				if i.Err != nil {
					a.writeFailed.Store(true)
				} else {
					a.writeFailed.Store(false)
				}
			},
		})
	}
	out := req.WithContext(ctx) // a shallow copy: the caller's Body and ContentLength stay as they were
	if out.Header.Get("User-Agent") == "" {
		// Like the middlewares, this writes to the header map of the request the pipeline built.
		out.Header.Set("User-Agent", userAgent)
	}
	if err := sizeBody(out); err != nil {
		return nil, err
	}
	if a := attemptFrom(ctx); a != nil && a.once {
		// Without GetBody net/http sends the body once: its HTTP/2 client would otherwise send
		// the request again by itself after some stream resets that may come after the server
		// read all of it (PROTOCOL_ERROR; only REFUSED_STREAM and GOAWAY promise it was not
		// processed). A request whose body was not written yet is still retried on a new
		// connection; anything else is this client's to decide (ambiguous: not resent).
		out.GetBody = nil
	}
	return t.base.RoundTrip(out)
}

// sizeBody replaces a body of unknown length (ContentLength 0) by an in-memory copy with its
// length set. kiota hands net/http the serialized body behind its own io.ReadSeekCloser without
// a length, so net/http sends it chunked: over HTTP/1.1 the headers, the body and the final
// empty chunk go out as three TLS records in three write syscalls, after a goroutine and a timer
// that probe the body; over HTTP/2 an empty DATA frame ends the stream. With a length and a
// bytes.Reader it knows, net/http writes the whole request in one flush and sends
// Content-Length instead of Transfer-Encoding: chunked, which Graph takes alike. Call-control
// bodies are a few hundred bytes, so the copy is cheap.
func sizeBody(req *http.Request) error {
	if req.Body == nil || req.Body == http.NoBody || req.ContentLength != 0 {
		return nil
	}
	defer req.Body.Close()
	var b []byte
	var err error
	if s, ok := req.Body.(io.ReadSeeker); ok {
		b, err = readSeeker(s)
	} else {
		b, err = io.ReadAll(req.Body)
	}
	if err != nil {
		return fmt.Errorf("read request body: %w", err)
	}
	if len(b) == 0 {
		req.Body, req.GetBody = http.NoBody, nil
		return nil
	}
	req.Body = io.NopCloser(bytes.NewReader(b))
	req.ContentLength = int64(len(b))
	req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil }
	return nil
}

// readSeeker reads what remains of s (already in memory: kiota's serialized body) into a slice
// of exactly that size.
func readSeeker(s io.ReadSeeker) ([]byte, error) {
	cur, err := s.Seek(0, io.SeekCurrent)
	if err != nil {
		return nil, err
	}
	end, err := s.Seek(0, io.SeekEnd)
	if err != nil {
		return nil, err
	}
	if _, err := s.Seek(cur, io.SeekStart); err != nil {
		return nil, err
	}
	b := make([]byte, end-cur)
	_, err = io.ReadFull(s, b)
	return b, err
}

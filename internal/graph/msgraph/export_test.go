package msgraph

import (
	"context"
	"net/http"
	"testing"
	"time"
)

// SetClock replaces c's clock, sleep and jitter, so retry tests neither sleep nor depend on
// randomness. A nil argument keeps the current function.
func SetClock(c *Client, now func() time.Time, sleep func(context.Context, time.Duration) error, jitter func(time.Duration) time.Duration) {
	if now != nil {
		c.now = now
	}
	if sleep != nil {
		c.sleep = sleep
	}
	if jitter != nil {
		c.jitter = jitter
	}
}

// SetHTTP2HealthCheck sets the HTTP/2 health check of clients made from now on until the test
// ends (graphPingAfter, graphPingTimeout).
func SetHTTP2HealthCheck(t testing.TB, pingAfter, pingTimeout time.Duration) {
	after, timeout := graphPingAfter, graphPingTimeout
	graphPingAfter, graphPingTimeout = pingAfter, pingTimeout
	t.Cleanup(func() { graphPingAfter, graphPingTimeout = after, timeout })
}

// BodyResendable runs a request of action op through the innermost transport of the Graph
// pipeline and reports whether the request handed to base could have its body sent again by
// net/http (GetBody set).
func BodyResendable(op string, req *http.Request) (bool, error) {
	var resendable bool
	base := roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resendable = r.GetBody != nil
		return &http.Response{StatusCode: 202, Body: http.NoBody, Request: r}, nil
	})
	a := &attempt{once: !RetryPolicyFor(op).Idempotent}
	resp, err := traceTransport{base: base}.RoundTrip(req.WithContext(context.WithValue(req.Context(), attemptKey{}, a)))
	if resp != nil {
		resp.Body.Close()
	}
	return resendable, err
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

package msgraph

import (
	"context"
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

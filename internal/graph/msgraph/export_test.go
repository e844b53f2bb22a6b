package msgraph

import (
	"context"
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

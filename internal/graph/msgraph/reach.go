package msgraph

import (
	"context"
	"errors"
	"sync"
	"time"

	abs "github.com/microsoft/kiota-abstractions-go"
	"github.com/microsoftgraph/msgraph-sdk-go/communications"
)

// reach records whether this process reaches Graph: when a request last had an answer from it
// (any status: a 404 or a 503 is Graph answering), and since when requests have failed without
// any (a connection refused, reset or silent, a TLS handshake or a request that timed out, a
// token that could not be had), the first such failure after the last answer. A request the
// caller gave up on (its context cancelled, as at shutdown) says nothing either way.
type reach struct {
	mu               sync.Mutex
	answered, failed time.Time // failed: the first failure since answered; zero if none
}

// observe records one attempt's outcome: status is the HTTP status of Graph's answer, 0 if none.
func (r *reach) observe(ctx context.Context, status int, err error, now time.Time) {
	switch {
	case status != 0:
		r.mu.Lock()
		r.answered, r.failed = now, time.Time{}
		r.mu.Unlock()
	case err == nil:
	case errors.Is(ctx.Err(), context.Canceled):
		// the caller gave up (a deadline is context.DeadlineExceeded: Graph did not answer in
		// time, a failure): no word on Graph
	default:
		r.mu.Lock()
		if r.failed.IsZero() {
			r.failed = now
		}
		r.mu.Unlock()
	}
}

// Reach returns when a request last had an answer from Graph (zero: never), and since when
// requests have failed without one: the first such failure after that answer (zero: the last
// request had an answer), on this process's clock (Config.Now). callbot compares them with what
// the other instances report before it takes this instance out of service (cmd/callbot,
// graphReach).
func (c *Client) Reach() (answered, failingSince time.Time) {
	c.reach.mu.Lock()
	defer c.reach.mu.Unlock()
	return c.reach.answered, c.reach.failed
}

// probeCallID names no call: a GET of it is answered 404 by a Graph that can be reached.
const probeCallID = "00000000-0000-0000-0000-000000000000"

// Probe asks Graph for a call that does not exist, to learn whether it can be reached: any
// answer (the 404 expected, or any other status) is nil, no answer is the error. It costs one
// request from the tenant's allowance; callbot sends one at a time, only while this instance is
// cut off from Graph (to learn when it reaches Graph again) or has had no answer for 10 s (so
// that an idle instance still tells the others whether it reaches Graph).
func (c *Client) Probe(ctx context.Context) error {
	r, err := c.do(ctx, "probe", probeCallID, func(ctx context.Context, h *abs.RequestHeaders, o []abs.RequestOption) error {
		_, err := communications.NewCallsCallItemRequestBuilder(c.callURL(probeCallID, ""), c.adapter).Get(ctx,
			&communications.CallsCallItemRequestBuilderGetRequestConfiguration{Headers: h, Options: o})
		return err
	})
	if r.status != 0 {
		return nil
	}
	return err
}

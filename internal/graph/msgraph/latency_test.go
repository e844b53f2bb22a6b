package msgraph_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

func TestLatencyHistogram(t *testing.T) {
	h := msgraph.NewLatencyHistogram(time.Second, 100*time.Millisecond, time.Second, 5*time.Second)
	var wg sync.WaitGroup
	for _, d := range []time.Duration{0, 100 * time.Millisecond, 101 * time.Millisecond, time.Second, 4 * time.Second, 6 * time.Second} {
		wg.Go(func() {
			for range 10 {
				h.Observe(d)
			}
		})
	}
	wg.Wait()
	got := h.Snapshot()
	want := msgraph.LatencySnapshot{
		Bounds: []time.Duration{100 * time.Millisecond, time.Second, 5 * time.Second},
		Counts: []uint64{20, 20, 10, 10},
		Count:  60,
		Sum:    10 * (201*time.Millisecond + 11*time.Second),
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("snapshot (-got +want):\n%s", diff)
	}
	if diff := cmp.Diff(got.Cumulative(), []uint64{20, 40, 50}); diff != "" {
		t.Errorf("cumulative (-got +want):\n%s", diff)
	}
	// A snapshot is a copy.
	h.Observe(time.Hour)
	if got.Counts[3] != 10 {
		t.Error("snapshot changed with the histogram")
	}
}

// bucketOf returns the index of the bucket of s holding its only observation.
func bucketOf(t *testing.T, s msgraph.LatencySnapshot) int {
	t.Helper()
	if s.Count != 1 {
		t.Fatalf("%d observations, want 1", s.Count)
	}
	for i, n := range s.Counts {
		if n == 1 {
			return i
		}
	}
	t.Fatal("no bucket counted")
	return -1
}

func TestAnswerLatency(t *testing.T) {
	f := newFakeGraph(t)
	c := newClient(t, f)
	req := graph.AnswerRequest{CallbackURI: "https://bot.contoso.com/api/calls"}
	if got := c.AnswerLatency().Snapshot().Bounds; !cmp.Equal(got, msgraph.AnswerLatencyBuckets) {
		t.Errorf("bounds %v, want AnswerLatencyBuckets", got)
	}

	// Measured from when the incoming call was seen.
	ctx := graph.WithIncomingAt(context.Background(), time.Now().Add(-2*time.Second))
	if err := c.Answer(ctx, callID, req); err != nil {
		t.Fatal(err)
	}
	s := c.AnswerLatency().Snapshot()
	if b := s.Bounds[bucketOf(t, s)]; b != 3*time.Second {
		t.Errorf("latency %v counted in the bucket up to %v, want the one up to 3s", s.Sum, b)
	}

	// A failed answer is not counted.
	f.respond("POST", "/communications/calls/"+callID+"/answer", response{Status: 403, Body: `{"error":{"code":"Forbidden","message":"no"}}`})
	if err := c.Answer(context.Background(), callID, req); err == nil {
		t.Fatal("answer succeeded")
	}
	if n := c.AnswerLatency().Snapshot().Count; n != 1 {
		t.Errorf("%d observations after a failure, want 1", n)
	}

	// Without WithIncomingAt, measured from the call to Answer.
	f2 := newFakeGraph(t)
	c2 := newClient(t, f2)
	if err := c2.Answer(context.Background(), callID, req); err != nil {
		t.Fatal(err)
	}
	if s := c2.AnswerLatency().Snapshot(); s.Count != 1 || s.Sum > 2*time.Second {
		t.Errorf("latency %v over %d answers, want one short answer", s.Sum, s.Count)
	}
}

// TestAnswerDeadline checks that an answer Graph does not reply to is abandoned 14 s after the
// incoming call was seen, or 14 s after Answer started when Config.Timeout is longer.
func TestAnswerDeadline(t *testing.T) {
	f := newFakeGraph(t)
	f.respond("POST", "/communications/calls/"+callID+"/answer", response{Hang: true})
	check := func(name string, c *msgraph.Client, ctx context.Context) {
		t.Helper()
		start := time.Now()
		err := c.Answer(ctx, callID, graph.AnswerRequest{})
		if d := time.Since(start); d > 5*time.Second {
			t.Errorf("%s: answer returned after %v", name, d)
		}
		if !errors.Is(err, context.DeadlineExceeded) || !graph.IsAmbiguous(err) {
			t.Errorf("%s: err = %v, want an ambiguous deadline error", name, err)
		}
	}

	c := newClient(t, f) // Timeout 10s
	check("incoming 13.7 s ago", c, graph.WithIncomingAt(context.Background(), time.Now().Add(-13700*time.Millisecond)))

	// With a 60 s timeout, a clock 13.6 s behind makes the 14 s cap expire 0.4 s from now.
	long := newClientCfg(t, f, func(cfg *msgraph.Config) {
		cfg.Timeout = time.Minute
		cfg.Now = func() time.Time { return time.Now().Add(-13600 * time.Millisecond) }
	})
	check("14 s cap", long, context.Background())

	if n := len(f.requests()); n != 2 {
		t.Errorf("%d answer requests, want 2 (no retry after a timeout)", n)
	}
	if n := c.AnswerLatency().Snapshot().Count + long.AnswerLatency().Snapshot().Count; n != 0 {
		t.Errorf("%d latencies recorded for failed answers", n)
	}
}

package msgraph

import (
	"sort"
	"sync"
	"time"
)

// AnswerLatencyBuckets are the upper bounds of Client.AnswerLatency's buckets, dense below 5 s
// (the webhook response time Graph engineers quote) and up to the 15 s answer deadline.
var AnswerLatencyBuckets = []time.Duration{
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond, time.Second,
	2 * time.Second, 3 * time.Second, 5 * time.Second, 8 * time.Second, 10 * time.Second,
	12 * time.Second, 14 * time.Second, 15 * time.Second,
}

// LatencyHistogram counts durations in fixed buckets. It is safe for concurrent use; a metrics
// endpoint reads it with Snapshot.
type LatencyHistogram struct {
	bounds []time.Duration // ascending upper bounds

	mu     sync.Mutex
	counts []uint64 // len(bounds)+1; the last counts durations above every bound
	sum    time.Duration
}

// NewLatencyHistogram returns a histogram with the given bucket upper bounds (sorted and
// deduplicated here). Durations above the last bound go to an overflow bucket.
func NewLatencyHistogram(bounds ...time.Duration) *LatencyHistogram {
	b := append([]time.Duration(nil), bounds...)
	sort.Slice(b, func(i, j int) bool { return b[i] < b[j] })
	out := b[:0]
	for i, d := range b {
		if i == 0 || d != b[i-1] {
			out = append(out, d)
		}
	}
	return &LatencyHistogram{bounds: out, counts: make([]uint64, len(out)+1)}
}

// Observe counts one duration in the first bucket whose bound is at least d.
func (h *LatencyHistogram) Observe(d time.Duration) {
	i := sort.Search(len(h.bounds), func(i int) bool { return d <= h.bounds[i] })
	h.mu.Lock()
	h.counts[i]++
	h.sum += d
	h.mu.Unlock()
}

// LatencySnapshot is a consistent copy of a LatencyHistogram.
type LatencySnapshot struct {
	// Bounds are the bucket upper bounds, ascending.
	Bounds []time.Duration
	// Counts has one more element than Bounds: Counts[i] counts durations d with
	// Bounds[i-1] < d <= Bounds[i]; the last counts durations above every bound.
	Counts []uint64
	// Count is the number of observations, Sum their total.
	Count uint64
	Sum   time.Duration
}

// Cumulative returns, for each bound, the number of observations at or below it (the "le"
// buckets of a Prometheus histogram); Count is the "+Inf" bucket.
func (s LatencySnapshot) Cumulative() []uint64 {
	out := make([]uint64, len(s.Bounds))
	var n uint64
	for i := range s.Bounds {
		n += s.Counts[i]
		out[i] = n
	}
	return out
}

// Snapshot copies the histogram's current state.
func (h *LatencyHistogram) Snapshot() LatencySnapshot {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := LatencySnapshot{
		Bounds: append([]time.Duration(nil), h.bounds...),
		Counts: append([]uint64(nil), h.counts...),
		Sum:    h.sum,
	}
	for _, n := range h.counts {
		s.Count += n
	}
	return s
}

package main

import (
	"math"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Quantiles of a histogram are the bounds of the buckets they fall in, counted since an earlier
// reading.
func TestHistogramLatency(t *testing.T) {
	inf := math.Inf(1)
	before := histogram{le: []float64{0.001, 0.01, 0.1, inf}, cum: []float64{50, 60, 60, 60}}
	after := histogram{le: []float64{0.001, 0.01, 0.1, inf}, cum: []float64{100, 190, 199, 200}}
	got := after.since(before).latency() // 50 at <= 1 ms, 80 at <= 10 ms, 9 at <= 100 ms, 1 beyond
	want := &BucketLatency{N: 140, P50: 10, P90: 10, P99: 100}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("latency (-got +want):\n%s", diff)
	}
	tail := histogram{le: []float64{0.001, inf}, cum: []float64{1, 100}}.latency()
	if tail.P50 != -1 || tail.P99 != -1 {
		t.Errorf("quantiles past the last bound: %+v, want -1", tail)
	}
	if (histogram{}).latency() != nil || before.since(before).latency() != nil {
		t.Error("a histogram with nothing counted gave a latency")
	}
}

// The whole run's Redis counts undercount the work each call leaves for later: the report says
// which figure to judge (10 s runs reported 1.38 round trips per notification where 40 s showed
// 1.72 for the same build).
func TestWholeRunNote(t *testing.T) {
	if n := wholeRunNote(true); !strings.Contains(n, "judge the steady-state line") {
		t.Errorf("with a steady window: %q", n)
	}
	if n := wholeRunNote(false); !strings.Contains(n, "-duration 15s or more") {
		t.Errorf("without one: %q", n)
	}
}

// The round-trip target is judged only where the proxy counted round trips, and on the
// steady-state figure when the run had a steady window (the whole run undercounts).
func TestRoundTripTarget(t *testing.T) {
	find := func(ts []Target) *Target {
		for i := range ts {
			if strings.HasPrefix(ts[i].Name, "redis round trips") {
				return &ts[i]
			}
		}
		return nil
	}
	r := &Report{Mode: "rate"}
	r.Settings.Rate = 200
	if tg := find(targets(r)); tg != nil {
		t.Errorf("no proxy, yet a round-trip target: %+v", *tg)
	}

	r.Redis = RedisStats{Sent: 1000, RoundTripsPerNotification: 1.21,
		Steady: &SteadyRedis{Notifications: 5000, RoundTripsPerNotification: 1.62}}
	tg := find(targets(r))
	if tg == nil || tg.Got != "1.62" || tg.Met || !strings.Contains(tg.Note, "steady state") {
		t.Errorf("steady 1.62 over a whole-run 1.21: %+v, want judged on 1.62 and not met", tg)
	}

	r.Redis.Steady.RoundTripsPerNotification = 1.34
	if tg := find(targets(r)); tg == nil || !tg.Met || tg.Got != "1.34" {
		t.Errorf("steady 1.34: %+v, want met", tg)
	}

	r.Redis.Steady = nil
	tg = find(targets(r))
	if tg == nil || tg.Got != "1.21" || !tg.Met || !strings.Contains(tg.Note, "undercounts") {
		t.Errorf("no steady window: %+v, want the whole run's 1.21, said to undercount", tg)
	}
	r.Targets = targets(r)
	if text := r.Text(); !strings.Contains(text, "redis round trips/notif.") {
		t.Errorf("text report lacks the round-trip target:\n%s", text)
	}
}

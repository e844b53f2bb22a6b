package main

import (
	"bufio"
	"context"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// metricLines reads callbot's /metrics, one line each; nil when it could not. The figures that
// come from it are then left out of the report rather than the run failing.
func metricLines(ctx context.Context, botURL string) []string {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, botURL+"/metrics", nil)
	if err != nil {
		return nil
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil
	}
	var lines []string
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if sc.Err() != nil {
		return nil
	}
	return lines
}

// scrapeMetrics returns the values of the named series of callbot's /metrics that have no
// labels; a series it does not find is left out.
func scrapeMetrics(ctx context.Context, botURL string, names ...string) map[string]float64 {
	out := map[string]float64{}
	for _, line := range metricLines(ctx, botURL) {
		name, value, ok := strings.Cut(line, " ")
		if !ok || !slices.Contains(names, name) {
			continue
		}
		if v, err := strconv.ParseFloat(strings.TrimSpace(value), 64); err == nil {
			out[name] = v
		}
	}
	return out
}

// histogram is a Prometheus histogram as /metrics shows it: cumulative counts by upper bound
// (seconds), the +Inf bucket last.
type histogram struct {
	le  []float64
	cum []float64
}

// scrapeHistogram reads the buckets of histogram name from callbot's /metrics; empty when it
// could not.
func scrapeHistogram(ctx context.Context, botURL, name string) histogram {
	var h histogram
	prefix := name + `_bucket{le="`
	for _, line := range metricLines(ctx, botURL) {
		rest, ok := strings.CutPrefix(line, prefix)
		if !ok {
			continue
		}
		bound, count, ok := strings.Cut(rest, `"} `)
		if !ok {
			continue
		}
		le, err1 := strconv.ParseFloat(bound, 64) // "+Inf" parses as +Inf
		n, err2 := strconv.ParseFloat(count, 64)
		if err1 != nil || err2 != nil {
			return histogram{}
		}
		h.le, h.cum = append(h.le, le), append(h.cum, n)
	}
	return h
}

// since is what h counted after earlier (a reading of the same histogram).
func (h histogram) since(earlier histogram) histogram {
	if len(earlier.cum) != len(h.cum) {
		return h
	}
	out := histogram{le: h.le, cum: make([]float64, len(h.cum))}
	for i := range h.cum {
		out.cum[i] = h.cum[i] - earlier.cum[i]
	}
	return out
}

// BucketLatency is a latency read from a histogram: each quantile is the upper bound of the
// bucket it falls in, in ms (+Inf past the last bound shows as -1).
type BucketLatency struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_le_ms"`
	P90 float64 `json:"p90_le_ms"`
	P99 float64 `json:"p99_le_ms"`
}

func (h histogram) latency() *BucketLatency {
	if len(h.cum) == 0 || h.cum[len(h.cum)-1] == 0 {
		return nil
	}
	total := h.cum[len(h.cum)-1]
	q := func(p float64) float64 {
		for i, c := range h.cum {
			if c >= p*total {
				if math.IsInf(h.le[i], 1) {
					return -1
				}
				return round(h.le[i]*1000, 3)
			}
		}
		return -1
	}
	return &BucketLatency{N: int(total), P50: q(0.5), P90: q(0.9), P99: q(0.99)}
}

// Series of callbot's /metrics the report reads.
const (
	metricGraphConns       = "callbot_graph_connections"
	metricGraphConnsOpened = "callbot_graph_connections_opened_total"
	metricWebhookDuration  = "callbot_webhook_duration_seconds"
)

// graphConns reads the Graph connections callbot has open now and has opened since it started;
// ok is false when /metrics did not tell.
func (w *world) graphConns(ctx context.Context) (open, opened int64, ok bool) {
	m := scrapeMetrics(ctx, w.botURL, metricGraphConns, metricGraphConnsOpened)
	o, ok1 := m[metricGraphConns]
	op, ok2 := m[metricGraphConnsOpened]
	return int64(o), int64(op), ok1 && ok2
}

package main

import (
	"bufio"
	"context"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// scrapeMetrics reads callbot's /metrics and returns the values of the named series that have
// no labels; a series it does not find is left out. Errors give an empty map: the figures that
// come from it are left out of the report rather than the run failing.
func scrapeMetrics(ctx context.Context, botURL string, names ...string) map[string]float64 {
	out := map[string]float64{}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, botURL+"/metrics", nil)
	if err != nil {
		return out
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return out
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return out
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), " ")
		if !ok || strings.HasPrefix(name, "#") {
			continue
		}
		for _, n := range names {
			if name == n {
				if v, err := strconv.ParseFloat(strings.TrimSpace(value), 64); err == nil {
					out[n] = v
				}
			}
		}
	}
	return out
}

// Series of callbot's /metrics the report reads.
const (
	metricGraphConns       = "callbot_graph_connections"
	metricGraphConnsOpened = "callbot_graph_connections_opened_total"
)

// graphConns reads the Graph connections callbot has open now and has opened since it started;
// ok is false when /metrics did not tell.
func (w *world) graphConns(ctx context.Context) (open, opened int64, ok bool) {
	m := scrapeMetrics(ctx, w.botURL, metricGraphConns, metricGraphConnsOpened)
	o, ok1 := m[metricGraphConns]
	op, ok2 := m[metricGraphConnsOpened]
	return int64(o), int64(op), ok1 && ok2
}

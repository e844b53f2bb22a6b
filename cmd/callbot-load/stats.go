package main

import (
	"math"
	"net/http"
	"slices"
	"sync"
	"time"
)

// recorder wraps the transport graphsim posts notifications with: it times every POST to the
// bot (until the response headers; the bot's answers have no body worth reading) and keeps the
// status code, and tracks how many POSTs are in flight.
type recorder struct {
	base http.RoundTripper

	mu       sync.Mutex
	posts    []post
	inflight int
	peak     int
	busy     time.Duration // integral of inflight over time, for the mean
	last     time.Time
}

type post struct {
	start  time.Time
	dur    time.Duration
	status int // 0: transport error
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	r.enter()
	start := time.Now()
	resp, err := r.base.RoundTrip(req)
	p := post{start: start, dur: time.Since(start)}
	if err == nil {
		p.status = resp.StatusCode
	}
	r.leave(p)
	return resp, err
}

func (r *recorder) account(now time.Time) {
	if !r.last.IsZero() {
		r.busy += time.Duration(r.inflight) * now.Sub(r.last)
	}
	r.last = now
}

func (r *recorder) enter() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.account(time.Now())
	r.inflight++
	r.peak = max(r.peak, r.inflight)
}

func (r *recorder) leave(p post) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.account(time.Now())
	r.inflight--
	r.posts = append(r.posts, p)
}

// snapshot returns the posts so far.
func (r *recorder) snapshot() []post {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.posts)
}

// resetWindow starts a new window for inflightStats and returns its start.
func (r *recorder) resetWindow() (at time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.account(now)
	r.peak, r.busy = r.inflight, 0
	return now
}

// inflightStats returns the peak and the time-weighted mean of POSTs in flight since resetWindow
// was called at from.
func (r *recorder) inflightStats(from time.Time) (int, float64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := time.Now()
	r.account(now)
	el := now.Sub(from)
	if el <= 0 {
		return r.peak, 0
	}
	return r.peak, float64(r.busy) / float64(el)
}

func (r *recorder) count() (n int, inflight int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.posts), r.inflight
}

// notifyTransport is the HTTP transport of graphsim's notifications and of the no-op baseline:
// keep-alive, with enough idle connections for every call's outbox (the default of 2 per host
// would open and close a connection for most POSTs).
func notifyTransport() *http.Transport {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.MaxIdleConns = 0
	t.MaxIdleConnsPerHost = 4096
	t.IdleConnTimeout = 90 * time.Second
	return t
}

// Latency summarises durations, in milliseconds.
type Latency struct {
	N   int     `json:"n"`
	P50 float64 `json:"p50_ms"`
	P90 float64 `json:"p90_ms"`
	P99 float64 `json:"p99_ms"`
	Max float64 `json:"max_ms"`
}

func latency(ds []time.Duration) Latency {
	if len(ds) == 0 {
		return Latency{}
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	q := func(p float64) float64 {
		i := int(math.Ceil(p*float64(len(s)))) - 1
		i = min(max(i, 0), len(s)-1)
		return ms(s[i])
	}
	return Latency{N: len(s), P50: q(0.50), P90: q(0.90), P99: q(0.99), Max: ms(s[len(s)-1])}
}

func ms(d time.Duration) float64 { return math.Round(float64(d)/1e4) / 100 }

// round keeps a few significant digits for the report.
func round(x float64, digits int) float64 {
	p := math.Pow(10, float64(digits))
	return math.Round(x*p) / p
}

// lateness is one sample of schedProbeAt.
type lateness struct {
	at   time.Time
	late time.Duration
}

// schedProbeAt is schedProbe with the time of each sample.
func schedProbeAt() (stop func() []lateness) {
	done := make(chan struct{})
	out := make(chan []lateness, 1)
	go func() {
		var late []lateness
		for {
			select {
			case <-done:
				out <- late
				return
			default:
			}
			t := time.Now()
			time.Sleep(time.Millisecond)
			late = append(late, lateness{at: t, late: max(time.Since(t)-time.Millisecond, 0)})
		}
	}()
	return func() []lateness { close(done); return <-out }
}

// schedProbe measures how late this process runs a goroutine that sleeps 1 ms at a time: the
// delay the load tool adds to what it measures (webhook and answer times are taken by
// goroutines of this process).
func schedProbe() (stop func() []time.Duration) {
	stopAt := schedProbeAt()
	return func() []time.Duration {
		samples := stopAt()
		out := make([]time.Duration, len(samples))
		for i, l := range samples {
			out[i] = l.late
		}
		return out
	}
}

//go:build chaos

// Package chaos holds callbot's fault-injection tests (issue #3): real `callbot serve`
// processes against a real redis-server and graphsim, with an instance or Redis killed while
// calls are in menus, queues and transfers. Run them with `go test -tags chaos ./chaos/` or
// `make chaos`; docs/chaos.md says what each shows.
//
// Everything runs on loopback, on free ports (never 127.0.0.1:6379), and is stopped when the
// test ends. Every wait has a deadline.
package chaos

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// The app registration graphsim and callbot agree on, and the resource account callers dial.
const (
	tenantID  = "3b0c6a1e-5f7d-4e2a-9c1b-8d4e2f6a7b90"
	clientID  = "5d2e8f41-7a3b-4c6d-8e9f-0a1b2c3d4e5f"
	secret    = "chaos-secret-not-for-production"
	accountID = "9c8b7a6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
	keyPrefix = "cb"
)

// agentIDs are the agents of testdata/flow.yaml: 1-6 serve sales, 6-8 support.
var agentIDs = func() []string {
	ids := make([]string, 8)
	for i := range ids {
		ids[i] = fmt.Sprintf("aaaaaaaa-0000-4000-8000-%012d", i+1)
	}
	return ids
}()

// callbotBin is the callbot binary TestMain builds once for every test.
var callbotBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "callbot-chaos-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "chaos:", err)
		os.Exit(1)
	}
	callbotBin = filepath.Join(dir, "callbot")
	start := time.Now()
	build := exec.Command("go", "build", "-o", callbotBin, "./cmd/callbot")
	build.Dir = ".." // the module root
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "chaos: go build ./cmd/callbot: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "chaos: built %s in %s\n", callbotBin, time.Since(start).Round(100*time.Millisecond))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// requireRedis skips the test when redis-server is not on PATH, unless CALLBOT_REQUIRE_REDIS=1.
func requireRedis(t *testing.T) string {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CALLBOT_REQUIRE_REDIS") == "1" {
			t.Fatal("CALLBOT_REQUIRE_REDIS=1 but redis-server is not on PATH")
		}
		t.Skip("redis-server is not on PATH: the chaos tests need a real Redis to kill")
	}
	return path
}

// freePort returns a free loopback port; never 6379, the shared Redis.
func freePort(t *testing.T) int {
	t.Helper()
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if port != 6379 {
			return port
		}
	}
}

func since(t0, t time.Time) string { return fmt.Sprintf("%.2fs", t.Sub(t0).Seconds()) }

// ---------------------------------------------------------------------------------------------
// Redis

// redisServer is a redis-server process that the test can SIGKILL and start again on the same
// port with the same directory (and so the same AOF files).
type redisServer struct {
	t      *testing.T
	path   string
	port   int
	addr   string
	dir    string
	extra  []string
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// startRedis starts redis-server on a free port; with aof, with appendonly yes and appendfsync
// everysec in its own directory.
func startRedis(t *testing.T, aof bool) *redisServer {
	t.Helper()
	r := &redisServer{t: t, path: requireRedis(t), dir: t.TempDir()}
	if aof {
		r.extra = []string{"--appendonly", "yes", "--appendfsync", "everysec"}
	} else {
		r.extra = []string{"--appendonly", "no"}
	}
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		r.port = freePort(t)
		r.addr = "127.0.0.1:" + strconv.Itoa(r.port)
		if err = r.start(); err == nil {
			t.Cleanup(r.kill)
			return r
		}
	}
	t.Fatalf("start redis-server: %v", err)
	return nil
}

// start runs redis-server on r.port and waits until it answers PING.
func (r *redisServer) start() error {
	args := append([]string{"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--save", "",
		"--dir", r.dir, "--logfile", filepath.Join(r.dir, "redis.log")}, r.extra...)
	cmd := exec.Command(r.path, args...)
	setDeathSignal(cmd)
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	r.mu.Lock()
	r.cmd, r.exited = cmd, exited
	r.mu.Unlock()
	c := redis.NewClient(&redis.Options{Addr: r.addr, MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("redis-server on %s exited: %s", r.addr, tail(filepath.Join(r.dir, "redis.log"), 3))
		default:
		}
		if time.Now().After(deadline) {
			r.kill()
			return fmt.Errorf("redis-server on %s not ready: %v", r.addr, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// kill sends SIGKILL and waits for the process to be gone.
func (r *redisServer) kill() {
	r.mu.Lock()
	cmd, exited := r.cmd, r.exited
	r.mu.Unlock()
	if cmd == nil || cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGKILL)
	<-exited
}

func (r *redisServer) client(t *testing.T) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: r.addr})
	t.Cleanup(func() { c.Close() })
	return c
}

// ---------------------------------------------------------------------------------------------
// callbot

// callbotProc is one `callbot serve` process, its JSON logs in a file.
type callbotProc struct {
	name, addr, logPath string
	cmd                 *exec.Cmd
	exited              chan struct{}
}

func (p *callbotProc) url() string { return "http://" + p.addr }

// baseEnv is the configuration of `callbot serve` against sim and the Redis at redisAddr, with
// callbacks to publicURL.
func baseEnv(sim *graphsim.Sim, caFile, redisAddr, publicURL string) map[string]string {
	flow, _ := filepath.Abs("testdata/flow.yaml")
	return map[string]string{
		"CALLBOT_PUBLIC_URL": publicURL, "CALLBOT_TENANT_ID": tenantID, "CALLBOT_CLIENT_ID": clientID,
		"CALLBOT_CLIENT_SECRET": secret, "CALLBOT_AUTHORITY_HOST": sim.AuthorityHost(), "CALLBOT_GRAPH_URL": sim.GraphURL(),
		"CALLBOT_OPENID_CONFIG_URL": sim.OpenIDConfigURL(), "CALLBOT_CA_FILE": caFile,
		"CALLBOT_TOKEN_ISSUERS": graphsim.DefaultIssuer, "CALLBOT_REDIS_URL": "redis://" + redisAddr + "/0",
		"CALLBOT_FLOW_FILE": flow, "CALLBOT_KEY_PREFIX": keyPrefix, "CALLBOT_PRESENCE_INTERVAL": "500ms",
		"CALLBOT_SHUTDOWN_GRACE": "2s", "CALLBOT_LOG_LEVEL": "debug",
	}
}

// startCallbot runs `callbot serve` listening on addr with env (plus CALLBOT_LISTEN_ADDR and
// CALLBOT_INSTANCE_ID=name) and waits until /readyz says 200. It is stopped (SIGTERM, then
// SIGKILL) when the test ends.
func startCallbot(t *testing.T, name, addr string, env map[string]string) *callbotProc {
	t.Helper()
	p, err := launchCallbot(t, name, addr, env, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// launchCallbot is startCallbot for any goroutine: it returns an error instead of failing the
// test (the process, if started, is still stopped when the test ends).
func launchCallbot(t *testing.T, name, addr string, env map[string]string, ready time.Duration) (*callbotProc, error) {
	p := &callbotProc{name: name, addr: addr, logPath: filepath.Join(t.TempDir(), name+".log"), exited: make(chan struct{})}
	logf, err := os.Create(p.logPath)
	if err != nil {
		return nil, err
	}
	p.cmd = exec.Command(callbotBin, "serve")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CALLBOT_") {
			p.cmd.Env = append(p.cmd.Env, kv)
		}
	}
	for k, v := range env {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	p.cmd.Env = append(p.cmd.Env, "CALLBOT_LISTEN_ADDR="+addr, "CALLBOT_INSTANCE_ID="+name)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	setDeathSignal(p.cmd)
	if err := p.cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %v", name, err)
	}
	go func() { p.cmd.Wait(); logf.Close(); close(p.exited) }()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(5 * time.Second):
			p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.exited
		}
		if dir := os.Getenv("CHAOS_LOG_DIR"); dir != "" { // keep the logs for a post-mortem
			if b, err := os.ReadFile(p.logPath); err == nil {
				os.MkdirAll(dir, 0o755)
				os.WriteFile(filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")+"-"+name+".log"), b, 0o644) // a subtest's name has slashes
			}
		}
	})
	deadline := time.Now().Add(ready)
	for {
		if code, _ := readyz(p.url()); code == http.StatusOK {
			return p, nil
		}
		select {
		case <-p.exited:
			return p, fmt.Errorf("%s exited before it was ready:\n%s", name, tail(p.logPath, 20))
		default:
		}
		if time.Now().After(deadline) {
			return p, fmt.Errorf("%s not ready after %s:\n%s", name, ready, tail(p.logPath, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill SIGKILLs the process and waits until it is gone.
func (p *callbotProc) kill() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	<-p.exited
}

var probe = &http.Client{Timeout: 3 * time.Second}

// readyz returns the status of GET /readyz, 0 when the request failed.
func readyz(base string) (int, error) {
	resp, err := probe.Get(base + "/readyz")
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode, nil
}

// outboxLease picks the outbox lease to run callbot with: CHAOS_OUTBOX_LEASE when set
// ("default" leaves callbot's own), else 5s when this callbot has CALLBOT_OUTBOX_LEASE, else
// callbot's built-in 30s. It returns the lease in force and whether the test set it.
func outboxLease(t *testing.T) (time.Duration, bool) {
	want := os.Getenv("CHAOS_OUTBOX_LEASE")
	if want == "default" || !supportsOutboxLease() {
		if want != "" && want != "default" {
			t.Logf("CHAOS_OUTBOX_LEASE=%s ignored: this callbot has no CALLBOT_OUTBOX_LEASE", want)
		}
		return 30 * time.Second, false
	}
	if want == "" {
		want = "5s"
	}
	d, err := time.ParseDuration(want)
	if err != nil {
		t.Fatalf("CHAOS_OUTBOX_LEASE: %v", err)
	}
	return d, true
}

var leaseSupport = sync.OnceValue(func() bool {
	// An invalid value is named in the configuration errors only by a callbot that reads it.
	cmd := exec.Command(callbotBin, "serve")
	cmd.Env = []string{"CALLBOT_OUTBOX_LEASE=not-a-duration", "PATH=" + os.Getenv("PATH")}
	out, _ := cmd.CombinedOutput()
	return bytes.Contains(out, []byte("CALLBOT_OUTBOX_LEASE"))
})

func supportsOutboxLease() bool { return leaseSupport() }

// ---------------------------------------------------------------------------------------------
// Load balancer

// balancer is a round-robin reverse proxy in front of callbot instances, as a cloud load
// balancer would be: a backend that refuses connections is taken out at once and the request
// goes to the next one; a health check (GET /healthz every 200ms) takes backends out and puts
// them back. A request that fails after it reached a backend is answered 502: Graph retries.
type balancer struct {
	srv      *httptest.Server
	base     *http.Transport
	mu       sync.Mutex
	backends []*backend
	errs     []string // why requests got 502, with the time
	next     int

	failovers, badGateway atomic.Int64
	// healthPath is what the health check GETs; "/healthz" unless set before the first check.
	healthPath string
	stop       context.CancelFunc
	done       chan struct{}
}

type backend struct {
	name, host       string
	down             atomic.Bool
	served, refusals atomic.Int64
	slowProbes       int // health checks in a row not answered in time (healthCheck's goroutine only)
}

// probeTimeouts is how many health checks in a row must go unanswered within the probe's
// timeout before the backend leaves the rotation, as a Kubernetes readiness probe's
// failureThreshold (3 by default): one late answer is a stall of the machine more often than of
// the instance. With a single one, a stall of a loaded 2-core machine (both callbot processes
// silent for 0.6 s, other work beside the test) took both instances out at once, and the
// balancer itself answered 22 notifications 502 (no backend in service) outside any shutdown.
// An answer other than 200, or a refused connection, still takes it out at once.
const probeTimeouts = 3

func newBalancer(t *testing.T) *balancer { return newBalancerChecking(t, "/healthz") }

// newBalancerChecking is newBalancer with a health check on path: "/readyz" takes a draining
// instance out of service as a Kubernetes readiness probe does.
func newBalancerChecking(t *testing.T, path string) *balancer {
	b := &balancer{done: make(chan struct{}), healthPath: path}
	b.base = &http.Transport{
		DialContext:         (&net.Dialer{Timeout: time.Second}).DialContext,
		MaxIdleConnsPerHost: 64,
		IdleConnTimeout:     30 * time.Second,
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme, pr.Out.URL.Host = "http", "backend" // the transport picks the backend
			pr.SetXForwarded()
		},
		Transport: b,
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			b.badGateway.Add(1)
			b.mu.Lock()
			b.errs = append(b.errs, time.Now().Format("05.000")+" "+err.Error())
			b.mu.Unlock()
			http.Error(w, "bad gateway: "+err.Error(), http.StatusBadGateway)
		},
	}
	b.srv = httptest.NewServer(rp)
	ctx, cancel := context.WithCancel(context.Background())
	b.stop = cancel
	go b.healthCheck(ctx)
	t.Cleanup(func() {
		b.stop()
		<-b.done
		b.srv.Close()
		b.base.CloseIdleConnections()
	})
	return b
}

func (b *balancer) URL() string { return b.srv.URL }

// errors returns why the requests answered 502 failed, with their times.
func (b *balancer) errors() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.errs)
}

func (b *balancer) add(name, host string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.backends = append(b.backends, &backend{name: name, host: host})
}

// remove takes the backend named name out of the rotation for good.
func (b *balancer) remove(name string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.backends = slices.DeleteFunc(b.backends, func(be *backend) bool { return be.name == name })
}

// live returns the backends in service, starting with the next in round-robin order.
func (b *balancer) live() []*backend {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []*backend
	n := len(b.backends)
	for i := 0; i < n; i++ {
		be := b.backends[(b.next+i)%n]
		if !be.down.Load() {
			out = append(out, be)
		}
	}
	b.next = (b.next + 1) % max(n, 1)
	return out
}

// RoundTrip sends the request to the next live backend, failing over on refused connections.
func (b *balancer) RoundTrip(req *http.Request) (*http.Response, error) {
	var body []byte
	if req.Body != nil {
		var err error
		if body, err = io.ReadAll(req.Body); err != nil {
			return nil, err
		}
		req.Body.Close()
	}
	lastErr := errors.New("no backend in service")
	for _, be := range b.live() {
		out := req.Clone(req.Context())
		out.URL.Host, out.Host = be.host, be.host
		out.Body, out.ContentLength = io.NopCloser(bytes.NewReader(body)), int64(len(body))
		resp, err := b.base.RoundTrip(out)
		if err == nil {
			be.served.Add(1)
			return resp, nil
		}
		lastErr = err
		if !refused(err) {
			return nil, err // it may have reached the backend: not ours to repeat
		}
		be.refusals.Add(1)
		be.down.Store(true)
		b.failovers.Add(1)
	}
	return nil, lastErr
}

func refused(err error) bool {
	var op *net.OpError
	return errors.Is(err, syscall.ECONNREFUSED) || (errors.As(err, &op) && op.Op == "dial")
}

func (b *balancer) healthCheck(ctx context.Context) {
	defer close(b.done)
	c := &http.Client{Timeout: 300 * time.Millisecond, Transport: &http.Transport{DisableKeepAlives: true}}
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		b.mu.Lock()
		bes := slices.Clone(b.backends)
		b.mu.Unlock()
		for _, be := range bes {
			resp, err := c.Get("http://" + be.host + b.healthPath)
			ok := err == nil && resp.StatusCode == http.StatusOK
			if resp != nil {
				resp.Body.Close()
			}
			var ne net.Error
			if err != nil && errors.As(err, &ne) && ne.Timeout() && !be.down.Load() {
				if be.slowProbes++; be.slowProbes < probeTimeouts {
					continue
				}
			}
			be.slowProbes = 0
			be.down.Store(!ok)
		}
	}
}

// served is how many requests the backend named name has served.
func (b *balancer) served(name string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, be := range b.backends {
		if be.name == name {
			return be.served.Load()
		}
	}
	return 0
}

func (b *balancer) stats() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	var parts []string
	for _, be := range b.backends {
		parts = append(parts, fmt.Sprintf("%s served %d (refused %d)", be.name, be.served.Load(), be.refusals.Load()))
	}
	return fmt.Sprintf("%s; failovers %d, 502s %d", strings.Join(parts, ", "), b.failovers.Load(), b.badGateway.Load())
}

// ---------------------------------------------------------------------------------------------
// Graph simulator and callers

// newSim starts graphsim posting to webhookURL with the given agents, and writes its CA to a
// file for callbot.
func newSim(t *testing.T, webhookURL string, agents []graphsim.AgentSpec) (*graphsim.Sim, string) {
	t.Helper()
	sim, err := graphsim.New(graphsim.Options{TenantID: tenantID, ClientID: clientID, ClientSecret: secret,
		WebhookURL: webhookURL, PromptDuration: 50 * time.Millisecond, RingTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sim.Close()
		if dir := os.Getenv("CHAOS_LOG_DIR"); dir != "" {
			keepSimLog(t, dir, sim)
		}
	})
	for _, a := range agents {
		sim.AddAgent(a)
	}
	ca := filepath.Join(t.TempDir(), "graphsim-ca.pem")
	if err := sim.WriteCAFile(ca); err != nil {
		t.Fatal(err)
	}
	return sim, ca
}

// keepSimLog writes graphsim's view of the test to dir, as JSON lines in time order: every
// request callbot made to Graph (its action, call, status) and every notification posted to
// callbot (attempt, what it carried, the status it got), for a post-mortem beside the callbot
// logs (<test>-graphsim.jsonl).
func keepSimLog(t *testing.T, dir string, sim *graphsim.Sim) {
	type line struct {
		Time       time.Time `json:"ts"`
		Kind       string    `json:"kind"` // "request" (callbot to Graph) or "delivery" (Graph to callbot)
		CallID     string    `json:"call_id,omitempty"`
		Action     string    `json:"action,omitempty"`
		Method     string    `json:"method,omitempty"`
		Path       string    `json:"path,omitempty"`
		Attempt    int       `json:"attempt,omitempty"`
		ChangeType string    `json:"change_type,omitempty"`
		Resource   string    `json:"resource,omitempty"`
		State      string    `json:"state,omitempty"`
		Status     int       `json:"status"`
		Err        string    `json:"err,omitempty"`
		Body       string    `json:"body,omitempty"`
	}
	var lines []line
	for _, r := range sim.Requests() {
		if r.Action == "token" {
			continue
		}
		lines = append(lines, line{Time: r.Time, Kind: "request", CallID: r.CallID, Action: r.Action, Method: r.Method,
			Path: r.Path, Status: r.Status, Body: string(r.Body)})
	}
	for _, d := range sim.Deliveries() {
		lines = append(lines, line{Time: d.Time, Kind: "delivery", CallID: d.CallID, Attempt: d.Attempt, ChangeType: d.ChangeType,
			Resource: d.ResourceURL, State: d.State, Status: d.Status, Err: d.Err})
	}
	sort.SliceStable(lines, func(i, j int) bool { return lines[i].Time.Before(lines[j].Time) })
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	for _, l := range lines {
		enc.Encode(l)
	}
	os.MkdirAll(dir, 0o755)
	if err := os.WriteFile(filepath.Join(dir, strings.ReplaceAll(t.Name(), "/", "_")+"-graphsim.jsonl"), b.Bytes(), 0o644); err != nil {
		t.Logf("graphsim log not kept: %v", err)
	}
}

// agent is agent n (1-8) of the flow: available and answering as told, or away.
func agent(n int, answer graphsim.AgentAnswer, available bool, talk time.Duration) graphsim.AgentSpec {
	a := graphsim.AgentSpec{ID: agentIDs[n-1], DisplayName: fmt.Sprintf("Agent %d", n), Availability: "Available",
		Activity: "Available", Answer: answer, TalkTime: talk}
	if !available {
		a.Availability, a.Activity = "Away", "Away"
	}
	return a
}

// flowAgents are the flow's eight agents, accepting every call and talking for talk, all
// available but agents 5 and 8 (away): sales has five agents, support two.
func flowAgents(talk time.Duration) []graphsim.AgentSpec {
	var out []graphsim.AgentSpec
	for n := 1; n <= 8; n++ {
		out = append(out, agent(n, graphsim.AgentAccept, n != 5 && n != 8, talk))
	}
	return out
}

// caller is one simulated caller of a test.
type caller struct {
	n      int
	kind   string // sales, support, hangup (sales, hangs up 3s after the answer), goodbye (presses 9)
	spec   graphsim.CallerSpec
	placed time.Time
	acked  time.Time // when the bot acknowledged the incoming notification; zero if it never did
	err    error
	call   *graphsim.Call
}

// defined reports whether the caller's call has reached an end the test accepts for its kind.
func (c *caller) outcome() string {
	if c.call == nil {
		return ""
	}
	return c.call.Result().Outcome
}

// expected are the outcomes a caller of each kind may end with.
var expected = map[string][]string{
	"sales":   {graphsim.OutcomeTransferred},
	"support": {graphsim.OutcomeTransferred},
	"hangup":  {graphsim.OutcomeCallerHangUp, graphsim.OutcomeTransferred},
	"goodbye": {graphsim.OutcomeBotHangUp},
}

// newCaller picks what caller n does: mostly a queue key.
func newCaller(rng *rand.Rand, n int) *caller {
	c := &caller{n: n, spec: graphsim.CallerSpec{
		From:       graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+1425556%04d", n)},
		To:         accountID,
		DigitDelay: 600 * time.Millisecond,
	}}
	switch p := rng.IntN(100); {
	case p < 62:
		c.kind, c.spec.Digits = "sales", "1"
	case p < 80:
		c.kind, c.spec.Digits = "support", "2"
	case p < 90:
		c.kind, c.spec.Digits, c.spec.HangUpAfter = "hangup", "1", 3*time.Second
	default:
		c.kind, c.spec.Digits = "goodbye", "9"
	}
	return c
}

// placeCalls places n calls, one every `every`, each in its own goroutine (PlaceCall waits for
// the bot's acknowledgement, retries included), calling at(i) before placing call i. It
// returns once every PlaceCall has returned.
// place places c's call on sim from a goroutine of wg: when it was placed, its call, and when
// callbot acknowledged it (or the error).
func (c *caller) place(wg *sync.WaitGroup, sim *graphsim.Sim) {
	c.placed = time.Now()
	wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c.call, c.err = sim.PlaceCall(ctx, c.spec)
		if c.err == nil {
			c.acked = time.Now()
		}
	})
}

// placePaced places n callers made by mk (with the seed's generator), one every gap from t0 by
// the clock (a slow placing does not push the others back), passing each to then (if set) once
// placing started; it does not wait for the placings, which placing counts.
func placePaced(sim *graphsim.Sim, seed uint64, n int, t0 time.Time, gap time.Duration, placing *sync.WaitGroup,
	mk func(rng *rand.Rand, i int) *caller, then func(*caller)) []*caller {
	rng := rand.New(rand.NewPCG(seed, 3))
	callers := make([]*caller, n)
	next := t0
	for i := range callers {
		time.Sleep(time.Until(next))
		next = next.Add(gap)
		c := mk(rng, i)
		callers[i] = c
		c.place(placing, sim)
		if then != nil {
			then(c)
		}
	}
	return callers
}

// placeAll places n callers as placePaced does, then calls stop (the test's background work
// ends: its failovers, its deploys) and waits for every placing; a caller not placed fails the
// test. placedAll is when the last one was placed.
func placeAll(t *testing.T, sim *graphsim.Sim, seed uint64, n int, t0 time.Time, gap time.Duration,
	mk func(rng *rand.Rand, i int) *caller, then func(*caller), stop func()) (callers []*caller, placedAll time.Time) {
	t.Helper()
	var placing sync.WaitGroup
	callers = placePaced(sim, seed, n, t0, gap, &placing, mk, then)
	placedAll = time.Now()
	stop()
	placing.Wait()
	for _, c := range callers {
		if c.call == nil {
			t.Fatalf("call %d not placed: %v", c.n, c.err)
		}
	}
	return callers, placedAll
}

func placeCalls(t *testing.T, sim *graphsim.Sim, seed uint64, n int, every time.Duration, at func(i int)) []*caller {
	rng := rand.New(rand.NewPCG(seed, 3))
	callers := make([]*caller, n)
	var wg sync.WaitGroup
	for i := range callers {
		if i > 0 {
			time.Sleep(every)
		}
		if at != nil {
			at(i)
		}
		c := newCaller(rng, i)
		callers[i] = c
		c.place(&wg, sim)
	}
	wg.Wait()
	for _, c := range callers {
		if c.call == nil {
			t.Fatalf("call %d not placed: %v", c.n, c.err)
		}
	}
	return callers
}

// waitEnded waits until every call has ended or the deadline passes, logging progress every
// 5s, and returns the calls still live.
func waitEnded(t *testing.T, t0 time.Time, callers []*caller, deadline time.Time) []*caller {
	nextLog := time.Now().Add(5 * time.Second)
	for {
		var live []*caller
		for _, c := range callers {
			if c.outcome() == "" {
				live = append(live, c)
			}
		}
		if len(live) == 0 || time.Now().After(deadline) {
			return live
		}
		if time.Now().After(nextLog) {
			t.Logf("t=%s: %d of %d calls still live", since(t0, time.Now()), len(live), len(callers))
			nextLog = nextLog.Add(5 * time.Second)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// checkOutcomes fails the test for every call not ended as its kind allows (unacked calls,
// whose incoming notification callbot never acknowledged, may also end not-answered: the
// instance that kept it died with it), except calls an instance mishandled on a stale cached
// record (the known bug), which it returns. It also returns the outcomes counted. Stuck calls
// are judgeStuck's.
func checkOutcomes(t *testing.T, callers []*caller, procs ...*callbotProc) (map[string]int, []*caller) {
	t.Helper()
	return checkOutcomesKept(t, callers, false, procs...)
}

// checkOutcomesKept is checkOutcomes where, if kept, no instance died: what Redis refused was
// kept by the instance that refused it (callstate's keep) and applied once Redis took it, so an
// incoming call Graph gave up delivering must still be answered, and a key press given up must
// still take the caller where they chose.
func checkOutcomesKept(t *testing.T, callers []*caller, kept bool, procs ...*callbotProc) (map[string]int, []*caller) {
	t.Helper()
	counts := map[string]int{}
	var known []*caller
	for _, c := range callers {
		r := c.call.Result()
		out := r.Outcome
		if out == "" {
			out = "STUCK"
		}
		counts[out]++
		ok := slices.Contains(expected[c.kind], r.Outcome)
		if !kept && c.acked.IsZero() && r.Outcome == graphsim.OutcomeNotAnswered {
			ok = true
		}
		if ok || r.Outcome == "" {
			continue
		}
		h := history(graph.CallKey(r.ID), procs...)
		if stale := staleDecisions(h); len(stale) > 0 {
			t.Logf("call %d (%s, %s) ended %q after decisions on a stale cached record %v; history %v",
				c.n, c.kind, r.ID, r.Outcome, stale, h)
			known = append(known, c)
			continue
		}
		t.Errorf("call %d (%s, %s) ended %q, want one of %v: %+v\n  history %v", c.n, c.kind, r.ID, r.Outcome, expected[c.kind], brief(r), h)
	}
	return counts, known
}

// checkAgents fails the test if an agent was ever offered two calls at once, and returns the
// offers counted.
func checkAgents(t *testing.T, sim *graphsim.Sim) (offered, accepted int) {
	t.Helper()
	for _, id := range agentIDs {
		st := sim.AgentStats(id)
		offered += st.Offered
		accepted += st.Accepted
		if st.MaxConcurrentOffers > 1 {
			t.Errorf("agent %s was offered %d calls at once: %+v", id, st.MaxConcurrentOffers, st)
		}
	}
	return offered, accepted
}

func brief(r graphsim.CallResult) string {
	return fmt.Sprintf("answered=%v tones=%v transfers=%v agent=%q outcome=%q end=%d/%d prompts=%d placed=%s ended=%s",
		r.Answered, r.Tones, r.TransferAttempts, r.Agent, r.Outcome, r.EndCode, r.EndSubcode, len(r.Prompts),
		r.PlacedAt.Format("15:04:05.000"), r.EndedAt.Format("15:04:05.000"))
}

// describeStuck logs everything known about a call that did not end: what the caller
// experienced, the Graph requests callbot made and the notifications graphsim delivered for
// it, callbot's record in Redis and the log lines of every instance that name it.
func describeStuck(t *testing.T, sim *graphsim.Sim, rdb redis.UniversalClient, c *caller, procs ...*callbotProc) {
	t.Helper()
	r := c.call.Result()
	key := graph.CallKey(r.ID)
	var b strings.Builder
	fmt.Fprintf(&b, "STUCK call %d (%s) %s\n  result: %+v\n  graph requests:", c.n, c.kind, r.ID, brief(r))
	for _, q := range sim.RequestsFor(r.ID) {
		fmt.Fprintf(&b, " %s:%s=%d", q.Time.Format("05.000"), q.Action, q.Status)
	}
	b.WriteString("\n  deliveries:")
	for _, d := range sim.Deliveries() {
		if graph.CallKey(d.CallID) == key {
			fmt.Fprintf(&b, " %s:%s#%d=%d%s", d.Time.Format("05.000"), d.State, d.Attempt, d.Status, errSuffix(d.Err))
		}
	}
	if rdb != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		rec, err := callstate.NewStore(rdb, keyPrefix).Get(ctx, key)
		cancel()
		if err != nil {
			fmt.Fprintf(&b, "\n  record: %v", err)
		} else {
			fmt.Fprintf(&b, "\n  record: state=%s v=%d queue=%q agent=%q timers=%v promptCtx=%q outbox=%d acked s=%d g=%d",
				rec.State, rec.Version, rec.Queue, rec.Agent, rec.Timers, rec.PromptCtx, len(rec.Outbox), rec.AckedStorage, rec.AckedGraph)
			for _, p := range rec.Outbox {
				fmt.Fprintf(&b, "\n    pending seq=%d ver=%d %s", p.Seq, p.Version, p.Cmd.Kind)
			}
		}
	}
	for _, p := range procs {
		lines := grep(p.logPath, key, r.ID)
		if len(lines) > 40 {
			lines = lines[len(lines)-40:]
		}
		fmt.Fprintf(&b, "\n  %s log (%d lines naming the call, last 40):", p.name, len(lines))
		for _, l := range lines {
			b.WriteString("\n    " + l)
		}
	}
	t.Log(b.String())
}

func errSuffix(e string) string {
	if e == "" {
		return ""
	}
	return "(" + e + ")"
}

// recordStates counts callbot's call records in Redis by state, and under "unacknowledged"
// those with commands saved and not yet acknowledged as done.
func recordStates(rdb redis.UniversalClient) map[string]int {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	out := map[string]int{}
	store := callstate.NewStore(rdb, keyPrefix)
	for _, k := range scanKeys(ctx, rdb, keyPrefix+":{call:*") {
		key := strings.TrimSuffix(strings.TrimPrefix(k, keyPrefix+":{call:"), "}")
		c, err := store.Get(ctx, key)
		if err != nil {
			out["error"]++
			continue
		}
		out[c.State.String()]++
		if len(c.Outbox) > 0 {
			out["unacknowledged"]++
		}
	}
	return out
}

// scanKeys returns the keys matching match: on Redis Cluster, those of every master.
func scanKeys(ctx context.Context, rdb redis.UniversalClient, match string) []string {
	scan := func(c redis.Cmdable) []string {
		var keys []string
		iter := c.Scan(ctx, 0, match, 500).Iterator()
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		return keys
	}
	cc, ok := rdb.(*redis.ClusterClient)
	if !ok {
		return scan(rdb)
	}
	for {
		var mu sync.Mutex
		var keys []string
		err := cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
			var k []string
			iter := m.Scan(ctx, 0, match, 500).Iterator()
			for iter.Next(ctx) {
				k = append(k, iter.Val())
			}
			mu.Lock()
			keys = append(keys, k...)
			mu.Unlock()
			return iter.Err()
		})
		if err == nil || ctx.Err() != nil {
			return keys
		}
		// a master the client still knows is gone (a failover): once it has the new slot map
		cc.ReloadState(ctx)
		time.Sleep(100 * time.Millisecond)
	}
}

func fmtCounts(m map[string]int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return strings.Join(parts, ", ")
}

// grep returns the lines of a file that contain any of the strings.
func grep(path string, subs ...string) []string {
	f, err := os.Open(path)
	if err != nil {
		return []string{err.Error()}
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		for _, s := range subs {
			if s != "" && strings.Contains(sc.Text(), s) {
				out = append(out, sc.Text())
				break
			}
		}
	}
	return out
}

// countLines counts the lines of a file that contain s.
func countLines(path, s string) int { return len(grep(path, s)) }

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// seed is CHAOS_SEED or 1: the callers' choices.
func seed(t *testing.T) uint64 {
	s := uint64(1)
	if v := os.Getenv("CHAOS_SEED"); v != "" {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("CHAOS_SEED: %v", err)
		}
		s = n
	}
	t.Logf("seed %d (CHAOS_SEED)", s)
	return s
}

// ---------------------------------------------------------------------------------------------
// Reading callbot's logs about a call

// logEvent is one line of a callbot log about a call's state: a transition it saved, or an
// event it decided to ignore.
type logEvent struct {
	At                     time.Time
	Inst                   string
	Msg                    string // "transition" or "event ignored"
	Event, From, To, State string
}

func (e logEvent) String() string {
	if e.Msg == "transition" {
		return fmt.Sprintf("%s %s %s: %s -> %s", e.At.Format("05.000"), e.Inst, e.Event, e.From, e.To)
	}
	return fmt.Sprintf("%s %s %s IGNORED in %s", e.At.Format("05.000"), e.Inst, e.Event, e.State)
}

// history returns the transitions and ignored events every instance logged for a call, in time
// order (the instances share the machine's clock).
func history(key string, procs ...*callbotProc) []logEvent {
	var out []logEvent
	for _, p := range procs {
		for _, line := range grep(p.logPath, `"call_id":"`+key+`"`) {
			var l struct{ Ts, Msg, Event, From, To, State string }
			if json.Unmarshal([]byte(line), &l) != nil || (l.Msg != "transition" && l.Msg != "event ignored") {
				continue
			}
			at, err := time.Parse("2006-01-02T15:04:05.000Z0700", l.Ts)
			if err != nil {
				continue
			}
			out = append(out, logEvent{At: at, Inst: p.name, Msg: l.Msg, Event: l.Event, From: l.From, To: l.To, State: l.State})
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].At.Before(out[j].At) })
	return out
}

// staleDecisions returns the events an instance ignored after another instance had saved a
// newer version of the call than the last one this instance saved: decisions taken on the
// instance's cached copy of the record (internal/callstate/cache.go), which was stale.
func staleDecisions(h []logEvent) []logEvent {
	own := map[string]time.Time{}
	var last *logEvent
	var out []logEvent
	for i, e := range h {
		switch e.Msg {
		case "transition":
			own[e.Inst] = e.At
			last = &h[i]
		case "event ignored":
			if mine, ok := own[e.Inst]; ok && last != nil && last.Inst != e.Inst && last.At.After(mine) {
				out = append(out, e)
			}
		}
	}
	return out
}

// judgeStuck describes every stuck call and sorts them: those an instance left stuck by
// ignoring an event on a stale cached record (the known bug docs/chaos.md describes) are
// returned; the others fail the test.
func judgeStuck(t *testing.T, sim *graphsim.Sim, rdb redis.UniversalClient, stuck []*caller, procs ...*callbotProc) (known []*caller) {
	t.Helper()
	for _, c := range stuck {
		describeStuck(t, sim, rdb, c, procs...)
		key := graph.CallKey(c.call.ID())
		h := history(key, procs...)
		var lines []string
		for _, e := range h {
			lines = append(lines, e.String())
		}
		t.Logf("call %d history: %s", c.n, strings.Join(lines, " | "))
		if stale := staleDecisions(h); len(stale) > 0 {
			t.Logf("call %d: stuck after decisions on a stale cached record: %v", c.n, stale)
			known = append(known, c)
			continue
		}
		t.Errorf("call %d (%s, %s) stuck: no outcome by the deadline", c.n, c.kind, c.call.ID())
	}
	return known
}

// skipKnown fails a test whose stuck calls show the stale-cache bug this test found (fixed: an
// event is ignored only on the record in Redis): a regression, reported with its signature.
func skipKnown(t *testing.T, known []*caller, total int) {
	t.Helper()
	if len(known) == 0 || t.Failed() {
		return
	}
	t.Errorf("regression: %d of %d calls stuck or misrouted because an instance ignored an event on its stale "+
		"cached record (see docs/chaos.md)", len(known), total)
}

func lastN(lines []string, n int) []string {
	if len(lines) > n {
		return lines[len(lines)-n:]
	}
	return lines
}

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/redistest"
)

const (
	agent1 = "aaaaaaaa-0000-4000-8000-000000000001"
	agent2 = "aaaaaaaa-0000-4000-8000-000000000002"
	agent3 = "aaaaaaaa-0000-4000-8000-000000000003"
)

// world is the real program (`callbot serve`, configured from the environment as in
// production) running against graphsim and a Redis of its own.
type world struct {
	sim    *graphsim.Sim
	botURL string
	stdout *syncBuffer
	logs   *syncBuffer
	env    map[string]string // callbot's environment
	done   chan error        // what `callbot serve` returned
	stop   func()            // SIGTERM, as it were: serve's context ends
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func freeAddr(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// redisBackend gives a world a Redis of its own: it returns the world's CALLBOT_REDIS_URL.
type redisBackend func(t *testing.T) string

// standaloneRedis is a redis-server (or miniredis) started for the world.
func standaloneRedis(t *testing.T) string { return "redis://" + redistest.Start(t).Addr + "/0" }

// e2eScenarios are the end-to-end scenarios, run by a test each against a standalone Redis and
// by TestE2EOnRedisCluster against a 3-master Redis Cluster.
var e2eScenarios = []struct {
	name string
	run  func(t *testing.T, rds redisBackend)
}{
	{"CallerReachesAgent", scenarioCallerReachesAgent},
	{"DeclinedTransferGoesToNextAgent", scenarioDeclinedTransferGoesToNextAgent},
	{"CallerHangsUpWhileQueued", scenarioCallerHangsUpWhileQueued},
	{"ForgedTokenChangesNothing", scenarioForgedTokenChangesNothing},
}

func startWorld(t *testing.T, rds redisBackend, agents ...graphsim.AgentSpec) *world {
	t.Helper()
	w := newWorld(t, rds, agents...)
	w.startServing(t)
	return w
}

// startServing starts callbot, waits until it is ready, and then for one presence poll, so that
// the available agents can be offered callers.
func (w *world) startServing(t *testing.T) {
	t.Helper()
	w.start(t)
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(700 * time.Millisecond) // one presence poll
}

// newWorld makes the simulator, its agents and the Redis; start runs callbot.
func newWorld(t *testing.T, rds redisBackend, agents ...graphsim.AgentSpec) *world {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end")
	}
	redisURL := rds(t)
	addr := freeAddr(t)
	botURL := "http://" + addr
	sim, err := graphsim.New(graphsim.Options{TenantID: demoTenant, ClientID: demoClient, ClientSecret: demoSecret,
		WebhookURL: botURL + "/api/calls", PromptDuration: 150 * time.Millisecond, RingTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	for _, a := range agents {
		sim.AddAgent(a)
	}
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := sim.WriteCAFile(ca); err != nil {
		t.Fatal(err)
	}
	return &world{sim: sim, botURL: botURL, stdout: &syncBuffer{}, logs: &syncBuffer{}, env: map[string]string{
		"CALLBOT_LISTEN_ADDR": addr, "CALLBOT_PUBLIC_URL": botURL, "CALLBOT_TENANT_ID": demoTenant,
		"CALLBOT_CLIENT_ID": demoClient, "CALLBOT_CLIENT_SECRET": demoSecret, "CALLBOT_AUTHORITY_HOST": sim.AuthorityHost(),
		"CALLBOT_GRAPH_URL": sim.GraphURL(), "CALLBOT_OPENID_CONFIG_URL": sim.OpenIDConfigURL(), "CALLBOT_CA_FILE": ca,
		"CALLBOT_REDIS_URL": redisURL, "CALLBOT_FLOW_FILE": "testdata/flow.yaml",
		"CALLBOT_PRESENCE_INTERVAL": "500ms", "CALLBOT_TOKEN_ISSUERS": graphsim.DefaultIssuer, "CALLBOT_LOG_LEVEL": "debug",
	}}
}

// start runs `callbot serve` until the test ends.
func (w *world) start(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w.stop = cancel
	w.done = make(chan error, 1)
	go func() {
		w.done <- run(ctx, []string{"serve"}, func(k string) string { return w.env[k] }, w.stdout, w.logs)
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-w.done; err != nil {
			t.Errorf("serve: %v", err)
		}
		if t.Failed() {
			t.Logf("callbot logs:\n%s", w.logs.String())
		}
	})
}

// readyz is callbot's readiness: its status code and body.
func (w *world) readyz() (int, string, error) {
	resp, err := http.Get(w.botURL + "/readyz")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), err
}

// waitReady waits until callbot's readiness says 200, or fails with what it last said.
func (w *world) waitReady(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		code, body, err := w.readyz()
		if err == nil && code == 200 {
			return nil
		}
		select {
		case err := <-w.done:
			w.done <- err // for the cleanup
			return fmt.Errorf("serve exited: %v\n%s", err, w.logs.String())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("callbot not ready: %d %q %v\n%s", code, body, err, w.logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *world) call(t *testing.T, spec graphsim.CallerSpec) *graphsim.Call {
	t.Helper()
	if spec.From.ID == "" {
		spec.From = graph.Party{Kind: graph.KindPhone, ID: "+14255550100"}
	}
	spec.To = demoAccount
	c, err := w.sim.PlaceCall(context.Background(), spec)
	if err != nil {
		t.Fatalf("place call: %v", err)
	}
	return c
}

func waitDone(t *testing.T, c *graphsim.Call, within time.Duration) graphsim.CallResult {
	t.Helper()
	select {
	case <-c.Done():
	case <-time.After(within):
		t.Fatalf("call not over after %s: %+v", within, c.Result())
	}
	return c.Result()
}

func available(id string, answer graphsim.AgentAnswer) graphsim.AgentSpec {
	return graphsim.AgentSpec{ID: id, Availability: "Available", Activity: "Available", Answer: answer, TalkTime: 5 * time.Second}
}

func away(id string) graphsim.AgentSpec {
	return graphsim.AgentSpec{ID: id, Availability: "Away", Activity: "Away"}
}

func TestE2ECallerReachesAgent(t *testing.T) { scenarioCallerReachesAgent(t, standaloneRedis) }

func scenarioCallerReachesAgent(t *testing.T, rds redisBackend) {
	w := startWorld(t, rds, away(agent1), available(agent2, graphsim.AgentAccept), available(agent3, graphsim.AgentAccept))
	// the caller listens to greeting and menu (150ms each) before pressing 1
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 15*time.Second)

	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent2 {
		t.Fatalf("caller experienced %+v; want answered and transferred to %s (the only available sales agent)", r, agent2)
	}
	// The hold music is decided when the caller joins the queue; when agent 2 is offered the
	// caller before it is sent, the transfer supersedes it and it is rightly never played
	// (Machine.Superseded). Either way the caller hears greeting and menu first, and nothing else.
	wantPrompts := []string{"https://media.test/welcome.wav", "https://media.test/menu.wav"}
	if len(r.Prompts) < 2 || !slices.Equal(r.Prompts[:2], wantPrompts) {
		t.Errorf("prompts heard %v, want %v first", r.Prompts, wantPrompts)
	}
	for _, p := range r.Prompts[min(2, len(r.Prompts)):] {
		if p != "https://media.test/hold.wav" {
			t.Errorf("prompts heard %v: %s after the menu, want only hold music", r.Prompts, p)
		}
	}
	if !slices.Equal(r.Tones, []string{"1"}) || !slices.Equal(r.TransferAttempts, []string{agent2}) {
		t.Errorf("tones %v transfers %v", r.Tones, r.TransferAttempts)
	}
	// the Graph commands callbot sent for this call, in order
	var actions []string
	for _, req := range w.sim.RequestsFor(r.ID) {
		if req.Action != "cancelMediaProcessing" { // barge-in cancels depend on timing
			actions = append(actions, req.Action)
		}
	}
	want := []string{"answer", "subscribeToTone", "playPrompt", "playPrompt", "transfer"}
	superseded := []string{"answer", "subscribeToTone", "playPrompt", "transfer"} // no hold music: see above
	if got := trimRepeats(actions); !slices.Equal(got, want) && !slices.Equal(got, superseded) {
		t.Errorf("graph requests %v, want %v (or %v when the offer came before the hold music was sent)", actions, want, superseded)
	}
	if st := w.sim.AgentStats(agent1); st.Offered != 0 {
		t.Errorf("away agent offered %d calls", st.Offered)
	}
}

// trimRepeats drops hold-music replays after the first two prompts.
func trimRepeats(a []string) []string {
	var out []string
	prompts := 0
	for _, s := range a {
		if s == "playPrompt" {
			prompts++
			if prompts > 2 {
				continue
			}
		}
		out = append(out, s)
	}
	return out
}

func TestE2EDeclinedTransferGoesToNextAgent(t *testing.T) {
	scenarioDeclinedTransferGoesToNextAgent(t, standaloneRedis)
}

func scenarioDeclinedTransferGoesToNextAgent(t *testing.T, rds redisBackend) {
	w := startWorld(t, rds, available(agent1, graphsim.AgentDecline), available(agent2, graphsim.AgentAccept), away(agent3))
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 20*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent2 {
		t.Fatalf("caller experienced %+v; want transferred to %s", r, agent2)
	}
	if !slices.Contains(r.TransferAttempts, agent1) {
		// agent1 and agent2 are equally idle; whichever was tried first, the declining one must not
		// have been the end of the call
		t.Logf("agent2 was tried first: %v", r.TransferAttempts)
	}
	for _, id := range []string{agent1, agent2} {
		if st := w.sim.AgentStats(id); st.MaxConcurrentOffers > 1 {
			t.Errorf("agent %s offered %d calls at once", id, st.MaxConcurrentOffers)
		}
	}
}

func TestE2ECallerHangsUpWhileQueued(t *testing.T) {
	scenarioCallerHangsUpWhileQueued(t, standaloneRedis)
}

func scenarioCallerHangsUpWhileQueued(t *testing.T, rds redisBackend) {
	w := startWorld(t, rds, away(agent1), away(agent2), away(agent3))
	c := w.call(t, graphsim.CallerSpec{Digits: "2", HangUpAfter: 2 * time.Second})
	r := waitDone(t, c, 10*time.Second)
	if r.Outcome != graphsim.OutcomeCallerHangUp || len(r.TransferAttempts) != 0 {
		t.Fatalf("caller experienced %+v", r)
	}
	// nobody is left in the queue: an agent who becomes available gets no ghost call
	w.sim.SetPresence(agent3, "Available", "Available")
	time.Sleep(1500 * time.Millisecond)
	if st := w.sim.AgentStats(agent3); st.Offered != 0 {
		t.Errorf("agent offered %d calls after the only caller hung up", st.Offered)
	}
}

func TestE2EForgedTokenChangesNothing(t *testing.T) {
	scenarioForgedTokenChangesNothing(t, standaloneRedis)
}

func scenarioForgedTokenChangesNothing(t *testing.T, rds redisBackend) {
	w := startWorld(t, rds, available(agent1, graphsim.AgentAccept))
	body, _ := os.ReadFile("../../internal/graph/testdata/payloads/notification-incoming-to-app-instance-pstn-bot.json")
	body = bytes.ReplaceAll(body, []byte("632899f8-2ea1-4604-8413-27bd2892079f"), []byte(demoTenant))
	now := time.Now().Unix()
	good := map[string]any{"aud": demoClient, "iss": graphsim.DefaultIssuer, "tid": demoTenant, "iat": now, "nbf": now, "exp": now + 300}
	variant := func(k string, v any) map[string]any {
		c := map[string]any{}
		for kk, vv := range good {
			c[kk] = vv
		}
		c[k] = v // nil removes the claim
		return c
	}
	before := len(w.sim.Requests())
	for name, claims := range map[string]map[string]any{
		"wrong audience": variant("aud", "another-bot"),
		"wrong issuer":   variant("iss", "https://evil.example"),
		"expired":        variant("exp", now-3600),
		"other tenant":   variant("tid", "9e9e9e9e-0000-4000-8000-000000000000"),
		"no tenant":      variant("tid", nil),
	} {
		tok, err := w.sim.SignToken(claims)
		if err != nil {
			t.Fatal(err)
		}
		if code := post(t, w.botURL+"/api/calls", "Bearer "+tok, body); code != http.StatusForbidden {
			t.Errorf("%s: status %d, want 403", name, code)
		}
	}
	if code := post(t, w.botURL+"/api/calls", "", body); code != http.StatusUnauthorized {
		t.Errorf("no token: status %d, want 401", code)
	}
	tok, _ := w.sim.SignToken(good)
	if code := post(t, w.botURL+"/api/calls", "Bearer "+tok+"x", body); code != http.StatusForbidden {
		t.Errorf("bad signature: status %d, want 403", code)
	}
	time.Sleep(300 * time.Millisecond)
	for _, r := range w.sim.Requests()[before:] {
		if r.CallID != "" {
			t.Errorf("callbot acted on a forged notification: %s %s", r.Method, r.Path)
		}
	}
	// the same body with a good token is answered
	if code := post(t, w.botURL+"/api/calls", "Bearer "+tok, body); code != http.StatusAccepted {
		t.Errorf("good token: status %d, want 202", code)
	}
}

func post(t *testing.T, url, auth string, body []byte) int {
	req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestDemoSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	var out bytes.Buffer
	err := run(context.Background(), []string{"demo", "-flow", "../../deployments/examples/flow.yaml", "-calls", "10", "-every", "150ms"}, os.Getenv, &out, &out)
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, out.String())
	}
	for _, want := range []string{"callbot demo summary", "answered                         10 (100%)", "no agent was offered two callers at once"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("demo output lacks %q:\n%s", want, out.String())
		}
	}
}

// Graph may answer a playPrompt with its operation already failed, and then sends no
// notification. A queued caller's hold music that fails so is tried again 5 s later: before,
// callbot took the final status for the prompt's end and asked for the hold music again at once,
// hundreds of requests a second for as long as the caller waited.
func TestE2EHoldMusicFailedInTheResponse(t *testing.T) {
	w := startWorld(t, standaloneRedis, away(agent1), away(agent2), away(agent3))
	const hold = "https://media.test/hold.wav"
	w.sim.FailPrompt(hold, graphsim.PromptFailInResponse)
	c := w.call(t, graphsim.CallerSpec{Digits: "2", HangUpAfter: 3 * time.Second})
	r := waitDone(t, c, 10*time.Second)
	if r.Outcome != graphsim.OutcomeCallerHangUp {
		t.Fatalf("caller experienced %+v", r)
	}
	n := 0
	for _, req := range w.sim.RequestsFor(c.ID()) {
		if req.Action == "playPrompt" && bytes.Contains(req.Body, []byte(hold)) {
			n++
		}
	}
	// the caller waited less than 3 s: the hold music failed once, its next try was 5 s away
	if n != 1 {
		t.Errorf("%d hold music requests while the caller waited, want 1", n)
	}
}

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// The app registration graphsim accepts and callbot is configured with, and the resource
// account callers dial. Made up; GUIDs because callbot checks.
const (
	loadTenant  = "3f2b8c1d-5a6e-4b7f-8c9d-0e1f2a3b4c5d"
	loadClient  = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
	loadSecret  = "load-secret-not-for-production"
	loadAccount = "6d5c4b3a-2f1e-4d0c-9b8a-7f6e5d4c3b2a"
	holdURI     = "https://media.load.test/hold.wav"
)

func agentID(i int) string { return fmt.Sprintf("a9e00000-0000-4000-8000-%012d", i+1) }

// cpuSplit says which CPUs this tool runs on and which callbot, Redis and the no-op server
// run on; both empty when nothing is pinned.
type cpuSplit struct{ tool, server []int }

// world is callbot (a subprocess) with its own redis-server (a subprocess) and graphsim (in
// this process).
type world struct {
	o         options
	cpus      cpuSplit
	dir       string
	redis     *proc
	redisAddr string // the real server; callbot may reach it through proxy
	proxy     *respProxy
	bot       *proc
	botURL    string
	botLog    string
	sim       *graphsim.Sim
	rec       *recorder
	pprofAddr string       // callbot's profiling endpoint, with -cpuprofile
	graphPeak atomic.Int64 // most Graph connections callbot had open at a progress tick
}

// startWorld starts Redis, graphsim and callbot, and returns once callbot is ready and has
// polled presence once.
func startWorld(ctx context.Context, o options, cpus cpuSplit, bin, dir string, progress io.Writer) (w *world, err error) {
	w = &world{o: o, cpus: cpus, dir: dir, botLog: filepath.Join(dir, "callbot.log")}
	defer func() {
		if err != nil {
			w.close()
			w = nil
		}
	}()
	if w.redis, w.redisAddr, err = startRedis(o.redisServer, dir); err != nil {
		return w, err
	}
	if err := pin(w.redis.pid(), cpus.server); err != nil {
		return w, fmt.Errorf("pin redis-server: %w", err)
	}
	redisURL := "redis://" + w.redisAddr + "/0"
	if o.redisProxy {
		if w.proxy, err = startProxy(w.redisAddr); err != nil {
			return w, err
		}
		redisURL = "redis://" + w.proxy.addr() + "/0"
	}
	botAddr, err := freeAddr()
	if err != nil {
		return w, err
	}
	w.botURL = "http://" + botAddr
	prompt := o.prompt
	durations := map[string]time.Duration{}
	if o.holdPrompt > 0 {
		// Hold music lasts minutes, not milliseconds: with a 5 ms one, every caller waiting
		// in the queue made callbot loop it 200 times a second, and a moment of delay in the
		// offers could run away into an overload no real call mix produces.
		durations[holdURI] = o.holdPrompt
	}
	if o.hold > 0 {
		prompt = time.Hour // held callers hear one long hold prompt, not a loop of short ones
		durations = nil
	}
	w.rec = &recorder{base: notifyTransport()}
	w.sim, err = graphsim.New(graphsim.Options{
		TenantID: loadTenant, ClientID: loadClient, ClientSecret: loadSecret,
		WebhookURL: w.botURL + "/api/calls", PromptDuration: prompt, PromptDurations: durations, StepDelay: o.step,
		RingTimeout: 5 * time.Second, NotifyClient: &http.Client{Transport: w.rec, Timeout: 5 * time.Second},
	})
	if err != nil {
		return w, err
	}
	if o.graphLat > 0 {
		// Every endpoint, as a real Graph and Entra ID: call actions, presence, token.
		if _, err := w.sim.AddFault(graphsim.Fault{Kind: graphsim.FaultLatency, Action: "*", Latency: o.graphLat, Probability: 1}); err != nil {
			return w, err
		}
	}
	availability := "Available"
	if o.hold > 0 {
		availability = "Away" // callers wait in the queue
	}
	agents := make([]string, o.agents)
	for i := range agents {
		agents[i] = agentID(i)
		w.sim.AddAgent(graphsim.AgentSpec{ID: agents[i], Availability: availability, Activity: availability,
			Answer: graphsim.AgentAccept, TalkTime: o.talk})
	}
	ca := filepath.Join(dir, "graphsim-ca.pem")
	if err := w.sim.WriteCAFile(ca); err != nil {
		return w, err
	}
	flowFile := filepath.Join(dir, "flow.yaml")
	if err := os.WriteFile(flowFile, []byte(flowYAML(agents)), 0o644); err != nil {
		return w, err
	}
	env := map[string]string{
		"CALLBOT_LISTEN_ADDR": botAddr, "CALLBOT_PUBLIC_URL": w.botURL, "CALLBOT_TENANT_ID": loadTenant,
		"CALLBOT_CLIENT_ID": loadClient, "CALLBOT_CLIENT_SECRET": loadSecret, "CALLBOT_AUTHORITY_HOST": w.sim.AuthorityHost(),
		"CALLBOT_GRAPH_URL": w.sim.GraphURL(), "CALLBOT_OPENID_CONFIG_URL": w.sim.OpenIDConfigURL(), "CALLBOT_CA_FILE": ca,
		"CALLBOT_TOKEN_ISSUERS": graphsim.DefaultIssuer, "CALLBOT_REDIS_URL": redisURL, "CALLBOT_FLOW_FILE": flowFile,
		"CALLBOT_PRESENCE_INTERVAL": o.presence.String(), "CALLBOT_SHUTDOWN_GRACE": "5s", "CALLBOT_LOG_LEVEL": o.logLevel,
	}
	cmd := exec.Command(bin, "serve")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CALLBOT_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	for k, v := range env {
		cmd.Env = append(cmd.Env, k+"="+v)
	}
	if o.reconcile > 0 {
		cmd.Env = append(cmd.Env, "CALLBOT_RECONCILE_INTERVAL="+o.reconcile.String())
	}
	if len(cpus.server) > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("GOMAXPROCS=%d", len(cpus.server)))
	}
	if o.cpuprofile != "" {
		if w.pprofAddr, err = freeAddr(); err != nil {
			return w, err
		}
		cmd.Env = append(cmd.Env, pprofEnv+"="+w.pprofAddr)
	}
	logf, err := os.Create(w.botLog)
	if err != nil {
		return w, err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	w.bot, err = startProc("callbot", cmd)
	logf.Close()
	if err != nil {
		return w, err
	}
	if err := pin(w.bot.pid(), cpus.server); err != nil {
		return w, fmt.Errorf("pin callbot: %w", err)
	}
	fmt.Fprintf(progress, "callbot pid %d on %s, redis-server pid %d on %s, %d agents\n", w.bot.pid(), w.botURL, w.redis.pid(), w.redisAddr, o.agents)
	if err := w.waitReady(ctx); err != nil {
		return w, err
	}
	if err := pin(w.bot.pid(), cpus.server); err != nil {
		return w, fmt.Errorf("pin callbot: %w", err)
	}
	return w, w.waitPresence(ctx)
}

func flowYAML(agents []string) string {
	var b strings.Builder
	b.WriteString(`# written by callbot-load
name: load
prompts:
  welcome: {uri: https://media.load.test/welcome.wav}
  menu: {uri: https://media.load.test/menu.wav}
  hold: {uri: ` + holdURI + `}
  bye: {uri: https://media.load.test/bye.wav}
greeting: welcome
start: main
menus:
  main:
    prompt: menu
    timeout: 10s
    retries: 0
    options:
      "1": {queue: load}
    fallback: {disconnect: bye}
queues:
  load:
    hold: hold
    agents:
`)
	for _, a := range agents {
		b.WriteString("      - " + a + "\n")
	}
	return b.String()
}

func (w *world) waitReady(ctx context.Context) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(w.botURL + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if w.bot.exited() {
			return fmt.Errorf("callbot exited: %v\n%s", w.bot.err, tail(w.botLog, 20))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("callbot not ready after 60s: %v\n%s", err, tail(w.botLog, 20))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// waitPresence waits for callbot's first successful presence poll, so agents are routable.
func (w *world) waitPresence(ctx context.Context) error {
	deadline := time.Now().Add(5*w.o.presence + 10*time.Second)
	for time.Now().Before(deadline) {
		for _, r := range w.sim.Requests() {
			if r.Action == "getPresencesByUserId" && r.Status == http.StatusOK {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(200 * time.Millisecond):
				}
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	return fmt.Errorf("callbot did not poll presence\n%s", tail(w.botLog, 20))
}

// stopBot stops callbot (SIGTERM, as an orchestrator would) and waits for it.
func (w *world) stopBot() {
	if w.bot != nil {
		w.bot.stop(10 * time.Second)
	}
}

// close stops everything, callbot first. Safe to call twice.
func (w *world) close() {
	w.stopBot()
	if w.sim != nil {
		w.sim.Close()
	}
	if w.proxy != nil {
		w.proxy.close()
	}
	if w.redis != nil {
		w.redis.stop(5 * time.Second)
	}
}

// place makes caller i dial the resource account and press 1.
func (w *world) place(ctx context.Context, i int) (*graphsim.Call, error) {
	return w.sim.PlaceCall(ctx, graphsim.CallerSpec{
		From:   graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+1425%07d", i%10_000_000)},
		To:     loadAccount,
		Digits: "1", DigitDelay: w.o.digitDelay,
	})
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// logStats counts callbot's warn and error lines (JSON, one per line) by message.
func logStats(path string) LogStats {
	var st LogStats
	f, err := os.Open(path)
	if err != nil {
		return st
	}
	defer f.Close()
	count := map[[2]string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Bytes()
		if !strings.Contains(string(line), `"level":"warn"`) && !strings.Contains(string(line), `"level":"error"`) &&
			!strings.Contains(string(line), `"level":"dpanic"`) && !strings.Contains(string(line), `"level":"panic"`) {
			st.Lines++
			continue
		}
		st.Lines++
		var e struct {
			Level, Msg, Error string
		}
		if json.Unmarshal(line, &e) != nil {
			continue
		}
		if e.Level == "warn" {
			st.Warn++
		} else {
			st.Error++
		}
		msg := e.Msg
		if e.Error != "" {
			msg += ": " + shorten(ids.ReplaceAllString(e.Error, "ID"), 120)
		}
		count[[2]string{e.Level, msg}]++
	}
	for k, n := range count {
		st.Top = append(st.Top, LogLine{Level: k[0], Msg: k[1], Count: n})
	}
	sort.Slice(st.Top, func(i, j int) bool {
		if st.Top[i].Count != st.Top[j].Count {
			return st.Top[i].Count > st.Top[j].Count
		}
		return st.Top[i].Msg < st.Top[j].Msg
	})
	if len(st.Top) > 6 {
		st.Top = st.Top[:6]
	}
	return st
}

// ids are call ids, GUIDs and long hex or decimal numbers: left out when grouping messages.
var ids = regexp.MustCompile(`[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|[0-9a-fA-F]{32}|\b\d{4,}\b`)

func shorten(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

//go:build chaos

package chaos

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// TestRollingDeploy: two `callbot serve` instances behind a round-robin load balancer whose
// health check is /readyz (as a Kubernetes readiness probe), while calls arrive at a steady
// rate. Every few seconds one instance is replaced as a rolling update does it: SIGTERM to the
// old one and a new one (a new name, a new port) started at once, then the other one; round
// after round. Subtests: the deploy alone; a slow, throttling Graph alone (latency of hundreds
// of ms to seconds on call actions, bursts of 429 with Retry-After, 503, 500 and a slow 504);
// both at once; and crashes (mode "crash": each replaced instance gets SIGKILL instead, a node
// lost or a container killed by its memory limit, round after round; what it held is the
// others' once its outbox lease runs out; "crash-graph": with the slow, throttling Graph too).
//
// At the end: every call ended as its caller allows, and one Graph transferred ended transferred
// in callbot's record too; callbot's records all terminated with no
// command unacknowledged; no caller left in a queue, no agent reserved, no outbox entry and no
// timer left; every instance stopped within its grace period with exit code 0 (or, with the slow
// Graph, 1, saying its grace ran out with only Graph commands left to the others, which the
// checks before find done); no notification
// given up by Graph; every 5xx the webhook answered falls within a shutdown's window (from the
// SIGTERM (less a second: a request in flight then) to the process's exit, plus a second); no agent offered two callers at once.
//
// Knobs (a longer soak: CHAOS_ROLL_RATE=20 CHAOS_ROLL_DURATION=3m):
// CHAOS_ROLL_RATE calls/s (default 8), CHAOS_ROLL_DURATION of the traffic (default 12s),
// CHAOS_ROLL_EVERY between two replacements (default 3s), CHAOS_ROLL_GRACE
// (CALLBOT_SHUTDOWN_GRACE, default 5s), CHAOS_ROLL_MODES, of deploy, graph, both, crash and
// crash-graph (default "both,crash").
func TestRollingDeploy(t *testing.T) {
	modes := strings.Split(envOr("CHAOS_ROLL_MODES", "both,crash"), ",")
	for _, m := range modes {
		t.Run(m, func(t *testing.T) {
			switch m {
			case "deploy":
				rollingRun(t, true, false, false)
			case "graph":
				rollingRun(t, false, true, false)
			case "both":
				rollingRun(t, true, true, false)
			case "crash":
				rollingRun(t, true, false, true)
			case "crash-graph":
				rollingRun(t, true, true, true)
			default:
				t.Fatalf("CHAOS_ROLL_MODES: unknown mode %q", m)
			}
		})
	}
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func envDuration(t *testing.T, k string, def time.Duration) time.Duration {
	d, err := time.ParseDuration(envOr(k, def.String()))
	if err != nil {
		t.Fatalf("%s: %v", k, err)
	}
	return d
}

// onlyGraphCommands is what serve's error names when all the grace left was Graph commands being
// sent.
var onlyGraphCommands = regexp.MustCompile(`^queued Graph commands \(\d+ calls sending\)$`)

// stop is one instance's graceful stop: when it got SIGTERM, when it exited, and how; or its
// crash (killed: SIGKILL).
type stop struct {
	name         string
	term, exited time.Time
	code         int
	lastLog      string
	killed       bool
}

// rollingFlow writes the chaos flow with sales agents 1..s and support agents s+1..s+p.
func rollingFlow(t *testing.T, s, p int) (string, []string) {
	ids := make([]string, s+p)
	for i := range ids {
		ids[i] = fmt.Sprintf("aaaaaaaa-0000-4000-8000-%012d", i+1)
	}
	b, err := os.ReadFile("testdata/flow.yaml")
	if err != nil {
		t.Fatal(err)
	}
	flow := string(b)
	cut := strings.Index(flow, "queues:")
	var q strings.Builder
	q.WriteString("queues:\n  sales:\n    hold: hold\n    agents:\n")
	for _, id := range ids[:s] {
		q.WriteString("      - " + id + "\n")
	}
	q.WriteString("  support:\n    hold: hold\n    agents:\n")
	for _, id := range ids[s:] {
		q.WriteString("      - " + id + "\n")
	}
	path := filepath.Join(t.TempDir(), "flow.yaml")
	if err := os.WriteFile(path, []byte(flow[:cut]+q.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, ids
}

// rollingCaller picks what caller n does: the chaos mix plus callers who press nothing (the
// menu replays, then its fallback says goodbye).
func rollingCaller(rng *rand.Rand, n int) *caller {
	c := newCaller(rng, n)
	if c.kind == "goodbye" && rng.IntN(2) == 0 {
		c.kind, c.spec.Digits = "silent", ""
	}
	return c
}

func init() {
	expected["silent"] = []string{graphsim.OutcomeBotHangUp}
	expected["deaf"] = []string{graphsim.OutcomeBotHangUp, graphsim.OutcomeTransferred, graphsim.OutcomeCallerHangUp}
}

func rollingRun(t *testing.T, deploy, slowGraph, crash bool) {
	var (
		rate     = envOr("CHAOS_ROLL_RATE", "8")
		duration = envDuration(t, "CHAOS_ROLL_DURATION", 12*time.Second)
		every    = envDuration(t, "CHAOS_ROLL_EVERY", 3*time.Second)
		grace    = envDuration(t, "CHAOS_ROLL_GRACE", 5*time.Second)
	)
	perSec, err := strconv.ParseFloat(rate, 64)
	if err != nil || perSec <= 0 {
		t.Fatalf("CHAOS_ROLL_RATE: %q", rate)
	}
	calls := int(perSec * duration.Seconds())
	gap := time.Duration(float64(time.Second) / perSec)
	sd := seed(t)
	rs := startRedis(t, false)
	rdb := rs.client(t)
	lb := newBalancerChecking(t, "/readyz")

	flowPath, ids, specs := rollingAgents(t, perSec)
	sim, ca := newSim(t, lb.URL()+"/api/calls", specs)
	// Every call action takes 100 ms at least, as Graph's do.
	commands := []string{"answer", "subscribeToTone", "playPrompt", "cancelMediaProcessing", "transfer", "delete", "get"}
	if slowGraph {
		// Slow: one request in 10 takes 2.5 s, one in 4 of the rest 800 ms, one in 3 of the rest 300 ms.
		for _, l := range []struct {
			d time.Duration
			p float64
		}{{2500 * time.Millisecond, 0.1}, {800 * time.Millisecond, 0.25}, {300 * time.Millisecond, 0.33}} {
			for _, a := range commands {
				if _, err := sim.AddFault(graphsim.Fault{Kind: graphsim.FaultLatency, Action: a, Latency: l.d, Probability: l.p}); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	for _, a := range commands {
		if _, err := sim.AddFault(graphsim.Fault{Kind: graphsim.FaultLatency, Action: a, Latency: 100 * time.Millisecond, Probability: 1}); err != nil {
			t.Fatal(err)
		}
	}

	env := baseEnv(sim, ca, rs.addr, lb.URL())
	env["CALLBOT_FLOW_FILE"] = flowPath
	env["CALLBOT_SHUTDOWN_GRACE"] = grace.String()
	lease, set := outboxLease(t)
	if set {
		env["CALLBOT_OUTBOX_LEASE"] = lease.String()
	}
	if os.Getenv("CHAOS_LOG_LEVEL") != "" {
		env["CALLBOT_LOG_LEVEL"] = os.Getenv("CHAOS_LOG_LEVEL")
	}
	var (
		mu    sync.Mutex
		procs []*callbotProc
		stops []stop
	)
	launch := func(name string) (*callbotProc, error) {
		p, err := launchCallbot(t, name, "127.0.0.1:"+strconv.Itoa(freePort(t)), env, 20*time.Second)
		if p != nil {
			mu.Lock()
			procs = append(procs, p)
			mu.Unlock()
		}
		return p, err
	}
	slots := make([]*callbotProc, 2)
	for i, n := range []string{"a", "b"} {
		p, err := launch("bot-" + n + "0")
		if err != nil {
			t.Fatal(err)
		}
		slots[i] = p
		lb.add(p.name, p.addr)
	}
	time.Sleep(1200 * time.Millisecond) // a presence poll or two: agents routable

	t0 := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var bg sync.WaitGroup
	deployErr := make(chan error, 1)
	if deploy {
		bg.Go(func() {
			round := 0
			for {
				for i := range slots {
					select {
					case <-ctx.Done():
						return
					case <-time.After(every):
					}
					old := slots[i]
					name := fmt.Sprintf("bot-%c%d", 'a'+i, round+1)
					term := time.Now()
					if crash {
						old.cmd.Process.Signal(syscall.SIGKILL)
					} else {
						old.cmd.Process.Signal(syscall.SIGTERM)
					}
					p, err := launch(name)
					if err != nil {
						deployErr <- err
						return
					}
					lb.add(p.name, p.addr)
					slots[i] = p
					<-old.exited
					lb.remove(old.name)
					st := stop{name: old.name, term: term, exited: time.Now(), code: old.cmd.ProcessState.ExitCode(), killed: crash}
					if l := grep(old.logPath, "shutdown grace over", `"level":"error"`); len(l) > 0 {
						st.lastLog = l[len(l)-1]
					}
					mu.Lock()
					stops = append(stops, st)
					mu.Unlock()
					verb := "stopped"
					if crash {
						verb = "killed"
					}
					t.Logf("t=%s: %s %s in %s (exit %d), %s ready", since(t0, st.exited), old.name, verb,
						st.exited.Sub(term).Round(10*time.Millisecond), st.code, name)
					if st.lastLog != "" {
						t.Logf("%s: %s", old.name, st.lastLog)
					}
				}
				round++
			}
		})
	}
	if slowGraph {
		// A throttling episode every 4 s: 429s with Retry-After on the actions callers feel,
		// some 503s and 500s, and a 504 after 3 s on a transfer (ambiguous: it may have taken).
		bg.Go(func() {
			for k := 0; ; k++ {
				select {
				case <-ctx.Done():
					return
				case <-time.After(4 * time.Second):
				}
				for _, a := range []string{"answer", "playPrompt", "subscribeToTone", "transfer", "delete", "get"} {
					sim.AddFault(graphsim.Fault{Kind: graphsim.FaultStatus, Action: a, Status: 429, RetryAfter: time.Second, Count: 4})
				}
				sim.AddFault(graphsim.Fault{Kind: graphsim.FaultStatus, Action: commands[k%len(commands)], Status: 503, Count: 3})
				sim.AddFault(graphsim.Fault{Kind: graphsim.FaultStatus, Action: commands[(k+3)%len(commands)], Status: 500, Count: 2})
				sim.AddFault(graphsim.Fault{Kind: graphsim.FaultStatus, Action: "transfer", Status: 504, Latency: 3 * time.Second, Count: 1})
			}
		})
	}

	callers, placedAll := placeAll(t, sim, sd, calls, t0, gap, rollingCaller, nil, func() {
		cancel()
		bg.Wait()
		select {
		case err := <-deployErr:
			t.Fatalf("rolling deploy: %v", err)
		default:
		}
	})
	sim.ClearFaults()
	t.Logf("t=%s: %d calls placed, %d instances replaced", since(t0, placedAll), calls, len(stops))

	mu.Lock()
	all := slices.Clone(procs)
	mu.Unlock()
	stuck := waitEnded(t, t0, callers, placedAll.Add(75*time.Second))
	known := judgeStuck(t, sim, rdb, stuck, all...)
	ended := time.Now()

	// callbot's side settles: records terminated with nothing unacknowledged, and the outbox
	// index, the timers, the queues and the reservations empty.
	var (
		settled map[string]int
		left    map[string]int64
		orphans int64 // timers a crash left for calls that ended
	)
	settledBy := time.Now().Add(2*max(lease, 5*time.Second) + 10*time.Second)
	for {
		settled, left = recordStates(rdb), leftovers(rdb)
		if crash {
			// A killed instance leaves the timers its last saves disarmed: they leave the set
			// with its acknowledgements, which it did not live to send. Each fires in its time
			// (the hold guard's in 10 minutes) and is ignored, its call having ended; a timer of
			// a call still live is not one of these.
			orphans = endedCallTimers(t, rdb)
			left[keyPrefix+":{timers}"] -= orphans
		}
		open := settled["unacknowledged"]
		for s, n := range settled {
			if s != "terminated" && s != "unacknowledged" {
				open += n
			}
		}
		for _, n := range left {
			open += int(n)
		}
		if open == 0 || time.Now().After(settledBy) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	settleTook := time.Since(ended)
	if len(stuck) == 0 {
		for s, n := range settled {
			if s != "terminated" && n > 0 {
				t.Errorf("%d callbot records %s after every call ended in Graph (records: [%s])", n, s, fmtCounts(settled))
			}
		}
	}
	for k, n := range left {
		if n > 0 {
			t.Errorf("%s holds %d entries %s after every call ended: %v", k, n, settleTook.Round(100*time.Millisecond), sample(rdb, k))
		}
	}
	// A caller whose tone subscription Graph refused (an injected 5xx or 429 outlasting the
	// client's retry) pressed their key into nothing: graphsim's callers press once, and do not
	// press again when the menu replays (a person would), so the menu's fallback says goodbye.
	deaf := 0
	for _, c := range callers {
		if len(c.call.Result().Tones) > 0 || c.spec.Digits == "" {
			continue
		}
		for _, r := range sim.RequestsFor(c.call.ID()) {
			if r.Action == "subscribeToTone" && r.Status >= 400 {
				c.kind = "deaf"
				deaf++
				break
			}
		}
	}
	counts, misrouted := checkOutcomes(t, callers, all...)
	known = append(known, misrouted...)
	// callbot knew who reached an agent: a call whose end Graph gave as transferred (7015) and
	// callbot's record took in another state (in a queue, say: a late read of the call had put
	// the caller back) had its agent released as free while talking to the caller
	for _, c := range callers {
		r := c.call.Result()
		if r.Outcome != graphsim.OutcomeTransferred {
			continue
		}
		rec, err := callstate.NewStore(rdb, keyPrefix).Get(context.Background(), graph.CallKey(r.ID))
		if err != nil || rec.EndSubcode == 7015 && rec.Outcome != callstate.OutcomeTransferred {
			t.Errorf("call %d (%s, %s) transferred to %s, but callbot's record ended %q (%v)\n  history %v",
				c.n, c.kind, r.ID, r.Agent, rec.Outcome, err, history(graph.CallKey(r.ID), all...))
		}
	}
	var offered, accepted int
	for _, id := range ids {
		st := sim.AgentStats(id)
		offered += st.Offered
		accepted += st.Accepted
		if st.MaxConcurrentOffers > 1 {
			t.Errorf("agent %s was offered %d calls at once: %+v", id, st.MaxConcurrentOffers, st)
		}
	}

	// Stops: within the grace period (plus a second for the process to exit), exit code 0; or 1
	// when the grace ran out first with nothing left but Graph commands held up by the slow,
	// throttling Graph (a transfer answered 504 after 3 s and the read of the call behind it can
	// outlast a 5 s grace), which the instance said: what it left is for the others, and the
	// checks above found it done. Anything else left (a loop that did not stop, a
	// request still in flight, the reconciler's lease), or any exit 1 with Graph answering in
	// 100 ms, is a shutdown that does not finish its own work, not Graph's slowness.
	var durs []time.Duration
	for _, s := range stops {
		if s.killed {
			continue // it did not stop: it was stopped
		}
		d := s.exited.Sub(s.term)
		durs = append(durs, d)
		_, left, _ := strings.Cut(s.lastLog, "shutdown grace over with work unfinished ("+grace.String()+"): ")
		gaveUp := s.code == 1 && slowGraph && onlyGraphCommands.MatchString(left)
		if (s.code != 0 && !gaveUp) || d > grace+time.Second {
			t.Errorf("%s stopped in %s with exit code %d (grace %s): %s", s.name, d.Round(10*time.Millisecond), s.code, grace, s.lastLog)
		}
	}
	// Deliveries: none given up; 5xx and transport errors only while an instance was stopping.
	var given, non2xx, fivexx, outside int
	var windows []string
	var ws, we time.Time
	for _, d := range sim.Deliveries() {
		bad := d.Err != "" || d.Status >= 500
		if d.Status >= 300 || d.Err != "" {
			non2xx++
		}
		if (d.Err != "" || d.Status >= 500 || d.Status == 429) && d.Attempt == 4 || (d.Err == "" && d.Status >= 400 && d.Status < 500 && d.Status != 429) {
			given++
			t.Errorf("notification given up by Graph: call %s %s %s attempt %d status %d %s", d.CallID, d.ChangeType, d.State, d.Attempt, d.Status, d.Err)
		}
		if !bad {
			continue
		}
		fivexx++
		if !ws.IsZero() && d.Time.Sub(we) < time.Second {
			we = d.Time
		} else {
			if !ws.IsZero() {
				windows = append(windows, fmt.Sprintf("%s-%s", since(t0, ws), since(t0, we)))
			}
			ws, we = d.Time, d.Time
		}
		in := false
		for _, s := range stops {
			// a delivery posted up to a second before the SIGTERM may be in flight when it comes
			if d.Time.After(s.term.Add(-time.Second)) && d.Time.Before(s.exited.Add(time.Second)) {
				in = true
			}
		}
		if !in {
			outside++
			t.Errorf("delivery answered %d %s at t=%s outside every shutdown window: call %s %s %s attempt %d",
				d.Status, d.Err, since(t0, d.Time), d.CallID, d.ChangeType, d.State, d.Attempt)
		}
	}
	if !ws.IsZero() {
		windows = append(windows, fmt.Sprintf("%s-%s", since(t0, ws), since(t0, we)))
	}
	var last time.Time
	for _, c := range callers {
		if e := c.call.Result().EndedAt; e.After(last) {
			last = e
		}
	}
	errs := 0
	for _, p := range all {
		errs += countLines(p.logPath, `"level":"error"`)
	}
	sort.Slice(durs, func(i, j int) bool { return durs[i] < durs[j] })
	t.Logf("summary: %d calls at %s/s for %s, outcomes [%s]; last call ended %s after the last was placed; "+
		"records at the end [%s], settled %s after the calls ended; leftovers %v (and %d timers of ended calls a crash left); %d instances stopped, stop times %v (grace %s); "+
		"deliveries %d (non-2xx %d, 5xx or transport errors %d in windows %v, %d outside a shutdown, given up %d); "+
		"agents offered %d, accepted %d; callers whose key press found no tone subscription %d; error log lines %d; graph faults injected %d",
		calls, rate, duration, fmtCounts(counts), last.Sub(placedAll).Round(100*time.Millisecond),
		fmtCounts(settled), settleTook.Round(100*time.Millisecond), left, orphans, len(stops), roundAll(durs), grace,
		len(sim.Deliveries()), non2xx, fivexx, windows, outside, given, offered, accepted, deaf, errs, len(sim.Injected()))
	if errs := lb.errors(); len(errs) > 0 {
		t.Logf("balancer errors (502 to Graph): %v", errs)
	}
	if t.Failed() {
		for _, p := range all {
			t.Logf("%s warnings and errors:\n%s", p.name, strings.Join(lastN(grep(p.logPath, `"level":"warn"`, `"level":"error"`), 20), "\n"))
		}
	}
	skipKnown(t, known, calls)
}

func roundAll(ds []time.Duration) []string {
	out := make([]string, len(ds))
	for i, d := range ds {
		out[i] = d.Round(10 * time.Millisecond).String()
	}
	return out
}

// leftovers counts what callbot keeps for live calls: outbox index, timers, queued callers and
// reserved agents.
func leftovers(rdb redis.UniversalClient) map[string]int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	out := map[string]int64{}
	out[keyPrefix+":{outbox}"], _ = rdb.ZCard(ctx, keyPrefix+":{outbox}").Result()
	out[keyPrefix+":{timers}"], _ = rdb.ZCard(ctx, keyPrefix+":{timers}").Result()
	out[keyPrefix+":{active}"], _ = rdb.ZCard(ctx, keyPrefix+":{active}").Result()
	for _, q := range []string{"sales", "support"} {
		k := keyPrefix + ":{tenant:" + tenantID + "}:queue:" + q
		out[k], _ = rdb.ZCard(ctx, k).Result()
	}
	busy := keyPrefix + ":{tenant:" + tenantID + "}:busy"
	out[busy], _ = rdb.HLen(ctx, busy).Result()
	return out
}

// endedCallTimers counts the timers in the set whose call's record has ended (or is gone).
func endedCallTimers(t *testing.T, rdb redis.UniversalClient) int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	members, err := rdb.ZRange(ctx, keyPrefix+":{timers}", 0, -1).Result()
	if err != nil {
		t.Logf("timers: %v", err)
		return 0
	}
	store := callstate.NewStore(rdb, keyPrefix)
	var n int64
	for _, m := range members {
		p := strings.Split(m, "|") // tenant|call|kind|token
		if len(p) != 4 {
			continue
		}
		c, err := store.Get(ctx, p[1])
		if errors.Is(err, callstate.ErrNotFound) || err == nil && c.State.Terminal() {
			n++
		}
	}
	return n
}

// sample returns a few members of a leftover key, for the failure message.
func sample(rdb redis.UniversalClient, k string) []string {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if strings.HasSuffix(k, ":busy") {
		m, _ := rdb.HGetAll(ctx, k).Result()
		var out []string
		for a, c := range m {
			out = append(out, a+"="+c)
		}
		return lastN(out, 5)
	}
	zs, _ := rdb.ZRangeWithScores(ctx, k, 0, 4).Result()
	var out []string
	for _, z := range zs {
		out = append(out, fmt.Sprintf("%v@%.0f", z.Member, z.Score))
	}
	return out
}

// rollingAgents writes the rolling-deploy flow for perSec calls a second and returns it, its
// agents' ids and their graphsim specs. Enough agents for the queues not to grow without bound:
// about 3 s an agent per call (the transfer, 1 s of talk, presence catching up), 70 % of
// callers queue. One agent in ten lets calls ring out (the caller back to the queue head).
func rollingAgents(t *testing.T, perSec float64) (flowPath string, ids []string, specs []graphsim.AgentSpec) {
	nAgents := max(8, int(perSec*3))
	nSales := nAgents * 3 / 4
	flowPath, ids = rollingFlow(t, nSales, nAgents-nSales)
	for i, id := range ids {
		answer := graphsim.AgentAccept
		if i%10 == 3 {
			answer = graphsim.AgentNoAnswer
		}
		specs = append(specs, graphsim.AgentSpec{ID: id, DisplayName: fmt.Sprintf("Agent %d", i+1),
			Availability: "Available", Activity: "Available", Answer: answer, TalkTime: time.Second})
	}
	return flowPath, ids, specs
}

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/graph/msgraph"
	"github.com/callbot/callbot/internal/ivr"
)

// Identities of the demo's app registration; the simulator accepts exactly these.
const (
	demoTenant  = "7a3c1e52-0d4b-4c1a-9d8e-2f6b5a4c3d21"
	demoClient  = "0efc74f7-41c3-47a4-8775-7259bfef4241"
	demoSecret  = "demo-secret-not-for-production"
	demoAccount = "7629bdce-046c-4903-86b4-a8f718277e1a" // the resource account callers dial
)

type demoOptions struct {
	flowFile string
	calls    int
	spacing  time.Duration
	seed     uint64
	verbose  bool
	timeout  time.Duration
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o demoOptions
	fs.StringVar(&o.flowFile, "flow", "deployments/examples/flow.yaml", "flow file")
	fs.IntVar(&o.calls, "calls", 36, "number of simulated calls")
	fs.DurationVar(&o.spacing, "every", 300*time.Millisecond, "time between two new calls")
	fs.Uint64Var(&o.seed, "seed", 1, "seed of the callers' choices")
	fs.BoolVar(&o.verbose, "v", false, "log callbot's own lines to stderr")
	fs.DurationVar(&o.timeout, "timeout", 2*time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	return demo(ctx, o, stdout, stderr)
}

// demoWorld is callbot wired to its simulator and an embedded Redis.
type demoWorld struct {
	sim   *graphsim.Sim
	redis *miniredis.Miniredis
	rdb   *redis.Client
	bot   *bot
	flow  *ivr.Flow
	ln    net.Listener
	dir   string

	mu       sync.Mutex
	outcomes map[string]int // callbot's own view of how calls ended
}

func startDemoWorld(ctx context.Context, flowFile string, log *zap.Logger, simOpts graphsim.Options) (*demoWorld, error) {
	flow, err := ivr.Load(flowFile)
	if err != nil {
		return nil, fmt.Errorf("load flow (run from the repository root, or pass -flow): %w", err)
	}
	w := &demoWorld{flow: flow, outcomes: map[string]int{}}
	ok := false
	defer func() {
		if !ok {
			w.close()
		}
	}()
	if w.dir, err = os.MkdirTemp("", "callbot-demo-"); err != nil {
		return nil, err
	}
	if w.redis, err = miniredis.Run(); err != nil {
		return nil, fmt.Errorf("embedded redis: %w", err)
	}
	w.rdb = redis.NewClient(&redis.Options{Addr: w.redis.Addr()})
	if w.ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		return nil, err
	}
	botURL := "http://" + w.ln.Addr().String()
	simOpts.TenantID, simOpts.ClientID, simOpts.ClientSecret = demoTenant, demoClient, demoSecret
	simOpts.WebhookURL = botURL + "/api/calls"
	simOpts.Logger = log.Named("graphsim")
	if w.sim, err = graphsim.New(simOpts); err != nil {
		return nil, fmt.Errorf("graph simulator: %w", err)
	}
	caFile := filepath.Join(w.dir, "graphsim-ca.pem")
	if err := w.sim.WriteCAFile(caFile); err != nil {
		return nil, err
	}
	gc, err := msgraph.New(msgraph.Config{TenantID: demoTenant, ClientID: demoClient, ClientSecret: demoSecret,
		AuthorityHost: w.sim.AuthorityHost(), GraphURL: w.sim.GraphURL(), CAFile: caFile, Logger: log.Named("graph")})
	if err != nil {
		return nil, err
	}
	verifier, err := graph.NewVerifier(graph.VerifierConfig{OpenIDConfigURL: w.sim.OpenIDConfigURL(), Audience: demoClient,
		Issuers: []string{graphsim.DefaultIssuer}, AllowedTenants: []string{demoTenant}, HTTPClient: w.sim.Client()})
	if err != nil {
		return nil, err
	}
	w.bot, err = newBot(ctx, botDeps{Redis: w.rdb, KeyPrefix: "cb", Graph: gc, Auth: verifier, Flow: flow, TenantID: demoTenant,
		CallbackURI: botURL + "/api/calls", PresenceEvery: 500 * time.Millisecond, PresenceMaxAge: 30 * time.Second,
		FailCooldown: 2 * time.Second, ConnectedGuard: time.Second, Log: log.Named("callbot"),
		OnEnd: func(c callstate.Call) {
			w.mu.Lock()
			w.outcomes[c.Outcome]++
			w.mu.Unlock()
		}})
	if err != nil {
		return nil, err
	}
	ok = true
	return w, nil
}

func (w *demoWorld) close() {
	if w.sim != nil {
		w.sim.Close()
	}
	if w.rdb != nil {
		w.rdb.Close()
	}
	if w.redis != nil {
		w.redis.Close()
	}
	if w.dir != "" {
		os.RemoveAll(w.dir)
	}
}

func demo(ctx context.Context, o demoOptions, stdout, stderr io.Writer) error {
	log := zap.NewNop()
	if o.verbose {
		log = newLogger(stderr, "info")
	}
	w, err := startDemoWorld(ctx, o.flowFile, log, graphsim.Options{PromptDuration: 400 * time.Millisecond, RingTimeout: 3 * time.Second})
	if err != nil {
		return err
	}
	defer w.close()

	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	serveCtx, stopServe := context.WithCancel(context.WithoutCancel(ctx))
	served := make(chan error, 1)
	go func() { served <- w.bot.serve(serveCtx, w.ln, 5*time.Second) }()
	defer func() { stopServe(); <-served }()

	agents := w.flow.Agents()
	names := map[string]string{}
	for i, a := range agents {
		names[a] = fmt.Sprintf("Agent %d", i+1)
		spec := graphsim.AgentSpec{ID: a, DisplayName: names[a], Availability: "Available", Activity: "Available", TalkTime: 4 * time.Second}
		switch i {
		case 1:
			spec.Answer = graphsim.AgentDecline // declines every call: its callers go back to the head of the queue
			names[a] += " (declines)"
		case 2:
			spec.Availability, spec.Activity = "Away", "Away" // comes back after a while
			names[a] += " (back from a break at 6s)"
		}
		w.sim.AddAgent(spec)
	}
	if len(agents) > 3 {
		w.after(ctx, 6*time.Second, func() { w.sim.SetPresence(agents[2], "Available", "Available") })
		w.after(ctx, 8*time.Second, func() { w.sim.SetPresence(agents[3], "DoNotDisturb", "Presenting") })
		names[agents[3]] += " (presenting from 8s)"
	}

	fmt.Fprintf(stdout, "callbot demo: flow %q, %d agents, %d simulated callers dialling the resource account\n", w.flow.Name, len(agents), o.calls)
	fmt.Fprintf(stdout, "Graph simulator at %s, callbot at http://%s, embedded Redis at %s\n\n", w.sim.URL(), w.ln.Addr(), w.redis.Addr())

	rng := rand.New(rand.NewPCG(o.seed, 7))
	kinds := map[string]int{}
	var calls []*graphsim.Call
	start := time.Now()
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	next := time.NewTimer(0)
	defer next.Stop()
	placed := 0
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("demo stopped before every call ended: %w", ctx.Err())
		case <-next.C:
			spec, kind := demoCaller(rng, placed)
			kinds[kind]++
			c, err := w.sim.PlaceCall(ctx, spec)
			if err != nil {
				return fmt.Errorf("place call: %w", err)
			}
			calls = append(calls, c)
			placed++
			if placed < o.calls {
				next.Reset(o.spacing)
			}
		case <-tick.C:
			w.progress(ctx, stdout, start, calls)
		}
		if placed == o.calls && allDone(calls) {
			break
		}
	}
	w.progress(ctx, stdout, start, calls)
	return w.summary(stdout, calls, kinds, names, time.Since(start))
}

func (w *demoWorld) after(ctx context.Context, d time.Duration, f func()) {
	go func() {
		select {
		case <-ctx.Done():
		case <-time.After(d):
			f()
		}
	}()
}

// demoCaller picks what caller number i does: most choose a queue, some make a typo first, some
// hang up while waiting, a few leave through the menu.
func demoCaller(rng *rand.Rand, i int) (graphsim.CallerSpec, string) {
	spec := graphsim.CallerSpec{
		From:       graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+1425555%04d", 100+i)},
		To:         demoAccount,
		DigitDelay: 300 * time.Millisecond,
	}
	switch p := rng.IntN(100); {
	case p < 45:
		spec.Digits = "1"
		return spec, "chose sales"
	case p < 78:
		spec.Digits = "2"
		return spec, "chose support"
	case p < 86:
		spec.Digits = "72" // an invalid key, then support
		return spec, "pressed an invalid key first"
	case p < 92:
		spec.Digits = "9"
		return spec, "chose to leave (goodbye)"
	default:
		spec.Digits = "1"
		spec.HangUpAfter = 3 * time.Second
		return spec, "hung up after 3s"
	}
}

func allDone(calls []*graphsim.Call) bool {
	for _, c := range calls {
		select {
		case <-c.Done():
		default:
			return false
		}
	}
	return true
}

func (w *demoWorld) progress(ctx context.Context, out io.Writer, start time.Time, calls []*graphsim.Call) {
	var answered, withAgent, ended int
	for _, c := range calls {
		r := c.Result()
		if r.Answered {
			answered++
		}
		if r.Agent != "" {
			withAgent++
		}
		if r.Outcome != "" {
			ended++
		}
	}
	var waiting []string
	ids := make([]string, 0, len(w.flow.Queues))
	for id := range w.flow.Queues {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		n, _ := w.bot.queues.Waiting(ctx, demoTenant, id)
		waiting = append(waiting, fmt.Sprintf("%s %d", id, len(n)))
	}
	fmt.Fprintf(out, "%5.1fs  placed %2d  answered %2d  waiting [%s]  with an agent %2d  ended %2d\n",
		time.Since(start).Seconds(), len(calls), answered, strings.Join(waiting, ", "), withAgent, ended)
}

func (w *demoWorld) summary(out io.Writer, calls []*graphsim.Call, kinds map[string]int, names map[string]string, took time.Duration) error {
	outcomes := map[string]int{}
	var answered, reattempts int
	var waits []time.Duration
	for _, c := range calls {
		r := c.Result()
		if r.Answered {
			answered++
		}
		if n := len(r.TransferAttempts) + len(r.Invites); n > 1 {
			reattempts += n - 1
		}
		if r.Agent == "" {
			outcomes[r.Outcome]++
			continue
		}
		outcomes["agent"]++ // by transfer, or invited into the call (conference hand-off)
		waits = append(waits, r.ConnectedAt.Sub(r.AnsweredAt))
	}
	pct := func(n int) string { return fmt.Sprintf("%d (%d%%)", n, n*100/max(len(calls), 1)) }
	fmt.Fprintf(out, "\n=== callbot demo summary (%s) ===\n", took.Round(100*time.Millisecond))
	fmt.Fprintf(out, "what the %d callers did:\n", len(calls))
	for _, k := range slices.Sorted(maps.Keys(kinds)) {
		fmt.Fprintf(out, "  %-32s %d\n", k, kinds[k])
	}
	fmt.Fprintf(out, "what they experienced:\n")
	fmt.Fprintf(out, "  %-32s %s\n", "answered", pct(answered))
	fmt.Fprintf(out, "  %-32s %s\n", "reached an agent", pct(outcomes["agent"]))
	fmt.Fprintf(out, "  %-32s %s\n", "hung up before an agent", pct(outcomes[graphsim.OutcomeCallerHangUp]))
	fmt.Fprintf(out, "  %-32s %s\n", "said goodbye to by the menu", pct(outcomes[graphsim.OutcomeBotHangUp]))
	for _, k := range slices.Sorted(maps.Keys(outcomes)) {
		if k != "agent" && k != graphsim.OutcomeCallerHangUp && k != graphsim.OutcomeBotHangUp {
			fmt.Fprintf(out, "  %-32s %s\n", "other: "+k, pct(outcomes[k]))
		}
	}
	fmt.Fprintf(out, "  %-32s %d\n", "offers declined, caller requeued", reattempts)
	if len(waits) > 0 {
		slices.Sort(waits)
		q := func(p float64) time.Duration { return waits[int(p*float64(len(waits)-1))].Round(10 * time.Millisecond) }
		fmt.Fprintf(out, "time from answer to agent:          p50 %s  p90 %s  max %s\n", q(0.5), q(0.9), q(1))
	}
	fmt.Fprintf(out, "agents:\n")
	var problems []string
	for _, a := range w.flow.Agents() {
		st := w.sim.AgentStats(a)
		fmt.Fprintf(out, "  %-40s offered %2d  accepted %2d  declined %2d  most at once %d\n", names[a], st.Offered, st.Accepted, st.Declined, st.MaxConcurrentOffers)
		if st.MaxConcurrentOffers > 1 {
			problems = append(problems, fmt.Sprintf("%s was offered %d calls at once", names[a], st.MaxConcurrentOffers))
		}
	}
	w.mu.Lock()
	fmt.Fprintf(out, "callbot's own record of how calls ended: %v\n", w.outcomes)
	w.mu.Unlock()
	if answered != len(calls) {
		problems = append(problems, fmt.Sprintf("%d callers were not answered", len(calls)-answered))
	}
	if len(problems) > 0 {
		return errors.New("demo: " + strings.Join(problems, "; "))
	}
	fmt.Fprintln(out, "every caller was answered; no agent was offered two callers at once.")
	return nil
}

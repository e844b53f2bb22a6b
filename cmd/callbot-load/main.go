// Command callbot-load measures callbot under load (issue #3, "Performance").
//
// It runs the real program, `callbot serve`, as a subprocess configured from the environment
// as in production, against a redis-server it starts on a free port (no persistence) and
// against graphsim running inside this process with fast timings and many always-available
// agents. Simulated callers dial at a target rate and press 1 for a queue; the tool reports
// notifications/s, webhook latency (per POST to the bot), incoming->answer latency, Redis
// commands per notification, CPU per notification of each process, and, in the same run, the
// throughput of a no-op webhook driven with the same notification bodies and the same client
// concurrency. With -hold N it keeps N calls waiting in a queue instead and reports Redis
// memory and the callbot process RSS per live call.
//
//	go run ./cmd/callbot-load                           # 200 calls/s for 20 s
//	go run ./cmd/callbot-load -rate 400 -duration 30s -json
//	go run ./cmd/callbot-load -rate 0 -concurrency 200  # closed loop: as fast as it goes
//	go run ./cmd/callbot-load -hold 10000               # memory per live call
//
// It stops by itself, and stops its subprocesses on exit and on Ctrl-C. Timings are reported,
// never asserted: docs/performance.md records what they were on the reference machine.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	// The no-op baseline server runs as a second copy of this program, so that it is a process
	// of its own, like callbot.
	if addr := os.Getenv(noopEnv); addr != "" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := serveNoop(ctx, addr, os.Stdout)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "callbot-load noop:", err)
			os.Exit(1)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "callbot-load:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

// options are the command-line settings.
type options struct {
	callbot     string
	redisServer string
	rate        float64
	duration    time.Duration
	concurrency int
	agents      int
	talk        time.Duration
	prompt      time.Duration
	holdPrompt  time.Duration
	step        time.Duration
	digitDelay  time.Duration
	graphLat    time.Duration
	presence    time.Duration
	drain       time.Duration
	warmup      int
	baseline    time.Duration
	hold        int
	redisProxy  bool
	logLevel    string
	jsonOut     bool
	keep        bool
	quiet       bool
	pin         bool
	cpuprofile  string
	leaks       time.Duration
	reconcile   time.Duration
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	fs := flag.NewFlagSet("callbot-load", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o options
	fs.StringVar(&o.callbot, "callbot", "", "callbot binary to run; default: go build ./cmd/callbot into a temporary directory")
	fs.StringVar(&o.redisServer, "redis-server", "redis-server", "redis-server binary (started on a free port, never a shared one)")
	fs.Float64Var(&o.rate, "rate", 200, "new calls per second; 0 = closed loop: keep -concurrency calls alive, as fast as they go")
	fs.DurationVar(&o.duration, "duration", defaultDuration, "how long new calls are placed (Redis counts per notification at steady state need 15s or more)")
	fs.IntVar(&o.concurrency, "concurrency", 5000, "most calls alive at once (placing waits beyond it)")
	fs.IntVar(&o.agents, "agents", 0, "agents in the queue, always available; 0 = max(200, 3 x rate)")
	fs.DurationVar(&o.talk, "talk", time.Second, "how long an agent talks (is Busy) after taking a call")
	fs.DurationVar(&o.prompt, "prompt", 5*time.Millisecond, "graphsim: how long each prompt plays")
	fs.DurationVar(&o.holdPrompt, "hold-prompt", time.Minute, "graphsim: how long the queue's hold music plays before callbot starts it again; 0 = as -prompt")
	fs.DurationVar(&o.step, "step", time.Millisecond, "graphsim: delay between a call's state notifications")
	fs.DurationVar(&o.graphLat, "graph-latency", 0, "graphsim: answer every request (call actions, presence, token, signing-key metadata) this much later, as a real Graph does (tens to hundreds of ms)")
	fs.DurationVar(&o.digitDelay, "digit-delay", 5*time.Millisecond, "callers press 1 this long after the first prompt starts")
	fs.DurationVar(&o.presence, "presence", 500*time.Millisecond, "CALLBOT_PRESENCE_INTERVAL")
	fs.DurationVar(&o.drain, "drain", 30*time.Second, "after the last call is placed, wait at most this long for calls to end")
	fs.IntVar(&o.warmup, "warmup", 10, "calls placed and finished before measuring (token fetch, connections, script load)")
	fs.DurationVar(&o.baseline, "baseline", 5*time.Second, "how long the no-op webhook is driven; 0 = no baseline")
	fs.IntVar(&o.hold, "hold", 0, "memory mode: keep N calls waiting in the queue (agents away) and report memory per live call")
	fs.BoolVar(&o.redisProxy, "redis-proxy", false, "count the commands callbot sends through a counting proxy (adds a hop to every Redis round trip)")
	fs.StringVar(&o.logLevel, "log-level", "info", "CALLBOT_LOG_LEVEL of the callbot subprocess")
	fs.BoolVar(&o.jsonOut, "json", false, "print the report as JSON")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary directory (callbot and redis logs, flow file)")
	fs.BoolVar(&o.quiet, "q", false, "no progress lines on stderr")
	fs.StringVar(&o.cpuprofile, "cpuprofile", "", "write a CPU profile of the callbot subprocess during the run to this file (builds callbot with net/http/pprof added through go build -overlay; not with -callbot)")
	fs.DurationVar(&o.leaks, "leaks", 0, "after the calls ended, wait this long (more than the 8 s outbox lease: 15s) and report what the run left in Redis and in callbot (keys by pattern, goroutines, heap, RSS, fds per 1,000 calls); 0 = off")
	fs.DurationVar(&o.reconcile, "reconcile", 0, "with -hold: CALLBOT_RECONCILE_INTERVAL (10s to 10m); once the calls are held, wait for a pass of the reconciler over all of them and report how long it took (calls older than a minute are checked: the wait lasts until they are); 0 = off")
	fs.BoolVar(&o.pin, "pin", true, "with 2+ CPUs: this tool (graphsim, callers) on the first half of the CPUs; callbot, redis-server and the no-op server on the rest")
	if err := fs.Parse(args); err != nil {
		return o, fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	switch {
	case o.rate < 0:
		return o, fmt.Errorf("%w: -rate must be >= 0", errUsage)
	case o.duration <= 0 || o.duration > 24*time.Hour:
		return o, fmt.Errorf("%w: -duration must be positive and at most 24h", errUsage)
	case o.concurrency < 1:
		return o, fmt.Errorf("%w: -concurrency must be at least 1", errUsage)
	case o.hold < 0 || o.hold > 1_000_000:
		return o, fmt.Errorf("%w: -hold must be between 0 and 1000000", errUsage)
	case o.hold > 0 && o.rate == 0:
		return o, fmt.Errorf("%w: -hold places calls at -rate, which must be > 0", errUsage)
	case o.graphLat < 0 || o.graphLat > time.Minute:
		return o, fmt.Errorf("%w: -graph-latency must be between 0 and 1m", errUsage)
	case o.presence < 500*time.Millisecond:
		return o, fmt.Errorf("%w: -presence must be at least 500ms (callbot's minimum)", errUsage)
	case o.cpuprofile != "" && o.callbot != "":
		return o, fmt.Errorf("%w: -cpuprofile builds callbot itself; leave out -callbot", errUsage)
	case o.leaks < 0 || o.leaks > 0 && o.hold > 0:
		return o, fmt.Errorf("%w: -leaks must be >= 0, and is for rate runs (not -hold)", errUsage)
	case o.reconcile != 0 && (o.hold == 0 || o.reconcile < 10*time.Second || o.reconcile > 10*time.Minute):
		return o, fmt.Errorf("%w: -reconcile is for -hold runs, from 10s to 10m", errUsage)
	case o.agents < 0 || o.agents > 20000:
		return o, fmt.Errorf("%w: -agents must be between 0 and 20000", errUsage)
	}
	if o.agents == 0 {
		o.agents = max(200, int(3*o.rate))
		if o.rate == 0 {
			o.agents = max(200, 3*min(o.concurrency, 1000))
		}
		o.agents = min(o.agents, 20000)
	}
	return o, nil
}

// run parses the flags, measures and prints the report.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	progress := io.Writer(stderr)
	if o.quiet {
		progress = io.Discard
	}
	rep, err := measure(ctx, o, progress)
	if err != nil {
		return err
	}
	if o.jsonOut {
		return writeJSON(stdout, rep)
	}
	_, err = io.WriteString(stdout, rep.Text())
	return err
}

package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/callbot/callbot/internal/graph/graphsim"
)

// runGraphsim runs the Graph simulator on its own, for a real `callbot serve` (or any other
// bot) to talk to: `callbot graphsim`, then `callbot serve` with the environment it prints.
// Calls, agents and faults are driven through the control API under /_sim/ (docs/graphsim.md).
func runGraphsim(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("graphsim", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, "usage: callbot graphsim [flags]\n\n"+
			"Runs the Microsoft Graph simulator (Entra ID token endpoint, Graph calling and presence,\n"+
			"signed notifications, control API under /_sim/) until interrupted. See docs/graphsim.md.\n\nflags:\n")
		fs.PrintDefaults()
	}
	var (
		opts       graphsim.Options
		caOut      string
		envOut     string
		agentsFile string
		verbose    bool
	)
	fs.StringVar(&opts.Addr, "addr", "127.0.0.1:9443", "address to listen on; the control API has no authentication, keep it on loopback")
	fs.StringVar(&opts.Hostname, "hostname", "", "host name of the simulator's URLs and certificate (default: the host of -addr, or 127.0.0.1)")
	fs.StringVar(&opts.TenantID, "tenant", demoTenant, "tenant id of the simulated app registration")
	fs.StringVar(&opts.ClientID, "client-id", demoClient, "client id of the simulated app registration")
	fs.StringVar(&opts.ClientSecret, "client-secret", demoSecret, "client secret of the simulated app registration")
	fs.StringVar(&opts.WebhookURL, "webhook", "http://127.0.0.1:8080/api/calls", "the bot's calling webhook, where incoming calls are posted")
	fs.StringVar(&caOut, "ca-out", filepath.Join(os.TempDir(), "callbot-graphsim-ca.pem"), "file to write the simulator's CA certificate (PEM) to")
	fs.StringVar(&envOut, "env-out", "", "also write the bot's environment to this file (KEY=value lines)")
	fs.DurationVar(&opts.PromptDuration, "prompt-duration", time.Second, "how long each prompt plays")
	fs.DurationVar(&opts.RingTimeout, "ring-timeout", graphsim.DefaultRingTimeout, "how long an agent who does not answer rings")
	fs.DurationVar(&opts.StepDelay, "step-delay", graphsim.DefaultStepDelay, "delay between a call's state notifications")
	fs.StringVar(&agentsFile, "agents", "", "YAML or JSON list of agents: {id, displayName, availability, activity, answer, talkTime}")
	fs.Uint64Var(&opts.Seed, "seed", 0, "seed of the fault rules' random decisions (0: pick one and print it)")
	fs.BoolVar(&verbose, "v", false, "log every request and notification to stderr")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return nil
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		fs.Usage()
		return fmt.Errorf("%w: graphsim takes no arguments, got %q", errUsage, fs.Args())
	}
	var agents []graphsim.AgentSpec
	if agentsFile != "" {
		data, err := os.ReadFile(agentsFile)
		if err != nil {
			return fmt.Errorf("graphsim: %w", err)
		}
		if agents, err = graphsim.ParseAgents(data); err != nil {
			return fmt.Errorf("graphsim: %s: %w", agentsFile, err)
		}
	}
	level := "warn"
	if verbose {
		level = "debug"
	}
	log := newLogger(stderr, level)
	defer func() { _ = log.Sync() }()
	opts.Logger = log

	sim, err := graphsim.New(opts)
	if err != nil {
		return err
	}
	defer sim.Close()
	for _, a := range agents {
		sim.AddAgent(a)
	}
	if err := sim.WriteCAFile(caOut); err != nil {
		return err
	}
	env := sim.BotEnv(caOut)
	if envOut != "" {
		var b strings.Builder
		for _, e := range env {
			fmt.Fprintf(&b, "%s=%s\n", e.Name, e.Value)
		}
		if err := os.WriteFile(envOut, []byte(b.String()), 0o600); err != nil {
			return fmt.Errorf("graphsim: write env file: %w", err)
		}
	}

	fmt.Fprintf(stdout, "graphsim: Microsoft Graph simulator at %s (listening on %s, seed %d)\n", sim.URL(), sim.Addr(), sim.Seed())
	fmt.Fprintf(stdout, "  Graph            %s\n", sim.GraphURL())
	fmt.Fprintf(stdout, "  Entra ID         %s%s/oauth2/v2.0/token\n", sim.AuthorityHost(), opts.TenantID)
	fmt.Fprintf(stdout, "  callback keys    %s\n", sim.OpenIDConfigURL())
	fmt.Fprintf(stdout, "  control API      %s/_sim/  (no authentication)\n", sim.URL())
	fmt.Fprintf(stdout, "  incoming calls   posted to %s\n", opts.WebhookURL)
	fmt.Fprintf(stdout, "  CA certificate   %s\n", caOut)
	if len(agents) > 0 {
		fmt.Fprintf(stdout, "  agents           %d from %s\n", len(agents), agentsFile)
	}
	if !loopback(sim.Addr()) {
		fmt.Fprintf(stdout, "\nWARNING: %s is not a loopback address: anyone who can reach it can drive the simulator.\n", sim.Addr())
	}
	fmt.Fprintf(stdout, "\nEnvironment for `callbot serve` (redis and flow settings are yours to add):\n\n")
	for _, e := range env {
		fmt.Fprintf(stdout, "export %s=%s\n", e.Name, shellQuote(e.Value))
	}
	fmt.Fprintf(stdout, "\nPlace a call:\n\n  curl -sk -X POST %s/_sim/calls -d '{\"from\":{\"kind\":\"phone\",\"id\":\"+14255550100\"},\"digits\":\"1\"}'\n\n", sim.URL())
	fmt.Fprintln(stdout, "Running until interrupted.")

	<-ctx.Done()
	log.Info("graphsim stopping")
	return nil
}

// loopback reports whether a listen address is on loopback only.
func loopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return host == "localhost" || (ip != nil && ip.IsLoopback())
}

// shellQuote quotes a value for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if s != "" && strings.IndexFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_./:,@%+=", r))
	}) < 0 {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

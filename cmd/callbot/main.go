// Command callbot is an open-source contact center for Microsoft Teams: it answers calls to a
// Teams resource account through Microsoft Graph, runs an IVR menu, queues callers and hands
// them to agents chosen by Teams presence.
//
//	callbot serve           production mode, configured from the environment
//	callbot demo            callbot with its Graph simulator and embedded Redis, placing calls
//	callbot graphsim        the Graph simulator alone, for a real callbot to talk to
//	callbot validate FILE   check a flow file, printing every problem with its line
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "callbot:", err)
		if errors.Is(err, errUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

const usage = `usage: callbot <command> [arguments]

commands:
  serve            run callbot (configuration from CALLBOT_* environment variables)
  demo             run callbot against its built-in Graph simulator and embedded Redis
  graphsim         run the Graph simulator alone, with its control API (see docs/graphsim.md)
  validate FILE    check a flow file and print every error with its line
`

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return fmt.Errorf("%w: no command", errUsage)
	}
	switch args[0] {
	case "serve":
		return runServe(ctx, args[1:], getenv, stdout, stderr)
	case "demo":
		return runDemo(ctx, args[1:], stdout, stderr)
	case "graphsim":
		return runGraphsim(ctx, args[1:], stdout, stderr)
	case "validate":
		return runValidate(args[1:], stdout)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("%w: unknown command %q", errUsage, args[0])
}

package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/callbot/callbot/internal/ivr"
)

// errInvalidFlow is returned by validate for a flow with problems (already printed).
var errInvalidFlow = errors.New("flow is not valid")

func runValidate(args []string, stdout io.Writer) error {
	if len(args) != 1 {
		return fmt.Errorf("%w: validate takes one flow file", errUsage)
	}
	flow, err := ivr.Load(args[0])
	var verr *ivr.ValidationError
	if errors.As(err, &verr) {
		for _, p := range verr.Problems {
			fmt.Fprintln(stdout, p.String())
		}
		return fmt.Errorf("%s: %w (%d problems)", args[0], errInvalidFlow, len(verr.Problems))
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: ok (%d menus, %d queues, %d agents, %d prompts)\n", args[0], len(flow.Menus), len(flow.Queues), len(flow.Agents()), len(flow.Prompts))
	return nil
}

package callstate

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
)

// envWithout is the test environment after a flow change (a rolling restart with an edited
// flow) that took queue id out of the flow, with the menu option leading to it.
func envWithout(t *testing.T, queue string) Env {
	t.Helper()
	y := testFlowYAML
	switch queue {
	case "vip":
		y = strings.Replace(y, "      \"4\": {queue: vip}\n", "", 1)
		y = y[:strings.Index(y, "  vip:\n")]
	case "sales":
		y = strings.Replace(y, "      \"1\": {queue: sales}\n", "", 1)
		y = strings.Replace(y, "    fallback: {queue: sales}\n", "", 1)
		start := strings.Index(y, "  sales:\n")
		end := strings.Index(y, "  vip:\n")
		y = y[:start] + y[end:]
	}
	f, err := ivr.Parse([]byte(y), "new.yaml")
	if err != nil {
		t.Fatalf("new flow: %v\n%s", err, y)
	}
	if f.Queues[queue] != nil {
		t.Fatalf("new flow still has queue %s", queue)
	}
	env := testEnv(t)
	env.Flow = f
	env.FlowSince = env.Now // the instance started with the new flow after the caller queued
	return env
}

// backAtTheMenu checks that a caller whose queue the flow no longer has left it for the start
// menu, hearing its prompt and waited for: no dispatcher serves a queue no flow names, so a
// caller left there waited in silence (the hold music is the queue's, gone with it) until they
// hung up.
func backAtTheMenu(t *testing.T, what string, c Call, cmds []Command, queue string) {
	t.Helper()
	if c.State != StateInMenu || c.Menu != (ivr.Position{Menu: "main"}) || c.Queue != "" {
		t.Fatalf("%s: %s at %+v in queue %q (%v), want back at the start menu", what, c.State, c.Menu, c.Queue, kinds(cmds))
	}
	left := slices.IndexFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdLeaveQueue && cmd.Queue == queue })
	played := slices.IndexFunc(cmds, func(cmd Command) bool {
		return cmd.Kind == CmdPlayPrompt && slices.Equal(cmd.Prompts, []graph.MediaPrompt{prompt("menu")})
	})
	if left < 0 || played < 0 || c.Timers[TimerMenu] == 0 {
		t.Errorf("%s: %v, timers %v: want the queue left, the menu played and its timer armed", what, kinds(cmds), c.Timers)
	}
	if slices.ContainsFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdEnqueue || cmd.Kind == CmdHangup }) {
		t.Errorf("%s: %v: want neither a new enqueue in the queue gone nor a hang-up", what, kinds(cmds))
	}
}

// released checks the step after a hand-off failed for a caller whose queue the flow no longer
// has: the agent released, the caller not put back in that queue, and on their way to the menu
// (the hold timer's move: the table has no move from a hand-off to a menu).
func released(t *testing.T, what string, c Call, cmds []Command, agent string) {
	t.Helper()
	if !slices.ContainsFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdReleaseAgent && cmd.Agent == agent }) {
		t.Errorf("%s: %v, want the agent released", what, kinds(cmds))
	}
	if slices.ContainsFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdEnqueue }) || c.Timers[TimerHold] == 0 || c.Agent != "" {
		t.Errorf("%s: %v, timers %v, agent %q: want no enqueue in the queue gone, the hold timer armed", what, kinds(cmds), c.Timers, c.Agent)
	}
}

func TestCallerInAQueueTheFlowNoLongerHasGoesBackToTheMenu(t *testing.T) {
	old := testEnv(t)
	t.Run("hold music ends", func(t *testing.T) {
		c, _ := step(t, old, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1})
		if c.State != StateQueued || c.Queue != "vip" {
			t.Fatalf("%s %q", c.State, c.Queue)
		}
		c, cmds, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, envWithout(t, "vip"))
		if err != nil {
			t.Fatal(err)
		}
		backAtTheMenu(t, "hold music ended", c, cmds, "vip")
	})
	t.Run("hold retry", func(t *testing.T) {
		c, _ := step(t, old, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
		c, cmds, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: c.Timers[TimerHold]}, envWithout(t, "sales"))
		if err != nil {
			t.Fatal(err)
		}
		backAtTheMenu(t, "hold timer", c, cmds, "sales")
	})
	t.Run("max wait", func(t *testing.T) {
		c, _ := step(t, old, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
		c, cmds, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: c.Timers[TimerMaxWait]}, envWithout(t, "sales"))
		if err != nil {
			t.Fatal(err)
		}
		backAtTheMenu(t, "max wait", c, cmds, "sales")
	})
	t.Run("transfer to the agent fails", func(t *testing.T) {
		agent := "11111111-0000-4000-8000-000000000001"
		c, _ := step(t, old, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1},
			Event{Kind: EvAgentOffer, Agent: agent})
		env := envWithout(t, "sales")
		c, cmds, err := Decide(c, Event{Kind: EvTransferFailed, Verified: true}, env)
		if err != nil {
			t.Fatal(err)
		}
		released(t, "failed transfer", c, cmds, agent)
		c, cmds, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: c.Timers[TimerHold]}, env)
		if err != nil {
			t.Fatal(err)
		}
		backAtTheMenu(t, "failed transfer", c, cmds, "sales")
	})
	t.Run("invite fails", func(t *testing.T) {
		agent := "11111111-0000-4000-8000-000000000002"
		c, _ := step(t, old, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1},
			Event{Kind: EvAgentOffer, Agent: agent})
		env := envWithout(t, "vip")
		c, _, err := Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx, Failed: true}, env)
		if err != nil || c.RosterCtx == "" {
			t.Fatalf("invite failed: %s %v, want the roster read", c.State, err)
		}
		c, cmds, err := Decide(c, Event{Kind: EvRoster, ClientContext: c.RosterCtx, Participants: []string{"caller"}}, env)
		if err != nil {
			t.Fatal(err)
		}
		released(t, "failed invite", c, cmds, agent)
		c, cmds, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: c.Timers[TimerHold]}, env)
		if err != nil {
			t.Fatal(err)
		}
		backAtTheMenu(t, "failed invite", c, cmds, "vip")
	})
}

// In a rolling update that adds a queue, an instance not yet updated sees callers the updated
// ones put in it: the queue is not gone, it is a newer flow's. Such an instance leaves the caller
// where they are, a moment's silence and the hold timer (any instance may fire it, the updated
// ones play the music); it neither sends them to the menu nor hangs up at their max wait.
func TestCallerInAQueueOfANewerFlowStaysQueued(t *testing.T) {
	newer := testEnv(t)
	older := envWithout(t, "vip")
	older.FlowSince = newer.Now.Add(-time.Hour) // started long before the update, as an old instance did
	agent := "11111111-0000-4000-8000-000000000002"
	queued := func(t *testing.T) Call {
		c, _ := step(t, newer, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1})
		if c.State != StateQueued || c.Queue != "vip" {
			t.Fatalf("%s %q", c.State, c.Queue)
		}
		return c
	}
	stays := func(t *testing.T, what string, c Call, cmds []Command, queue string, timer TimerKind) {
		t.Helper()
		if c.State != StateQueued || c.Queue != queue || c.Timers[timer] == 0 {
			t.Fatalf("%s: %s in %q, timers %v (%v): want still queued in %s, the %s timer armed", what, c.State, c.Queue, c.Timers, kinds(cmds), queue, timer)
		}
		if slices.ContainsFunc(cmds, func(cmd Command) bool {
			return cmd.Kind == CmdLeaveQueue || cmd.Kind == CmdHangup || cmd.Kind == CmdPlayPrompt || cmd.Kind == CmdTransfer
		}) {
			t.Errorf("%s: %v: want the caller left where they are", what, kinds(cmds))
		}
	}
	t.Run("hold music ends", func(t *testing.T) {
		c := queued(t)
		c, cmds, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, older)
		if err != nil {
			t.Fatal(err)
		}
		stays(t, "hold music ended", c, cmds, "vip", TimerHold)
		// the hold timer, fired by an updated instance, plays the music again
		c, cmds, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerHold, TimerToken: c.Timers[TimerHold]}, newer)
		if err != nil || !slices.ContainsFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdPlayPrompt }) {
			t.Errorf("hold timer on an updated instance: %v %v, want the hold music", kinds(cmds), err)
		}
	})
	t.Run("max wait", func(t *testing.T) {
		c, _ := step(t, newer, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
		older := envWithout(t, "sales")
		older.FlowSince = newer.Now.Add(-time.Hour)
		c, cmds, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: c.Timers[TimerMaxWait]}, older)
		if err != nil {
			t.Fatal(err)
		}
		stays(t, "max wait", c, cmds, "sales", TimerMaxWait)
	})
	t.Run("transfer to the agent fails", func(t *testing.T) {
		c, _ := step(t, newer, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "4", Seq: 1},
			Event{Kind: EvAgentOffer, Agent: agent})
		c, _, err := Decide(c, Event{Kind: EvInviteDone, ClientContext: c.InviteCtx, Failed: true}, older)
		if err != nil {
			t.Fatal(err)
		}
		c, cmds, err := Decide(c, Event{Kind: EvRoster, ClientContext: c.RosterCtx, Participants: []string{"caller"}}, older)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdEnqueue && cmd.Queue == "vip" }) {
			t.Errorf("failed invite: %v, want the caller back in vip, which the updated instances serve", kinds(cmds))
		}
		stays(t, "failed invite", c, cmds, "vip", TimerHold)
	})
	t.Run("queued during the update, by an instance still on the old flow", func(t *testing.T) {
		// the queue was removed; an old instance queued the caller 5 minutes after this one started
		gone := envWithout(t, "vip")
		gone.FlowSince = newer.Now.Add(-5 * time.Minute)
		c := queued(t)
		c, cmds, err := Decide(c, Event{Kind: EvPromptDone, ClientContext: c.PromptCtx}, gone)
		if err != nil {
			t.Fatal(err)
		}
		backAtTheMenu(t, "queued during the update", c, cmds, "vip")
	})
}

// In a rolling update that adds queue sales (max wait 2 minutes), a caller the updated instances
// queued there is offered to an agent, and the transfer fails, the failure decided by an
// instance not yet updated. The caller goes back to sales, served by the updated instances, and
// keeps their max wait (its timer, armed when they joined): 2 minutes after they joined, the
// flow's on-timeout (a goodbye), where the max wait was dropped and they waited without end.
func TestFailedHandOffInAQueueOfANewerFlowKeepsTheMaxWait(t *testing.T) {
	newer := testEnv(t)
	older := envWithout(t, "sales")
	older.FlowSince = newer.Now.Add(-time.Hour)
	agent := "11111111-0000-4000-8000-000000000001"
	c, _ := step(t, newer, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1},
		Event{Kind: EvAgentOffer, Agent: agent})
	if c.State != StateTransferring || c.Queue != "sales" {
		t.Fatalf("%s in %q", c.State, c.Queue)
	}
	older.Now = newer.Now.Add(40 * time.Second)
	c, cmds, err := Decide(c, Event{Kind: EvTransferFailed, Verified: true}, older)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != StateQueued || !slices.ContainsFunc(cmds, func(cmd Command) bool { return cmd.Kind == CmdEnqueue && cmd.Queue == "sales" }) {
		t.Fatalf("failed transfer: %s %v, want back in sales", c.State, kinds(cmds))
	}
	if c.Timers[TimerMaxWait] == 0 {
		t.Fatalf("failed transfer: timers %v: the caller's max wait is gone", c.Timers)
	}
	// the max-wait timer, armed when the caller joined, fired by an updated instance
	at := func(d time.Duration) Env { e := newer; e.Now = newer.Now.Add(d); return e }
	c, cmds, err = Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: c.Timers[TimerMaxWait]}, at(2*time.Minute))
	if err != nil || c.State != StateTerminating {
		t.Errorf("max wait over: %s %v %v, want the queue's on-timeout (goodbye)", c.State, kinds(cmds), err)
	}
}

// A flow edited to lift a queue's max wait (and so its on-timeout, which needs one) must not hang
// up the callers who joined under the old limit: the max-wait timer armed then fires on an
// instance with the new flow, whose queue has no on-timeout, and the default was to disconnect.
func TestMaxWaitLiftedByAFlowChangeDoesNotHangUp(t *testing.T) {
	old := testEnv(t)
	c, _ := step(t, old, incoming, Event{Kind: EvEstablished}, Event{Kind: EvTone, Digit: "1", Seq: 1})
	if c.State != StateQueued || c.Timers[TimerMaxWait] == 0 {
		t.Fatalf("%s, timers %v: want queued in sales with its max wait armed", c.State, c.Timers)
	}
	f, err := ivr.Parse([]byte(strings.Replace(testFlowYAML, "    max-wait: 2m\n    on-timeout: {disconnect: bye}\n", "", 1)), "new.yaml")
	if err != nil || f.Queues["sales"].MaxWait != 0 {
		t.Fatalf("new flow: %v", err)
	}
	lifted := old
	lifted.Flow, lifted.FlowSince, lifted.Now = f, old.Now, old.Now.Add(2*time.Minute)
	c, cmds, err := Decide(c, Event{Kind: EvTimeout, Timer: TimerMaxWait, TimerToken: c.Timers[TimerMaxWait]}, lifted)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != StateQueued || c.Queue != "sales" || len(cmds) != 0 {
		t.Errorf("max wait fired after the flow lifted it: %s in %q, %v; want the caller left waiting", c.State, c.Queue, kinds(cmds))
	}
}

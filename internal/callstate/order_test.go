package callstate_test

import (
	"context"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// instantQueues is a QueueWriter whose dispatcher is as fast as can be: woken after the save that
// enqueued a caller (the after of Writes), it offers the caller to an agent before returning.
type instantQueues struct {
	fakeQueues
	m *callstate.Machine
}

func (q *instantQueues) Writes(ctx context.Context, tenant, callKey string, cmds []callstate.Command) (func(redis.Pipeliner), func()) {
	return func(redis.Pipeliner) {}, func() {
		for _, c := range cmds {
			if c.Kind == callstate.CmdEnqueue {
				if _, err := q.m.Offer(ctx, tenant, callKey, "agent-a"); err != nil {
					panic(err)
				}
			}
		}
	}
}

// A caller offered to an agent as soon as the dispatcher is woken for them: the Graph commands of
// joining the queue (silence the menu, start the hold music) go out before the transfer, not
// after it, when Graph would refuse them (the call is transferring, or gone).
func TestCommandsOfAQueueJoinPrecedeTheOffersTransfer(t *testing.T) {
	g := &fakeGraph{}
	q := &instantQueues{}
	m, _ := newMachine(t, g, q)
	q.m = m
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	in, _ := os.ReadFile("../graph/testdata/payloads/notification-incoming.json")
	notify(t, m, string(in))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	checkTransferLast(t, g.log()[3:])
}

// checkTransferLast: after the key press that queues the caller, the Graph commands are those of
// joining the queue, in order, or fewer of them (those not yet sent when the transfer was decided
// are moot: the transfer takes the caller's media), then the transfer, and nothing after it.
func checkTransferLast(t *testing.T, got []string) {
	t.Helper()
	join := []string{"cancelMediaProcessing", "playPrompt hold"}
	if len(got) == 0 || got[len(got)-1] != "transfer agent-a" {
		t.Fatalf("graph commands after the key press: %q, want the transfer last", got)
	}
	before := got[:len(got)-1]
	if len(before) > len(join) || !slices.Equal(before, join[:len(before)]) {
		t.Fatalf("graph commands after the key press: %q, want a prefix of %q before the transfer", got, join)
	}
}

// offerAfterSave is a go-redis hook that, once armed, offers the caller to an agent the moment
// the next write to Redis (the save that puts the caller in the queue) has been applied, before
// the machine that made it goes on: a dispatcher woken by another call, on this instance or
// another, that sees the caller in the queue at once.
type offerAfterSave struct {
	armed atomic.Bool
	offer func()
}

func (h *offerAfterSave) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *offerAfterSave) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		h.fire(err)
		return err
	}
}

func (h *offerAfterSave) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		h.fire(err)
		return err
	}
}

func (h *offerAfterSave) fire(err error) {
	if err == nil && h.armed.CompareAndSwap(true, false) {
		h.offer()
	}
}

// armingQueues arms the hook when a transition puts the caller in a queue.
type armingQueues struct {
	fakeQueues
	hook *offerAfterSave
}

func (q *armingQueues) Writes(ctx context.Context, tenant, callKey string, cmds []callstate.Command) (func(redis.Pipeliner), func()) {
	for _, c := range cmds {
		if c.Kind == callstate.CmdEnqueue {
			q.hook.armed.Store(true)
		}
	}
	return func(redis.Pipeliner) {}, nil
}

// newHookedMachine is a machine on a Redis client with an offerAfterSave hook, armed by the
// transitions that put a caller in a queue; the test sets the hook's offer.
func newHookedMachine(t *testing.T, g *fakeGraph) (*callstate.Machine, *offerAfterSave) {
	hook := &offerAfterSave{}
	rdb := redistest.Start(t).Client(t)
	rdb.AddHook(hook)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "test"), Timers: callstate.NewTimers(rdb, "test"),
		Control: g, Queues: &armingQueues{hook: hook}, Flow: flow, CallbackURI: "https://bot.test/api/calls",
		Log: zaptest.NewLogger(t), Now: time.Now})
	return m, hook
}

// The same race as above, but the dispatcher that offers the caller was not woken by this
// caller's key press: it saw the caller in the queue as soon as the save was applied, before the
// machine that saved it had queued the commands of joining the queue. Those kept their place
// ahead of the transfer (taken before the save), and being moot by the time they could go, they
// are not sent at all: no prompt reaches Graph after the transfer.
func TestCommandsOfAQueueJoinPrecedeAnOfferMadeRightAfterTheSave(t *testing.T) {
	g := &fakeGraph{}
	m, hook := newHookedMachine(t, g)
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	offered := false
	hook.offer = func() {
		ok, err := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-a")
		if err != nil {
			t.Errorf("offer: %v", err)
		}
		offered = ok
	}
	in, _ := os.ReadFile("../graph/testdata/payloads/notification-incoming.json")
	notify(t, m, string(in))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if !offered {
		t.Fatal("the offer made right after the save was refused")
	}
	// The transfer was decided before the commands of joining the queue could be sent: they
	// are moot, and only the transfer goes out.
	got := g.log()[3:]
	if diff := cmp.Diff(got, []string{"transfer agent-a"}); diff != "" {
		t.Fatalf("graph commands after the key press (-got +want):\n%s", diff)
	}
	if n := m.Superseded.Load(); n != 2 {
		t.Fatalf("Superseded = %d, want 2 (the menu's silencing and the hold music)", n)
	}
}

// What a transfer makes moot is only what was decided before it: when the transfer is refused,
// the caller goes back to the queue and hears the hold music again.
func TestHoldMusicAfterARefusedTransferIsNotMoot(t *testing.T) {
	g := &fakeGraph{fail: map[string]error{"transfer": &graph.Error{Op: "transfer", Status: 403}}}
	m, hook := newHookedMachine(t, g)
	id := "57dab8b1-894c-409a-b240-bd8beae78896"
	offers := 0
	hook.offer = func() {
		if offers++; offers > 1 {
			return // the dispatcher finds no agent the second time
		}
		if _, err := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-a"); err != nil {
			t.Errorf("offer: %v", err)
		}
	}
	in, _ := os.ReadFile("../graph/testdata/payloads/notification-incoming.json")
	notify(t, m, string(in))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	got := g.log()[3:]
	if diff := cmp.Diff(got, []string{"transfer agent-a", "playPrompt hold"}); diff != "" {
		t.Fatalf("graph commands after the key press (-got +want):\n%s", diff)
	}
	if offers != 2 {
		t.Fatalf("the caller joined the queue %d times, want 2 (again after the refused transfer)", offers)
	}
}

// recordingWriter is a QueueWriter whose piped writes are recorded as they go out, in the
// pipeline of the save, whether it wins its race or not.
type recordingWriter struct{ fakeQueues }

func (q *recordingWriter) Writes(ctx context.Context, tenant, callKey string, cmds []callstate.Command) (func(redis.Pipeliner), func()) {
	return func(redis.Pipeliner) {
		for _, c := range cmds {
			switch c.Kind {
			case callstate.CmdEnqueue:
				q.Enqueue(ctx, tenant, c.Queue, callKey, c.Score)
			case callstate.CmdLeaveQueue:
				q.Remove(ctx, tenant, c.Queue, callKey)
			case callstate.CmdReleaseAgent:
				q.Release(ctx, tenant, c.Agent, callKey, c.AgentOutcome, c.After)
			}
		}
	}, nil
}

// An agent's release decided on a stale cached copy must not go out with a save that loses its
// race: instance A offered the caller and caches the call transferring; instance B applies the
// transfer's acceptance (the agent talks to the caller now); the call's end reaches A, whose
// first decision, on its copy, takes the end for a caller who left while the agent rang and
// frees the agent at once. That save loses to B's, and A decides again (transferred: the agent
// held by the connected guard), but the first release had gone out in the pipeline: the agent
// was offered another caller 2 ms later, in the middle of the conversation (the rolling-deploy
// soak with a slow Graph, docs/chaos.md: an agent offered two calls at once).
func TestReleaseOfALostSaveIsNotSent(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	q := &recordingWriter{}
	a := instance(t, rdb, "rl", &fakeGraph{}, q, nil)
	b := instance(t, rdb, "rl", &fakeGraph{}, q, nil)
	id := "9d2c4b6a-1e3f-4a5b-8c7d-6e5f4a3b2c1d"
	key := graph.CallKey(id)
	queuedCall(t, a, id)
	if ok, err := a.Offer(context.Background(), "tenant-1", key, "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	a.Wait()
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferring"}`))
	notify(t, b, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"transferAccepted"}`))
	notify(t, a, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":200,"subcode":540000}}`))
	c, _ := callstate.NewStore(rdb, "rl").Get(context.Background(), key)
	var releases []string
	for _, op := range q.ops {
		if strings.HasPrefix(op, "release") {
			releases = append(releases, op)
		}
	}
	if c.Outcome != callstate.OutcomeTransferred || !slices.Equal(releases, []string{"release agent-a connected"}) {
		t.Errorf("outcome %s, releases %v; want transferred, the agent released once, as after a transfer", c.Outcome, releases)
	}
}

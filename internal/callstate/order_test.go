package callstate_test

import (
	"context"
	"os"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
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
	got := g.log()[3:]
	want := []string{"cancelMediaProcessing", "playPrompt hold", "transfer agent-a"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Fatalf("graph commands after the key press (-got +want):\n%s", diff)
	}
}

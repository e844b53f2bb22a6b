package callstate_test

import (
	"context"
	"slices"
	"testing"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// A command decided before an offer can reach Graph after the transfer took: callbot's leg of
// the call ends when the agent takes the caller, and Graph answers that command 404. The Redis
// Cluster failover soak (seed 44) had one instance start the caller's hold music again (a key
// press Redis had refused, applied late) while the other offered them; the hold music met the
// 404 and the call was ended as a caller who hung up, the agent freed at once, and offered the
// next caller 120 ms later while talking to the first: two calls at once. A 404 to a command
// other than the transfer, while the call is being transferred, now waits for the call's
// terminated notification, which says how it ended (or, lost, for the transfer's timer).
func TestCommandGoneDuringATransferWaitsForTheTerminatedNotification(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "test")
	q := &fakeQueues{}
	ga := &fakeGraph{}
	gb := &fakeGraph{block: make(chan struct{}), fail: map[string]error{"playPrompt": &graph.Error{Op: "playPrompt", Status: 404}}}
	a := instance(t, rdb, "test", ga, q, nil)
	b := instance(t, rdb, "test", gb, q, nil)
	id := "5c0ffee0-7d3c-4a43-9c51-0f6c3c9d9e01"
	key := graph.CallKey(id)
	queuedCall(t, a, id)
	c, err := store.Get(ctx, key)
	mustDo(t, err)
	// B starts the hold music again; its request is slow to reach Graph
	ns, err := graph.Decode([]byte(`{"value":[{"changeType":"deleted","resourceUrl":"/communications/calls/` + id + `/operations/o1","resourceData":{"@odata.type":"#microsoft.graph.playPromptOperation","status":"completed","clientContext":"` + c.PromptCtx + `"}}]}`))
	mustDo(t, err)
	mustDo(t, b.Notify(ctx, "tenant-1", ns))
	// meanwhile A offers the caller to agent-a, and the transfer takes
	if ok, err := a.Offer(ctx, "tenant-1", key, "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	a.Wait()
	close(gb.block) // B's hold music reaches Graph: 404, the bot's leg is gone
	b.Wait()
	if c, err := store.Get(ctx, key); err != nil || c.State != callstate.StateTransferring {
		t.Fatalf("after a 404 to the hold music during the transfer: %s %v, want still transferring (graph %v)", c.State, err, gb.log())
	}
	for _, op := range q.snapshot() {
		if len(op) > 7 && op[:7] == "release" {
			t.Errorf("agent released on a 404 to the hold music: %v; they have the caller", q.snapshot())
		}
	}
	// the terminated notification says the transfer took: the agent is released as after one
	notify(t, b, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":7015}}`))
	c, err = store.Get(ctx, key)
	if err != nil || c.State != callstate.StateTerminated || c.Outcome != callstate.OutcomeTransferred {
		t.Errorf("after the terminated notification: %s %q %v, want terminated, transferred", c.State, c.Outcome, err)
	}
	if ops := q.snapshot(); !slices.Contains(ops, "release agent-a connected") {
		t.Errorf("queue ops %v, want agent-a released as connected (guarded until presence is read again)", ops)
	}
}

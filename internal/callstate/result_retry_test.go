package callstate_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// A Graph command's result that Redis refuses for a moment (down, failing over: on Redis
// Cluster the call's master alone) is applied a moment later. Nothing else would bring it back:
// it is no notification that Graph delivers again after a 503. Before, it was logged and
// dropped: a refused transfer left the caller transferring, in silence and in no queue, and the
// agent reserved, until the transfer's timer, 90 s on (the Redis Cluster failover soak, a
// transfer failure read from Graph during the outage).
func TestCommandResultRedisRefusesIsAppliedAMomentLater(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	hook := &failSave{kind: string(callstate.TimerHold)}
	rdb.AddHook(hook)
	g := &fakeGraph{fail: map[string]error{"transfer": &graph.Error{Op: "transfer", Status: 403}}}
	q := &fakeQueues{}
	m := instance(t, rdb, "rr", g, q, nil)
	id := "0f4c2a9e-5b1d-4e7a-9c3f-8d2b6a1e4c70"
	queuedCall(t, m, id)
	// Graph refuses the transfer; the save of that result (the caller back in the queue, the hold
	// music and its timer) fails once, as with the call's master down
	hook.armed.Store(true)
	offeredToAgentA(t, m, id) // waits for the call's commands and what they fed back
	if hook.armed.Load() {
		t.Fatal("the save of the refused transfer's result never failed: the test proves nothing")
	}
	c, err := callstate.NewStore(srv.Client(t), "rr").Get(context.Background(), graph.CallKey(id))
	if err != nil {
		t.Fatal(err)
	}
	if c.State != callstate.StateQueued || !slices.Contains(q.snapshot(), "release agent-a failed") {
		t.Errorf("after the refused transfer: %s, queue ops %v; want the caller back in the queue and agent-a released as failed", c.State, q.snapshot())
	}
}

// A call's removal from the live calls goes behind the save that ended it and can fail alone
// (on Redis Cluster its master down while the call's served): the save's error has Graph deliver
// the notification again, and that delivery, ignored by the ended record, removes it. Before,
// the entry stayed until the reconciler's pass (the cluster failover soak, seed 7).
func TestEndedCallLeftInTheLiveSetLeavesItWhenItsEndComesAgain(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "lv", &fakeGraph{}, &fakeQueues{}, nil)
	store := callstate.NewStore(rdb, "lv")
	id := "3e8b1c52-7a4d-4f19-b6e0-c2d95a7f1e38"
	queuedCall(t, m, id)
	ended := note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`)
	notify(t, m, ended)
	m.Wait()
	ctx := context.Background()
	live := func() []string {
		t.Helper()
		keys, err := store.Live(ctx, time.Now().Add(time.Hour), 10)
		if err != nil {
			t.Fatal(err)
		}
		return keys
	}
	if keys := live(); len(keys) != 0 {
		t.Fatalf("live calls after the end: %v, want none", keys)
	}
	// as if the removal had failed behind the save that ended the call
	if err := rdb.ZAdd(ctx, "lv:{active}", redis.Z{Score: float64(time.Now().UnixMilli()), Member: graph.CallKey(id)}).Err(); err != nil {
		t.Fatal(err)
	}
	m2 := instance(t, rdb, "lv", &fakeGraph{}, &fakeQueues{}, nil) // another instance: no cached copy
	notify(t, m2, ended)
	m2.Wait()
	if keys := live(); len(keys) != 0 {
		t.Errorf("live calls after the end delivered again: %v, want none", keys)
	}
}

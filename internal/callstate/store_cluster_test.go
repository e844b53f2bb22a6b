package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// TestOnRedisCluster runs the call store and the timers on a real 3-master Redis Cluster.
func TestOnRedisCluster(t *testing.T) {
	cluster := redistest.StartCluster(t)
	var ids []string
	t.Run("Store", func(t *testing.T) { ids = testStoreOnCluster(t, cluster) })
	t.Run("Timers", func(t *testing.T) { testTimersOnCluster(t, cluster) })
	t.Run("OutboxIndexWhenAMasterCrashes", func(t *testing.T) { testOutboxIndexWhenAMasterCrashes(t, cluster, ids) })
}

// testStoreOnCluster: the store's scripts and pipelines work (no CROSSSLOT), and the hash tag
// {call:KEY} spreads the records of different calls over different slots and masters.
func testStoreOnCluster(t *testing.T, cluster *redistest.Cluster) (ids []string) {
	ctx := context.Background()
	rdb := cluster.Client(t)
	st := callstate.NewStore(rdb, "cb")
	now := time.Now()
	due := now.Add(-time.Second) // re-drivable at once

	const calls = 24
	slots, masters := map[int64]string{}, map[string]int{}
	for i := range calls {
		id := fmt.Sprintf("1a2b%04d-0c0d-4e0f-8a0b-%012d", i, i*7919)
		ids = append(ids, graph.CallKey(id))
		c := &callstate.Call{ID: id, Tenant: "t1", State: callstate.StateAnswering, CreatedAt: now, CmdSeq: 2,
			Outbox: []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdAnswer}},
				{Seq: 2, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdEnqueue, Queue: "sales"}}}}
		// createScript, pipelined with the outbox index and the set of live calls; the first
		// call on each master also takes the NOSCRIPT fallback
		if err := st.Create(ctx, c, due); err != nil {
			t.Fatalf("create %s: %v", id, err)
		}
		if err := st.Create(ctx, &callstate.Call{ID: id, Tenant: "t1"}, due); !errors.Is(err, callstate.ErrExists) {
			t.Fatalf("create %s again: %v, want ErrExists", id, err)
		}
		c.State = callstate.StateInMenu
		if err := st.Save(ctx, c, due); err != nil || c.Version != 2 { // saveScript, pipelined
			t.Fatalf("save %s: %v (version %d)", id, err, c.Version)
		}
		stale := *c
		stale.Version = 1
		if err := st.Save(ctx, &stale, time.Time{}); !errors.Is(err, callstate.ErrConflict) { // saveScript alone
			t.Fatalf("save %s with a stale version: %v, want ErrConflict", id, err)
		}
		if err := st.Ack(ctx, graph.CallKey(id), true, 1); err != nil { // ackScript
			t.Fatalf("ack %s: %v", id, err)
		}
		got, err := st.Get(ctx, graph.CallKey(id))
		if err != nil || got.State != callstate.StateInMenu || got.Version != 2 || len(got.Outbox) != 1 || got.Outbox[0].Seq != 2 {
			t.Fatalf("get %s: %+v %v; want version 2 in_menu with the unacknowledged enqueue only", id, got, err)
		}

		// the record is the documented key, on the master CLUSTER KEYSLOT names, and only the
		// tag is hashed
		key := "cb:{call:" + graph.CallKey(id) + "}"
		slot, addr, err := cluster.SlotOf(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if tagSlot, _, _ := cluster.SlotOf(ctx, "call:"+graph.CallKey(id)); tagSlot != slot {
			t.Errorf("slot of %s is %d, slot of its tag %d", key, slot, tagSlot)
		}
		if n, err := cluster.NodeClient(t, addr).Exists(ctx, key).Result(); err != nil || n != 1 {
			t.Fatalf("%s (slot %d) is not on master %s: %d %v", key, slot, addr, n, err)
		}
		if other, ok := slots[slot]; ok {
			t.Errorf("calls %s and %s share slot %d", other, id, slot)
		}
		slots[slot] = id
		masters[addr]++
	}
	if len(masters) != redistest.ClusterSize {
		t.Errorf("%d calls on %d masters %v, want all %d", calls, len(masters), masters, redistest.ClusterSize)
	}
	t.Logf("%d calls on %d slots; records per master %v", calls, len(slots), masters)

	// a save after the script caches were emptied (restart, failover) sends the script itself
	if err := rdb.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error { return m.ScriptFlush(ctx).Err() }); err != nil {
		t.Fatal(err)
	}
	c, err := st.Get(ctx, ids[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Save(ctx, &c, due); err != nil || c.Version != 3 {
		t.Fatalf("save after SCRIPT FLUSH: %v (version %d)", err, c.Version)
	}

	// the outbox index and the set of live calls: one key each, any instance claims from them
	keys, score, err := st.ClaimOutbox(ctx, now, time.Minute, 100) // claimOutboxScript
	if err != nil {
		t.Fatalf("claim outboxes: %v", err)
	}
	if !sameSet(keys, ids) {
		t.Errorf("claimed outboxes %v, want %v", keys, ids)
	}
	for _, k := range keys {
		if err := st.DoneOutbox(ctx, k, score); err != nil { // doneOutboxScript
			t.Fatalf("done outbox %s: %v", k, err)
		}
	}
	if keys, _, err := st.ClaimOutbox(ctx, now.Add(time.Hour), time.Minute, 100); err != nil || len(keys) != 0 {
		t.Errorf("outboxes left after done: %v %v", keys, err)
	}
	live, err := st.Live(ctx, now.Add(time.Second), 100)
	if err != nil || !sameSet(live, ids) {
		t.Errorf("live calls %v (%v), want %v", live, err, ids)
	}
	if err := st.Forget(ctx, ids[0]); err != nil {
		t.Fatal(err)
	}
	if live, _ := st.Live(ctx, now.Add(time.Second), 100); len(live) != calls-1 {
		t.Errorf("%d live calls after forgetting one, want %d", len(live), calls-1)
	}
	// the reconciler's sweep reads records of every master in one pipeline
	ended, err := st.Ended(ctx, append(slices.Clone(ids), "no-such-call"))
	if err != nil || slices.Contains(ended[:calls], true) || !ended[calls] {
		t.Errorf("ended %v (%v), want none but the call with no record", ended, err)
	}
	return ids
}

func sameSet(a, b []string) bool {
	return len(a) == len(b) && !slices.ContainsFunc(a, func(s string) bool { return !slices.Contains(b, s) })
}

// testTimersOnCluster: the claim script works; all timers share one key, cb:{timers}, hence
// one slot.
func testTimersOnCluster(t *testing.T, cluster *redistest.Cluster) {
	ctx := context.Background()
	tm := callstate.NewTimers(cluster.Client(t), "cb")
	now := time.Now()
	var want []string
	for i := range 5 {
		call := fmt.Sprintf("call%d", i)
		if err := tm.Set(ctx, "t1", call, callstate.TimerMenu, int64(i), now.Add(-time.Duration(5-i)*time.Millisecond)); err != nil {
			t.Fatal(err)
		}
		want = append(want, call)
	}
	if err := tm.Set(ctx, "t1", "later", callstate.TimerMaxWait, 1, now.Add(time.Hour)); err != nil {
		t.Fatal(err)
	}
	got, err := tm.Claim(ctx, now, time.Minute, 10) // claimScript
	if err != nil {
		t.Fatalf("claim: %v", err)
	}
	var calls []string
	for _, g := range got {
		calls = append(calls, g.Call)
	}
	if !slices.Equal(calls, want) {
		t.Errorf("claimed %v, want %v", calls, want)
	}
	if again, err := tm.Claim(ctx, now, time.Minute, 10); err != nil || len(again) != 0 {
		t.Errorf("claimed leased timers again: %v %v", again, err)
	}
	if err := tm.Done(ctx, got[0]); err != nil {
		t.Fatal(err)
	}
	if back, err := tm.Claim(ctx, now.Add(2*time.Minute), time.Minute, 10); err != nil || len(back) != len(want)-1 {
		t.Errorf("after the lease %d timers are due again (%v), want %d", len(back), err, len(want)-1)
	}
	if _, addr, err := cluster.SlotOf(ctx, "cb:{timers}"); err != nil {
		t.Fatal(err)
	} else if n, _ := cluster.NodeClient(t, addr).ZCard(ctx, "cb:{timers}").Result(); n != int64(len(want)) {
		t.Errorf("cb:{timers} on %s holds %d timers, want %d", addr, n, len(want))
	}
}

// testOutboxIndexWhenAMasterCrashes checks the promise of Store.Save: the outbox index entry
// is written before the record, so a saved outbox is never left without an index entry (it
// would never be re-driven). On a cluster cb:{outbox} and cb:{call:KEY} live on different
// masters; the pipeline's commands go to each master concurrently, and when the index master
// crashes the record is saved all the same. It kills a master: run it last.
func testOutboxIndexWhenAMasterCrashes(t *testing.T, cluster *redistest.Cluster, ids []string) {
	ctx := context.Background()
	st := callstate.NewStore(cluster.Client(t), "cb")
	_, indexAddr, err := cluster.SlotOf(ctx, "cb:{outbox}")
	if err != nil {
		t.Fatal(err)
	}
	var key, callAddr string
	for _, id := range ids {
		if _, a, _ := cluster.SlotOf(ctx, "cb:{call:"+id+"}"); a != indexAddr {
			key, callAddr = id, a
			break
		}
	}
	if key == "" {
		t.Fatalf("no call outside the master of cb:{outbox}")
	}
	c, err := st.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	before := c.Version
	c.CmdSeq++
	c.Outbox = append(c.Outbox, callstate.Pending{Seq: c.CmdSeq, Version: before + 1, Cmd: callstate.Command{Kind: callstate.CmdHangup}})
	cluster.StopNode(indexAddr)
	// quick: the other masters serve until the cluster notices the crash (2 s)
	sctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	saveErr := st.Save(sctx, &c, time.Now().Add(time.Minute))
	cancel()

	v, err := cluster.NodeClient(t, callAddr).HGet(ctx, "cb:{call:"+key+"}", "v").Int64()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("master of cb:{outbox} %s crashed; Save: %v; record version %d -> %d on %s", indexAddr, saveErr, before, v, callAddr)
	if saveErr == nil {
		t.Fatalf("Save succeeded while the master of cb:{outbox} was down")
	}
	if v != before {
		t.Errorf("cluster: store.go write(): record %s saved at version %d with an outbox but no index entry "+
			"(the pipeline sends ZADD cb:{outbox} and the save script to different masters concurrently)", key, v)
	}
}

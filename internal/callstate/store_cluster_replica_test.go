package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/queue"
	"github.com/callbot/callbot/internal/redistest"
)

// On Redis Cluster a save writes to up to three masters: the timers' and the outbox index's
// (ahead of the record) and its call's. With WaitForReplicas each of them is waited on: a
// save one of whose masters' replica does not confirm in time is refused (the notification
// behind it gets 503), whichever master it is, and one refused on a master of the entries ahead
// has not touched the record.
func TestClusterSaveWaitsForEveryMasterItWrites(t *testing.T) {
	const prefix = "crs"
	cluster, _, store := replicatedCluster(t, prefix)
	ctx := context.Background()
	timersAt, outboxAt := masterOf(t, cluster, prefix+":{timers}"), masterOf(t, cluster, prefix+":{outbox}")
	id := callOnAnotherMaster(t, cluster, prefix, timersAt, outboxAt)
	recordAt := masterOf(t, cluster, prefix+":{call:"+graph.CallKey(id)+"}")

	c := &callstate.Call{ID: id, Tenant: "t1", State: callstate.StateAnswering, CreatedAt: time.Now(), CmdSeq: 1,
		Outbox: []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdAnswer}}}}
	if err := store.Create(ctx, c, time.Now().Add(time.Minute)); err != nil {
		t.Fatalf("create with every replica in sync: %v", err)
	}
	token := int64(0)
	save := func() error {
		token++
		return store.SaveWith(ctx, c, callstate.Write{OutboxDue: time.Now().Add(time.Minute),
			Timers: []callstate.Timer{{Tenant: "t1", Call: graph.CallKey(id), Kind: callstate.TimerHold, Token: token, At: time.Now().Add(time.Minute)}}})
	}
	if err := save(); err != nil {
		t.Fatalf("save with every replica in sync: %v", err)
	}

	roles := map[string][]string{}
	roles[timersAt] = append(roles[timersAt], "timers")
	roles[outboxAt] = append(roles[outboxAt], "outbox index")
	roles[recordAt] = append(roles[recordAt], "record")
	for _, addr := range cluster.Addrs() {
		if len(roles[addr]) == 0 {
			continue // a master this save does not write to
		}
		t.Run(fmt.Sprint(roles[addr]), func(t *testing.T) {
			resume := cluster.CutReplica(t, addr)
			before := c.Version
			t0 := time.Now()
			err := save()
			waited := time.Since(t0)
			if !errors.Is(err, callstate.ErrNotReplicated) {
				t.Errorf("save with the replica of the %v master cut: %v, want ErrNotReplicated (503)", roles[addr], err)
			} else if waited < 200*time.Millisecond || waited > 2*time.Second {
				t.Errorf("the save waited %s, want about the 200ms asked for", waited)
			}
			got, gerr := store.Get(ctx, graph.CallKey(id))
			if gerr != nil {
				t.Fatal(gerr)
			}
			aheadThere := addr == timersAt || addr == outboxAt
			switch {
			case !aheadThere && got.Version != before+1:
				t.Errorf("record version %d on its master, want %d: the save applied, unreplicated", got.Version, before+1)
			case aheadThere && got.Version != before:
				t.Errorf("record version %d, want %d: the record was written before the entries ahead of it were replicated", got.Version, before)
			}
			c.Version = got.Version
			resume()
			waitFor(t, "a save once the replica is back", func() bool { return save() == nil })
		})
	}
}

// A save that disarms a timer (a key press in the menu: the no-input timer) removes it from the
// timer set, which lives on another master than the record, once the save is acknowledged. If
// the save is not on a replica of its master, a failover takes the record back to the menu and
// its timer while the removal, on the other master, stays: the caller waits for a timer that is
// gone and hears nothing until they press a key. The save must be refused instead (503: Graph
// delivers the key press again), its timer left armed, and nothing it disarmed removed; the key
// press delivered again is refused as long as the replica does not have it, and applied on the
// promoted master.
func TestClusterTimerRemovalFollowsTheSave(t *testing.T) {
	const prefix = "crt"
	cluster, rdb, store := replicatedCluster(t, prefix)
	ctx := context.Background()
	m := clusterMachine(t, rdb, store, prefix, &fakeQueues{}, 0)
	_, timersAt, err := cluster.SlotOf(ctx, prefix+":{timers}")
	if err != nil {
		t.Fatal(err)
	}
	id := callOnAnotherMaster(t, cluster, prefix, timersAt)
	key := graph.CallKey(id)
	_, recordAt, err := cluster.SlotOf(ctx, prefix+":{call:"+key+"}")
	if err != nil {
		t.Fatal(err)
	}
	answered(t, m, "tenant-1", id)
	inMenu, err := store.Get(ctx, key)
	if err != nil || inMenu.State != callstate.StateInMenu || inMenu.Timers[callstate.TimerMenu] == 0 {
		t.Fatalf("call %+v %v, want in the menu with its no-input timer", inMenu, err)
	}
	menuTimer := callstate.Timer{Tenant: "tenant-1", Call: key, Kind: callstate.TimerMenu, Token: inMenu.Timers[callstate.TimerMenu]}.Member()
	armed := func(member string) bool {
		t.Helper()
		_, err := rdb.ZScore(ctx, prefix+":{timers}", member).Result()
		if err != nil && !errors.Is(err, redis.Nil) {
			// not a timer gone: the timer set could not be read (CLUSTERDOWN from a master that
			// had not heard of the failover yet failed this test as a timer gone)
			t.Fatalf("read the timer set for %s: %v", member, err)
		}
		return err == nil
	}
	if !armed(menuTimer) {
		t.Fatalf("the menu's timer %s is not in the timer set", menuTimer)
	}

	resume := cluster.CutReplica(t, recordAt)
	tone := note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
	acked := deliver(m, tone) == nil
	if acked {
		t.Errorf("the key press was acknowledged (202) though the replica of the record's master does not have it")
	}
	againAcked := deliver(m, tone) == nil // Graph delivers it again: its change is on the master
	if againAcked {
		t.Errorf("the key press delivered again was acknowledged (202) though the replica still does not have it")
	}
	time.Sleep(100 * time.Millisecond) // acknowledgement batches (every 10 ms) have gone out
	if !armed(menuTimer) {
		t.Errorf("the menu's timer was removed though the key press that disarmed it is on no replica")
	}

	// what a failover of the record's master now keeps
	cluster.StopNode(recordAt)
	resume()
	if _, err := cluster.WaitFailover(recordAt, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	var got callstate.Call
	waitFor(t, "the record read from the promoted master", func() bool {
		got, err = store.Get(ctx, key)
		if err != nil {
			rdb.ReloadState(ctx) // the cluster client reads the slot map again only now and then
		}
		return err == nil
	})
	if (acked || againAcked) && got.State != callstate.StateQueued {
		t.Errorf("the acknowledged key press is lost with the failover: the call is %s, want queued", got.State)
	}
	for kind, tok := range got.Timers {
		if member := (callstate.Timer{Tenant: "tenant-1", Call: key, Kind: kind, Token: tok}).Member(); !armed(member) {
			t.Errorf("after the failover the call (%s) waits for its %s timer, which is gone from the timer set: the caller hears nothing", got.State, kind)
		}
	}
	// Graph delivers the key press again (503 until the slot map is read again), to the
	// promoted master (alone: not waited on)
	waitFor(t, "the key press delivered after the failover acknowledged", func() bool { return deliver(m, tone) == nil })
	if got, err = store.Get(ctx, key); err != nil || got.State != callstate.StateQueued {
		t.Errorf("after the key press delivered again the call is %s (%v), want queued", got.State, err)
	}
}

// The queue writes of a transition live on the tenant's master. A key press saved (record
// replicated) whose enqueue is on no replica of the tenant's master must not lose the caller
// with a failover there: the enqueue stays in the call's outbox until its replica has it, and
// the outbox is re-driven after its lease, so the caller is put back in the queue.
func TestClusterEnqueueReplicatedOrRedriven(t *testing.T) {
	const prefix = "cre"
	cluster, rdb, store := replicatedCluster(t, prefix)
	ctx := context.Background()
	// a tenant whose master holds none of what the key press's save writes
	tenant, tenantAt := tenantApart(t, cluster, prefix)
	qs := queue.NewStore(rdb, prefix)
	qs.Durable = store.Durably
	d := queue.NewDispatcher(qs, nil, tenant, []string{"q"}, zaptest.NewLogger(t))
	m := clusterMachine(t, rdb, store, prefix, d, time.Second)
	id := callOnAnotherMaster(t, cluster, prefix, tenantAt)
	key := graph.CallKey(id)
	answered(t, m, tenant, id)
	resume := cluster.CutReplica(t, tenantAt)
	tone := note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
	if err := deliverAs(m, tenant, tone); err != nil {
		t.Errorf("key press refused though its save writes nothing on the master whose replica is cut: %v", err)
	}
	time.Sleep(100 * time.Millisecond) // acknowledgement batches have gone out
	c, err := store.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if c.State == callstate.StateQueued && !slices.ContainsFunc(c.Outbox, func(p callstate.Pending) bool { return p.Cmd.Kind == callstate.CmdEnqueue }) {
		t.Errorf("the call is queued and its enqueue is acknowledged (outbox %+v), though the enqueue is on no replica", c.Outbox)
	}

	cluster.StopNode(tenantAt)
	resume()
	if _, err := cluster.WaitFailover(tenantAt, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// the outbox's lease (1 s) runs out: the re-drive carries the enqueue again
	octx, stop := context.WithCancel(ctx)
	redriving := make(chan struct{})
	go func() { m.RunOutbox(octx, 100*time.Millisecond); close(redriving) }()
	defer func() { stop(); <-redriving }()
	var waiting []string
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err = store.Get(ctx, key); err != nil || c.State != callstate.StateQueued {
			continue
		}
		if waiting, err = qs.Waiting(ctx, tenant, "q"); err == nil && slices.Contains(waiting, key) {
			return
		}
	}
	t.Errorf("after the failover of the tenant's master the call is %s and the queue holds %v: the caller waits in no queue", c.State, waiting)
}

// replicatedCluster is a Redis Cluster whose masters have a replica each, and a store on it
// waiting for one replica (200 ms).
func replicatedCluster(t *testing.T, prefix string) (*redistest.Cluster, *redis.ClusterClient, *callstate.Store) {
	t.Helper()
	cluster := redistest.StartClusterWithReplicas(t)
	rdb := cluster.Client(t)
	store := callstate.NewStore(rdb, prefix)
	store.WaitForReplicas(1, 200*time.Millisecond)
	ctx, stop := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { store.WatchReplicas(ctx, 50*time.Millisecond); close(watched) }()
	t.Cleanup(func() { stop(); <-watched })
	for deadline := time.Now().Add(5 * time.Second); store.ConnectedReplicas() != 1; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("replicas counted: %d, want 1 (every master has one)", store.ConnectedReplicas())
			break
		}
	}
	return cluster, rdb, store
}

// clusterMachine is a machine on the cluster with the test flow, writing acknowledgements in
// batches every 10 ms; lease is its outbox lease (0: the default).
func clusterMachine(t *testing.T, rdb *redis.ClusterClient, store *callstate.Store, prefix string, q callstate.Queues, lease time.Duration) *callstate.Machine {
	t.Helper()
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, prefix), Control: &fakeGraph{},
		Queues: q, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), OutboxLease: lease})
	ctx, stop := context.WithCancel(context.Background())
	acks := make(chan struct{})
	go func() { m.RunAcks(ctx, 10*time.Millisecond); close(acks) }()
	t.Cleanup(func() { m.Wait(); stop(); <-acks })
	return m
}

// callOnAnotherMaster returns a call id whose record lives on another master than those of
// avoid (as many as there are others).
func callOnAnotherMaster(t *testing.T, cluster *redistest.Cluster, prefix string, avoid ...string) string {
	t.Helper()
	return onAnotherMaster(t, cluster, func(i int) (string, string) {
		id := fmt.Sprintf("7c0ffee%d-0000-4000-8000-00000000%04d", i%10, i)
		return id, prefix + ":{call:" + graph.CallKey(id) + "}"
	}, avoid...)
}

// onAnotherMaster returns the first name (of key) that lives on another master than those of
// avoid, as far as there are others.
func onAnotherMaster(t *testing.T, cluster *redistest.Cluster, name func(int) (string, string), avoid ...string) string {
	t.Helper()
	avoided := map[string]bool{}
	for _, a := range avoid {
		avoided[a] = true
	}
	if len(avoided) >= len(cluster.Addrs()) {
		t.Fatalf("nothing left besides %v", avoid)
	}
	for i := 0; i < 1000; i++ {
		n, key := name(i)
		_, addr, err := cluster.SlotOf(context.Background(), key)
		if err != nil {
			t.Fatal(err)
		}
		if !avoided[addr] {
			return n
		}
	}
	t.Fatal("no name found on another master")
	return ""
}

// masterOf returns the address of the master serving key.
// answered takes call id of tenant in and up to the menu, every replica in sync.
func answered(t *testing.T, m *callstate.Machine, tenant, id string) {
	t.Helper()
	for _, n := range []string{
		note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`),
		note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`),
	} {
		deliverInSync(t, m, tenant, n)
	}
}

// tenantApart is a tenant whose master holds neither the timers nor the outbox index, and that
// master's address.
func tenantApart(t *testing.T, cluster *redistest.Cluster, prefix string) (tenant, addr string) {
	t.Helper()
	timersAt, outboxAt := masterOf(t, cluster, prefix+":{timers}"), masterOf(t, cluster, prefix+":{outbox}")
	tenant = onAnotherMaster(t, cluster, func(i int) (string, string) {
		tenant := fmt.Sprintf("tenant-%d", i)
		return tenant, prefix + ":{tenant:" + tenant + "}"
	}, timersAt, outboxAt)
	return tenant, masterOf(t, cluster, prefix+":{tenant:"+tenant+"}")
}

func masterOf(t *testing.T, cluster *redistest.Cluster, key string) string {
	t.Helper()
	_, addr, err := cluster.SlotOf(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// deliverAs is deliver for a tenant.
func deliverAs(m *callstate.Machine, tenant, payload string) error {
	ns, err := graph.Decode([]byte(payload))
	if err != nil {
		return err
	}
	err = m.Notify(context.Background(), tenant, ns)
	m.Wait()
	return err
}

// An enqueue whose replica did not confirm it in time stays in the call's outbox, for the
// re-drive a lease later. By then the caller may have moved on: hung up (the hang-up took them
// out of the queue), or been offered to an agent (the reservation took them out). The re-drive
// must not put them back in the queue: a caller who hung up was left there as a ghost, and one
// being transferred was counted as waiting and had the next free agent reserved for them.
func TestClusterEnqueueRedrivenOnlyWhileTheCallerWaits(t *testing.T) {
	const prefix = "crq"
	for _, tc := range []struct {
		name    string
		moveOn  func(t *testing.T, m *callstate.Machine, d *queue.Dispatcher, tenant, id string)
		wantNow callstate.State
	}{
		{"hung up", func(t *testing.T, m *callstate.Machine, _ *queue.Dispatcher, tenant, id string) {
			if err := deliverAs(m, tenant, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`)); err != nil {
				t.Fatal(err)
			}
		}, callstate.StateTerminated},
		{"offered", func(t *testing.T, m *callstate.Machine, d *queue.Dispatcher, _, _ string) {
			if n := d.DispatchOnce(context.Background()); n != 1 {
				t.Fatalf("%d offers, want the caller offered to the agent", n)
			}
			m.Wait()
		}, callstate.StateTransferring},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cluster, rdb, store := replicatedCluster(t, prefix)
			ctx := context.Background()
			tenant, tenantAt := tenantApart(t, cluster, prefix)
			qs := queue.NewStore(rdb, prefix)
			qs.Durable = store.Durably
			const agent = "11111111-0000-4000-8000-000000000001"
			if err := qs.SetMembers(ctx, tenant, "q", []string{agent}); err != nil {
				t.Fatal(err)
			}
			if err := qs.SetRoutable(ctx, tenant, map[string]bool{agent: true}); err != nil {
				t.Fatal(err)
			}
			d := queue.NewDispatcher(qs, nil, tenant, []string{"q"}, zaptest.NewLogger(t))
			m := clusterMachine(t, rdb, store, prefix, d, time.Second)
			d.Offer = m
			id := callOnAnotherMaster(t, cluster, prefix, tenantAt)
			key := graph.CallKey(id)
			answered(t, m, tenant, id)
			// the key press is saved; its enqueue is on the master, not confirmed by the replica
			resume := cluster.CutReplica(t, tenantAt)
			if err := deliverAs(m, tenant, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)); err != nil {
				t.Fatalf("key press: %v", err)
			}
			resume()
			waitFor(t, "the replica of the tenant's master back", func() bool {
				return store.Durably(ctx, prefix+":{tenant:"+tenant+"}", nil) == nil
			})
			tc.moveOn(t, m, d, tenant, id)
			if c, err := store.Get(ctx, key); err != nil || c.State != tc.wantNow {
				t.Fatalf("call %s (%v), want %s", c.State, err, tc.wantNow)
			}

			// the outbox's lease (1 s) runs out: the re-drive carries out what is left of it
			octx, stop := context.WithCancel(ctx)
			redriving := make(chan struct{})
			go func() { m.RunOutbox(octx, 100*time.Millisecond); close(redriving) }()
			deadline := time.Now().Add(4 * time.Second)
			for time.Now().Before(deadline) {
				if c, err := store.Get(ctx, key); err == nil && !slices.ContainsFunc(c.Outbox, func(p callstate.Pending) bool { return !p.Cmd.Kind.Graph() }) {
					break
				}
				time.Sleep(50 * time.Millisecond)
			}
			stop()
			<-redriving
			m.Wait()
			if waiting, err := qs.Waiting(ctx, tenant, "q"); err != nil || slices.Contains(waiting, key) {
				t.Errorf("the queue holds %v (%v): the caller, %s, was put back in it by the re-drive of their old enqueue", waiting, err, tc.wantNow)
			}
			if c, err := store.Get(ctx, key); err != nil || slices.ContainsFunc(c.Outbox, func(p callstate.Pending) bool { return !p.Cmd.Kind.Graph() }) {
				t.Errorf("storage commands left in the outbox after the re-drive: %+v (%v)", c.Outbox, err)
			}
		})
	}
}

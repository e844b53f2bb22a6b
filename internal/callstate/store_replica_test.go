package callstate_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// With WaitForReplicas, a record write returns only once the replica has it; one the replica
// does not acknowledge in time (its link stalled) is reported as ErrNotReplicated, so the
// notification behind it is refused and delivered again rather than acknowledged and then lost
// with a failover.
func TestWritesWaitForTheReplica(t *testing.T) {
	s := redistest.StartSentinelWithLink(t)
	ctx := context.Background()
	store := callstate.NewStore(s.Client(t), "wr")
	store.WaitForReplicas(1, 200*time.Millisecond)
	watchReplicas(t, store, 50*time.Millisecond)
	c := callstate.Call{ID: "c-repl", Tenant: "t1", State: callstate.StateAnswering}
	if err := store.Create(ctx, &c, time.Time{}); err != nil {
		t.Fatalf("create with the replica in sync: %v", err)
	}
	c.State = callstate.StateInMenu
	if err := store.Save(ctx, &c, time.Time{}); err != nil {
		t.Fatalf("save with the replica in sync: %v", err)
	}
	s.HoldReplication()
	c.State = callstate.StateQueued
	t0 := time.Now()
	err := store.Save(ctx, &c, time.Time{})
	if !errors.Is(err, callstate.ErrNotReplicated) {
		t.Fatalf("save with the replication link stalled: %v, want ErrNotReplicated", err)
	}
	if waited := time.Since(t0); waited < 200*time.Millisecond || waited > 2*time.Second {
		t.Errorf("the save waited %s for the replica, want about the 200ms asked for", waited)
	}
	if n := store.Unreplicated.Load(); n != 1 {
		t.Errorf("Unreplicated = %d, want 1", n)
	}
	// applied on the master all the same: what a failover now would lose
	if got, _ := store.Get(ctx, graph.CallKey(c.ID)); got.State != callstate.StateQueued {
		t.Errorf("record on the master: %s", got.State)
	}

	// The master dies and the replica is promoted, alone: nothing could be failed over to, so
	// writes go on without waiting (waiting for a replica that is not there stopped callbot).
	old, err := s.KillMaster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitFailover(old, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the promoted master's replicas counted", func() bool { return store.ConnectedReplicas() == 0 })
	c, _ = store.Get(ctx, graph.CallKey(c.ID)) // what the replica had
	c.State = callstate.StateTerminated
	if err := store.Save(ctx, &c, time.Time{}); err != nil {
		t.Errorf("save on a master with no replica: %v, want it written", err)
	}
}

// watchReplicas runs store.WatchReplicas every interval until the test ends, and waits until it
// has counted the set-up's replica.
func watchReplicas(t testing.TB, store *callstate.Store, every time.Duration) {
	t.Helper()
	ctx, stop := context.WithCancel(context.Background())
	watched := make(chan struct{})
	go func() { store.WatchReplicas(ctx, every); close(watched) }()
	t.Cleanup(func() { stop(); <-watched })
	waitFor(t, "the replica counted", func() bool { return store.ConnectedReplicas() == 1 })
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
	}
}

// replicatedMachine is a machine whose store waits for one replica (200 ms), on a Sentinel
// set-up whose replication link the test can stall.
func replicatedMachine(t *testing.T, prefix string) (*redistest.Sentinel, *callstate.Machine, *callstate.Store) {
	t.Helper()
	s := redistest.StartSentinelWithLink(t)
	rdb := s.Client(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	store := callstate.NewStore(rdb, prefix)
	store.WaitForReplicas(1, 200*time.Millisecond)
	watchReplicas(t, store, 50*time.Millisecond)
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, prefix), Control: &fakeGraph{},
		Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
	t.Cleanup(m.Wait)
	return s, m, store
}

// deliver applies a notification as the webhook does: nil is a 202.
func deliver(m *callstate.Machine, payload string) error {
	ns, err := graph.Decode([]byte(payload))
	if err != nil {
		return err
	}
	err = m.Notify(context.Background(), "tenant-1", ns)
	m.Wait()
	return err
}

// deliverInSync delivers a notification of a test's set-up, the replicas in sync: one refused as
// unreplicated is delivered again, as Graph does after a 503, until it is acknowledged (within
// 10 s); any other error fails the test. A replica in sync may still not acknowledge a write
// within the 200 ms the store waits on a loaded machine, which is not what a test is about
// (TestAReplicaBrieflyDisconnectedStillCounts failed at its first notification so, once in 65
// runs under load: "0 of 1 within 200ms").
func deliverInSync(t *testing.T, m *callstate.Machine, tenant, payload string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		err := deliverAs(m, tenant, payload)
		if err == nil {
			return
		}
		if !strings.Contains(err.Error(), callstate.ErrNotReplicated.Error()) || time.Now().After(deadline) {
			t.Fatalf("with every replica in sync: %v", err)
		}
	}
}

// A notification refused as unreplicated (503) is delivered again by Graph. Its change is on the
// master already, so the redelivery finds nothing to do (a repeated incoming; a repeated key
// press): it was acknowledged without waiting for the replica, which still did not have the
// change, and the failover lost what callbot had acknowledged. It is acknowledged now only once
// the replica has it (Store.Sync).
func TestRedeliveryOfAnUnreplicatedChangeWaitsForTheReplica(t *testing.T) {
	s, m, store := replicatedMachine(t, "rv1")
	ctx := context.Background()
	const old, fresh = "c-old", "c-new"
	deliverInSync(t, m, "tenant-1", note("created", old, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	deliverInSync(t, m, "tenant-1", note("updated", old, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	s.HoldReplication()

	incoming := note("created", fresh, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)
	if err := deliver(m, incoming); err == nil {
		t.Fatal("incoming with the replica stalled was acknowledged")
	}
	incomingAgain := deliver(m, incoming) // Graph delivers the 503'd notification again
	if incomingAgain == nil {
		t.Errorf("the redelivered incoming was acknowledged (202) though no replica has the call")
	}
	tone := note("updated", old, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
	if err := deliver(m, tone); err == nil {
		t.Fatal("tone with the replica stalled was acknowledged")
	}
	toneAgain := deliver(m, tone)
	if toneAgain == nil {
		t.Errorf("the redelivered key press was acknowledged (202) though no replica has it")
	}

	// what the acknowledgements were worth: the master dies, the replica is promoted
	addr, err := s.KillMaster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitFailover(addr, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	var (
		gotNew error
		gotOld callstate.Call
	)
	waitFor(t, "the promoted master read", func() bool {
		_, gotNew = store.Get(ctx, graph.CallKey(fresh))
		var e error
		gotOld, e = store.Get(ctx, graph.CallKey(old))
		return e == nil
	})
	if incomingAgain == nil && errors.Is(gotNew, callstate.ErrNotFound) {
		t.Errorf("after the failover the acknowledged incoming call %s has no record", fresh)
	}
	if toneAgain == nil && gotOld.State != callstate.StateQueued {
		t.Errorf("after the failover the call whose key press was acknowledged is %s, want queued", gotOld.State)
	}
}

// A replica whose link drops (a network blip, a replica restart) leaves the master with
// connected_slaves 0 for a moment. Counting that as "no replica" let writes stop waiting, but
// Sentinel still promotes that replica when the master dies: what callbot acknowledged meanwhile
// was lost. The most replicas the master has had still count.
func TestAReplicaBrieflyDisconnectedStillCounts(t *testing.T) {
	s, m, store := replicatedMachine(t, "rv2")
	ctx := context.Background()
	const id = "c-blip"
	deliverInSync(t, m, "tenant-1", note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	deliverInSync(t, m, "tenant-1", note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	// the link drops and does not come back at once (the replica's reconnection stalls)
	s.HoldReplication()
	rdb := s.Client(t)
	if err := rdb.Do(ctx, "CLIENT", "KILL", "TYPE", "replica").Err(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the master's replica gone from INFO", func() bool {
		info, err := rdb.Info(ctx, "replication").Result()
		return err == nil && strings.Contains(info, "connected_slaves:0")
	})
	time.Sleep(200 * time.Millisecond) // WatchReplicas (every 50 ms) has looked since
	if n := store.ConnectedReplicas(); n != 1 {
		t.Errorf("replicas counted with the replica off for a moment: %d, want 1", n)
	}
	tone := note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)
	acked := deliver(m, tone) == nil

	addr, err := s.KillMaster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	promoted, err := s.WaitFailover(addr, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var c callstate.Call
	waitFor(t, "the promoted master read", func() bool {
		var e error
		c, e = store.Get(ctx, graph.CallKey(id))
		return e == nil
	})
	if acked && c.State != callstate.StateQueued {
		t.Errorf("the replica %s was promoted, and the acknowledged key press is lost: the call is %s, want queued", promoted, c.State)
	}
}

// The count of replicas read from the old master outlived it: after the promotion, writes on the
// lone new master waited for a replica it does not have, and were refused until the next look.
// A short WAIT now looks again at once.
func TestPromotedMasterServedAtOnce(t *testing.T) {
	s := redistest.StartSentinel(t)
	ctx := context.Background()
	store := callstate.NewStore(s.Client(t), "st")
	store.WaitForReplicas(1, 100*time.Millisecond)
	watchReplicas(t, store, time.Second) // as callbot serve does
	c := callstate.Call{ID: "c-stale", Tenant: "t1", State: callstate.StateAnswering}
	if err := store.Create(ctx, &c, time.Time{}); err != nil {
		t.Fatal(err)
	}
	old, err := s.KillMaster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitFailover(old, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	refused := 0
	for t0 := time.Now(); time.Since(t0) < 5*time.Second; {
		got, err := store.Get(ctx, graph.CallKey(c.ID))
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		got.State = callstate.StateInMenu
		err = store.Save(ctx, &got, time.Time{})
		if err == nil {
			break
		}
		if errors.Is(err, callstate.ErrNotReplicated) {
			refused++
		}
	}
	if refused > 0 {
		t.Errorf("%d saves on the promoted master (no replica) refused as unreplicated: the count was the old master's", refused)
	}
}

// The key press of a call taken back is acknowledged only once the new record is replicated: it
// was acknowledged first and the call taken back after, so a create refused as unreplicated
// left the key press lost and the call uncounted.
func TestAdoptionAcknowledgedOnlyOnceReplicated(t *testing.T) {
	s, m, store := replicatedMachine(t, "rva")
	s.HoldReplication()
	id := "8a1b2c3d-0000-4000-8000-0000000a0a0a"
	err := deliver(m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))
	if err == nil && store.Unreplicated.Load() > 0 {
		t.Errorf("the key press was acknowledged (202) though the call taken back is on no replica")
	}
}

// A change refused as unreplicated is on the master only: a failover may still lose it. Its
// commands (in the record's outbox) are not sent when refused, but the outbox was re-driven a
// lease later from the master's record, replicated or not: Graph carried out a decision the
// record could lose (a transfer to an agent whose offer a failover then took back). The re-drive
// now waits, as a save does, until the replicas have the record.
func TestRedriveWaitsForTheReplicas(t *testing.T) {
	s := redistest.StartSentinelWithLink(t)
	rdb := s.Client(t)
	store := callstate.NewStore(rdb, "rw")
	store.WaitForReplicas(1, 200*time.Millisecond)
	watchReplicas(t, store, 50*time.Millisecond)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	mustDo(t, err)
	g := &fakeGraph{}
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "rw"), Control: g,
		Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
	t.Cleanup(m.Wait)
	notify(t, m, note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, m, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	m.Wait()
	sent := len(g.log())

	s.HoldReplication()
	ns, err := graph.Decode([]byte(note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)))
	mustDo(t, err)
	if err := m.Notify(context.Background(), "tenant-1", ns); !errors.Is(err, graph.ErrUnavailable) {
		t.Fatalf("key press with the replication held: %v, want it refused (503)", err)
	}
	if c, _ := store.Get(context.Background(), realCallKey); c.State != callstate.StateQueued {
		t.Fatalf("on the master: %s, want the refused change applied there (queued)", c.State)
	}
	redriveAll(t, m, store, time.Minute)
	if got := g.log()[sent:]; len(got) != 0 {
		t.Errorf("re-drive of the unreplicated change sent %v; want nothing until the replicas have it", got)
	}
}

package callstate_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
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
	wctx, stop := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { store.WatchReplicas(wctx, 50*time.Millisecond); close(watched) }()
	t.Cleanup(func() { stop(); <-watched })
	waitFor(t, "the replica counted", func() bool { return store.ConnectedReplicas() == 1 })
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

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10s", what)
		}
	}
}

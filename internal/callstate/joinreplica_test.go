package callstate_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// A master promoted alone is not waited on; a replica that then joins it (the old master back,
// or a new node) is counted only once it is in sync. Counted from the moment it connected, every
// write waited for a replica still waiting for the master's data (a full resync with Redis 7's
// diskless sync begins repl-diskless-sync-delay, 5 s, after the replica asked), and was refused
// as unreplicated: callbot refused every notification for the whole sync, though the joining
// replica could not have been failed over to (the failover soak, docs/chaos.md: 5 s of 503s
// after failovers, as the next replica joined, and notifications given up by Graph).
func TestAJoiningReplicaCountsOnceInSync(t *testing.T) {
	s := redistest.StartSentinel(t)
	ctx := context.Background()
	rdb := s.Client(t)
	store := callstate.NewStore(rdb, "jr")
	// syncing: the master has a replica connected and none in sync (a refusal then is the
	// fault; one once it is in sync is a WAIT that timed out on a loaded machine, which is not)
	syncing := func() bool {
		info, err := rdb.Info(ctx, "replication").Result()
		return err == nil && !strings.Contains(info, "connected_slaves:0") && !strings.Contains(info, "state=online")
	}
	store.WaitForReplicas(1, 100*time.Millisecond)
	watchReplicas(t, store, 100*time.Millisecond)
	c := callstate.Call{ID: "c-join", Tenant: "t1", State: callstate.StateAnswering}
	if err := store.Create(ctx, &c, time.Time{}); err != nil {
		t.Fatal(err)
	}
	for round := 1; round <= 2; round++ {
		old, err := s.KillMaster(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.WaitFailover(old, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "the promoted master's replicas counted", func() bool { return store.ConnectedReplicas() == 0 })
		added := make(chan error, 1)
		go func() { added <- s.AddReplica(20 * time.Second) }()
		var saves, refused int
		t0 := time.Now()
		for done := false; !done; {
			select {
			case err := <-added:
				if err != nil {
					t.Fatal(err)
				}
				done = true
			case <-time.After(50 * time.Millisecond):
			}
			got, err := store.Get(ctx, graph.CallKey(c.ID))
			if err != nil {
				continue
			}
			got.State = callstate.StateInMenu
			before := syncing()
			err = store.Save(ctx, &got, time.Time{})
			if !before || !syncing() {
				continue
			}
			saves++
			if errors.Is(err, callstate.ErrNotReplicated) {
				refused++
			}
		}
		t.Logf("round %d: replica added in %s, %d of %d saves while it synced refused", round, time.Since(t0).Round(time.Millisecond), refused, saves)
		if refused > 0 {
			t.Errorf("round %d: %d of %d saves refused as unreplicated while a replica joined the lone master and synced", round, refused, saves)
		}
		// once in sync it counts: a write waits for it again
		waitFor(t, "the joined replica counted", func() bool { return store.ConnectedReplicas() == 1 })
	}
}

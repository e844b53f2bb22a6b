package queue_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/queue"
	"github.com/callbot/callbot/internal/redistest"
)

// TestStoreOnRedisCluster runs the queue store's scripts and transactions on a real 3-master
// Redis Cluster: each touches the keys of one tenant only (no CROSSSLOT), all of a tenant's
// keys share the slot of its hash tag {tenant:T}, and different tenants spread over the masters.
func TestStoreOnRedisCluster(t *testing.T) {
	cluster := redistest.StartCluster(t)
	ctx := context.Background()
	rdb := cluster.Client(t)
	st := queue.NewStore(rdb, "cb")
	masters := map[string]int{}
	tenantSlots := map[int64]string{}
	for i := range 9 {
		tenant := fmt.Sprintf("tenant-%d", i)
		agents := []string{tenant + "-a1", tenant + "-a2"}
		if err := st.SetMembers(ctx, tenant, "sales", agents); err != nil { // MULTI/EXEC on members and idle
			t.Fatalf("%s: set members: %v", tenant, err)
		}
		if err := st.SetRoutable(ctx, tenant, map[string]bool{agents[0]: true, agents[1]: true}); err != nil {
			t.Fatalf("%s: set routable: %v", tenant, err)
		}
		for n, call := range []string{"c1", "c2", "c3"} {
			if err := st.Enqueue(ctx, tenant, "sales", call, int64(1000+n)); err != nil {
				t.Fatalf("%s: enqueue %s: %v", tenant, call, err)
			}
		}
		var got []queue.Reservation
		for range 2 {
			r, err := st.Reserve(ctx, tenant, "sales", time.Now()) // reserveScript, seven keys
			if err != nil {
				t.Fatalf("%s: reserve: %v", tenant, err)
			}
			got = append(got, r)
		}
		if got[0].Call != "c1" || got[1].Call != "c2" || got[0].Agent == got[1].Agent || got[0].Score != 1000 {
			t.Fatalf("%s: reservations %+v; want c1 and c2 with two different agents", tenant, got)
		}
		if r, err := st.Reserve(ctx, tenant, "sales", time.Now()); !errors.Is(err, queue.ErrEmpty) {
			t.Fatalf("%s: third reservation %+v %v; want ErrEmpty (both agents reserved)", tenant, r, err)
		}
		// releaseScript, three keys: one agent cools down, the other is guarded after connecting
		if err := st.Release(ctx, tenant, got[0].Agent, "c1", callstate.AgentFailed, 0); err != nil {
			t.Fatalf("%s: release: %v", tenant, err)
		}
		if err := st.Release(ctx, tenant, got[1].Agent, "c2", callstate.AgentConnected, 0); err != nil {
			t.Fatalf("%s: release: %v", tenant, err)
		}
		if r, err := st.Reserve(ctx, tenant, "sales", time.Now()); !errors.Is(err, queue.ErrEmpty) {
			t.Fatalf("%s: reservation %+v %v during cool-down and guard; want ErrEmpty", tenant, r, err)
		}
		if r, err := st.Reserve(ctx, tenant, "sales", time.Now().Add(time.Minute)); err != nil || r.Call != "c3" {
			t.Fatalf("%s: reservation after cool-down %+v %v; want c3", tenant, r, err)
		}
		for _, a := range agents {
			if call, err := st.Reserved(ctx, tenant, a); err != nil || (call != "" && call != "c3") {
				t.Errorf("%s: agent %s reserved for %q %v", tenant, a, call, err)
			}
		}
		// the reconciler's sweep: the queues of a tenant read in one pipeline, removeAtScript
		if err := st.Enqueue(ctx, tenant, "support", "ghost", 1); err != nil {
			t.Fatal(err)
		}
		es, err := st.Entries(ctx, tenant, []string{"sales", "support"})
		if err != nil || len(es["sales"]) != 0 || len(es["support"]) != 1 {
			t.Fatalf("%s: entries %v %v, want the ghost in support alone", tenant, es, err)
		}
		if n, err := st.RemoveEntries(ctx, tenant, "support", es["support"]); err != nil || n != 1 {
			t.Fatalf("%s: removed %d %v, want the ghost", tenant, n, err)
		}

		// every key of the tenant is where CLUSTER KEYSLOT says, on the slot of the tag alone
		tagSlot, addr, err := cluster.SlotOf(ctx, "tenant:"+tenant)
		if err != nil {
			t.Fatal(err)
		}
		node := cluster.NodeClient(t, addr)
		for _, name := range []string{"members:sales", "routable", "idle", "busy", "cool"} {
			key := "cb:{tenant:" + tenant + "}:" + name
			slot, a, err := cluster.SlotOf(ctx, key)
			if err != nil || slot != tagSlot || a != addr {
				t.Errorf("%s: slot %d on %s (%v), want the tag's slot %d on %s", key, slot, a, err, tagSlot, addr)
			}
			if n, err := node.Exists(ctx, key).Result(); err != nil || n != 1 {
				t.Errorf("%s not on master %s: %d %v", key, addr, n, err)
			}
		}
		if other, ok := tenantSlots[tagSlot]; ok {
			t.Errorf("tenants %s and %s share slot %d", other, tenant, tagSlot)
		}
		tenantSlots[tagSlot] = tenant
		masters[addr]++
	}
	if len(masters) != redistest.ClusterSize {
		t.Errorf("9 tenants on %d masters %v, want all %d", len(masters), masters, redistest.ClusterSize)
	}
	t.Logf("tenants per master %v", masters)

	t.Run("PresenceLease", func(t *testing.T) {
		src := &presences{polled: make(chan []string, 10)}
		p := &queue.Poller{Store: st, Source: src, Tenant: "tenant-0", Agents: []string{"tenant-0-a1"}, Instance: "i1", Log: zaptest.NewLogger(t)}
		pctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { p.Run(pctx, time.Hour); close(done) }() // leaseScript, then a poll
		defer func() { cancel(); <-done }()
		select {
		case ids := <-src.polled:
			if !slices.Equal(ids, []string{"tenant-0-a1"}) {
				t.Errorf("polled %v", ids)
			}
		case <-time.After(3 * time.Second):
			t.Fatal("the poller never took the presence lease")
		}
	})
}

// On Redis Cluster the registry of a tenant's queues is filled, at the first start with none,
// from the queue keys on the master that serves the tenant's slot, and read from there. A SCAN
// of the cluster client goes to one node: go-redis picks the slot of the hash tag in the MATCH
// pattern, which is not the tenant's when the pattern escapes a character of its name (the
// tenants here have a ?, a wildcard), so the store sends it to the tenant's master itself.
func TestKnownQueuesOnRedisCluster(t *testing.T) {
	cluster := redistest.StartCluster(t)
	ctx := context.Background()
	st := queue.NewStore(cluster.Client(t), "cb")
	for i := range 9 {
		tenant := fmt.Sprintf("t?%d", i)
		// an older callbot's queue, not registered, and calls of the tenant on other slots
		if err := st.Enqueue(ctx, tenant, "gone", "ghost", 1); err != nil {
			t.Fatal(err)
		}
		if err := st.SetQueues(ctx, tenant, map[string][]string{"sales": {tenant + "-a1"}}); err != nil {
			t.Fatalf("%s: set queues: %v", tenant, err)
		}
		got, err := st.KnownQueues(ctx, tenant)
		if err != nil || !slices.Equal(got, []string{"gone", "sales"}) {
			t.Errorf("%s: known queues %v %v, want gone and sales", tenant, got, err)
		}
		es, err := st.Entries(ctx, tenant, got)
		if err != nil || len(es["gone"]) != 1 {
			t.Fatalf("%s: entries %v %v, want the ghost in gone", tenant, es, err)
		}
		if n, err := st.RemoveEntries(ctx, tenant, "gone", es["gone"]); err != nil || n != 1 {
			t.Errorf("%s: removed %d %v, want the ghost", tenant, n, err)
		}
	}
}

type presences struct{ polled chan []string }

func (p *presences) Presences(_ context.Context, ids []string) ([]graph.Presence, error) {
	p.polled <- ids
	var out []graph.Presence
	for _, id := range ids {
		out = append(out, graph.Presence{UserID: id, Availability: "Available", Activity: "Available"})
	}
	return out, nil
}

package queue_test

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/queue"
	"github.com/callbot/callbot/internal/redistest"
)

// On Redis Cluster a caller's offer is saved on the call's master, and the reservation behind it
// (the caller out of the queue, the agent reserved) on the tenant's. With replicas to wait for,
// the offer must not be made while the reservation is on no replica: a failover of the tenant's
// master would keep the offer and lose the reservation, leaving the agent free to be offered a
// second caller during the transfer. The reservation is reported as failed until its replica
// has it, and asked for again with the same token, which returns it: the same caller and agent
// are offered once the replica is back, not before.
func TestClusterReservationReplicatedBeforeTheOffer(t *testing.T) {
	cluster := redistest.StartClusterWithReplicas(t)
	ctx := context.Background()
	rdb := cluster.Client(t)
	const prefix, tenant = "qr", "tenant-r"
	cs := callstate.NewStore(rdb, prefix)
	cs.WaitForReplicas(1, 200*time.Millisecond)
	wctx, stop := context.WithCancel(ctx)
	watched := make(chan struct{})
	go func() { cs.WatchReplicas(wctx, 50*time.Millisecond); close(watched) }()
	defer func() { stop(); <-watched }()
	qs := queue.NewStore(rdb, prefix)
	qs.Durable = cs.Durably
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(qs.SetMembers(ctx, tenant, "sales", []string{"a1"}))
	must(qs.SetRoutable(ctx, tenant, map[string]bool{"a1": true}))
	must(qs.Enqueue(ctx, tenant, "sales", "call-1", 1))
	off := &offers{}
	d := queue.NewDispatcher(qs, off, tenant, []string{"sales"}, zaptest.NewLogger(t))

	_, addr, err := cluster.SlotOf(ctx, prefix+":{tenant:"+tenant+"}")
	must(err)
	resume := cluster.CutReplica(t, addr)
	if n := d.DispatchOnce(ctx); n != 0 || len(off.list()) != 0 {
		t.Errorf("with the tenant master's replica cut: %d offers %v, want none (the reservation is on no replica)", n, off.list())
	}
	resume()
	for deadline := time.Now().Add(10 * time.Second); len(off.list()) == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		d.DispatchOnce(ctx)
	}
	if got := off.list(); !slices.Equal(got, []string{"call-1->a1"}) {
		t.Errorf("offers once the replica is back: %v, want the caller to the agent, once", got)
	}
	if r, err := qs.Reserved(ctx, tenant, "a1"); err != nil || r != "call-1" {
		t.Errorf("a1 reserved for %q (%v), want call-1", r, err)
	}
}

type offers struct {
	mu sync.Mutex
	l  []string
}

func (o *offers) Offer(_ context.Context, _, call, agent string) (bool, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.l = append(o.l, call+"->"+agent)
	return true, nil
}

func (o *offers) list() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.l)
}

package queue_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
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
	for deadline := time.Now().Add(20 * time.Second); len(off.list()) == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
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

// recordOfferer saves each offer in the call's own slot on a Redis Cluster (PREFIX:{call:K},
// as the call's record is), so that an offer fails, and cannot be read back, while the call's
// master is down.
type recordOfferer struct {
	rdb    *redis.ClusterClient
	prefix string
	offers
}

func (o *recordOfferer) key(call string) string { return o.prefix + ":{call:" + call + "}:offer" }

// reload has the client read the slot map again after an error that is no reply (the master
// is away: it may have failed over), as callstate's store does.
func (o *recordOfferer) reload(ctx context.Context, err error) error {
	var reply redis.Error
	if err != nil && !errors.Is(err, redis.Nil) && !errors.As(err, &reply) {
		o.rdb.ReloadState(ctx)
	}
	return err
}

func (o *recordOfferer) Offer(ctx context.Context, _, call, agent string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := o.reload(ctx, o.rdb.Set(ctx, o.key(call), agent, 0).Err()); err != nil {
		return false, err
	}
	return o.offers.Offer(ctx, "", call, agent)
}

func (o *recordOfferer) Offered(ctx context.Context, _, call, agent string) (bool, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	got, err := o.rdb.Get(ctx, o.key(call)).Result()
	if o.reload(ctx, err); errors.Is(err, redis.Nil) {
		return false, nil
	}
	return got == agent, err
}

// On Redis Cluster the master of a call's record can be down while the tenant's master serves
// the queues. An offer to that call fails and its record cannot be read, so the dispatcher does
// not know whether it applied. It put the caller back in the queue at once and left the agent
// reserved for the reconciler (minutes): each tick while the master was away it reserved
// another agent for the same caller and left that one reserved too, and once the cluster was
// down (every master refuses while one has failed) the put-back itself failed, leaving the
// caller in no queue until the reconciler's pass (TestRedisClusterFailoverSoak: call 8433af7c
// with three agents reserved, f4550fc2 with one, both in no queue for minutes). The reservation
// must be undone once the record can be read again: the caller offered to one agent, the others
// free.
func TestClusterOfferFailedWhileTheCallsMasterIsDown(t *testing.T) {
	cluster := redistest.StartClusterWith(t, redistest.ClusterOptions{Replicas: 1, NodeTimeout: time.Second})
	ctx := context.Background()
	rdb := cluster.Client(t)
	const prefix, tenant = "qd", "tenant-d"
	qs := queue.NewStore(rdb, prefix)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, tenantAt, err := cluster.SlotOf(ctx, prefix+":{tenant:"+tenant+"}")
	must(err)
	call, callAt := "", ""
	for i := 0; callAt == "" || callAt == tenantAt; i++ {
		call = fmt.Sprintf("call-%d", i)
		_, callAt, err = cluster.SlotOf(ctx, prefix+":{call:"+call+"}")
		must(err)
	}
	agents := []string{"a1", "a2", "a3", "a4"}
	must(qs.SetMembers(ctx, tenant, "sales", agents))
	must(qs.SetRoutable(ctx, tenant, map[string]bool{"a1": true, "a2": true, "a3": true, "a4": true}))
	must(qs.Enqueue(ctx, tenant, "sales", call, 1))
	off := &recordOfferer{rdb: rdb, prefix: prefix}
	d := queue.NewDispatcher(qs, off, tenant, []string{"sales"}, zaptest.NewLogger(t))
	tick := func() {
		d.RetryUndos(ctx)
		d.DispatchOnce(ctx)
	}

	cluster.StopNode(callAt)
	for end := time.Now().Add(1500 * time.Millisecond); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		tick() // the call's master down, then (past the node timeout) the whole cluster
	}
	if _, err := cluster.WaitFailover(callAt, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(20 * time.Second); len(off.list()) == 0 && time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		tick()
	}
	got := off.list()
	if len(got) != 1 {
		t.Fatalf("offers once the call's master failed over: %v, want the caller offered once", got)
	}
	tick() // settled: nothing more to do
	busy, err := qs.Reservations(ctx, tenant)
	must(err)
	offered := strings.TrimPrefix(got[0], call+"->")
	if len(busy) != 1 || busy[offered] != call {
		t.Errorf("reservations %v after the caller was offered to %s: want that agent alone (the others reserved for nobody until the reconciler's pass)", busy, offered)
	}
	if n, err := qs.Length(ctx, tenant, "sales"); err != nil || n != 0 {
		t.Errorf("%d callers in the queue (%v), want none: the caller is with %s", n, err, offered)
	}
	if n := d.RetryUndos(ctx); n != 0 {
		t.Errorf("%d reservations still to undo", n)
	}
}

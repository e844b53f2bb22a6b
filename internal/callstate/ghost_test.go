package callstate_test

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/queue"
)

// ghostInstances are two callbot instances on one Redis with the queue of newAgentOnRealQueues;
// a's reconciler serves tenant-1, and its clock can be moved on (skew).
type ghostInstances struct {
	f    *agentOnRealQueues
	a, b *callstate.Machine
	dA   *queue.Dispatcher
	skew time.Duration
}

func newGhostInstances(t *testing.T, prefix string) *ghostInstances {
	g := &ghostInstances{f: newAgentOnRealQueues(t, prefix)}
	g.a, g.dA, _ = g.f.instance(g.f.srv.Client(t), &fakeGraph{}, func(c *callstate.Config) {
		c.Tenants = []string{"tenant-1"}
		c.Now = func() time.Time { return time.Now().Add(g.skew) }
	})
	g.b, _, _ = g.f.instance(g.f.srv.Client(t), &fakeGraph{}, nil)
	return g
}

func (g *ghostInstances) waiting(t *testing.T) []string {
	t.Helper()
	w, err := g.f.qs.Waiting(context.Background(), "tenant-1", "q")
	mustDo(t, err)
	return w
}

// reconcile runs a's reconciler pass, after moving a's clock on by later.
func (g *ghostInstances) reconcile(t *testing.T, later time.Duration) {
	t.Helper()
	g.skew += later
	mustDo(t, g.a.Reconcile(context.Background()))
}

// The caller presses the key that queues them on instance A while their hang-up is applied on
// instance B. A decides on its cached record (in the menu): the caller joins the queue. Its save
// loses the race to B's (the call ended), but the enqueue that goes in the same round trip,
// behind the save, is applied all the same: the queue holds a caller whose call ended. Nothing
// took it out: it counted in callbot_queue_waiting until an agent was free to be reserved for it
// (the offer then refused). The reconciler's pass now removes it.
func TestGhostOfALostRaceIsSwept(t *testing.T) {
	ctx := context.Background()
	g := newGhostInstances(t, "gr")
	notify(t, g.a, note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	notify(t, g.a, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established"}`)) // A caches the menu
	notify(t, g.b, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`))  // hang-up, on B
	notify(t, g.a, note("updated", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`))

	c, err := callstate.NewStore(g.f.srv.Client(t), g.f.prefix).Get(ctx, realCallKey)
	mustDo(t, err)
	if c.State != callstate.StateTerminated {
		t.Fatalf("call %s after the race, want terminated", c.State)
	}
	if w := g.waiting(t); !slices.Contains(w, realCallKey) {
		t.Skipf("no ghost after the lost race (queue %v): the enqueue no longer goes behind a save that may lose", w)
	}
	g.reconcile(t, 6*time.Minute)
	if w := g.waiting(t); slices.Contains(w, realCallKey) {
		t.Errorf("after a reconciler pass the queue still holds %s, whose call ended (queue %v)", realCallKey, w)
	}
}

// endingOffer is an offer that fails (a Redis timeout) while the caller hangs up on another
// instance: the dispatcher puts the caller back in the queue, at their place, as it undoes the
// reservation.
type endingOffer struct {
	t *testing.T
	m *callstate.Machine // the dispatcher's instance (Offered)
	b *callstate.Machine // where the hang-up is applied
}

func (o *endingOffer) Offer(ctx context.Context, tenant, callKey, agent string) (bool, error) {
	notify(o.t, o.b, note("deleted", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"terminated"}`))
	return false, errors.New("read tcp: i/o timeout")
}

func (o *endingOffer) Offered(ctx context.Context, tenant, callKey, agent string) (bool, error) {
	return o.m.Offered(ctx, tenant, callKey, agent)
}

// The dispatcher's undo after a failed offer puts back a caller whose call ends right then: a
// ghost, swept by the reconciler's next pass.
func TestGhostOfAnUndoneOfferIsSwept(t *testing.T) {
	ctx := context.Background()
	g := newGhostInstances(t, "gu")
	g.f.queueCaller(g.a)
	g.dA.Offer = &endingOffer{t: t, m: g.a, b: g.b}
	g.dA.DispatchOnce(ctx)
	if w := g.waiting(t); !slices.Contains(w, realCallKey) {
		t.Skipf("no ghost after the undone offer (queue %v)", w)
	}
	g.reconcile(t, 6*time.Minute)
	if w := g.waiting(t); len(w) != 0 {
		t.Errorf("after a reconciler pass the queue still holds %v; call %s ended", w, realCallKey)
	}
	// and the agent is free for the next caller
	mustDo(t, g.f.qs.Enqueue(ctx, "tenant-1", "q", "next-caller", time.Now().UnixMilli()))
	if r, err := g.f.qs.Reserve(ctx, "tenant-1", "q", time.Now()); err != nil || r.Call != "next-caller" {
		t.Errorf("next reservation %+v %v, want the next caller with the agent", r, err)
	}
}

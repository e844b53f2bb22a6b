package callstate_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// refusingQueues is fakeQueues whose Enqueue and Release fail the number of times refuse gives,
// as a Redis Cluster master that is down does; each attempt is counted.
type refusingQueues struct {
	*fakeQueues
	mu       sync.Mutex
	refuse   map[string]int
	attempts map[string]int
}

func (q *refusingQueues) attempt(kind string) error {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.attempts == nil {
		q.attempts = map[string]int{}
	}
	q.attempts[kind]++
	if q.refuse[kind] > 0 {
		q.refuse[kind]--
		return errors.New("dial tcp: connect: connection refused (injected)")
	}
	return nil
}

func (q *refusingQueues) tries(kind string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.attempts[kind]
}

func (q *refusingQueues) Enqueue(ctx context.Context, tenant, queue, call string, score int64) error {
	if err := q.attempt("enqueue"); err != nil {
		return err
	}
	return q.fakeQueues.Enqueue(ctx, tenant, queue, call, score)
}

func (q *refusingQueues) Release(ctx context.Context, tenant, agent, call string, o callstate.AgentOutcome, hold time.Duration) error {
	if err := q.attempt("release"); err != nil {
		return err
	}
	return q.fakeQueues.Release(ctx, tenant, agent, call, o, hold)
}

// leasedInstance is instance with an outbox lease of a minute, longer than any test waits: what
// such a test sees done was not done by a re-drive.
func leasedInstance(t *testing.T, rdb *redis.Client, prefix string, q callstate.Queues) *callstate.Machine {
	t.Helper()
	return instanceLeased(t, rdb, prefix, &fakeGraph{}, q, nil, time.Minute)
}

// runOutbox runs m's RunOutbox until the test ends.
func runOutbox(t *testing.T, m *callstate.Machine) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunOutbox(ctx, 20*time.Millisecond); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
}

// An agent's release that Redis refused (on Redis Cluster the tenant's master killed as the call
// ended) is carried out again at the outbox loop's next tick, not a lease later by a re-drive:
// the agent stayed reserved for a call that had ended for 4 to 5 s after the promotion (the
// cluster failover soak).
func TestRefusedReleaseCarriedOutBeforeTheLease(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	q := &refusingQueues{fakeQueues: &fakeQueues{}, refuse: map[string]int{"release": 2}}
	m := leasedInstance(t, rdb, "rr", q)
	id := "5c2e8f1a-9b3d-4a67-8e0c-7f4b1d2a9c36"
	key := offeredToAgentA(t, m, id)
	notify(t, m, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`))
	if n := q.tries("release"); n != 1 {
		t.Fatalf("releases tried as the call ended: %d, want 1 (refused)", n)
	}
	runOutbox(t, m)
	eventually(t, "the refused release was not carried out again", func() bool {
		for _, op := range q.snapshot() {
			if strings.HasPrefix(op, "release agent-a") {
				return true
			}
		}
		return false
	})
	eventually(t, "the release carried out was not acknowledged", func() bool {
		c, err := callstate.NewStore(rdb, "rr").Get(context.Background(), key)
		return err == nil && len(c.Outbox) == 0
	})
	if n := q.tries("release"); n != 3 {
		t.Errorf("releases tried: %d, want 3 (refused twice, then taken)", n)
	}
}

// A queue write the call has moved past by the time Redis takes it is not carried out: the
// caller, refused their place, was offered to an agent meanwhile (as the dispatcher's follow-up
// of the record, or a failover, may do); put back in the queue they would be a ghost entry.
func TestRefusedEnqueueTheCallMovedPastIsNotCarriedOut(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	q := &refusingQueues{fakeQueues: &fakeQueues{}, refuse: map[string]int{"enqueue": 1}}
	m := leasedInstance(t, rdb, "rq", q)
	id := "e7a14c3b-2d9f-4b85-a6e1-0c8d5f3b7a92"
	queuedCall(t, m, id) // its enqueue refused
	if ok, err := m.Offer(context.Background(), "tenant-1", graph.CallKey(id), "agent-a"); !ok || err != nil {
		t.Fatalf("offer: %v %v", ok, err)
	}
	m.Wait()
	runOutbox(t, m)
	eventually(t, "the enqueue the call moved past still pending", func() bool {
		c, err := callstate.NewStore(rdb, "rq").Get(context.Background(), graph.CallKey(id))
		for _, p := range c.Outbox {
			if p.Cmd.Kind == callstate.CmdEnqueue {
				return false
			}
		}
		return err == nil
	})
	if n := q.tries("enqueue"); n != 1 {
		t.Errorf("enqueues tried: %d, want 1 (refused, then moved past)", n)
	}
}

// A storage command an instance died with is re-driven by another; if Redis refuses it then (a
// hiccup as the re-drive runs), it is carried out again at the next tick, not a lease later by
// the next re-drive: the dead instance's agent stayed reserved, for a call that had ended, one
// lease longer.
func TestReleaseRefusedDuringARedriveCarriedOutBeforeTheLease(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	// A: its releases refused for good, and no outbox loop: it dies with the release pending
	qa := &refusingQueues{fakeQueues: &fakeQueues{}, refuse: map[string]int{"release": 1 << 30}}
	a := leasedInstance(t, rdb, "rv", qa)
	id := "3f9d1b27-6c4e-4a8b-9e52-d17a0c6b8f43"
	key := offeredToAgentA(t, a, id)
	notify(t, a, note("deleted", id, `{"@odata.type":"#microsoft.graph.call","state":"terminated","resultInfo":{"code":0,"subcode":0}}`))
	if c, err := callstate.NewStore(rdb, "rv").Get(context.Background(), key); err != nil ||
		!slices.ContainsFunc(c.Outbox, func(p callstate.Pending) bool { return p.Cmd.Kind == callstate.CmdReleaseAgent }) {
		t.Fatalf("the ended call's outbox holds no release (%v): the test does not set up what it means to", err)
	}
	// B, two leases on (a minute each): A's outbox is due; its re-drive's release is refused once
	qb := &refusingQueues{fakeQueues: &fakeQueues{}, refuse: map[string]int{"release": 1}}
	b := instanceLeased(t, rdb, "rv", &fakeGraph{}, qb, func() time.Time { return time.Now().Add(2 * time.Minute) }, time.Minute)
	runOutbox(t, b)
	eventually(t, "the release refused during the re-drive was not carried out again", func() bool {
		return slices.ContainsFunc(qb.snapshot(), func(op string) bool { return strings.HasPrefix(op, "release agent-a") })
	})
	eventually(t, "the release carried out was not acknowledged", func() bool {
		c, err := callstate.NewStore(rdb, "rv").Get(context.Background(), key)
		return err == nil && len(c.Outbox) == 0
	})
	if n := qb.tries("release"); n != 2 {
		t.Errorf("releases B tried: %d, want 2 (refused in the re-drive, then taken)", n)
	}
}

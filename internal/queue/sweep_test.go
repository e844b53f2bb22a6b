package queue

import (
	"context"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/callbot/callbot/internal/callstate"
)

// The reconciler's sweep reads the queues, then the calls' records, then removes the entries of
// calls that ended: an entry is removed only if it is still there with the score read. A caller
// put back at another score meanwhile keeps their new place; one already gone is not counted.
func TestRemoveEntriesOnlyAtTheScoreRead(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	now := time.Now().UnixMilli()
	must(t, s.Enqueue(ctx, "t", "sales", "ghost", now))
	must(t, s.Enqueue(ctx, "t", "sales", "requeued", now+1))
	must(t, s.Enqueue(ctx, "t", "sales", "gone", now+2))
	must(t, s.Enqueue(ctx, "t", "sales", "waiting", now+3))
	must(t, s.Enqueue(ctx, "t", "support", "other", now+4))

	got, err := s.Entries(ctx, "t", []string{"sales", "support", "empty"})
	must(t, err)
	e := func(call string, score int64) callstate.QueueEntry {
		return callstate.QueueEntry{Call: call, Score: float64(score)}
	}
	want := map[string][]callstate.QueueEntry{
		"sales":   {e("ghost", now), e("requeued", now+1), e("gone", now+2), e("waiting", now+3)},
		"support": {e("other", now+4)},
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Fatalf("entries (-got +want):\n%s", diff)
	}

	must(t, s.Enqueue(ctx, "t", "sales", "requeued", now+10)) // put back at another score since
	must(t, s.Remove(ctx, "t", "sales", "gone"))
	n, err := s.RemoveEntries(ctx, "t", "sales", got["sales"][:3])
	must(t, err)
	if n != 1 {
		t.Errorf("removed %d, want 1 (the ghost)", n)
	}
	w, err := s.Waiting(ctx, "t", "sales")
	must(t, err)
	if diff := cmp.Diff(w, []string{"waiting", "requeued"}); diff != "" {
		t.Errorf("queue after the removal (-got +want):\n%s", diff)
	}
}

// The registry of a tenant's queues (KnownQueues) names every queue a flow of the tenant has had:
// SetMembers registers its queue, and a queue is never taken out (an instance still on an older
// flow may enqueue there). The first SetQueues with no registry fills it from the queue keys in
// Redis (written by a callbot that kept none), the tenant's alone: another tenant whose name a
// MATCH pattern would take for this one's (? is a wildcard) is left out.
func TestKnownQueues(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	known := func(tenant string) []string {
		t.Helper()
		names, err := s.KnownQueues(ctx, tenant)
		must(t, err)
		return names
	}
	if got := known("t?"); len(got) != 0 {
		t.Fatalf("known queues of a new tenant %v, want none", got)
	}
	must(t, s.Enqueue(ctx, "t?", "gone", "ghost", 1)) // an older callbot's queue, not registered
	must(t, s.Enqueue(ctx, "t?", "renamed", "caller", 2))
	must(t, s.Enqueue(ctx, "tx", "other-tenant", "caller", 3))
	must(t, s.SetQueues(ctx, "t?", map[string][]string{"sales": {"a1"}, "support": {"a2"}}))
	if diff := cmp.Diff(known("t?"), []string{"gone", "renamed", "sales", "support"}); diff != "" {
		t.Errorf("known queues after the first start (-got +want):\n%s", diff)
	}

	must(t, s.SetQueues(ctx, "t?", map[string][]string{"sales2": {"a1"}})) // a flow edit
	if diff := cmp.Diff(known("t?"), []string{"gone", "renamed", "sales", "sales2", "support"}); diff != "" {
		t.Errorf("known queues after a flow edit (-got +want):\n%s", diff)
	}
	if got := known("tx"); len(got) != 0 {
		t.Errorf("known queues of a tenant that never started %v, want none", got)
	}
}

// A flow edit rolls out with a callbot that keeps the registry, over instances of one that kept
// none: they, on the old flow, serve queue old (its members in Redis, written when they
// started), in which no caller waits at the moment the first new instance fills the registry
// from the queue keys (an empty queue is no key). It was left out: the old instances go on
// putting callers in old until they are replaced, and a ghost they leave there (a hang-up whose
// enqueue lost its race) was never swept once the rollout was over, no flow naming old. The
// members of every queue an older flow had stay in Redis: they name it too.
func TestKnownQueuesSeededFromOlderFlowsMembers(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	// what an older callbot wrote at its start: the members of its flow's queues, no registry
	for _, q := range []string{"old", "sales"} {
		must(t, s.rdb.SAdd(ctx, s.keys("t", q).members, "a1").Err())
	}
	must(t, s.SetQueues(ctx, "t", map[string][]string{"sales": {"a1"}, "sales2": {"a1"}}))
	must(t, s.Enqueue(ctx, "t", "old", "ghost", 1)) // an old instance, later
	names, err := s.KnownQueues(ctx, "t")
	must(t, err)
	if diff := cmp.Diff(names, []string{"old", "sales", "sales2"}); diff != "" {
		t.Errorf("known queues (-got +want):\n%s", diff)
	}
}

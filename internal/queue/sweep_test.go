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

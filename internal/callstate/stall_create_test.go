package callstate_test

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// Graph delivers an incoming call again, and callbot applies again what it kept, while Redis is
// stalled (a fork or fsync that stops it, a VM paused: TestRedisStall): the creates of the call
// reach Redis one behind the other when it resumes, the first makes the record, the others find
// it. Neither the outbox's lease nor the answer's timer may move to a later create's: found by
// TestRedisStall (8 s), where the outbox index ended at the second create's lease and the timer at
// its due, both past Graph's 15 s answer deadline, and the caller was never answered. Each
// repeated create had swapped in its own due and put back the one it saw, which a third create,
// swapped in between, had made its own.
func TestRepeatedCreatesQueuedBehindAStallKeepTheFirstLeaseAndTimers(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	store := callstate.NewStore(rdb, "rcs")
	ctx := context.Background()
	const id = "0b1c0003-0000-4000-8000-000000000003"
	key := graph.CallKey(id)
	first := time.UnixMilli(time.Now().UnixMilli())
	answer := []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdAnswer}}}
	timer := func(at time.Time) callstate.Timer {
		return callstate.Timer{Tenant: "t1", Call: key, Kind: callstate.TimerAnswer, Token: 1, At: at}
	}

	// a connection each, open before the stall (a dial would wait for Redis too)
	var warm sync.WaitGroup
	for range 8 {
		warm.Go(func() { rdb.BLPop(ctx, 100*time.Millisecond, "rcs:nothing") })
	}
	warm.Wait()

	resume := srv.Hang(t)
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		at := first.Add(time.Duration(i) * time.Second) // each delivery a second later than the one before
		c := &callstate.Call{ID: id, Tenant: "t1", State: callstate.StateAnswering, CreatedAt: at, CmdSeq: 1, Outbox: answer}
		wg.Go(func() { errs[i] = store.Create(ctx, c, at.Add(8*time.Second), timer(at.Add(10*time.Second))) })
		time.Sleep(50 * time.Millisecond) // they reach Redis in this order, most likely
	}
	time.Sleep(100 * time.Millisecond)
	resume()
	wg.Wait()
	won := -1
	for i, err := range errs {
		switch {
		case err == nil && won < 0:
			won = i
		case !errors.Is(err, callstate.ErrExists):
			t.Errorf("create %d: %v, want one to make the record and the others ErrExists", i+1, err)
		}
	}
	if won < 0 {
		t.Fatal("no create made the record")
	}
	t.Logf("create %d made the record", won+1)
	// The outbox's lease and the answer's timer are those of the create that made the record, or
	// of a create computed earlier that reached Redis after it (the order of connections Redis
	// serves after a stall is its own): never a later one's. Later, they fell past Graph's 15 s.
	wantDue := first.Add(time.Duration(won)*time.Second + 8*time.Second)
	due, err := rdb.ZScore(ctx, "rcs:{outbox}", key).Result()
	if at := time.UnixMilli(int64(due)); err != nil || at.After(wantDue) || at.Before(first.Add(8*time.Second)) {
		t.Errorf("outbox index entry due %v (%v), want from the earliest create's lease, %v, to that of the create that made the record, %v",
			at.Sub(first), err, 8*time.Second, wantDue.Sub(first))
	}
	due, err = rdb.ZScore(ctx, "rcs:{timers}", timer(first).Member()).Result()
	if at := time.UnixMilli(int64(due)); err != nil || at.After(wantDue.Add(2*time.Second)) || at.Before(first.Add(10*time.Second)) {
		t.Errorf("answer timer due %v (%v), want from the earliest create's, %v, to that of the create that made the record, %v",
			at.Sub(first), err, 10*time.Second, wantDue.Add(2*time.Second).Sub(first))
	}
}

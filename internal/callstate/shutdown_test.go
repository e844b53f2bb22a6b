package callstate_test

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// A shutdown (the timer loop's context ends) that comes while RunTimers applies the timers it has
// just claimed must not leave them claimed and unapplied: nobody would fire them before their
// claim ran out, a lease (8 s) late. Here the answer check, due 10 s after the answer, would have
// fired 18 s after it, past Graph's 15 s answer deadline: a caller whose answer was lost rang
// until Graph dropped the call, when the check would have answered again in time.
func TestTimersClaimedWhenTheShutdownComesAreNotLeftALeaseLate(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	g := &fakeGraph{state: graph.CallIncoming}
	var (
		mu       sync.Mutex
		clock    = time.Now()
		shutdown func() // when set, called by the second reading of the clock
		reads    int
	)
	now := func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		if shutdown != nil {
			if reads++; reads == 2 {
				shutdown()
			}
		}
		return clock
	}
	store := callstate.NewStore(rdb, "test")
	m := instance(t, rdb, "test", g, &fakeQueues{}, now)
	id := "7c1e0f44-1b7e-4c1e-9a55-3f1d2c3b4a50"
	key := graph.CallKey(id)
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	// no established: the answer was lost on its way to Graph
	mu.Lock()
	clock = clock.Add(11 * time.Second) // the answer check is due
	mu.Unlock()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	mu.Lock()
	shutdown = cancel // the first reading claims the due timers; the shutdown comes right after
	mu.Unlock()
	before := len(g.log())
	done := make(chan struct{})
	go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("RunTimers did not return after its context ended")
	}
	m.Wait()

	applied := countPrefix(g.log()[before:], "get") > 0
	c, err := store.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	tok := c.Timers[callstate.TimerAnswer]
	score, err := rdb.ZScore(context.Background(), "test:{timers}", "tenant-1|"+key+"|answer|"+strconv.FormatInt(tok, 10)).Result()
	dueNow := err == nil && int64(score) <= clock.UnixMilli()
	if !applied && !dueNow {
		t.Fatalf("the answer check claimed as the shutdown came was neither applied nor due again at once "+
			"(score %v, %v; due %d): another instance fires it only a lease late", score, err, clock.UnixMilli())
	}
}

package queue

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/graph"
)

// slowPresence answers a presence read taken now, but only once released: a Graph request that
// takes longer than the poller's lease.
type slowPresence struct {
	called, release chan struct{}
	p               graph.Presence
}

func (f *slowPresence) Presences(_ context.Context, ids []string) ([]graph.Presence, error) {
	p := f.p // what presence said when the request was made
	f.called <- struct{}{}
	<-f.release
	return []graph.Presence{p}, nil
}

// A poller whose lease ran out while its Graph request was in flight wrote its old reading over
// the newer one of the poller that took the lease; the new holder's next polls (deltas) never
// wrote it again, so the agent was offered calls while presence said offline. The presence
// write is now fenced by the lease: it lives in the tenant's slot and the script refuses a
// write from a poller that no longer holds it (ErrLeaseLost).
func TestPollerThatLostItsLeaseCannotOverwritePresence(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))

	every := 50 * time.Millisecond // lease TTL 150 ms
	slow := &slowPresence{called: make(chan struct{}, 1), release: make(chan struct{}),
		p: graph.Presence{UserID: "a1", Availability: "Available", Activity: "Available"}}
	wroteA := make(chan struct{}, 8)
	a := &Poller{Store: s, Source: slow, Tenant: "t", Agents: []string{"a1"}, Instance: "A",
		Log: zaptest.NewLogger(t), OnChange: func() { wroteA <- struct{}{} }}
	go a.Run(ctx, every)
	<-slow.called         // A holds the lease and reads "Available" ...
	time.Sleep(4 * every) // ... its Graph request outlives the lease
	b := &Poller{Store: s, Tenant: "t", Agents: []string{"a1"}, Instance: "B", Log: zaptest.NewLogger(t),
		Source: &fakePresence{status: map[string]graph.Presence{"a1": {UserID: "a1", Availability: "Offline", Activity: "Offline"}}}}
	held, err := b.lease(ctx, time.Minute) // B keeps it: A never polls again
	must(t, err)
	if !held {
		t.Fatal("B did not get the expired lease")
	}
	must(t, b.PollOnce(ctx)) // B: a1 is now Offline (full write)
	close(slow.release)      // A's old answer arrives and is written
	select {
	case <-wroteA:
	case <-time.After(500 * time.Millisecond): // A's write was refused
	}
	must(t, b.PollOnce(ctx)) // B's next poll, between full writes: a1 unchanged for B, not written

	must(t, s.Enqueue(ctx, "t", "q", "c1", 1))
	v, _ := s.rdb.HGet(ctx, s.keys("t", "").routable, "a1").Result()
	if r, err := s.Reserve(ctx, "t", "q", time.Now()); err == nil {
		t.Errorf("routable[a1]=%q after the lease holder wrote Offline: %s reserved for %s while offline", v, r.Agent, r.Call)
	}
}

// slowBatches answers every presence request after delay: a Graph that is slow, but answers.
type slowBatches struct{ delay time.Duration }

func (f slowBatches) Presences(ctx context.Context, ids []string) ([]graph.Presence, error) {
	time.Sleep(f.delay)
	out := make([]graph.Presence, len(ids))
	for i, id := range ids {
		out[i] = graph.Presence{UserID: id, Availability: "Available", Activity: "Available"}
	}
	return out, nil
}

// The lease was taken once per poll. A poll of several batches (650 agents each) that took
// longer than the lease, with Graph slow but answering, had its write refused as if another
// poller had taken the lease, though none had; the next poll took the lease again and was
// refused again, so with one instance (or every instance as slow) presence was never written
// again: agents who came online were never offered a call, and agents who went offline kept
// being offered calls. Now the poller renews its lease before each batch and before writing.
func TestSlowPollOfSeveralBatchesStillWritesPresence(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newStore(t)
	agents := make([]string, 700) // two batches
	for i := range agents {
		agents[i] = fmt.Sprintf("agent-%04d", i)
	}
	must(t, s.SetMembers(ctx, "t", "q", agents))
	every := 50 * time.Millisecond // lease TTL 150 ms; each batch takes 100 ms
	p := &Poller{Store: s, Source: slowBatches{delay: 2 * every}, Tenant: "t", Agents: agents, Instance: "only",
		Log: zaptest.NewLogger(t)}
	go p.Run(ctx, every)
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if v, _ := s.rdb.HGet(ctx, s.keys("t", "").routable, "agent-0000").Result(); v == "1" {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Error("presence never written: every poll of the only poller was refused as lease lost")
}

// A poller paused (its instance does not reach Graph while the others do) hands its lease back
// at once, for another instance to poll, rather than keep it while its reads fail and presence
// ages past MaxAge; unpaused, it takes a free lease again.
func TestPausedPollerHandsItsLeaseBack(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newStore(t)
	var paused atomic.Bool
	presence := &fakePresence{status: map[string]graph.Presence{"a1": {UserID: "a1", Availability: "Available", Activity: "Available"}}}
	a := &Poller{Store: s, Source: presence, Tenant: "t", Agents: []string{"a1"}, Instance: "A",
		Log: zaptest.NewLogger(t), Paused: paused.Load}
	every := 20 * time.Millisecond
	go a.Run(ctx, every)
	holder := func() string {
		v, _ := s.rdb.Get(ctx, s.k("t", "lease:presence")).Result()
		return v
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(2 * time.Second); !ok(); time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: lease holder %q", what, holder())
			}
		}
	}
	waitFor("A takes the lease", func() bool { return holder() == "A" })
	paused.Store(true)
	waitFor("A, paused, hands it back", func() bool { return holder() == "" })
	b := &Poller{Store: s, Source: presence, Tenant: "t", Agents: []string{"a1"}, Instance: "B", Log: zaptest.NewLogger(t)}
	if held, err := b.lease(ctx, time.Minute); err != nil || !held {
		t.Fatalf("B asks for the lease A handed back: %v, %v", held, err)
	}
	must(t, s.ReleasePresenceLease(ctx, "t", "B"))
	paused.Store(false)
	waitFor("A, unpaused, takes it again", func() bool { return holder() == "A" })
}

// A dispatcher paused (its instance does not reach Graph while the others do) offers no caller:
// the offer's transfer would wait for Graph in vain there. The caller keeps their place for the
// other instances' dispatchers, and is offered once it is unpaused.
func TestPausedDispatcherOffersNoCaller(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true}))
	off := &fakeOfferer{accept: true}
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	var paused atomic.Bool
	paused.Store(true)
	d.Paused = paused.Load
	go d.Run(ctx, 5*time.Millisecond)
	must(t, d.Enqueue(ctx, "t", "q", "c1", 1))
	time.Sleep(100 * time.Millisecond) // twenty ticks
	off.mu.Lock()
	offers := len(off.offers)
	off.mu.Unlock()
	if n, _ := s.Length(ctx, "t", "q"); offers != 0 || n != 1 {
		t.Fatalf("paused: %d offers, %d callers waiting; want none, and the caller in the queue", offers, n)
	}
	paused.Store(false)
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		off.mu.Lock()
		offers = len(off.offers)
		off.mu.Unlock()
		if offers == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("unpaused: %d offers, want the caller offered", offers)
		}
	}
}

// gatedPresence answers a presence batch once a second one is being read too (or after a
// second): it sees how many batches are read at once.
type gatedPresence struct {
	mu            sync.Mutex
	inFlight, max int
	two           chan struct{} // closed once two batches are being read at once
	closed        bool
}

func (g *gatedPresence) Presences(_ context.Context, ids []string) ([]graph.Presence, error) {
	g.mu.Lock()
	g.inFlight++
	g.max = max(g.max, g.inFlight)
	if g.inFlight == 2 && !g.closed {
		close(g.two)
		g.closed = true
	}
	g.mu.Unlock()
	select {
	case <-g.two:
	case <-time.After(time.Second):
	}
	g.mu.Lock()
	g.inFlight--
	g.mu.Unlock()
	out := make([]graph.Presence, len(ids))
	for i, id := range ids {
		out[i] = graph.Presence{UserID: id, Availability: "Available", Activity: "Available"}
	}
	return out, nil
}

// A tenant of many agents has its presence batches read at once, not one after another (a
// reading 16 of Graph's round trips old for 10,000 agents), and never more than
// presenceParallel at a time; every agent is read.
func TestPollerReadsBatchesAtOnce(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	agents := make([]string, 8*graph.MaxPresenceIDs)
	for i := range agents {
		agents[i] = fmt.Sprintf("agent-%05d", i)
	}
	src := &gatedPresence{two: make(chan struct{})}
	p := &Poller{Store: s, Source: src, Tenant: "t", Agents: agents, Instance: "i1", Log: zaptest.NewLogger(t)}
	must(t, p.PollOnce(ctx))
	if src.max < 2 || src.max > presenceParallel {
		t.Errorf("%d batches read at once at most, want 2 to %d", src.max, presenceParallel)
	}
	n, err := s.rdb.HLen(ctx, s.k("t", "routable")).Result()
	if err != nil || n != int64(len(agents)) {
		t.Errorf("%d agents' presence written (%v), want %d", n, err, len(agents))
	}
}

package queue

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

func newStore(t *testing.T) *Store {
	return NewStore(redistest.Start(t).Client(t), "test")
}

func reserveAll(t *testing.T, s *Store, queue string) []Reservation {
	var out []Reservation
	for {
		r, err := s.Reserve(context.Background(), "t", queue, time.Now())
		if errors.Is(err, ErrEmpty) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, r)
	}
}

func TestReserveLongestIdleRoutableMember(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "sales", []string{"a1", "a2", "a3", "a4"}))
	must(t, s.SetMembers(ctx, "t", "support", []string{"a5"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true, "a2": true, "a3": false, "a4": true, "a5": true}))
	// a1 finished a call recently; a2 longest idle
	must(t, s.Release(ctx, "t", "a1", "none", callstate.AgentConnected, 0)) // not reserved: no-op
	s.rdb.ZAdd(ctx, s.keys("t", "").idle, redisZ(2000, "a1"), redisZ(1000, "a2"), redisZ(1500, "a4"))

	for i, c := range []string{"c1", "c2", "c3", "c4"} {
		must(t, s.Enqueue(ctx, "t", "sales", c, int64(100+i)))
	}
	got := reserveAll(t, s, "sales")
	want := []Reservation{{"c1", "a2", 100}, {"c2", "a4", 101}, {"c3", "a1", 102}}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Fatalf("reservations (-got +want): %s", diff)
	}
	// a3 is not routable, a5 is not a member: c4 waits
	if w, _ := s.Waiting(ctx, "t", "sales"); !cmp.Equal(w, []string{"c4"}) {
		t.Errorf("waiting = %v", w)
	}
}

func TestFailedTransferBackToHeadAndCooldown(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	s.FailCooldown = time.Hour
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1", "a2"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true, "a2": true}))
	must(t, s.Enqueue(ctx, "t", "q", "first", 100))
	must(t, s.Enqueue(ctx, "t", "q", "second", 200))
	r, err := s.Reserve(ctx, "t", "q", time.Now())
	must(t, err)
	// the agent declines: the caller goes back with its original score, ahead of "second"
	must(t, s.Release(ctx, "t", r.Agent, r.Call, callstate.AgentFailed, 0))
	must(t, s.Enqueue(ctx, "t", "q", r.Call, r.Score))
	if w, _ := s.Waiting(ctx, "t", "q"); !cmp.Equal(w, []string{"first", "second"}) {
		t.Fatalf("waiting = %v, want the failed caller at the head", w)
	}
	r2, err := s.Reserve(ctx, "t", "q", time.Now())
	must(t, err)
	if r2.Call != "first" || r2.Agent == r.Agent {
		t.Errorf("second reservation %+v: want first caller, another agent than %s (cooling down)", r2, r.Agent)
	}
	if _, err := s.Reserve(ctx, "t", "q", time.Now()); !errors.Is(err, ErrEmpty) {
		t.Errorf("third reservation: %v, want ErrEmpty (one agent busy, one cooling down)", err)
	}
}

// Many dispatchers racing (as several instances would) never reserve one agent twice.
func TestNoAgentReservedTwice(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	var agents []string
	routable := map[string]bool{}
	for i := range 10 {
		a := fmt.Sprintf("a%d", i)
		agents = append(agents, a)
		routable[a] = true
	}
	must(t, s.SetMembers(ctx, "t", "q1", agents))
	must(t, s.SetMembers(ctx, "t", "q2", agents[5:])) // agents in two queues
	must(t, s.SetRoutable(ctx, "t", routable))
	for i := range 200 {
		must(t, s.Enqueue(ctx, "t", fmt.Sprintf("q%d", 1+i%2), fmt.Sprintf("c%d", i), int64(i)))
	}
	var mu sync.Mutex
	byAgent := map[string][]string{}
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Go(func() {
			for _, q := range []string{"q1", "q2"}[w%2:] {
				for {
					r, err := s.Reserve(ctx, "t", q, time.Now())
					if err != nil {
						break
					}
					mu.Lock()
					byAgent[r.Agent] = append(byAgent[r.Agent], r.Call)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	total := 0
	for a, calls := range byAgent {
		if len(calls) != 1 {
			t.Errorf("agent %s reserved for %d calls at once: %v", a, len(calls), calls)
		}
		total += len(calls)
	}
	if total != 10 {
		t.Errorf("%d reservations, want 10 (one per agent)", total)
	}
}

type fakeOfferer struct {
	mu     sync.Mutex
	offers []string
	accept bool
}

func (f *fakeOfferer) Offer(_ context.Context, tenant, call, agent string) (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.offers = append(f.offers, call+"->"+agent)
	return f.accept, nil
}

func TestDispatcherReleasesAgentOfVanishedCaller(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true}))
	off := &fakeOfferer{accept: false}
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	must(t, d.Enqueue(ctx, "t", "q", "gone", 1))
	must(t, d.Enqueue(ctx, "t", "q", "live", 2))
	if n := d.DispatchOnce(ctx); n != 0 {
		t.Errorf("%d offers accepted, want 0", n)
	}
	off.accept = true
	if n := d.DispatchOnce(ctx); n != 0 {
		t.Errorf("%d offers: both callers were consumed already", n)
	}
	if diff := cmp.Diff(off.offers, []string{"gone->a1", "live->a1"}); diff != "" {
		t.Errorf("offers (-got +want): %s", diff)
	}
	if r, _ := s.Reserved(ctx, "t", "a1"); r != "" {
		t.Errorf("agent still reserved for %q", r)
	}
}

type fakePresence struct {
	mu      sync.Mutex
	batches []int
	status  map[string]graph.Presence
}

func (f *fakePresence) Presences(_ context.Context, ids []string) ([]graph.Presence, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(ids) > graph.MaxPresenceIDs {
		return nil, fmt.Errorf("too many ids: %d", len(ids))
	}
	f.batches = append(f.batches, len(ids))
	var out []graph.Presence
	for _, id := range ids {
		if p, ok := f.status[id]; ok {
			out = append(out, p)
		}
	}
	return out, nil
}

func TestPollerBatchesOf650(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	var agents []string
	src := &fakePresence{status: map[string]graph.Presence{}}
	for i := range 1400 {
		a := fmt.Sprintf("agent-%04d", i)
		agents = append(agents, a)
		av := "Available"
		if i%2 == 1 {
			av = "Busy"
		}
		src.status[a] = graph.Presence{UserID: a, Availability: av, Activity: av}
	}
	delete(src.status, "agent-0000") // Graph does not know this one
	changed := 0
	p := &Poller{Store: s, Source: src, Tenant: "t", Agents: agents, Instance: "i1", Log: zaptest.NewLogger(t), OnChange: func() { changed++ }}
	must(t, p.PollOnce(ctx))
	if diff := cmp.Diff(src.batches, []int{650, 650, 100}); diff != "" {
		t.Errorf("batches (-got +want): %s", diff)
	}
	got, _ := s.rdb.HMGet(ctx, s.k("t", "routable"), "agent-0000", "agent-0001", "agent-0002").Result()
	if diff := cmp.Diff(got, []any{"0", "0", "1"}); diff != "" {
		t.Errorf("routable (-got +want): %s", diff)
	}
	must(t, p.PollOnce(ctx))
	if changed != 1 {
		t.Errorf("OnChange called %d times, want 1 (second poll changed nothing)", changed)
	}
	// a second instance does not poll while the first holds the lease
	if held, _ := p.lease(ctx, time.Minute); !held {
		t.Fatal("first instance could not take the lease")
	}
	p2 := &Poller{Store: s, Source: src, Tenant: "t", Agents: agents, Instance: "i2", Log: zaptest.NewLogger(t)}
	if held, _ := p2.lease(ctx, time.Minute); held {
		t.Error("second instance took the presence lease")
	}
	if held, _ := p.lease(ctx, time.Minute); !held {
		t.Error("lease holder could not renew")
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// A caller joining a queue no agent can take does not make the dispatcher scan the agents
// again; an agent event (release, presence) or the tick does.
func TestDispatcherSkipsExhaustedQueueUntilAnAgentEvent(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": false}))
	off := &fakeOfferer{accept: true}
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	must(t, d.Enqueue(ctx, "t", "q", "c1", 1))
	if n := d.DispatchOnce(ctx); n != 0 || !d.exhausted["q"] {
		t.Fatalf("%d offers, exhausted=%v; want none and the queue marked", n, d.exhausted["q"])
	}
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true}))
	must(t, d.Enqueue(ctx, "t", "q", "c2", 2))
	if n := d.DispatchOnce(ctx); n != 0 {
		t.Errorf("%d offers on a caller event for an exhausted queue, want the scan skipped", n)
	}
	clear(d.exhausted) // what Run does on PokeAgents and on every tick
	if n := d.DispatchOnce(ctx); n != 1 || off.offers[0] != "c1->a1" {
		t.Errorf("after an agent event: %d offers %v, want c1 offered to a1", n, off.offers)
	}
}

package queue

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
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
	must(t, s.RepairFree(ctx, "t")) // the idle times were written behind the store's back

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
	slices.Sort(src.batches) // read at once: in any order
	if diff := cmp.Diff(src.batches, []int{100, 650, 650}); diff != "" {
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

// The scan of free agents reads them in chunks: an agent far down the list (past several chunks
// of agents who cannot take a call, for each reason there is) is still found, and it is the
// longest idle of those who can; with nobody free, the caller keeps waiting.
func TestReserveFindsTheLongestIdleFreeAgentPastManyUnavailable(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	s.FailCooldown = time.Hour
	const n = 700
	var members []string
	routable := map[string]bool{}
	var idle []redis.Z
	for i := range n {
		a := fmt.Sprintf("a%03d", i)
		idle = append(idle, redisZ(float64(1000+i), a))
		routable[a] = true
		if i%4 != 0 { // every fourth agent serves another queue only
			members = append(members, a)
		}
		if i%4 == 1 {
			routable[a] = false
		}
	}
	must(t, s.SetMembers(ctx, "t", "q", members))
	must(t, s.SetMembers(ctx, "t", "other", []string{"a000"}))
	must(t, s.SetRoutable(ctx, "t", routable))
	must(t, s.rdb.ZAdd(ctx, s.keys("t", "").idle, idle...).Err())
	k := s.keys("t", "q")
	for i := 0; i < 600; i++ {
		a := fmt.Sprintf("a%03d", i)
		switch i % 4 {
		case 2:
			must(t, s.rdb.HSet(ctx, k.busy, a, "someone").Err()) // reserved for another call
		case 3:
			must(t, s.rdb.ZAdd(ctx, k.cool, redisZ(float64(time.Now().Add(time.Hour).UnixMilli()), a)).Err())
		}
	}
	must(t, s.RepairFree(ctx, "t")) // idle times, reservations, cool-downs written directly
	must(t, s.Enqueue(ctx, "t", "q", "c1", 1))
	must(t, s.Enqueue(ctx, "t", "q", "c2", 2))
	must(t, s.Enqueue(ctx, "t", "q", "c3", 3))
	// a602 is the first agent past 600 that is a member, routable and free; then a603, a606
	got := reserveAll(t, s, "q")[:3]
	want := []Reservation{{"c1", "a602", 1}, {"c2", "a603", 2}, {"c3", "a606", 3}}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Fatalf("reservations (-got +want): %s", diff)
	}

	// nobody free: the caller waits, whatever the number of chunks read
	s2 := newStore(t)
	must(t, s2.SetMembers(ctx, "t", "q", members))
	must(t, s2.SetRoutable(ctx, "t", map[string]bool{}))
	must(t, s2.Enqueue(ctx, "t", "q", "c1", 1))
	if _, err := s2.Reserve(ctx, "t", "q", time.Now()); !errors.Is(err, ErrNoAgent) {
		t.Fatalf("reserve with no routable agent: %v, want ErrNoAgent", err)
	}
	if w, _ := s2.Waiting(ctx, "t", "q"); !cmp.Equal(w, []string{"c1"}) {
		t.Errorf("waiting = %v, want c1 still there", w)
	}
}

// BenchmarkReserve is one reservation, and the release that makes the agent free again, in a
// tenant of 2,000 agents. The agents free are the longest idle, as in a contact centre with
// spare agents; the time is mostly Redis running the script.
//
//	go test -run '^$' -bench Reserve -count 8 ./internal/queue/ | tee new.txt
func BenchmarkReserve(b *testing.B) {
	ctx := context.Background()
	s := NewStore(redistest.Start(b).Client(b), "bench")
	s.ConnectedGuard = 0
	const n = 2000
	agents := make([]string, n)
	routable := map[string]bool{}
	for i := range agents {
		agents[i] = fmt.Sprintf("agent-%04d", i)
		routable[agents[i]] = true
	}
	if err := errors.Join(s.SetMembers(ctx, "t", "q", agents), s.SetRoutable(ctx, "t", routable)); err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		if err := s.Enqueue(ctx, "t", "q", "call", 1); err != nil {
			b.Fatal(err)
		}
		r, err := s.Reserve(ctx, "t", "q", time.Now())
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Release(ctx, "t", r.Agent, r.Call, callstate.AgentAbandoned, 0); err != nil {
			b.Fatal(err)
		}
	}
}

// freeWant is what the set of free agents must hold: every idle agent who is routable and not
// reserved, with its idle score.
func freeWant(t *testing.T, s *Store, tenant string) []redis.Z {
	ctx := context.Background()
	k := s.keys(tenant, "")
	idle, err := s.rdb.ZRangeWithScores(ctx, k.idle, 0, -1).Result()
	must(t, err)
	routable, err := s.rdb.HGetAll(ctx, k.routable).Result()
	must(t, err)
	busy, err := s.rdb.HGetAll(ctx, k.busy).Result()
	must(t, err)
	want := []redis.Z{}
	for _, z := range idle {
		if _, reserved := busy[z.Member.(string)]; routable[z.Member.(string)] == "1" && !reserved {
			want = append(want, z)
		}
	}
	return want
}

func freeGot(t *testing.T, s *Store, tenant string) []redis.Z {
	got, err := s.rdb.ZRangeWithScores(context.Background(), s.keys(tenant, "").free, 0, -1).Result()
	must(t, err)
	return append([]redis.Z{}, got...)
}

// Whatever happens to agents (presence changes, reservations, releases of every outcome, queue
// membership changes, in random order), the set of free agents the reservation reads stays
// exactly the idle agents who are routable and not reserved, with their idle times: an agent
// missing from it would never be offered a call.
func TestFreeAgentsStayTrue(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	s.FailCooldown, s.ConnectedGuard = time.Millisecond, time.Millisecond
	rng := rand.New(rand.NewPCG(3, 25))
	agents := []string{"a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"}
	queues := []string{"q1", "q2"}
	must(t, s.SetMembers(ctx, "t", "q1", agents[:5]))
	must(t, s.SetMembers(ctx, "t", "q2", agents[3:]))
	reserved := map[string]string{} // agent -> call
	calls := 0
	for step := range 3000 {
		var did string
		switch op := rng.IntN(10); {
		case op < 3:
			m := map[string]bool{}
			for range 1 + rng.IntN(4) {
				m[agents[rng.IntN(len(agents))]] = rng.IntN(3) > 0
			}
			must(t, s.SetRoutable(ctx, "t", m))
			did = fmt.Sprintf("presence %v", m)
		case op < 6:
			q := queues[rng.IntN(2)]
			calls++
			c := fmt.Sprintf("c%d", calls)
			must(t, s.Enqueue(ctx, "t", q, c, int64(calls)))
			r, err := s.Reserve(ctx, "t", q, time.Now())
			if err == nil {
				reserved[r.Agent] = r.Call
			} else if !errors.Is(err, ErrNoAgent) {
				t.Fatal(err)
			} else {
				must(t, s.Remove(ctx, "t", q, c))
			}
			did = fmt.Sprintf("reserve in %s: %+v %v", q, r, err)
		case op < 9 && len(reserved) > 0:
			held := slices.Sorted(maps.Keys(reserved)) // in order: a failing seed fails again
			a := held[rng.IntN(len(held))]
			c := reserved[a]
			outcome := []callstate.AgentOutcome{callstate.AgentConnected, callstate.AgentFailed, callstate.AgentAbandoned}[rng.IntN(3)]
			must(t, s.Release(ctx, "t", a, c, outcome, 0))
			delete(reserved, a)
			did = fmt.Sprintf("release %s from %s (%v)", a, c, outcome)
		case op < 9:
			did = "nothing to release"
		default:
			from := rng.IntN(len(agents))
			q := queues[rng.IntN(2)]
			must(t, s.SetMembers(ctx, "t", q, agents[from:min(from+3, len(agents))]))
			did = fmt.Sprintf("members of %s from %d", q, from)
		}
		if got, want := freeGot(t, s, "t"), freeWant(t, s, "t"); !cmp.Equal(got, want) {
			t.Fatalf("step %d (%s): free agents %v, want %v", step, did, got, want)
		}
	}
}

// A set of free agents that is wrong (written by an older callbot, or lost) does no harm: an
// agent in it who is reserved or not routable is skipped and dropped from it, and the poller's
// first poll rebuilds it.
func TestWrongFreeSetIsSkippedAndRepaired(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1", "a2", "a3"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": false, "a2": true, "a3": true}))
	k := s.keys("t", "q")
	must(t, s.rdb.HSet(ctx, k.busy, "a2", "other-call").Err()) // an older callbot reserved a2
	must(t, s.rdb.ZAdd(ctx, k.free, redisZ(0, "a1"), redisZ(0, "a2")).Err())
	must(t, s.Enqueue(ctx, "t", "q", "c1", 1))
	r, err := s.Reserve(ctx, "t", "q", time.Now())
	must(t, err)
	if r.Agent != "a3" {
		t.Errorf("reserved %s, want a3 (a1 not routable, a2 reserved)", r.Agent)
	}
	if got := freeGot(t, s, "t"); len(got) != 0 {
		t.Errorf("free agents after the reservation: %v, want a1 and a2 dropped, a3 taken", got)
	}

	// the set is lost: the poller's first poll rebuilds it
	must(t, s.rdb.Del(ctx, k.free).Err())
	must(t, s.Release(ctx, "t", "a3", "c1", callstate.AgentAbandoned, 0))
	must(t, s.rdb.Del(ctx, k.free).Err())
	src := &fakePresence{status: map[string]graph.Presence{}}
	for _, a := range []string{"a1", "a2", "a3"} {
		src.status[a] = graph.Presence{UserID: a, Availability: "Available", Activity: "Available"}
	}
	p := &Poller{Store: s, Source: src, Tenant: "t", Agents: []string{"a1", "a2", "a3"}, Log: zaptest.NewLogger(t)}
	must(t, p.PollOnce(ctx))
	if got, want := freeGot(t, s, "t"), freeWant(t, s, "t"); !cmp.Equal(got, want) || len(want) != 2 {
		t.Errorf("free agents after the first poll: %v, want %v (a1 and a3; a2 still reserved)", got, want)
	}
}

// Between full writes a poll writes only the presences that changed since the last one; a full
// write (every SyncEvery, and the first poll after the lease is taken) writes them all, so what
// another poller wrote meanwhile is set right.
func TestPollerWritesChangesThenEverything(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1", "a2"}))
	src := &fakePresence{status: map[string]graph.Presence{
		"a1": {UserID: "a1", Availability: "Available", Activity: "Available"},
		"a2": {UserID: "a2", Availability: "Available", Activity: "Available"},
	}}
	p := &Poller{Store: s, Source: src, Tenant: "t", Agents: []string{"a1", "a2"}, Log: zaptest.NewLogger(t), SyncEvery: time.Hour}
	routable := func() map[string]string {
		m, err := s.rdb.HGetAll(ctx, s.keys("t", "").routable).Result()
		must(t, err)
		return m
	}
	must(t, p.PollOnce(ctx))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": false})) // another instance's poll
	src.mu.Lock()
	src.status["a2"] = graph.Presence{UserID: "a2", Availability: "Away", Activity: "Away"}
	src.mu.Unlock()
	must(t, p.PollOnce(ctx))
	if got := routable(); got["a2"] != "0" || got["a1"] != "0" {
		t.Errorf("after a poll between full writes: %v, want a2's change written and a1 left alone", got)
	}
	p.synced = time.Time{} // what Run does when it takes the lease
	must(t, p.PollOnce(ctx))
	if got := routable(); got["a1"] != "1" || got["a2"] != "0" {
		t.Errorf("after a full write: %v, want a1 routable again", got)
	}
	if got, want := freeGot(t, s, "t"), freeWant(t, s, "t"); !cmp.Equal(got, want) || len(want) != 1 {
		t.Errorf("free agents %v, want %v (a1 only)", got, want)
	}
}

// BenchmarkSetRoutable is one presence poll's write in a tenant of 2,000 agents of whom half
// change presence: the script runs inside Redis's single thread, so its time delays every other
// command of every instance.
func BenchmarkSetRoutable(b *testing.B) {
	ctx := context.Background()
	s := NewStore(redistest.Start(b).Client(b), "bench")
	const n = 2000
	agents := make([]string, n)
	for i := range agents {
		agents[i] = fmt.Sprintf("agent-%04d", i)
	}
	if err := s.SetMembers(ctx, "t", "q", agents); err != nil {
		b.Fatal(err)
	}
	flip := false
	for b.Loop() {
		m := make(map[string]bool, n)
		for i, a := range agents {
			m[a] = i%2 == 0 || flip
		}
		flip = !flip
		if err := s.SetRoutable(ctx, "t", m); err != nil {
			b.Fatal(err)
		}
	}
}

// shutdownOfferer is an Offerer that meets a shutdown during the offer: the dispatcher's context
// ends (SIGTERM stops the loops) and, as the machine's Redis calls then do, the offer and the
// read of the call fail with the context's error; nothing was applied.
type shutdownOfferer struct{ stop context.CancelFunc }

func (f *shutdownOfferer) Offer(ctx context.Context, _, _, _ string) (bool, error) {
	f.stop()
	return false, ctx.Err()
}

func (f *shutdownOfferer) Offered(ctx context.Context, _, _, _ string) (bool, error) {
	return false, ctx.Err()
}

// An instance stopped between reserving an agent and offering them the caller hands both back:
// the caller is in the queue again and the agent free, so another instance offers the caller at
// once. The undo ran on the context the shutdown had ended: it failed, and the caller sat out of
// the queue, the agent reserved, until a reconciler's pass (minutes) repaired them.
func TestDispatcherStoppedMidOfferHandsBackCallerAndAgent(t *testing.T) {
	s := newStore(t)
	bg := context.Background()
	must(t, s.SetMembers(bg, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(bg, "t", map[string]bool{"a1": true}))
	must(t, s.Enqueue(bg, "t", "q", "c1", 1))
	ctx, stop := context.WithCancel(bg)
	defer stop()
	d := NewDispatcher(s, &shutdownOfferer{stop: stop}, "t", []string{"q"}, zaptest.NewLogger(t))
	if n := d.DispatchOnce(ctx); n != 0 {
		t.Fatalf("%d offers made, want 0", n)
	}
	if n, _ := s.Length(bg, "t", "q"); n != 1 {
		t.Errorf("%d callers in the queue after the interrupted offer, want the caller back", n)
	}
	if r, _ := s.Reserved(bg, "t", "a1"); r != "" {
		t.Errorf("agent still reserved for %q after the interrupted offer", r)
	}
}

// presenceFunc is a PresenceSource from a function.
type presenceFunc func(ctx context.Context, ids []string) ([]graph.Presence, error)

func (f presenceFunc) Presences(ctx context.Context, ids []string) ([]graph.Presence, error) {
	return f(ctx, ids)
}

// How old the presence that routing goes by is, every instance can tell
// (callbot_presence_age_seconds): the time of the last poll that read every agent. A poll Graph
// refused (429) does not count: its agents keep an older reading, which grows old.
func TestPresenceReadAtCountsOnlyWholeReadings(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	if at, err := s.PresenceReadAt(ctx, "t"); err != nil || !at.IsZero() {
		t.Fatalf("before any poll: %v %v, want the zero time", at, err)
	}
	src := &fakePresence{status: map[string]graph.Presence{"a1": {UserID: "a1", Availability: "Available", Activity: "Available"}}}
	p := &Poller{Store: s, Source: src, Tenant: "t", Agents: []string{"a1"}, Instance: "i1", Log: zaptest.NewLogger(t)}
	before := time.Now().Truncate(time.Millisecond)
	must(t, p.PollOnce(ctx))
	at, err := s.PresenceReadAt(ctx, "t")
	if err != nil || at.Before(before) || at.After(time.Now()) {
		t.Fatalf("after a poll: %v %v, want its time", at, err)
	}
	p.Source = presenceFunc(func(context.Context, []string) ([]graph.Presence, error) {
		return nil, &graph.Error{Op: "getPresencesByUserId", Status: 429, Code: "TooManyRequests"}
	})
	time.Sleep(5 * time.Millisecond)
	if err := p.PollOnce(ctx); err == nil {
		t.Fatal("a poll Graph refused returned no error")
	}
	if again, _ := s.PresenceReadAt(ctx, "t"); !again.Equal(at) {
		t.Errorf("after a refused poll: %v, want the last whole reading's %v", again, at)
	}
}

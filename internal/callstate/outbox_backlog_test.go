package callstate_test

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// Every transition that decides commands leaves its call in the outbox index until a claim finds
// them acknowledged, so under load many outboxes fall due every second, nearly all of them done
// already. RunOutbox claimed at most 100 a tick (a second): at a few hundred calls a second the
// index fell behind, and the answer of an instance that died waited behind the backlog, re-driven
// seconds (then minutes) after its lease ran out, past Graph's 15 s answer deadline.
func TestOutboxBacklogDoesNotHoldUpADeadInstancesAnswer(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	var clock skewClock
	newInstance := func(g *fakeGraph) *callstate.Machine { return instance(t, rdb, "bl", g, &fakeQueues{}, clock.now) }
	incoming := func(m *callstate.Machine, id string) {
		ns, _ := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		if err := m.Notify(context.Background(), "t1", ns); err != nil {
			t.Fatal(err)
		}
	}
	// B answers 250 calls, all acknowledged: their index entries fall due a lease later
	g := &fakeGraph{state: graph.CallIncoming}
	b := newInstance(g)
	for i := range 250 {
		incoming(b, "busy-"+strconv.Itoa(i))
	}
	b.Wait()
	time.Sleep(5 * time.Millisecond)
	// A saves the answer of one more call and dies before sending it
	hung := &fakeGraph{block: make(chan struct{})}
	a := newInstance(hung)
	defer func() { close(hung.block); a.Wait() }()
	incoming(a, "c-dead")
	before := len(g.log())

	clock.add(9 * time.Second) // every lease has run out
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.RunOutbox(ctx, time.Second); close(done) }()
	time.Sleep(2500 * time.Millisecond) // two ticks and more
	cancel()
	<-done
	b.Wait()
	if got := countPrefix(g.log()[before:], "answer c-dead"); got != 1 {
		t.Fatalf("the dead instance's answer sent %d times 1.5 s after the first re-drive pass, want once: "+
			"it waited behind %d outboxes already done", got, 250)
	}
}

// getCancels is a Graph whose GetCall ends the caller's loop (a shutdown comes while the read is
// in flight), then answers as Graph would, unless the read's own context has ended.
type getCancels struct {
	*fakeGraph
	shutdown func()
}

func (g *getCancels) GetCall(ctx context.Context, id string) (graph.CallState, error) {
	g.shutdown()
	if err := ctx.Err(); err != nil {
		return "", err
	}
	return g.fakeGraph.GetCall(ctx, id)
}

// A shutdown that comes while RunOutbox re-drives an outbox it has claimed: the re-drive of a
// dead instance's answer must still go out (or be left due at once for another instance), not
// be dropped as "Graph could not be read" (the read failed only because the loop's context
// ended) nor left claimed to be re-driven a lease (8 s) later, past Graph's answer deadline.
func TestOutboxClaimedWhenTheShutdownComesIsNotDropped(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	var clock skewClock
	now := clock.now
	store := callstate.NewStore(rdb, "sd")
	newInstance := func(g callstate.CallControl) *callstate.Machine { return instance(t, rdb, "sd", g, &fakeQueues{}, now) }
	hung := &fakeGraph{block: make(chan struct{})}
	a := newInstance(hung)
	defer func() { close(hung.block); a.Wait() }()
	ids := []string{"c-left", "c-left2"}
	for _, id := range ids {
		ns, _ := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
		if err := a.Notify(context.Background(), "t1", ns); err != nil {
			t.Fatal(err)
		}
	}
	// A dies before its answers reached Graph

	clock.add(9 * time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	g := &getCancels{fakeGraph: &fakeGraph{state: graph.CallIncoming}, shutdown: cancel}
	b := newInstance(g)
	done := make(chan struct{})
	go func() { b.RunOutbox(ctx, 10*time.Millisecond); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("RunOutbox did not return after its context ended")
	}
	b.Wait()
	for _, id := range ids {
		sent := countPrefix(g.log(), "answer "+id+" ") == 1
		score, err := rdb.ZScore(context.Background(), "sd:{outbox}", graph.CallKey(id)).Result()
		c, gerr := store.Get(context.Background(), graph.CallKey(id))
		if gerr != nil {
			t.Fatal(gerr)
		}
		dueNow := err == nil && int64(score) <= now().UnixMilli() && len(c.Outbox) > 0
		if !sent && !dueNow {
			t.Errorf("%s: the dead instance's answer, claimed for a re-drive as the shutdown came, was neither sent nor left due at once "+
				"(graph %v; outbox %v, index score %v %v, due %d)", id, g.log(), c.Outbox, score, err, now().UnixMilli())
		}
	}
}

package callstate_test

import (
	"context"
	"strconv"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// Every transition that decides commands leaves its call in the outbox index until a claim finds
// them acknowledged, so under load many outboxes fall due every second, nearly all of them done
// already. RunOutbox claimed at most 100 a tick (a second): at a few hundred calls a second the
// index fell behind, and the answer of an instance that died waited behind the backlog, re-driven
// seconds (then minutes) after its lease ran out, past Graph's 15 s answer deadline.
func TestOutboxBacklogDoesNotHoldUpADeadInstancesAnswer(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu   sync.Mutex
		skew time.Duration
	)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return time.Now().Add(skew) }
	newInstance := func(g *fakeGraph) *callstate.Machine {
		return callstate.NewMachine(callstate.Config{Store: callstate.NewStore(rdb, "bl"), Timers: callstate.NewTimers(rdb, "bl"),
			Control: g, Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t), Now: now})
	}
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

	mu.Lock()
	skew = 9 * time.Second // every lease has run out
	mu.Unlock()
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

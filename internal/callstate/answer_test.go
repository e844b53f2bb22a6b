package callstate_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// answerFailsOnce fails the first answer with err (and the extra ones after it).
type answerFailsOnce struct {
	*fakeGraph
	mu    sync.Mutex
	err   error
	extra int
	done  int
}

func (f *answerFailsOnce) Answer(ctx context.Context, id string, r graph.AnswerRequest) error {
	f.mu.Lock()
	fail := f.done <= f.extra
	f.done++
	f.mu.Unlock()
	if fail {
		f.rec("answer " + id + " (failed)")
		return f.err
	}
	return f.fakeGraph.Answer(ctx, id, r)
}

// An answer Graph did not take (throttled: 429 after the client's own retry; or never sent: the
// token endpoint failed, the connection was refused) is not the answer's refusal: Graph still has
// the call incoming, and answering it again works. callbot used to end the call at once, with
// nothing sent: the caller rang until Graph dropped the call at its 15 s deadline. Graph's own
// refusal (a 403, say) still ends it.
func TestAnswerGraphDidNotTakeIsNotGivenUp(t *testing.T) {
	for _, c := range []struct {
		name     string
		err      error
		answered bool
	}{
		{"throttled", &graph.Error{Op: "answer", Status: 429}, true},
		{"token not obtained", fmt.Errorf("answer call x: token endpoint unavailable (%w)", graph.ErrNotSent), true},
		{"refused", &graph.Error{Op: "answer", Status: 403}, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			g := &answerFailsOnce{fakeGraph: &fakeGraph{state: graph.CallIncoming}, err: c.err}
			rdb := redistest.Start(t).Client(t)
			flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
			if err != nil {
				t.Fatal(err)
			}
			store := callstate.NewStore(rdb, "an")
			m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "an"), Control: g,
				Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", Log: zaptest.NewLogger(t)})
			id := "0b6e2d1c-5a4f-4e3d-8c2b-1a0f9e8d7c6b"
			notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
			m.Wait()
			cl, err := store.Get(context.Background(), graph.CallKey(id))
			if err != nil {
				t.Fatal(err)
			}
			answers := countPrefix(g.log(), "answer "+id+" https://")
			if c.answered && (cl.State != callstate.StateAnswering || answers != 1) {
				t.Fatalf("after the answer failed (%v): state %s, %d answers sent again (log %v); want the call still answering and answered again",
					c.err, cl.State, answers, g.log())
			}
			if !c.answered && (cl.State != callstate.StateTerminated || answers != 0) {
				t.Fatalf("after Graph refused the answer: state %s, %d answers sent again; want the call ended", cl.State, answers)
			}
		})
	}
}

// An answer that failed ambiguously (a 500) is checked with a read of the call, and Graph may
// not answer that read either (throttled after the client's retries, failing). The next look was
// the answer's check, 10 s after the answer: one read at most before Graph drops a call not
// answered within 15 s, too late when it was slow or throttled too (2 of 2,400 callers never
// answered in the rolling-deploy soak with a throttling Graph, docs/chaos.md). The read is now
// made again a second later, and the call, still incoming, is answered again.
func TestAnswerInDoubtUnreadableIsReadAgainSoon(t *testing.T) {
	g := &answerFailsOnce{fakeGraph: &fakeGraph{state: graph.CallIncoming,
		fail: map[string]error{"get": &graph.Error{Op: "get", Status: 429, Code: "TooManyRequests"}}},
		err: &graph.Error{Op: "answer", Status: 500, Code: "InternalServerError"}}
	var mu sync.Mutex
	clock := time.Now()
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "an", g, &fakeQueues{}, now)
	id := "0b6e2d1c-5a4f-4e3d-8c2b-1a0f9e8d7c6c"
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	m.Wait() // the answer fails (500); the read of the call is throttled
	if n := countPrefix(g.log(), "get"); n != 1 {
		t.Fatalf("reads of the call after the answer failed: %v, want one", g.log())
	}
	g.mu.Lock()
	delete(g.fail, "get") // Graph answers reads again; the call is still incoming
	g.mu.Unlock()
	mu.Lock()
	clock = clock.Add(2 * time.Second) // 2 s after the answer: not yet its 10 s check
	mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
	answered := func() int { return countPrefix(g.log(), "answer "+id+" https://") }
	for deadline := time.Now().Add(5 * time.Second); answered() == 0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
	}
	cancel()
	<-done
	m.Wait()
	if answered() != 1 || countPrefix(g.log(), "get") != 2 {
		t.Errorf("2 s after a read Graph did not answer: graph %v; want the call read again and answered again", g.log())
	}
}

// answerAgainHangs is a fakeGraph whose first answer fails ambiguously (a 500) and whose second
// hangs: an instance that decided to answer again and died before the request left it.
type answerAgainHangs struct {
	*fakeGraph
	mu    sync.Mutex
	n     int
	hang  chan struct{}
	first error
}

func (f *answerAgainHangs) Answer(ctx context.Context, id string, r graph.AnswerRequest) error {
	f.mu.Lock()
	f.n++
	n := f.n
	f.mu.Unlock()
	switch n {
	case 1:
		f.rec("answer " + id + " (failed)")
		return f.first
	case 2:
		<-f.hang
		return ctx.Err()
	}
	return f.fakeGraph.Answer(ctx, id, r)
}

// A re-drive that cannot read the call gives up the answer it re-drives ("when in doubt, do not
// act twice") and leaves it to a read a second later, which answers again if Graph still has the
// call incoming. When the answer given up was the call's second (the first failed ambiguously,
// the read showed the call incoming, and the instance died before its second answer left it),
// that read found the call incoming and did nothing: two answers decided already (maxAnswers),
// though the second may never have been sent. The caller rang until Graph dropped the call.
func TestRedriveOfASecondAnswerUnreadableStillAnswers(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "an")
	ga := &answerAgainHangs{fakeGraph: &fakeGraph{state: graph.CallIncoming}, hang: make(chan struct{}),
		first: &graph.Error{Op: "answer", Status: 500, Code: "InternalServerError"}}
	defer close(ga.hang)
	gb := &fakeGraph{state: graph.CallIncoming, fail: map[string]error{"get": &graph.Error{Op: "get", Status: 429, Code: "TooManyRequests"}}}
	var mu sync.Mutex
	clock := time.Now().Add(9 * time.Second) // a lease after the second answer was decided
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	a := instance(t, rdb, "an", ga, &fakeQueues{}, nil)
	b := instance(t, rdb, "an", gb, &fakeQueues{}, now)
	id := "0b6e2d1c-5a4f-4e3d-8c2b-1a0f9e8d7c7d"
	ns, err := graph.Decode([]byte(note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)))
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Notify(context.Background(), "tenant-1", ns); err != nil {
		t.Fatal(err)
	}
	// A: the answer fails (500), the read shows the call incoming, the second answer hangs
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		ga.mu.Lock()
		n := ga.n
		ga.mu.Unlock()
		if n == 2 {
			break
		}
	}
	// B re-drives the second answer: its read of the call is throttled, the answer given up
	redriveAll(t, b, store, time.Minute)
	if n := countPrefix(gb.log(), "answer"); n != 0 {
		t.Fatalf("answer re-sent without a read of the call: %v", gb.log())
	}
	gb.mu.Lock()
	delete(gb.fail, "get") // Graph answers reads again: the call is still incoming
	gb.mu.Unlock()
	mu.Lock()
	clock = clock.Add(2 * time.Second) // 11 s after the call came in: within Graph's 15 s
	mu.Unlock()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { b.RunTimers(ctx, 10*time.Millisecond); close(done) }()
	answered := func() int { return countPrefix(gb.log(), "answer "+id+" https://") }
	for deadline := time.Now().Add(5 * time.Second); answered() == 0 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
	}
	cancel()
	<-done
	b.Wait()
	if answered() != 1 {
		t.Errorf("a read after the re-drive gave up the second answer: graph %v; want the call, still incoming, answered", gb.log())
	}
}

// Answers Graph did not process (throttled) do not count against the two answers a call gets:
// under throttling both could be refused, and the caller rang, never answered, until Graph
// dropped the call at its 15 s deadline, with time left for a third.
func TestAnswersGraphDidNotProcessDoNotCount(t *testing.T) {
	g := &answerFailsOnce{fakeGraph: &fakeGraph{state: graph.CallIncoming}, err: &graph.Error{Op: "answer", Status: 429}, extra: 1}
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "an3", g, &fakeQueues{}, nil)
	id := "4d2c8e1a-9b3f-4a6e-8d7c-2e1f0a9b8c7d"
	notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
	m.Wait()
	if n, sent := countPrefix(g.log(), "answer "+id+" (failed)"), countPrefix(g.log(), "answer "+id+" https://"); n != 2 || sent != 1 {
		t.Errorf("answers: %d throttled, %d taken (log %v); want two throttled, then a third taken", n, sent, g.log())
	}
}

// answerErrs is a fakeGraph whose n-th answer fails with errs[n] (nil: taken), recorded as
// "answer <id> (failed)" when it fails.
type answerErrs struct {
	*fakeGraph
	mu   sync.Mutex
	errs []error
	n    int
}

func (f *answerErrs) Answer(ctx context.Context, id string, r graph.AnswerRequest) error {
	f.mu.Lock()
	var err error
	if f.n < len(f.errs) {
		err = f.errs[f.n]
	}
	f.n++
	f.mu.Unlock()
	if err != nil {
		f.rec("answer " + id + " (failed)")
		return err
	}
	return f.fakeGraph.Answer(ctx, id, r)
}

// An answer that failed ambiguously (a 500), whose reads Graph throttled until its deadline, was
// never answered again: callbot answers again only once a read shows the call still incoming,
// and the read that did came past the answer's deadline (the rolling-deploy soak, mode graph,
// 1 of 1,800 callers never answered). 10 s after the call came in, with no established
// notification and no read answered, callbot now answers again without the read. Graph's
// refusal of that answer may mean the first one took: the call is read and, established, its
// menu starts; it is not ended as a refused answer would end it.
func TestAnswerInDoubtUnreadableToTheDeadlineIsAnsweredAgain(t *testing.T) {
	for _, tc := range []struct {
		name   string
		second error           // what Graph answers to the second answer
		state  graph.CallState // the call in Graph once it can be read
		want   callstate.State // the record in the end
	}{
		{"the first answer did not take", nil, graph.CallIncoming, callstate.StateAnswering},
		{"the first answer took", &graph.Error{Op: "answer", Status: 400, Code: "BadRequest"}, graph.CallEstablished, callstate.StateInMenu},
	} {
		t.Run(tc.name, func(t *testing.T) {
			throttled := &graph.Error{Op: "get", Status: 429, Code: "TooManyRequests"}
			g := &answerErrs{fakeGraph: &fakeGraph{state: graph.CallIncoming, fail: map[string]error{"get": throttled}},
				errs: []error{&graph.Error{Op: "answer", Status: 500, Code: "InternalServerError"}, tc.second}}
			var mu sync.Mutex
			clock := time.Now()
			now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
			advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }
			rdb := redistest.Start(t).Client(t)
			m := instance(t, rdb, "an", g, &fakeQueues{}, now)
			store := callstate.NewStore(rdb, "an")
			id := "0b6e2d1c-5a4f-4e3d-8c2b-1a0f9e8d7c6d"
			notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
			m.Wait() // the answer fails (500); the read of the call is throttled
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { m.RunTimers(ctx, 10*time.Millisecond); close(done) }()
			defer func() { cancel(); <-done }()
			answers := func() int { return countPrefix(g.log(), "answer "+id) }
			settle := func(want int) {
				t.Helper()
				for deadline := time.Now().Add(5 * time.Second); answers() < want && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				}
				time.Sleep(100 * time.Millisecond)
			}
			advance(5 * time.Second) // a read again, throttled: 5 s in, not yet time to answer blind
			for deadline := time.Now().Add(5 * time.Second); countPrefix(g.log(), "get") < 2 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
			}
			settle(1)
			if n := answers(); n != 1 {
				t.Fatalf("5 s after the call came in, its reads throttled: %d answers (graph %v), want the first alone", n, g.log())
			}
			advance(6 * time.Second) // 11 s in: the read again is throttled too
			settle(2)
			if n := answers(); n != 2 {
				t.Fatalf("11 s after the call came in, its reads throttled: %d answers (graph %v), want a second answer", n, g.log())
			}
			// Graph answers reads again
			g.mu.Lock()
			delete(g.fail, "get")
			g.state = tc.state
			g.mu.Unlock()
			advance(2 * time.Second) // past the read again a second after the last unanswered one
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				if c, err := store.Get(context.Background(), graph.CallKey(id)); err == nil && c.State == tc.want {
					break
				}
			}
			c, err := store.Get(context.Background(), graph.CallKey(id))
			if err != nil || c.State != tc.want || c.Answers != 2 {
				t.Errorf("the second answer %v, Graph then showing the call %s: %s (%d answers) %v, graph %v; want %s",
					tc.second, tc.state, c.State, c.Answers, err, g.log(), tc.want)
			}
		})
	}
}

// Graph refuses an answer to a call another answer of ours has taken ("Action answer is not
// allowed: call is in state establishing"): the outbox's re-drive of a stalled instance's
// answer and the answer's own timer both found the call incoming when Redis came back from a
// stall, and both answered (TestRedisStall, 12 s). The refusal ended the call in callbot while
// Graph established it, and the caller was left in silence in a call no one would end. A
// refused answer now has the call read: answered, the call carries on; still incoming, the
// refusal ends it as before; gone, it ended.
func TestRefusedAnswerToACallAnsweredMeanwhileCarriesOn(t *testing.T) {
	for _, tc := range []struct {
		name  string
		state graph.CallState // the call in Graph when the refusal is read
		want  callstate.State
	}{
		{"answered by the other answer", graph.CallEstablished, callstate.StateInMenu},
		{"being answered by the other answer", graph.CallEstablishing, callstate.StateAnswering},
		{"still incoming: a refusal of the call", graph.CallIncoming, callstate.StateTerminated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &answerErrs{fakeGraph: &fakeGraph{state: tc.state},
				errs: []error{&graph.Error{Op: "answer", Status: 400, Code: "BadRequest", Message: "Action answer is not allowed"}}}
			rdb := redistest.Start(t).Client(t)
			m := instance(t, rdb, "arf", g, &fakeQueues{}, nil)
			store := callstate.NewStore(rdb, "arf")
			id := "6c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f"
			notify(t, m, note("created", id, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`))
			m.Wait()
			var c callstate.Call
			var err error
			for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				if c, err = store.Get(context.Background(), graph.CallKey(id)); err == nil && c.State == tc.want {
					break
				}
			}
			if err != nil || c.State != tc.want {
				t.Errorf("answer refused, Graph showing the call %s: record %s %v (graph %v); want %s", tc.state, c.State, err, g.log(), tc.want)
			}
			if n := countPrefix(g.log(), "get"); n != 1 {
				t.Errorf("%d reads of the call after the refusal (graph %v), want 1", n, g.log())
			}
		})
	}
}

package callstate_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// answerFailsOnce fails the first answer with err.
type answerFailsOnce struct {
	*fakeGraph
	mu   sync.Mutex
	err  error
	done bool
}

func (f *answerFailsOnce) Answer(ctx context.Context, id string, r graph.AnswerRequest) error {
	f.mu.Lock()
	first := !f.done
	f.done = true
	f.mu.Unlock()
	if first {
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

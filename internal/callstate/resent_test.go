package callstate_test

import (
	"context"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
)

// resendOnce, once armed, sends the next pipeline that runs a script (a record's save) twice:
// what go-redis does when a pipeline's reply is lost after Redis applied it (a read timeout, the
// connection reset: generalProcessPipelineFrom re-sends it, up to MaxRetries, 3 by default). The
// second run's replies are the ones the caller reads: the save script finds its own version and
// answers 0, a conflict.
type resendOnce struct{ armed atomic.Bool }

func (h *resendOnce) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (h *resendOnce) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h *resendOnce) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		script := false
		for _, c := range cmds {
			script = script || c.Name() == "evalsha" || c.Name() == "eval"
		}
		if script && h.armed.CompareAndSwap(true, false) {
			if err := next(ctx, cmds); err != nil {
				return err
			}
		}
		return next(ctx, cmds)
	}
}

// The dispatcher's offer is saved, and its pipeline re-sent by go-redis after the reply was lost:
// the save comes back as a conflict, the machine reads the record again and finds the offer
// there, its own, which the table ignores (the call is transferring). It answered the dispatcher
// as for a ghost entry, the call no longer waiting, and the dispatcher freed the agent while the
// record, and the transfer in its outbox (re-driven a lease later), had the call with them: the
// next caller could be reserved for the same agent, offered two callers at once. A record that
// shows the call with the offer's agent has the offer: it stands.
func TestAnOfferWhoseSaveWasResentStands(t *testing.T) {
	ctx := context.Background()
	f := newAgentOnRealQueues(t, "rs")
	rdb := f.srv.Client(t)
	h := &resendOnce{}
	rdb.AddHook(h)
	m, d, st := f.instance(rdb, &fakeGraph{}, nil)
	f.queueCaller(m)

	h.armed.Store(true)
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Errorf("%d offers, want the offer saved to stand", n)
	}
	if h.armed.Load() {
		t.Fatal("no save was sent twice (the set-up is wrong)")
	}
	c, err := st.Get(ctx, realCallKey)
	mustDo(t, err)
	if c.State != callstate.StateTransferring || c.Agent != f.agent {
		t.Fatalf("the record: %s agent %q, want transferring to %s", c.State, c.Agent, f.agent)
	}
	if res, _ := f.qs.Reserved(ctx, "tenant-1", f.agent); res != realCallKey {
		t.Errorf("the agent, whose transfer the record holds, is reserved for %q, want the call", res)
	}
}

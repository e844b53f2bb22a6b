package queue

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/redistest"
)

// lostReserveReply, once armed, lets the next reservation script reach Redis and run, then
// reports a failure: a read timeout, or the connection dropped, after the server did the work.
type lostReserveReply struct{ armed atomic.Bool }

func (h *lostReserveReply) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h *lostReserveReply) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		args := cmd.Args()
		if err == nil && len(args) > 1 && args[1] == reserveScript.Hash() && h.armed.CompareAndSwap(true, false) {
			return errors.New("read tcp: i/o timeout")
		}
		return err
	}
}
func (h *lostReserveReply) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// A reservation whose reply was lost (Redis took the caller from the queue and reserved the
// agent, the dispatcher saw an error) left the caller out of the queue, on hold music with
// nobody to offer them, and the agent reserved for nobody: until the reconciler's next pass
// put the caller back (up to 5 minutes) and the pass after freed the agent (up to 10). Now the
// dispatcher asks for the same reservation again and, if Redis made it, offers it.
func TestReservationWhoseReplyWasLostIsOfferedStill(t *testing.T) {
	ctx := context.Background()
	rdb := redistest.Start(t).Client(t)
	hook := &lostReserveReply{}
	rdb.AddHook(hook)
	s := NewStore(rdb, "test")
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true}))
	off := &fakeOfferer{accept: true}
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	must(t, d.Enqueue(ctx, "t", "q", "c1", 1))
	must(t, reserveScript.Load(ctx, rdb).Err()) // the reservation goes as EVALSHA
	hook.armed.Store(true)
	if n := d.DispatchOnce(ctx); n != 0 {
		t.Fatalf("%d offers while the reservation's reply was lost", n)
	}
	if n := d.DispatchOnce(ctx); n != 1 || len(off.offers) != 1 || off.offers[0] != "c1->a1" {
		w, _ := s.Waiting(ctx, "t", "q")
		r, _ := s.Reserved(ctx, "t", "a1")
		t.Fatalf("next dispatch: %d offers %v; queue %v, a1 reserved for %q: want c1 offered to a1", n, off.offers, w, r)
	}
}

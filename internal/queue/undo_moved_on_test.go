package queue

import (
	"context"
	"errors"
	"sync"
	"testing"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
)

// unreadableOfferer fails every offer with the call's record unreadable (its master down) until
// read is set, then answers each look with check.
type unreadableOfferer struct {
	mu    sync.Mutex
	read  bool
	check callstate.OfferCheck
}

var errMasterDown = errors.New("dial tcp: connection refused")

func (u *unreadableOfferer) Offer(context.Context, string, string, string) (bool, error) {
	return false, errMasterDown
}

func (u *unreadableOfferer) CheckOffer(context.Context, string, string, string) (callstate.OfferCheck, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if !u.read {
		return callstate.OfferCheck{}, errMasterDown
	}
	return u.check, nil
}

func (u *unreadableOfferer) OfferFate(context.Context, string, string, callstate.OfferCheck) (callstate.OfferFate, error) {
	return callstate.OfferUnsettled, nil
}

// A reservation whose offer failed with the call's record unreadable is undone once the record
// can be read (RetryUndos). By then the caller may be waiting nowhere: they hung up (the record
// ended, or gone), or their max wait passed them on to another queue. The agent is freed; the
// caller is not put back in the queue the offer took them from, where they would be a ghost
// (an ended caller waiting, an agent reserved for them and refused; a caller in two queues).
func TestFailedOfferUndoneLaterLeavesACallerWhoIsNoLongerWaiting(t *testing.T) {
	for name, check := range map[string]callstate.OfferCheck{
		"ended":         {Queue: "q", QueueScore: 1},
		"gone":          {},
		"another queue": {Queue: "q2", QueueScore: 5, Waiting: true},
		"in a menu":     {Queue: "q", QueueScore: 1},
	} {
		t.Run(name, func(t *testing.T) {
			s := undoneLater(t, check)
			if n, _ := s.Length(context.Background(), "t", "q"); n != 0 {
				t.Errorf("caller put back in q (%d waiting) though their record shows them waiting elsewhere or not at all", n)
			}
		})
	}
}

// One whose record shows them still waiting in the queue is put back at their place.
func TestFailedOfferUndoneLaterPutsAWaitingCallerBack(t *testing.T) {
	s := undoneLater(t, callstate.OfferCheck{Queue: "q", QueueScore: 1, Waiting: true})
	if n, _ := s.Length(context.Background(), "t", "q"); n != 1 {
		t.Errorf("%d waiting in q, want the caller back", n)
	}
}

// undoneLater offers caller c1 of queue q to agent a1 with the call's record unreadable, then
// lets RetryUndos read it as check: the reservation is undone, a1 freed. It returns the store.
func undoneLater(t *testing.T, check callstate.OfferCheck) *Store {
	t.Helper()
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true}))
	off := &unreadableOfferer{}
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	must(t, d.Enqueue(ctx, "t", "q", "c1", 1))
	d.DispatchOnce(ctx)
	if n := d.RetryUndos(ctx); n != 1 {
		t.Fatalf("%d undos pending after the offer failed unreadable, want 1", n)
	}
	off.mu.Lock()
	off.read, off.check = true, check
	off.mu.Unlock()
	if n := d.RetryUndos(ctx); n != 0 {
		t.Fatalf("%d undos pending once the record could be read, want 0", n)
	}
	if r, _ := s.Reserved(ctx, "t", "a1"); r != "" {
		t.Errorf("a1 still reserved for %q", r)
	}
	return s
}

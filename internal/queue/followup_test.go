package queue

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
)

// unreplicatedOfferer saves every offer on the master only (the save refused as unreplicated,
// found applied, not confirmed by the replicas) and answers the follow-ups' looks with fate,
// noting when (by the dispatcher's clock) each look came.
type unreplicatedOfferer struct {
	mu    sync.Mutex
	now   func() time.Time
	fate  func(call string) (callstate.OfferFate, error)
	looks []string
}

func (u *unreplicatedOfferer) Offer(context.Context, string, string, string) (bool, error) {
	return false, callstate.ErrNotReplicated
}

func (u *unreplicatedOfferer) CheckOffer(context.Context, string, string, string) (callstate.OfferCheck, error) {
	return callstate.OfferCheck{Took: true, Offers: 1}, nil
}

func (u *unreplicatedOfferer) OfferFate(_ context.Context, _, call string, _ callstate.OfferCheck) (callstate.OfferFate, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.looks = append(u.looks, fmt.Sprintf("%s@%s", call, u.now().Format("04:05")))
	return u.fate(call)
}

func (u *unreplicatedOfferer) list() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.looks)
}

// An offer not confirmed by the replicas is looked at 15 s, 30 s, 1 min and 2 min after it was
// made, then left to the reconciler. A look that fails (here every one: the replica is away)
// holds back the other follow-ups due on that pass until the next (one WAIT a pass, not one per
// follow-up), without counting them a look.
func TestOfferFollowUpLooksThenGivesUp(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1", "a2"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true, "a2": true}))
	clock := time.Date(2026, 1, 1, 10, 0, 0, 0, time.UTC)
	off := &unreplicatedOfferer{now: func() time.Time { return clock }}
	off.fate = func(string) (callstate.OfferFate, error) { return callstate.OfferUnsettled, callstate.ErrNotReplicated }
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	d.Now = func() time.Time { return clock }
	must(t, d.Enqueue(ctx, "t", "q", "c1", 1))
	must(t, d.Enqueue(ctx, "t", "q", "c2", 2))
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers, want c1's standing", n)
	}
	if n := d.DispatchOnce(ctx); n != 1 {
		t.Fatalf("%d offers, want c2's standing", n)
	}
	for sec := 1; sec <= 150; sec++ {
		clock = clock.Add(time.Second)
		d.FollowUpOffers(ctx)
	}
	want := []string{"c1@00:15", "c2@00:16", "c1@00:30", "c2@00:31", "c1@01:00", "c2@01:01", "c1@02:00", "c2@02:01"}
	if got := off.list(); !slices.Equal(got, want) {
		t.Errorf("looks %v, want %v", got, want)
	}
	if n := d.FollowUpOffers(ctx); n != 0 {
		t.Errorf("%d offers still followed up after their last look", n)
	}
	if r, _ := s.Reserved(ctx, "t", "a1"); r == "" {
		t.Errorf("an unsettled follow-up freed its agent")
	}
}

// Run ends with ctx although offers are still followed up: they are left to the reconciler
// (they hold no goroutine or timer of their own).
func TestRunEndsWithOffersFollowedUp(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1"}))
	must(t, s.SetRoutable(ctx, "t", map[string]bool{"a1": true}))
	off := &unreplicatedOfferer{now: time.Now, fate: func(string) (callstate.OfferFate, error) {
		return callstate.OfferUnsettled, callstate.ErrNotReplicated
	}}
	d := NewDispatcher(s, off, "t", []string{"q"}, zaptest.NewLogger(t))
	d.OfferRecheck = 10 * time.Millisecond
	d.OfferRechecks = 1000
	must(t, d.Enqueue(ctx, "t", "q", "c1", 1))
	done := make(chan struct{})
	go func() { d.Run(ctx, 5*time.Millisecond); close(done) }()
	for deadline := time.Now().Add(5 * time.Second); len(off.list()) < 2; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("looks %v: the offer was not followed up", off.list())
		}
	}
	cancel()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatal("Run did not end with its context")
	}
	if len(d.followUps) != 0 {
		t.Errorf("%d follow-ups kept after Run ended", len(d.followUps))
	}
}

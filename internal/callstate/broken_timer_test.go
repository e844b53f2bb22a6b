package callstate_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
)

// brokenInvite saves the record a bug could leave: a call inviting with no agent, the invite's
// failure being checked against the roster, and the recheck's timer due. Its decision (the
// caller back to where they came from: with no agent, the menu) has no row from inviting: the
// table refuses it. It returns the call's key and the timer's member in the timer set.
func brokenInvite(t *testing.T, r *rig, id string) (string, string) {
	t.Helper()
	key := graph.CallKey(id)
	c := callstate.Call{ID: id, Tenant: "t1", State: callstate.StateInviting, Queue: "vip", InviteCtx: "i4", RosterCtx: "r5",
		Seq: 6, Timers: map[callstate.TimerKind]int64{callstate.TimerTransfer: 6}, CreatedAt: time.Now()}
	tm := callstate.Timer{Tenant: "t1", Call: key, Kind: callstate.TimerTransfer, Token: 6, At: time.Now().Add(-time.Second)}
	if err := r.store.CreateWith(context.Background(), &c, callstate.Write{Timers: []callstate.Timer{tm}}); err != nil {
		t.Fatal(err)
	}
	return key, tm.Member()
}

// runTimers runs the rig's machine's timer loop, as serve does, until done says so (or 5 s).
func (r *rig) runTimers(t *testing.T, done func() bool) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stopped := make(chan struct{})
	go func() { r.m.RunTimers(ctx, 10*time.Millisecond); close(stopped) }()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline) && !done(); time.Sleep(20 * time.Millisecond) {
	}
	cancel()
	<-stopped
	r.m.Wait()
}

// A timer whose event the transition table refuses (a bug, never input) was left in the timer
// set, leased again, and refused again every lease, for ever, while its caller stayed where
// nothing moved them on. Now it is removed, logged and counted
// (callbot_invalid_transitions_total), and its call is given up on as far as that is safe: a
// caller Graph shows alone with callbot is hung up, a conversation is never cut, and a call
// Graph no longer has is ended.
func TestTimerRefusedByTheTableIsRemovedAndItsCallGivenUp(t *testing.T) {
	for _, tc := range []struct {
		name      string
		users     []string        // who Graph lists in the call besides callbot
		graph     graph.CallState // what GetCall answers
		wantState callstate.State
		hangups   int
	}{
		{"the caller alone", []string{"caller"}, "", callstate.StateTerminating, 1},
		{"the agent with the caller", []string{"caller", "agent-x"}, "", callstate.StateInviting, 0},
		{"gone from Graph", nil, "gone", callstate.StateTerminated, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := &fakeGraph{users: tc.users, state: tc.graph}
			r := newRig(t, g, "rbt")
			key, member := brokenInvite(t, r, "c-broken-timer")
			timerLeft := func() bool {
				err := r.rdb.ZScore(context.Background(), "rbt:{timers}", member).Err()
				if err != nil && !errors.Is(err, redis.Nil) {
					t.Fatal(err)
				}
				return err == nil
			}
			r.runTimers(t, func() bool { return !timerLeft() })
			if timerLeft() {
				t.Fatal("the timer the table refused is still in the timer set: it fires again every lease, for ever")
			}
			if n := r.m.InvalidTransitions.Load(); n != 1 {
				t.Errorf("%d invalid transitions counted, want 1", n)
			}
			c, err := r.store.Get(context.Background(), key)
			if err != nil {
				t.Fatal(err)
			}
			if c.State != tc.wantState || countPrefix(g.log(), "hangup") != tc.hangups {
				t.Errorf("the call is %s, Graph saw %v; want %s and %d hangups", c.State, g.log(), tc.wantState, tc.hangups)
			}
		})
	}
}

// joinDuringRead is a Graph whose participants read, the first time, lets something happen in
// the call before it answers (as the agent answering their invite while the read is under way).
type joinDuringRead struct {
	*fakeGraph
	once   sync.Once
	during func()
}

func (g *joinDuringRead) Participants(ctx context.Context, id string) ([]graph.Participant, error) {
	g.once.Do(g.during)
	return g.fakeGraph.Participants(ctx, id)
}

// Giving up on a call decides on the record Graph was read for. The agent who answers their
// invite while callbot reads the roster (which showed the caller alone) is talking to the caller
// when the read comes back: callbot hung up on that conversation, as the call, connected now,
// has a row for EvAbort too.
func TestGiveUpLeavesACallThatMovedOnDuringTheRead(t *testing.T) {
	g := &joinDuringRead{fakeGraph: &fakeGraph{users: []string{"caller"}}}
	r := newRig(t, g, "rbj")
	key, _ := brokenInvite(t, r, "c-broken-join")
	g.during = func() {
		// the invite's completion: the agent joined
		if ok, err := r.m.Handle(context.Background(), "t1", key, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: "i4"}); !ok || err != nil {
			t.Errorf("the invite's completion during the read: %v %v", ok, err)
		}
	}
	r.runTimers(t, func() bool { return r.m.InvalidTransitions.Load() > 0 && slices.Contains(g.log(), "participants") })
	c, err := r.store.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if c.State != callstate.StateConnected || countPrefix(g.log(), "hangup") != 0 {
		t.Errorf("the call is %s, Graph saw %v; want it connected, never hung up", c.State, g.log())
	}
}

// A blind transfer that Graph no longer has the call of has most likely completed (callbot's
// leg ends when the agent takes the caller), its terminated notification lost or late. Giving
// up on such a call ended it as if the caller had hung up, releasing the agent at once as never
// having talked to anyone (abandoned: no guard, their idle place kept): the dispatcher could
// offer them a second caller in the middle of the conversation. It is left to its terminated
// notification, as a transfer's own read of the call leaves it (and the reconciler ends it).
func TestGiveUpLeavesATransferGraphNoLongerHas(t *testing.T) {
	g := &fakeGraph{state: "gone"}
	r := newRig(t, g, "rbg")
	id := "c-broken-transfer"
	key := graph.CallKey(id)
	c := callstate.Call{ID: id, Tenant: "t1", State: callstate.StateTransferring, Queue: "q", Agent: "agent-x", TransferCtx: "x4",
		Transferring: true, Seq: 5, Timers: map[callstate.TimerKind]int64{callstate.TimerTransfer: 5}, CreatedAt: time.Now()}
	if err := r.store.CreateWith(context.Background(), &c, callstate.Write{}); err != nil {
		t.Fatal(err)
	}
	r.m.GiveUp("t1", key, callstate.StateTransferring)
	r.m.Wait()
	got, err := r.store.Get(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	if got.State != callstate.StateTransferring || slices.ContainsFunc(r.q.ops, func(op string) bool { return strings.HasPrefix(op, "release") }) {
		t.Errorf("the call is %s (%q), the agent %v; want it left transferring, the agent reserved until the transfer's end is known", got.State, got.Outcome, r.q.ops)
	}
}

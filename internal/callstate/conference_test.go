package callstate_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// The conference hand-off against the rosters Graph notifies: each participant an object of
// the resourceData array, with its own rosterSequenceNumber and, once removed, a removedState.

// rosterNote is a participants notification of call id listing the given participants.
func rosterNote(id string, ps ...string) string {
	return `{"@odata.type":"#microsoft.graph.commsNotifications","value":[{"changeType":"updated","resourceUrl":"/communications/calls/` +
		id + `/participants","resourceData":[` + strings.Join(ps, ",") + `]}]}`
}

func callerEntry(seq int, muted bool) string {
	return fmt.Sprintf(`{"@odata.type":"#microsoft.graph.participant","id":"p-caller","info":{"identity":{"phone":{"id":"+14255550100"}}},"isMuted":%v,"rosterSequenceNumber":%d}`, muted, seq)
}

func botEntry(seq int) string {
	return fmt.Sprintf(`{"@odata.type":"#microsoft.graph.participant","id":"p-bot","info":{"identity":{"application":{"id":"bot"}}},"rosterSequenceNumber":%d}`, seq)
}

// userEntry is a user participant; extra is more JSON members (a removedState).
func userEntry(user string, seq int, extra string) string {
	return fmt.Sprintf(`{"@odata.type":"#microsoft.graph.participant","id":"p-agent","info":{"identity":{"user":{"id":%q}}},"rosterSequenceNumber":%d%s}`, user, seq, extra)
}

// notify applies a notification body to the rig's machine and waits for its commands.
func (r *rig) notify(t *testing.T, body string) {
	t.Helper()
	ns, err := graph.Decode([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.m.Notify(context.Background(), "t1", ns); err != nil {
		t.Fatal(err)
	}
	r.m.Wait()
}

const confAgent = "11111111-0000-4000-8000-000000000002"

// A busy conference (the caller muting and unmuting: 50 roster updates, each the whole roster
// with the agent) makes no roster read: only a roster without the agent is checked.
func TestBusyConferenceReadsNoRoster(t *testing.T) {
	g := &fakeGraph{}
	r := newRig(t, g, "cbusy")
	id := "c-busy"
	r.inviting(t, id, confAgent)
	for i := range 51 {
		r.notify(t, rosterNote(id, callerEntry(1+i, i%2 == 1), botEntry(1), userEntry(confAgent, 1, "")))
	}
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if n := countPrefix(g.log(), "participants"); c.State != callstate.StateConnected || n != 0 {
		t.Errorf("after 51 rosters with the agent: %s, %d roster reads; want connected and none", c.State, n)
	}
}

// The invite's completion connects the call before any roster shows the agent (graphsim sends
// it first). If the agent then leaves and the roster that showed them is late or lost (Graph
// delivers notifications again after a 503, in any order), the roster without them must be
// checked as it is once a roster showed them: it was ignored (not Joined), and the caller heard
// nothing, with nobody, until the roster check a minute later.
func TestAgentGoneBeforeAnyRosterShowedThemIsChecked(t *testing.T) {
	g := &fakeGraph{}
	r := newRig(t, g, "cgone")
	id := "c-gone"
	r.inviting(t, id, confAgent)
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	r.handle(t, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx})
	if c, _ = r.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateConnected {
		t.Fatalf("after the invite's completion: %s, want connected", c.State)
	}
	r.notify(t, rosterNote(id, callerEntry(2, false), botEntry(2))) // the agent gone (Graph lists nobody else)
	if log := g.log(); countPrefix(log, "participants") != 0 {
		t.Errorf("at once after a roster without the agent, before any showed them: Graph commands %v; want the read a few seconds on (Graph's roster may not list them yet)", log)
	}
	r.skew += 6 * time.Second
	r.fireDue(t)
	c, _ = r.store.Get(context.Background(), graph.CallKey(id))
	if log := g.log(); c.State != callstate.StateTerminating || countPrefix(log, "participants") != 1 || countPrefix(log, "hangup") != 1 {
		t.Errorf("6 s after a roster without the agent: %s, Graph commands %v; want the roster read and callbot to hang up", c.State, log)
	}
	// A roster from before they joined, with them in the call, changes nothing.
	g2 := &fakeGraph{users: []string{confAgent}}
	r2 := newRig(t, g2, "cgone2")
	r2.inviting(t, id, confAgent)
	c, _ = r2.store.Get(context.Background(), graph.CallKey(id))
	r2.handle(t, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx})
	r2.notify(t, rosterNote(id, callerEntry(1, false), botEntry(1)))
	r2.skew += 6 * time.Second
	r2.fireDue(t)
	if c, _ = r2.store.Get(context.Background(), graph.CallKey(id)); c.State != callstate.StateConnected || !c.Joined || countPrefix(g2.log(), "hangup") != 0 {
		t.Errorf("a late roster from before the agent joined: %s joined=%v, Graph commands %v; want connected, the read showing the agent", c.State, c.Joined, g2.log())
	}
}

// A participant Graph lists with a removedState was removed from the roster: an agent listed so
// has left the call. rosterEvent took every user listed for present, so the roster showing the
// agent removed was ignored as one with them in the call, and the caller stayed with nobody
// (until the roster check a minute later, or for good if the read lists them removed too).
func TestAgentListedAsRemovedHasLeft(t *testing.T) {
	g := &fakeGraph{}
	r := newRig(t, g, "crm")
	id := "c-removed"
	r.inviting(t, id, confAgent)
	r.notify(t, rosterNote(id, callerEntry(1, false), botEntry(1), userEntry(confAgent, 1, "")))
	r.notify(t, rosterNote(id, callerEntry(1, false), botEntry(1), userEntry(confAgent, 2, `,"removedState":{"@odata.type":"#microsoft.graph.removedState","reason":"left"}`)))
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if log := g.log(); c.State != callstate.StateTerminating || countPrefix(log, "participants") != 1 || countPrefix(log, "hangup") != 1 {
		t.Errorf("after a roster listing the agent removed: %s, Graph commands %v; want the roster read and callbot to hang up", c.State, log)
	}
}

// slowRoster holds the first roster read until gate is closed: Graph slow to answer it.
type slowRoster struct {
	*fakeGraph
	gate chan struct{}
	once sync.Once
}

func (g *slowRoster) Participants(ctx context.Context, id string) ([]graph.Participant, error) {
	g.once.Do(func() { <-g.gate })
	return g.fakeGraph.Participants(ctx, id)
}

// Rosters without the agent that come while Graph is slow to answer a roster read (the agent
// left amid participant updates; rosters that list only what changed) each decide a read that
// supersedes the one before: only the latest can apply. The superseded ones were sent all the
// same, one Graph request per notification on the call's executor, ahead of what the call
// decides next (its hangup): 20 reads for 20 notifications. A read the call no longer waits for
// is not sent.
func TestSupersededRosterReadsAreNotSent(t *testing.T) {
	g := &slowRoster{fakeGraph: &fakeGraph{users: []string{confAgent}}, gate: make(chan struct{})}
	r := newRig(t, g, "csup")
	id := "c-sup"
	r.inviting(t, id, confAgent)
	r.notify(t, rosterNote(id, callerEntry(1, false), botEntry(1), userEntry(confAgent, 1, "")))
	g.setUsers() // the agent leaves
	for i := range 20 {
		ns, err := graph.Decode([]byte(rosterNote(id, callerEntry(2+i, i%2 == 1))))
		if err != nil {
			t.Fatal(err)
		}
		if err := r.m.Notify(context.Background(), "t1", ns); err != nil {
			t.Fatal(err)
		}
	}
	close(g.gate)
	r.m.Wait()
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	if n := countPrefix(g.log(), "participants"); c.State != callstate.StateTerminating || n != 2 {
		t.Errorf("after 20 rosters without the agent, the first read slow: %s, %d roster reads; want terminating, 2 (the slow one, the latest)", c.State, n)
	}
}

// The invite's completion connected the call and a roster without the agent brought the roster
// check forward (Graph's roster may not list them yet). Its read, slow to be answered, was made
// before Graph listed the agent; a roster that shows them comes meanwhile. The read must not
// then hang up on the conversation that roster shows: the agent joining supersedes a read made
// before (as it does while inviting). It applied, and callbot hung up on the caller and the
// agent a few seconds into their conversation, the agent sent to wrap-up.
func TestRosterReadFromBeforeTheAgentJoinedDoesNotHangUp(t *testing.T) {
	g := &slowRoster{fakeGraph: &fakeGraph{}, gate: make(chan struct{})} // the read: the agent not listed yet
	r := newRig(t, g, "cstale")
	id := "c-stale-read"
	r.inviting(t, id, confAgent)
	c, _ := r.store.Get(context.Background(), graph.CallKey(id))
	r.handle(t, id, callstate.Event{Kind: callstate.EvInviteDone, ClientContext: c.InviteCtx})
	r.notify(t, rosterNote(id, callerEntry(1, false), botEntry(1))) // before Graph lists the agent
	// the roster check, brought forward, fires: its read goes to Graph, which is slow to answer
	r.skew += 6 * time.Second
	ctx := context.Background()
	due, err := r.timers.Claim(ctx, time.Now().Add(r.skew), time.Minute, 100)
	if err != nil || len(due) != 1 || due[0].Kind != callstate.TimerRoster {
		t.Fatalf("due timers %v (%v); want the roster check", due, err)
	}
	if _, err := r.m.Handle(ctx, "t1", due[0].Call, callstate.Event{Kind: callstate.EvTimeout, Timer: due[0].Kind, TimerToken: due[0].Token}); err != nil {
		t.Fatal(err)
	}
	// the roster that shows the agent in the call, while the read is being answered
	ns, err := graph.Decode([]byte(rosterNote(id, callerEntry(1, false), botEntry(1), userEntry(confAgent, 2, ""))))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.m.Notify(ctx, "t1", ns); err != nil {
		t.Fatal(err)
	}
	close(g.gate) // the read answers: made before, it does not list the agent
	r.m.Wait()
	c, _ = r.store.Get(ctx, graph.CallKey(id))
	if log := g.log(); c.State != callstate.StateConnected || !c.Joined || countPrefix(log, "hangup") != 0 {
		t.Errorf("a read made before a roster showed the agent, answered after it: %s joined=%v, Graph commands %v, queue ops %v; want connected, no hangup",
			c.State, c.Joined, log, r.q.ops)
	}
}

// removedAgent is Graph listing, in a roster read, the caller, callbot and an agent who was
// removed from the call (removedState): the caller is alone with callbot.
type removedAgent struct{ *fakeGraph }

func (g removedAgent) Participants(ctx context.Context, id string) ([]graph.Participant, error) {
	if _, err := g.fakeGraph.Participants(ctx, id); err != nil {
		return nil, err
	}
	return []graph.Participant{
		{ID: "p-bot", Info: graph.ParticipantInfo{Identity: graph.IdentitySet{Application: &graph.Identity{ID: "bot"}}}},
		{ID: "p-caller", Info: graph.ParticipantInfo{Identity: graph.IdentitySet{Phone: &graph.Identity{ID: "+14255550100"}}}},
		{ID: "p-agent", Info: graph.ParticipantInfo{Identity: graph.IdentitySet{User: &graph.Identity{ID: confAgent}}},
			RemovedState: &graph.RemovedState{Reason: "left"}},
	}, nil
}

// A call whose record was lost (with Redis data) after its agent left the conference: Graph
// lists the agent removed (removedState), which is not in the call, as the rosters the record's
// call took them for. The call was taken for a conference and left alone: the caller stayed with
// nobody, on hold music that no longer played, until they hung up.
func TestCallWithoutARecordWhoseAgentWasRemovedIsTakenBack(t *testing.T) {
	g := &fakeGraph{}
	rdb := redistest.Start(t).Client(t)
	m := instance(t, rdb, "test", removedAgent{g}, &fakeQueues{}, time.Now)
	store := callstate.NewStore(rdb, "test")
	id := "8a1b2c3d-0000-4000-8000-00000000e0e0"
	notify(t, m, note("updated", id, `{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":3,"tone":"tone1"}}`))
	c, err := store.Get(context.Background(), graph.CallKey(id))
	if err != nil || m.Adopted.Load() != 1 {
		t.Fatalf("a call with no record, the caller alone with callbot and an agent listed removed: %+v %v, adopted %d; want it taken back",
			c, err, m.Adopted.Load())
	}
}

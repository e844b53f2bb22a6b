package graphsim

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/google/go-cmp/cmp"
)

func TestInviteAcceptedThenAgentLeaves(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), inviteBot(agentA))
	const talk = 300 * time.Millisecond
	s.AddAgent(AgentSpec{ID: agentA, DisplayName: "Heidi", TalkTime: talk})

	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "the agent in the roster", func() bool {
		ns := b.seen(c.ID())
		return len(ns) > 0 && ns[len(ns)-1].N.Kind == graph.ResourceParticipants
	})
	if p := s.Presence(agentA); p.Availability != "Busy" || p.Activity != "InACall" {
		t.Errorf("presence while connected %+v", p)
	}
	if r := c.Result(); r.Agent != agentA || r.ConnectedAt.IsZero() || r.Outcome != "" {
		t.Errorf("result while connected %+v", r)
	}
	res := waitDone(t, c)

	notes := b.seen(c.ID())
	want := []string{
		"created incoming",
		"updated establishing",
		"updated established",
		"deleted invite completed 200/0",
		"updated roster phone,application,user",
		"updated roster phone,application",
		"updated terminating",
		"deleted terminated 200/7000",
	}
	if diff := cmp.Diff(summary(notes), want); diff != "" {
		t.Fatalf("notifications (-got +want):\n%s", diff)
	}

	// The operation's completion, as the documented example has it.
	opNote := notes[3]
	op := opNote.N.Operation
	reqs := s.RequestsFor(c.ID())
	opID := b.opID(c.ID())
	if opID == "" || op.ID != opID || opNote.N.OperationID != opID || op.ClientContext != "handoff-"+graph.CallKey(c.ID()) ||
		opNote.N.ResourceURL != "/communications/calls/"+c.ID()+"/operations/"+opID {
		t.Errorf("completion %s, op id %s", opNote.Raw, opID)
	}
	var raw struct {
		Value []struct {
			ResourceData struct {
				Participants []struct {
					Type     string `json:"@odata.type"`
					Identity struct {
						Type string `json:"@odata.type"`
						User struct {
							ID, TenantID string
						}
					}
				}
			}
		}
	}
	if err := json.Unmarshal(opNote.Raw, &raw); err != nil {
		t.Fatal(err)
	}
	ps := raw.Value[0].ResourceData.Participants
	if len(ps) != 1 || ps[0].Type != "#microsoft.graph.invitationParticipantInfo" || ps[0].Identity.Type != "#microsoft.graph.identitySet" ||
		ps[0].Identity.User.ID != agentA || ps[0].Identity.User.TenantID != testTenant {
		t.Errorf("completion participants: %s", opNote.Raw)
	}

	// The roster with the agent, then without.
	with, without := notes[4].N, notes[5].N
	created := notes[0].N.Call
	if with.ResourceURL != "/communications/calls/"+c.ID()+"/participants" || with.CallID != c.ID() {
		t.Errorf("roster resource %q", with.ResourceURL)
	}
	caller, bot, agent := with.Participants[0], with.Participants[1], with.Participants[2]
	if caller.Info.Identity.Phone.ID != phoneCaller.ID || bot.Info.Identity.Application.ID != testClient ||
		bot.ID != created.MyParticipantID || agent.Info.Identity.User.ID != agentA || agent.Info.Identity.User.DisplayName != "Heidi" {
		t.Errorf("roster with the agent: %s", notes[4].Raw)
	}
	ids := map[string]bool{caller.ID: true, bot.ID: true, agent.ID: true}
	if len(ids) != 3 || ids[""] {
		t.Errorf("participant ids not distinct: %s", notes[4].Raw)
	}
	if len(without.Participants) != 2 || without.Participants[0].ID != caller.ID || without.Participants[1].ID != bot.ID {
		t.Errorf("roster without the agent: %s", notes[5].Raw)
	}
	// rosterSequenceNumber is the update in which each participant was last updated: the caller
	// and the bot keep theirs, the agent has the join's, and the roster without the agent lists
	// only numbers older than the one before it.
	if !(caller.RosterSequenceNumber > 0 && bot.RosterSequenceNumber == caller.RosterSequenceNumber &&
		agent.RosterSequenceNumber >= caller.RosterSequenceNumber &&
		without.Participants[0].RosterSequenceNumber == caller.RosterSequenceNumber &&
		without.Participants[1].RosterSequenceNumber == bot.RosterSequenceNumber) {
		t.Errorf("rosterSequenceNumbers: caller %d bot %d agent %d, then caller %d bot %d; want each participant's own, unchanged when another leaves",
			caller.RosterSequenceNumber, bot.RosterSequenceNumber, agent.RosterSequenceNumber,
			without.Participants[0].RosterSequenceNumber, without.Participants[1].RosterSequenceNumber)
	}

	if res.Outcome != OutcomeBotHangUp || res.Agent != agentA || !slices.Equal(res.Invites, []string{agentA}) ||
		res.EndCode != 200 || res.EndSubcode != 7000 || len(res.TransferAttempts) != 0 {
		t.Errorf("result %+v", res)
	}
	if res.ConnectedAt.Before(res.AnsweredAt) || res.EndedAt.Sub(res.ConnectedAt) < talk {
		t.Errorf("times: answered %v connected %v ended %v", res.AnsweredAt, res.ConnectedAt, res.EndedAt)
	}
	if got := s.AgentStats(agentA); got != (AgentStats{Offered: 1, Accepted: 1, MaxConcurrentOffers: 1}) {
		t.Errorf("agent stats %+v", got)
	}
	if p := s.Presence(agentA); p.Availability != "Available" {
		t.Errorf("presence after the agent left %+v", p)
	}
	var actions []string
	for _, r := range reqs {
		actions = append(actions, fmt.Sprintf("%s %d", r.Action, r.Status))
	}
	if diff := cmp.Diff(actions, []string{"answer 202", "invite 200", "delete 204"}); diff != "" {
		t.Errorf("graph requests (-got +want):\n%s", diff)
	}
}

func TestInviteFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		answer AgentAnswer
		agent  string
		want   string
		stats  AgentStats
		rings  time.Duration // at least
	}{
		{"declined", AgentDecline, agentA, "deleted invite failed 486/0", AgentStats{Offered: 1, Declined: 1, MaxConcurrentOffers: 1}, 0},
		{"no answer", AgentNoAnswer, agentA, "deleted invite failed 408/10057", AgentStats{Offered: 1, Missed: 1, MaxConcurrentOffers: 1}, fastOptions().RingTimeout},
		{"unknown agent", AgentAccept, "not-an-agent", "deleted invite failed 480/10037", AgentStats{}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, b := newHarness(t, fastOptions(), inviteBot(tc.agent))
			s.AddAgent(AgentSpec{ID: agentA, Answer: tc.answer})
			c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
			if err != nil {
				t.Fatal(err)
			}
			res := waitDone(t, c)
			notes := b.seen(c.ID())
			want := []string{"created incoming", "updated establishing", "updated established", tc.want,
				"updated terminating", "deleted terminated 200/7000"}
			if diff := cmp.Diff(summary(notes), want); diff != "" {
				t.Fatalf("notifications (-got +want):\n%s", diff)
			}
			op := notes[3].N.Operation
			if op.Status != graph.OpFailed || op.ClientContext != "handoff-"+graph.CallKey(c.ID()) || op.ResultInfo.Message == "" ||
				!bytes.Contains(notes[3].Raw, []byte(`"participants":[{"@odata.type":"#microsoft.graph.invitationParticipantInfo"`)) {
				t.Errorf("failed operation: %s", notes[3].Raw)
			}
			if res.Outcome != OutcomeBotHangUp || res.Agent != "" || !res.ConnectedAt.IsZero() ||
				!slices.Equal(res.Invites, []string{tc.agent}) {
				t.Errorf("result %+v", res)
			}
			if op.ID != b.opID(c.ID()) {
				t.Errorf("operation %s, invite answered %s", op.ID, b.opID(c.ID()))
			}
			var invited, failed time.Time
			for _, r := range s.RequestsFor(c.ID()) {
				if r.Action == "invite" {
					invited = r.Time
				}
			}
			for _, d := range s.Deliveries() {
				if d.CallID == c.ID() && d.State == "failed" {
					failed = d.Time
				}
			}
			if d := failed.Sub(invited); d < tc.rings {
				t.Errorf("failed %v after the invite, want at least %v", d, tc.rings)
			}
			if got := s.AgentStats(agentA); got != tc.stats {
				t.Errorf("stats %+v, want %+v", got, tc.stats)
			}
			if p := s.Presence(agentA); p.Availability != "Available" {
				t.Errorf("presence %+v", p)
			}
		})
	}
}

func TestInviteValidation(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), func(b *fakeBot, n graph.Notification) {
		if n.Kind == graph.ResourceCall && n.ChangeType == graph.Created {
			// Not established yet: 400.
			b.invite(n.CallID, agentA, "early", http.StatusBadRequest)
			b.answer(n.CallID)
		}
	})
	s.AddAgent(AgentSpec{ID: agentA, Answer: AgentNoAnswer})
	s.AddAgent(AgentSpec{ID: agentB})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "established", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.lookup(c.ID()).state == graph.CallEstablished
	})
	path := "/communications/calls/" + c.ID() + "/participants/invite"
	user := func(id string) map[string]any {
		return map[string]any{"identity": map[string]any{"user": map[string]any{"id": id}}}
	}
	for _, tc := range []struct {
		name string
		body any
		want int
	}{
		{"no participants", map[string]any{}, http.StatusBadRequest},
		{"two participants", map[string]any{"participants": []any{user(agentA), user(agentB)}}, http.StatusBadRequest},
		{"no identity", map[string]any{"participants": []any{map[string]any{}}}, http.StatusBadRequest},
		{"long clientContext", map[string]any{"participants": []any{user(agentA)}, "clientContext": strings.Repeat("x", 257)}, http.StatusBadRequest},
	} {
		if st, out, _ := b.call(http.MethodPost, path, tc.body); st != tc.want || !bytes.Contains(out, []byte(`"BadRequest"`)) {
			t.Errorf("%s: %d %s", tc.name, st, out)
		}
	}
	if st, _, _ := b.call(http.MethodPost, "/communications/calls/"+newID()+"/participants/invite",
		map[string]any{"participants": []any{user(agentA)}}); st != http.StatusNotFound {
		t.Errorf("unknown call: %d", st)
	}

	// Faults apply to "invite" like to any other action, without effect.
	s.FailNext("invite", http.StatusServiceUnavailable, time.Second, 1)
	if st, _, hdr := b.call(http.MethodPost, path, map[string]any{"participants": []any{user(agentA)}}); st != http.StatusServiceUnavailable || hdr.Get("Retry-After") != "1" {
		t.Errorf("injected fault: %d %v", st, hdr)
	}
	if got := s.AgentStats(agentA); got.Offered != 0 {
		t.Errorf("a failed request rang the agent: %+v", got)
	}

	// One invite at a time; no transfer meanwhile.
	b.invite(c.ID(), agentA, "first", http.StatusOK)
	b.invite(c.ID(), agentB, "second", http.StatusBadRequest)
	b.action(c.ID(), "transfer", map[string]any{"transferTarget": user(agentB)}, http.StatusBadRequest)
	if got := s.AgentStats(agentB); got.Offered != 0 {
		t.Errorf("agent B rang: %+v", got)
	}
	eventually(t, "the invite to ring out", func() bool { return s.AgentStats(agentA).Missed == 1 })
	// Once it failed, another invite may follow.
	b.invite(c.ID(), agentB, "second", http.StatusOK)
	eventually(t, "agent B joined", func() bool { return s.AgentStats(agentB).Accepted == 1 })
	b.invite(c.ID(), agentA, "third", http.StatusBadRequest)
	b.hangUp(c.ID())
	res := waitDone(t, c)
	if !slices.Equal(res.Invites, []string{agentA, agentB}) || res.Agent != agentB || res.Outcome != OutcomeBotHangUp {
		t.Errorf("result %+v", res)
	}

	var actions []string
	for _, r := range s.RequestsFor(c.ID()) {
		actions = append(actions, fmt.Sprintf("%s %d", r.Action, r.Status))
	}
	want := []string{"invite 400", "answer 202", "invite 400", "invite 400", "invite 400", "invite 400", "invite 503",
		"invite 200", "invite 400", "transfer 400", "invite 200", "invite 400", "delete 204"}
	if diff := cmp.Diff(actions, want); diff != "" {
		t.Errorf("graph requests (-got +want):\n%s", diff)
	}
	if inj := s.Injected(); len(inj) != 1 || inj[0].Action != "invite" {
		t.Errorf("injected %+v", inj)
	}
	if _, err := s.AddFault(Fault{Kind: FaultLatency, Action: "INVITE", Latency: time.Millisecond, Count: 1}); err != nil {
		t.Errorf("invite is not a known fault action: %v", err)
	}
}

// TestInviteCallEndsWithAgentConnected: the caller hanging up frees the agent at once; the bot
// hanging up leaves caller and agent talking until the agent's TalkTime.
func TestInviteCallEndsWithAgentConnected(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		byBot   bool
		outcome string
		end     string
	}{
		{"caller hangs up", false, OutcomeCallerHangUp, "deleted terminated 200/540000"},
		{"bot hangs up", true, OutcomeBotHangUp, "deleted terminated 200/7000"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s, b := newHarness(t, fastOptions(), inviteBot(agentA))
			const talk = 700 * time.Millisecond
			s.AddAgent(AgentSpec{ID: agentA, TalkTime: talk})
			c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
			if err != nil {
				t.Fatal(err)
			}
			eventually(t, "the agent connected", func() bool { return c.Result().Agent == agentA })
			if tc.byBot {
				b.hangUp(c.ID())
			} else if err := c.HangUp(); err != nil {
				t.Fatal(err)
			}
			res := waitDone(t, c)
			if res.Outcome != tc.outcome || res.Agent != agentA {
				t.Errorf("result %+v", res)
			}
			busy := s.Presence(agentA).Availability == "Busy"
			if busy != tc.byBot {
				t.Errorf("agent busy right after the call ended: %v", busy)
			}
			eventually(t, "agent available", func() bool { return s.Presence(agentA).Availability == "Available" })
			if tc.byBot && time.Since(res.ConnectedAt) < talk {
				t.Errorf("agent freed before TalkTime")
			}
			time.Sleep(talk) // nothing more may be sent
			got := summary(b.seen(c.ID()))
			if got[len(got)-1] != tc.end || slices.Contains(got, "updated roster phone,application") {
				t.Errorf("notifications %v", got)
			}
			if st := s.AgentStats(agentA); st != (AgentStats{Offered: 1, Accepted: 1, MaxConcurrentOffers: 1}) {
				t.Errorf("stats %+v", st)
			}
		})
	}
}

// TestInviteCountsInAgentConcurrency: an invited agent counts as an offer while ringing and
// connected, with transfers; a caller hanging up frees them.
func TestInviteCountsInAgentConcurrency(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), func(b *fakeBot, n graph.Notification) {
		if n.Kind == graph.ResourceCall && n.ChangeType == graph.Created {
			b.answer(n.CallID)
		}
	})
	s.AddAgent(AgentSpec{ID: agentA, TalkTime: 10 * time.Second})
	established := func(c *Call) func() bool {
		return func() bool {
			s.mu.Lock()
			defer s.mu.Unlock()
			cc := s.lookup(c.ID())
			return cc != nil && cc.state == graph.CallEstablished
		}
	}
	var calls []*Call
	for i := range 3 {
		c, err := s.PlaceCall(context.Background(), CallerSpec{From: graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+4930777%d", i)}, To: testAppInst})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "established", established(c))
		calls = append(calls, c)
	}
	b.invite(calls[0].ID(), agentA, "one", http.StatusOK)
	b.transfer(calls[2].ID(), agentA)
	eventually(t, "two accepted", func() bool { return s.AgentStats(agentA).Accepted == 2 })
	if got := s.AgentStats(agentA); got != (AgentStats{Offered: 2, Accepted: 2, MaxConcurrentOffers: 2}) {
		t.Errorf("stats %+v", got)
	}
	// The first caller hangs up: the invited agent's talk ends with the call. The transferred
	// call still holds the agent for their TalkTime, so a new invite makes two again, not three.
	if err := calls[0].HangUp(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, calls[0])
	waitDone(t, calls[2])
	b.invite(calls[1].ID(), agentA, "two", http.StatusOK)
	eventually(t, "three accepted", func() bool { return s.AgentStats(agentA).Accepted == 3 })
	if got := s.AgentStats(agentA); got != (AgentStats{Offered: 3, Accepted: 3, MaxConcurrentOffers: 2}) {
		t.Errorf("stats %+v", got)
	}
	if err := calls[1].HangUp(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, calls[1])
}

// GET .../participants: refused for a peer-to-peer call (Graph does not list those), then the
// roster as the last update listed it once an invited agent joined (a group call from then on,
// after the agent has left too); 404 once the call is gone.
func TestListParticipants(t *testing.T) {
	t.Parallel()
	answerOnly := func(b *fakeBot, n graph.Notification) {
		if n.Kind == graph.ResourceCall && n.ChangeType == graph.Created && n.Call.State == graph.CallIncoming {
			b.answer(n.CallID)
		}
	}
	s, b := newHarness(t, fastOptions(), answerOnly)
	s.AddAgent(AgentSpec{ID: agentA, DisplayName: "Heidi", TalkTime: 300 * time.Millisecond})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	path := "/communications/calls/" + c.ID() + "/participants"
	list := func() (int, []graph.Participant, []byte) {
		st, out, _ := b.call(http.MethodGet, path, nil)
		var body struct {
			Value []graph.Participant `json:"value"`
		}
		if st == http.StatusOK {
			if err := json.Unmarshal(out, &body); err != nil {
				t.Fatalf("list: %v: %s", err, out)
			}
		}
		return st, body.Value, out
	}
	lastRoster := func() []graph.Participant {
		ns := b.seen(c.ID())
		for i := len(ns) - 1; i >= 0; i-- {
			if ns[i].N.Kind == graph.ResourceParticipants {
				return ns[i].N.Participants
			}
		}
		return nil
	}
	eventually(t, "established", func() bool { return slices.Contains(summary(b.seen(c.ID())), "updated established") })
	if st, _, out := list(); st != http.StatusBadRequest || !bytes.Contains(out, []byte("peer-to-peer")) {
		t.Errorf("list of a peer-to-peer call: %d %s, want 400", st, out)
	}
	b.invite(c.ID(), agentA, "x1", http.StatusOK)
	eventually(t, "the agent in the roster", func() bool { return len(lastRoster()) == 3 })
	st, got, out := list()
	want := lastRoster()
	if st != http.StatusOK || len(got) != 3 || got[2].Info.Identity.User == nil || got[2].Info.Identity.User.ID != agentA ||
		got[2].ID != want[2].ID || got[0].RosterSequenceNumber != want[0].RosterSequenceNumber {
		t.Errorf("list with the agent joined: %d %s; the roster notified: %+v", st, out, want)
	}
	eventually(t, "the agent gone from the roster", func() bool { return len(lastRoster()) == 2 })
	if st, got, out := list(); st != http.StatusOK || len(got) != 2 || got[0].RosterSequenceNumber != lastRoster()[0].RosterSequenceNumber {
		t.Errorf("list after the agent left: %d %s, want the caller and the bot", st, out)
	}
	b.hangUp(c.ID())
	waitDone(t, c)
	if st, _, out := list(); st != http.StatusNotFound {
		t.Errorf("list of an ended call: %d %s, want 404", st, out)
	}
}

package main

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// Graph faults injected by graphsim, and what the caller experiences with callbot in front:
// answered anyway, re-queued, or ended with a defined outcome; never a transfer sent twice.

// requests counts the requests of one action graphsim received for a call, and those it
// accepted (2xx: the action took effect).
func requests(w *world, callID, action string) (sent, took int) {
	for _, r := range w.sim.RequestsFor(callID) {
		if r.Action == action {
			sent++
			if r.Status >= 200 && r.Status < 300 {
				took++
			}
		}
	}
	return sent, took
}

func addFault(t *testing.T, w *world, f graphsim.Fault) {
	t.Helper()
	if _, err := w.sim.AddFault(f); err != nil {
		t.Fatal(err)
	}
}

func TestFaultAnswerThrottledIsAnsweredAnyway(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultStatus, Action: "answer", Status: 429, RetryAfter: time.Second, Count: 1})
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 20*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred {
		t.Fatalf("caller experienced %+v; want answered and transferred despite a 429 on answer", r)
	}
	if sent, took := requests(w, r.ID, "answer"); sent != 2 || took != 1 {
		t.Errorf("answer requests: %d sent, %d taken; want the throttled one repeated once after Retry-After", sent, took)
	}
}

// A 503 on answer is ambiguous: callbot does not repeat it blindly but reads the call, and
// answers again because Graph still has it incoming.
func TestFaultAnswerUnavailableIsReconciled(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultStatus, Action: "answer", Status: 503, Count: 1})
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 20*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred {
		t.Fatalf("caller experienced %+v; want answered after the 503", r)
	}
	sent, took := requests(w, r.ID, "answer")
	gets, _ := requests(w, r.ID, "get")
	if sent != 2 || took != 1 || gets < 1 {
		t.Errorf("answer %d sent / %d taken, %d reads of the call; want a read, then one more answer", sent, took, gets)
	}
}

func TestFaultSlowAnswerStillInTime(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultLatency, Action: "answer", Latency: 3 * time.Second, Count: 1})
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 20*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred {
		t.Fatalf("caller experienced %+v; want answered after 3 s", r)
	}
	if sent, _ := requests(w, r.ID, "answer"); sent != 1 {
		t.Errorf("%d answer requests; a slow answer must not be sent again", sent)
	}
}

// A 503 on transfer may or may not have been taken: callbot reads the call, sees it still
// established, and offers the caller again, from the head of the queue. The transfer Graph
// took is the only one.
func TestFaultTransferUnavailableNoDuplicate(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), available(agent2, graphsim.AgentAccept), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultStatus, Action: "transfer", Status: 503, Count: 1})
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 25*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred {
		t.Fatalf("caller experienced %+v; want transferred after the failed request", r)
	}
	sent, took := requests(w, r.ID, "transfer")
	if sent != 2 || took != 1 {
		t.Errorf("transfer requests: %d sent, %d taken; want the failed one and one more", sent, took)
	}
	for _, a := range []string{agent1, agent2} {
		if st := w.sim.AgentStats(a); st.MaxConcurrentOffers > 1 {
			t.Errorf("agent %s offered %d calls at once", a, st.MaxConcurrentOffers)
		}
	}
}

// eachCallerTransferredOnce places n callers who press 1, gap apart, and asserts that each
// reaches an agent by exactly one transfer Graph took, and that no agent rang twice at once.
func eachCallerTransferredOnce(t *testing.T, w *world, n int, gap time.Duration) {
	t.Helper()
	var calls []*graphsim.Call
	for i := range n {
		calls = append(calls, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 400 * time.Millisecond,
			From: graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+1425555%04d", i)}}))
		time.Sleep(gap)
	}
	for _, c := range calls {
		r := waitDone(t, c, 40*time.Second)
		if r.Outcome != graphsim.OutcomeTransferred {
			t.Errorf("caller %s experienced %+v; want transferred", r.From.ID, r)
			continue
		}
		if _, took := requests(w, r.ID, "transfer"); took != 1 {
			t.Errorf("caller %s: %d transfers taken by Graph, want 1", r.From.ID, took)
		}
	}
	for _, a := range []string{agent1, agent2, agent3} {
		if st := w.sim.AgentStats(a); st.MaxConcurrentOffers > 1 {
			t.Errorf("agent %s offered %d calls at once", a, st.MaxConcurrentOffers)
		}
	}
}

// Graph's notifications may arrive twice and out of order: every caller still reaches an
// agent, each by exactly one transfer Graph took, and no agent rings twice at once.
func TestFaultDuplicatedAndReorderedNotifications(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), available(agent2, graphsim.AgentAccept), available(agent3, graphsim.AgentAccept))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultDuplicate, Probability: 0.5})
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultReorder, Probability: 0.3, Latency: 300 * time.Millisecond})
	eachCallerTransferredOnce(t, w, 4, 300*time.Millisecond)
	if len(w.sim.Injected()) == 0 {
		t.Error("no fault was injected: the test proved nothing")
	}
}

// Graph may put several notifications in one request: callbot applies each of them, in order.
func TestFaultBatchedNotifications(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), available(agent2, graphsim.AgentAccept), available(agent3, graphsim.AgentAccept))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultBatch, Probability: 0.6, Latency: 300 * time.Millisecond})
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultDuplicate, Probability: 0.2})
	eachCallerTransferredOnce(t, w, 3, 200*time.Millisecond)
	// Requests that carried several notifications, and callbot's answers to them.
	shared := 0
	ds := w.sim.Deliveries()
	for i, d := range ds {
		if i > 0 && d.Fault == graphsim.FaultBatch && ds[i-1].Fault == graphsim.FaultBatch && ds[i-1].Time.Equal(d.Time) {
			shared++
			if d.Status != 202 {
				t.Errorf("a request of several notifications got %d, want 202", d.Status)
			}
		}
	}
	if shared == 0 {
		t.Error("no request carried several notifications: the test proved nothing")
	}
}

// A lost "established" notification: callbot asks Graph after 10 s and starts the menu.
func TestFaultLostEstablishedNotification(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultDrop, State: "established", Count: 1})
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 30*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || len(r.Prompts) == 0 {
		t.Fatalf("caller experienced %+v; want the menu after the lost notification, then an agent", r)
	}
}

// Conference hand-off: callbot invites the agent and stays in the call; when the agent leaves,
// callbot hangs up, and the agent gets its wrap-up time before the next caller.
func TestE2EInviteHandoffAndWrapUp(t *testing.T) {
	agent := graphsim.AgentSpec{ID: agent3, Availability: "Available", Activity: "Available", TalkTime: time.Second}
	w := startWorld(t, standaloneRedis, away(agent1), away(agent2), agent)
	first := w.call(t, graphsim.CallerSpec{Digits: "3"})
	second := w.call(t, graphsim.CallerSpec{Digits: "3", From: graph.Party{Kind: graph.KindPhone, ID: "+14255550199"}})
	r1 := waitDone(t, first, 20*time.Second)
	r2 := waitDone(t, second, 30*time.Second)
	for _, r := range []graphsim.CallResult{r1, r2} {
		if r.Agent != agent3 || r.ConnectedAt.IsZero() || r.Outcome != graphsim.OutcomeBotHangUp {
			t.Fatalf("caller %s experienced %+v; want connected to %s by invite, then hung up by callbot when the agent left", r.From.ID, r, agent3)
		}
		if sent, _ := requests(w, r.ID, "transfer"); sent != 0 {
			t.Errorf("caller %s was transferred; the queue hands off by invite", r.From.ID)
		}
	}
	a, b := r1, r2
	if b.ConnectedAt.Before(a.ConnectedAt) {
		a, b = b, a
	}
	if gap := b.ConnectedAt.Sub(a.EndedAt); gap < 2*time.Second {
		t.Errorf("the agent took the next caller %s after the conversation ended; want at least the 2 s wrap-up", gap)
	}
	if st := w.sim.AgentStats(agent3); st.MaxConcurrentOffers > 1 {
		t.Errorf("agent offered %d calls at once", st.MaxConcurrentOffers)
	}
}

// Graph's signing key rolls over between two calls: callbot fetches the new key and the second
// caller is answered like the first; no notification is refused.
func TestFaultSigningKeyRollover(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), available(agent2, graphsim.AgentAccept), away(agent3))
	r1 := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 20*time.Second)
	if _, err := w.sim.RolloverKey(); err != nil {
		t.Fatal(err)
	}
	r2 := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", From: graph.Party{Kind: graph.KindPhone, ID: "+14255550177"}}), 20*time.Second)
	for _, r := range []graphsim.CallResult{r1, r2} {
		if r.Outcome != graphsim.OutcomeTransferred {
			t.Errorf("caller %s experienced %+v; want transferred", r.From.ID, r)
		}
	}
	for _, d := range w.sim.Deliveries() {
		if d.Status == 401 || d.Status == 403 {
			t.Errorf("notification refused with %d after the rollover", d.Status)
		}
	}
}

// Graph's signing-key metadata is down when callbot starts. callbot says it is not ready, and
// why, rather than taking notifications it cannot verify; it keeps trying by itself, and once the
// metadata answers it is ready and the first caller is served with no notification refused.
func TestFaultSigningKeysUnreachableAtStart(t *testing.T) {
	w := newWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	down, err := w.sim.AddFault(graphsim.Fault{Kind: graphsim.FaultStatus, Action: "botauth-openid-configuration", Status: 503, Probability: 1})
	if err != nil {
		t.Fatal(err)
	}
	w.start(t)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		code, body, err := w.readyz()
		if code == 200 {
			t.Fatal("ready without signing keys")
		}
		if err == nil && code == 503 && strings.Contains(body, "signing keys not fetched yet: ") && strings.Contains(body, "status 503") {
			break // it tried, and says why it is not ready
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness while the key metadata is down: %d %q %v; want 503 naming the failed fetch", code, body, err)
		}
	}
	w.sim.RemoveFault(down)
	if err := w.waitReady(10 * time.Second); err != nil { // retried after 1 s, 2 s, 4 s
		t.Fatal(err)
	}
	time.Sleep(700 * time.Millisecond) // one presence poll
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 20*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred {
		t.Fatalf("caller experienced %+v; want transferred", r)
	}
	for _, d := range w.sim.Deliveries() {
		if d.Status != 200 && d.Status != 202 && d.Status != 204 {
			t.Errorf("notification %s %s answered %d %s; want every one taken", d.ChangeType, d.State, d.Status, d.Err)
		}
	}
}

// A notification signed with an expired token is refused (403) and lost; the caller is served
// anyway: callbot asks Graph after 10 s and carries on.
func TestFaultExpiredTokenOnANotification(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultExpiredToken, State: "established", Count: 1})
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 30*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred {
		t.Fatalf("caller experienced %+v; want transferred despite the refused notification", r)
	}
	refused := 0
	for _, d := range w.sim.Deliveries() {
		if d.CallID == r.ID && d.Status == 403 {
			refused++
		}
	}
	if refused != 1 {
		t.Errorf("%d notifications refused with 403, want the one with the expired token", refused)
	}
}

// An instance stopped (SIGTERM) while its answer is on its way to a slow Graph keeps renewing
// that command's outbox lease until it is sent: another instance does not answer the call a
// second time. Before, the shutdown stopped the renewal with the other loops, and with a 1 s
// lease the other instance re-drove the answer Graph had not applied yet.
func TestShutdownKeepsTheLeasesOfCommandsInFlight(t *testing.T) {
	w := newWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	w.env["CALLBOT_OUTBOX_LEASE"] = "1s"
	w.env["CALLBOT_SHUTDOWN_GRACE"] = "10s"
	b := &world{sim: w.sim, stdout: &syncBuffer{}, logs: &syncBuffer{}, env: maps.Clone(w.env)}
	addrB := freeAddr(t)
	b.botURL = "http://" + addrB
	b.env["CALLBOT_LISTEN_ADDR"], b.env["CALLBOT_PUBLIC_URL"], b.env["CALLBOT_INSTANCE_ID"] = addrB, b.botURL, "b"
	w.env["CALLBOT_INSTANCE_ID"] = "a"
	w.start(t) // graphsim's webhook is this one
	b.start(t)
	for _, x := range []*world{w, b} {
		if err := x.waitReady(10 * time.Second); err != nil {
			t.Fatal(err)
		}
	}
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultLatency, Action: "answer", Latency: 3 * time.Second, Probability: 1})
	c := w.call(t, graphsim.CallerSpec{Digits: "1"}) // acknowledged: A's answer is on its way
	w.stop()
	select {
	case err := <-w.done: // A sent its answer (3 s) within its grace, then exited
		w.done <- err // for the cleanup
	case <-time.After(20 * time.Second):
		t.Fatal("the stopped instance did not exit within its grace")
	}
	time.Sleep(2 * time.Second) // two more leases: B would have re-driven by now
	if sent, _ := requests(w, c.ID(), "answer"); sent != 1 {
		t.Errorf("%d answer requests for the call, want 1: another instance answered it again while the stopping one was still sending", sent)
	}
}

// Conference hand-off, the agent declines: callbot reads the call's roster before giving up on
// the agent (a second invite's failure could come while the agent talks to the caller); graphsim,
// as Graph, lists no participants of a peer-to-peer call (400), which tells callbot nobody joined,
// and the caller goes back to the queue, hearing the hold music again.
func TestE2EDeclinedInviteReadsTheRoster(t *testing.T) {
	agent := graphsim.AgentSpec{ID: agent3, Availability: "Available", Activity: "Available", Answer: graphsim.AgentDecline}
	w := startWorld(t, standaloneRedis, away(agent1), away(agent2), agent)
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "3", HangUpAfter: 4 * time.Second}), 20*time.Second)
	var seq []string // invites, roster reads and prompts, in order
	for _, q := range w.sim.RequestsFor(r.ID) {
		switch q.Action {
		case "invite", "participants":
			seq = append(seq, fmt.Sprintf("%s %d", q.Action, q.Status))
		case "playPrompt":
			seq = append(seq, "playPrompt")
		}
	}
	invited, read := slices.Index(seq, "invite 200"), slices.Index(seq, "participants 400")
	if invited < 0 || read < invited || !slices.Contains(seq[read:], "playPrompt") {
		t.Errorf("requests %v; want the invite, then the roster read (400: peer-to-peer), then the hold music again", seq)
	}
	if r.Outcome != graphsim.OutcomeCallerHangUp || !r.ConnectedAt.IsZero() {
		t.Errorf("caller experienced %+v; want to wait in the queue until they hung up", r)
	}
}

// A tone subscription Graph fails (503, after the Graph client's own retries) is made again a
// second later, so the caller's key, pressed once it took, reaches callbot: without it, graphsim
// (as Graph) reports no key, and the caller hears the menu until its fallback hangs up on them.
func TestFaultToneSubscriptionFailedIsMadeAgain(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	addFault(t, w, graphsim.Fault{Kind: graphsim.FaultStatus, Action: "subscribeToTone", Status: 503, Count: 3})
	c := w.call(t, graphsim.CallerSpec{})
	for deadline := time.Now().Add(4 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if _, took := requests(w, c.ID(), "subscribeToTone"); took > 0 {
			break
		}
		if time.Now().After(deadline) {
			sent, _ := requests(w, c.ID(), "subscribeToTone")
			t.Fatalf("no tone subscription taken 4 s after the call came in (%d sent): %+v", sent, c.Result())
		}
	}
	if err := c.Press("1"); err != nil {
		t.Fatal(err)
	}
	r := waitDone(t, c, 20*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 || !slices.Equal(r.Tones, []string{"1"}) {
		t.Fatalf("caller experienced %+v; want their key taken and transferred to %s", r, agent1)
	}
	if sent, took := requests(w, r.ID, "subscribeToTone"); sent != 4 || took != 1 {
		t.Errorf("subscribeToTone: %d sent, %d taken; want the client's three attempts failed, then callbot's one more", sent, took)
	}
}

// Graph throttles every presence read: for CALLBOT_PRESENCE_MAX_AGE callbot routes on the last
// reading, then offers the agent no caller (a caller waits in the queue, hearing hold music),
// until a read succeeds again; then the caller reaches the agent.
func TestFaultPresenceThrottledPastItsMaxAge(t *testing.T) {
	w := newWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	w.env["CALLBOT_PRESENCE_MAX_AGE"] = "2s" // polls every 500 ms
	w.startServing(t)
	id, err := w.sim.AddFault(graphsim.Fault{Kind: graphsim.FaultStatus, Action: "getPresencesByUserId", Status: 429, RetryAfter: 100 * time.Millisecond, Probability: 1})
	if err != nil {
		t.Fatal(err)
	}
	// each throttled poll takes about 2 s (the client waits out two 429s): wait until one finds
	// the last reading past its max age
	for deadline := time.Now().Add(15 * time.Second); !strings.Contains(w.logs.String(), "presence not read for longer than its max age"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no warning that presence was too old to route on")
		}
	}
	c := w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 300 * time.Millisecond})
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(c.Result().Prompts, "https://media.test/hold.wav") { // queued
		if time.Now().After(deadline) {
			t.Fatalf("the caller did not reach the queue: %+v", c.Result())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // the dispatcher looks every 250 ms
	if st := w.sim.AgentStats(agent1); st.Offered != 0 {
		t.Fatalf("agent offered %d callers on a presence reading older than its max age", st.Offered)
	}

	w.sim.RemoveFault(id)
	r := waitDone(t, c, 15*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 {
		t.Errorf("caller experienced %+v; want transferred to %s once presence was read again", r, agent1)
	}
}

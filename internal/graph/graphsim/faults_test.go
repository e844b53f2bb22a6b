package graphsim

import (
	"bytes"
	"context"
	"crypto/rsa"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/golang-jwt/jwt/v5"
	"github.com/google/go-cmp/cmp"
)

// answerOnce answers each call's first `created` notification only: duplicates of it are
// ignored, as a bot that dedupes does.
func answerOnce() func(b *fakeBot, n graph.Notification) {
	var mu sync.Mutex
	answered := map[string]bool{}
	return func(b *fakeBot, n graph.Notification) {
		if n.ChangeType != graph.Created {
			return
		}
		mu.Lock()
		first := !answered[n.CallID]
		answered[n.CallID] = true
		mu.Unlock()
		if first {
			b.answer(n.CallID)
		}
	}
}

func mustAddFault(t *testing.T, s *Sim, f Fault) string {
	t.Helper()
	id, err := s.AddFault(f)
	if err != nil {
		t.Fatalf("AddFault(%+v): %v", f, err)
	}
	return id
}

func deliverySummary(ds []Delivery, callID string) []string {
	var out []string
	for _, d := range ds {
		if d.CallID == callID {
			out = append(out, strings.TrimSpace(fmt.Sprintf("%s %s %d %s", d.ChangeType, d.State, d.Status, d.Fault)))
		}
	}
	return out
}

func injectedSummary(in []InjectedFault) []string {
	var out []string
	for _, f := range in {
		out = append(out, strings.TrimSpace(fmt.Sprintf("%s %s %s%s", f.Rule, f.Kind, f.Action, f.State)))
	}
	return out
}

func TestDuplicatedAndReorderedNotificationsReachTheBot(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnce())
	dup := mustAddFault(t, s, Fault{Kind: FaultDuplicate, State: "incoming", Count: 1})
	reo := mustAddFault(t, s, Fault{Kind: FaultReorder, State: "establishing", Count: 1})

	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablishing)
	if err := c.HangUp(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, c)

	// What the bot received: the created notification twice, established before establishing.
	want := []string{"created incoming", "created incoming", "updated established", "updated establishing", "deleted terminated 200/540000"}
	if diff := cmp.Diff(summary(b.seen(c.ID())), want); diff != "" {
		t.Errorf("bot received (-got +want):\n%s", diff)
	}
	wantD := []string{"created incoming 202", "created incoming 202 duplicate", "updated established 202",
		"updated establishing 202 reorder", "deleted terminated 202"}
	if diff := cmp.Diff(deliverySummary(s.Deliveries(), c.ID()), wantD); diff != "" {
		t.Errorf("deliveries (-got +want):\n%s", diff)
	}
	wantI := []string{dup + " duplicate incoming", reo + " reorder establishing"}
	if diff := cmp.Diff(injectedSummary(s.Injected()), wantI); diff != "" {
		t.Errorf("injected (-got +want):\n%s", diff)
	}
	if got := s.Faults(); len(got) != 0 {
		t.Errorf("rules left after their count: %+v", got)
	}
	for _, r := range s.RequestsFor(c.ID()) {
		if r.Action == "answer" && r.Status != http.StatusAccepted {
			t.Errorf("answer %d", r.Status)
		}
	}
}

func TestReorderWithNothingToFollow(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnce())
	// The created notification is held: nothing follows it until the bot answers, so it goes
	// out when the hold expires. The last notification of a call is not held at all.
	mustAddFault(t, s, Fault{Kind: FaultReorder, State: "incoming", Latency: 80 * time.Millisecond, Count: 1})
	mustAddFault(t, s, Fault{Kind: FaultReorder, State: "terminated", Count: 1})
	start := time.Now()
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst, HangUpAfter: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 80*time.Millisecond {
		t.Errorf("PlaceCall returned after %v, before the hold expired", d)
	}
	start = time.Now()
	waitDone(t, c)
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("the held last notification waited %v", d)
	}
	want := []string{"created incoming", "updated establishing", "updated established", "deleted terminated 200/540000"}
	if diff := cmp.Diff(summary(b.seen(c.ID())), want); diff != "" {
		t.Errorf("bot received (-got +want):\n%s", diff)
	}
}

// Graph may put several notifications in one request: a batched notification goes in one POST
// with the ones after it, in order; one with nothing after it goes alone.
func TestBatchedNotificationsShareARequest(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnce())
	// establishing waits for established; the call's last notification has nothing after it.
	mustAddFault(t, s, Fault{Kind: FaultBatch, State: "establishing", Count: 1})
	mustAddFault(t, s, Fault{Kind: FaultBatch, State: "terminated", Count: 1})
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	start := time.Now()
	if err := c.HangUp(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, c)
	if d := time.Since(start); d > 900*time.Millisecond {
		t.Errorf("the batched last notification waited %v", d)
	}
	seen := b.seen(c.ID())
	want := []string{"created incoming", "updated establishing", "updated established", "deleted terminated 200/540000"}
	if diff := cmp.Diff(summary(seen), want); diff != "" {
		t.Fatalf("bot received (-got +want):\n%s", diff)
	}
	if !bytes.Equal(seen[1].Raw, seen[2].Raw) || bytes.Equal(seen[0].Raw, seen[1].Raw) || bytes.Equal(seen[2].Raw, seen[3].Raw) {
		t.Errorf("requests: establishing and established should share one, and only they:\n%s\n%s\n%s\n%s", seen[0].Raw, seen[1].Raw, seen[2].Raw, seen[3].Raw)
	}
	wantD := []string{"created incoming 202", "updated establishing 202 batch", "updated established 202 batch", "deleted terminated 202 batch"}
	if diff := cmp.Diff(deliverySummary(s.Deliveries(), c.ID()), wantD); diff != "" {
		t.Errorf("deliveries (-got +want):\n%s", diff)
	}

	// Every notification batched: runs of them go together, each request in order, none lost.
	mustAddFault(t, s, Fault{Kind: FaultBatch, Probability: 1, Latency: 50 * time.Millisecond})
	c = placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	if err := c.HangUp(); err != nil {
		t.Fatal(err)
	}
	waitDone(t, c)
	seen = b.seen(c.ID())
	if diff := cmp.Diff(summary(seen), want); diff != "" {
		t.Errorf("bot received (-got +want):\n%s", diff)
	}
	requests := 0
	for i := range seen {
		if i == 0 || !bytes.Equal(seen[i].Raw, seen[i-1].Raw) {
			requests++
		}
	}
	if requests >= len(seen) {
		t.Errorf("%d notifications in %d requests: none batched", len(seen), requests)
	}
}

func TestDroppedNotifications(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	opts.AnswerTimeout = 150 * time.Millisecond
	s, b := newHarness(t, opts, answerOnce())

	mustAddFault(t, s, Fault{Kind: FaultDrop, State: "established", Count: 1})
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablishing)
	eventually(t, "the drop", func() bool { return len(s.Injected()) == 1 })
	_ = c.HangUp()
	waitDone(t, c)
	want := []string{"created incoming", "updated establishing", "deleted terminated 200/540000"}
	if diff := cmp.Diff(summary(b.seen(c.ID())), want); diff != "" {
		t.Errorf("bot received (-got +want):\n%s", diff)
	}
	if got := deliverySummary(s.Deliveries(), c.ID()); len(got) != 3 {
		t.Errorf("a dropped notification was delivered: %v", got)
	}

	// A dropped incoming call: PlaceCall says so, and the call rings out unanswered.
	mustAddFault(t, s, Fault{Kind: FaultDrop, State: "incoming", Count: 1})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if !errors.Is(err, ErrDropped) || c == nil {
		t.Fatalf("PlaceCall with a dropped created notification: %v", err)
	}
	res := waitDone(t, c)
	if res.Outcome != OutcomeNotAnswered {
		t.Errorf("result %+v", res)
	}
	if diff := cmp.Diff(summary(b.seen(c.ID())), []string{"deleted terminated 408/1106"}); diff != "" {
		t.Errorf("bot received (-got +want):\n%s", diff)
	}
}

func TestRequestFaults(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	presence := func() string {
		st, out, hdr := b.call(http.MethodPost, "/communications/getPresencesByUserId", map[string]any{"ids": []string{agentA}})
		var e struct{ Error struct{ Code string } }
		_ = json.Unmarshal(out, &e)
		return strings.TrimSpace(fmt.Sprintf("%d %s %s", st, hdr.Get("Retry-After"), e.Error.Code))
	}

	// Status with Retry-After, for the next 2 requests.
	id := mustAddFault(t, s, Fault{Kind: FaultStatus, Action: "getpresencesbyuserid", Status: 429, RetryAfter: 3 * time.Second, Count: 2})
	if f := s.Faults(); len(f) != 1 || f[0].Action != "getPresencesByUserId" || f[0].ID != id {
		t.Errorf("rule %+v", f)
	}
	var got []string
	for range 3 {
		got = append(got, presence())
	}
	if diff := cmp.Diff(got, []string{"429 3 TooManyRequests", "429 3 TooManyRequests", "200"}); diff != "" {
		t.Errorf("presence (-got +want):\n%s", diff)
	}
	var ids []string
	for _, r := range s.Requests() {
		if r.Action == "getPresencesByUserId" && r.Status == 429 {
			ids = append(ids, r.RequestID)
		}
	}
	in := s.Injected()
	if len(in) != 2 || len(ids) != 2 || in[0].RequestID != ids[0] || in[1].RequestID != ids[1] || in[0].Status != 429 || in[0].Rule != id {
		t.Errorf("injected %+v, failed requests %v", in, ids)
	}

	// Latency, then the request runs normally.
	mustAddFault(t, s, Fault{Kind: FaultLatency, Action: "*", Latency: 150 * time.Millisecond, Count: 1})
	start := time.Now()
	if got := presence(); got != "200" {
		t.Errorf("after latency: %s", got)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("latency fault took %v", d)
	}

	// A 5xx on one call only, after a delay.
	c1, c2 := newID(), newID()
	mustAddFault(t, s, Fault{Kind: FaultStatus, Action: "get", CallID: strings.ToUpper(c1), Status: 503, Latency: 20 * time.Millisecond, Count: 5})
	if st, out, _ := b.call(http.MethodGet, "/communications/calls/"+c2, nil); st != http.StatusNotFound {
		t.Errorf("other call: %d %s", st, out)
	}
	if st, out, _ := b.call(http.MethodGet, "/communications/calls/"+c1, nil); st != http.StatusServiceUnavailable || !bytes.Contains(out, []byte(`"ServiceUnavailable"`)) {
		t.Errorf("faulted call: %d %s", st, out)
	}
	s.ClearFaults()
	if st, _, _ := b.call(http.MethodGet, "/communications/calls/"+c1, nil); st != http.StatusNotFound {
		t.Errorf("after ClearFaults: %d", st)
	}

	// The token endpoint answers with an Entra ID error body.
	mustAddFault(t, s, Fault{Kind: FaultStatus, Action: "token", Status: 500, Count: 1})
	if st, out := fetchToken(t, s, testClient, testSecret); st != 500 || out["error"] != "temporarily_unavailable" {
		t.Errorf("token: %d %v", st, out)
	}
	// And the callback-key metadata can be slow or failing too.
	mustAddFault(t, s, Fault{Kind: FaultStatus, Action: "botauth-keys", Status: 503, Count: 1})
	if _, err := fetchJWKS(s.Client(), s.OpenIDConfigURL()); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("botauth keys: %v", err)
	}
	if _, err := fetchJWKS(s.Client(), s.OpenIDConfigURL()); err != nil {
		t.Errorf("botauth keys after the fault: %v", err)
	}
	// FailNext replaces its own rule, and clears it with n <= 0.
	s.FailNext("answer", 503, 0, 3)
	s.FailNext("answer", 504, 0, 1)
	if f := s.Faults(); len(f) != 1 || f[0].Status != 504 {
		t.Errorf("FailNext rules %+v", f)
	}
	s.FailNext("answer", 504, 0, 0)
	if f := s.Faults(); len(f) != 0 {
		t.Errorf("FailNext(0) left %+v", f)
	}
}

func TestFaultValidation(t *testing.T) {
	t.Parallel()
	s, _ := newHarness(t, fastOptions(), nil)
	for _, tc := range []struct {
		f    Fault
		want string
	}{
		{Fault{}, "kind is required"},
		{Fault{Kind: "explode", Count: 1}, `unknown kind "explode"`},
		{Fault{Kind: FaultStatus, Status: 503, Count: 1}, "needs an action"},
		{Fault{Kind: FaultStatus, Action: "dance", Status: 503, Count: 1}, `unknown action "dance"`},
		{Fault{Kind: FaultStatus, Action: "answer", Status: 302, Count: 1}, "not between 400 and 599"},
		{Fault{Kind: FaultLatency, Action: "answer", Count: 1}, "positive latency"},
		{Fault{Kind: FaultStatus, Action: "answer", Status: 503}, "set count"},
		{Fault{Kind: FaultStatus, Action: "answer", Status: 503, Probability: 1.5}, "probability 1.5"},
		{Fault{Kind: FaultDrop, Action: "answer", Count: 1}, "request faults only"},
		{Fault{Kind: FaultDuplicate, Latency: time.Second, Count: 1}, "latency does not apply"},
		{Fault{Kind: FaultStatus, Action: "answer", State: "incoming", Status: 503, Count: 1}, "notification faults only"},
		{Fault{Kind: FaultDrop, Count: -1}, "negative"},
	} {
		_, err := s.AddFault(tc.f)
		if !errors.Is(err, ErrInvalidFault) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("AddFault(%+v) = %v, want an error with %q", tc.f, err, tc.want)
		}
	}
	if len(s.Faults()) != 0 {
		t.Errorf("invalid rules were added: %+v", s.Faults())
	}
}

// TestProbabilityIsSeeded: the same seed and the same events give the same faults.
func TestProbabilityIsSeeded(t *testing.T) {
	t.Parallel()
	pattern := func(seed uint64) string {
		opts := fastOptions()
		opts.Seed = seed
		s, b := newHarness(t, opts, nil)
		if s.Seed() != seed {
			t.Errorf("Seed() = %d, want %d", s.Seed(), seed)
		}
		mustAddFault(t, s, Fault{Kind: FaultStatus, Action: "get", Status: 500, Probability: 0.5})
		var out strings.Builder
		id := newID()
		for range 32 {
			st, _, _ := b.call(http.MethodGet, "/communications/calls/"+id, nil)
			out.WriteString(map[int]string{500: "x", 404: "."}[st])
		}
		return out.String()
	}
	a, b, c := pattern(7), pattern(7), pattern(8)
	if a != b || !strings.Contains(a, "x") || !strings.Contains(a, ".") {
		t.Errorf("seed 7 gave %s then %s", a, b)
	}
	if a == c {
		t.Errorf("seeds 7 and 8 gave the same pattern %s", a)
	}
}

func TestSigningFaultsAndKeyRollover(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnce())
	b.refetch = true
	kid0 := s.CallbackKeyID()

	// Expired token and a token signed with a key not published yet: the bot answers 403.
	mustAddFault(t, s, Fault{Kind: FaultExpiredToken, State: "incoming", Count: 1})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err == nil || !strings.Contains(err.Error(), "status 403") {
		t.Errorf("PlaceCall with an expired token: %v", err)
	}
	mustAddFault(t, s, Fault{Kind: FaultUnpublishedKey, State: "incoming", Count: 1})
	c2, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err == nil || !strings.Contains(err.Error(), "status 403") {
		t.Errorf("PlaceCall with an unpublished key: %v", err)
	}
	var spoiled []Delivery
	for _, d := range s.Deliveries() {
		if d.CallID == c.ID() || d.CallID == c2.ID() {
			spoiled = append(spoiled, d)
		}
	}
	if len(spoiled) != 2 || spoiled[0].Fault != FaultExpiredToken || spoiled[1].Fault != FaultUnpublishedKey ||
		spoiled[0].Status != 403 || spoiled[1].Status != 403 {
		t.Fatalf("deliveries %+v", spoiled)
	}
	b.mu.Lock()
	authErrs := fmt.Sprint(b.authErr)
	b.mu.Unlock()
	if !strings.Contains(authErrs, "expired") || !strings.Contains(authErrs, "unknown kid") {
		t.Errorf("bot's errors: %s", authErrs)
	}
	tokenOf := func(d Delivery) *jwt.Token {
		tok, _, err := jwt.NewParser().ParseUnverified(strings.TrimPrefix(d.Header.Get("Authorization"), "Bearer "), jwt.MapClaims{})
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	exp, _ := tokenOf(spoiled[0]).Claims.GetExpirationTime()
	if time.Until(exp.Time) > -5*time.Minute {
		t.Errorf("expired token expires at %v", exp)
	}
	unpublished := tokenOf(spoiled[1]).Header["kid"]
	if unpublished == kid0 {
		t.Error("unpublished-key token signed with the published key")
	}

	// Rollover: the key that was not yet published is published and signs from now on. A bot
	// that fetches the keys again on an unknown kid keeps working.
	kid1, err := s.AddFault(Fault{Kind: FaultRollover})
	if err != nil {
		t.Fatal(err)
	}
	if kid1 != unpublished || s.CallbackKeyID() != kid1 {
		t.Errorf("rollover published %s, signing with %s; the unpublished key was %v", kid1, s.CallbackKeyID(), unpublished)
	}
	keys, err := fetchJWKS(s.Client(), s.OpenIDConfigURL())
	if err != nil || len(keys) != 2 || keys[kid0] == nil || keys[kid1] == nil {
		t.Errorf("keys after rollover: %v %v", keys, err)
	}
	c3 := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	_ = c3.HangUp()
	waitDone(t, c3)
	for _, d := range s.Deliveries() {
		if d.CallID == c3.ID() && (d.Status != http.StatusAccepted || tokenOf(d).Header["kid"] != kid1) {
			t.Errorf("delivery after rollover: %d kid %v", d.Status, tokenOf(d).Header["kid"])
		}
	}
	// A bot that never fetches the keys again rejects the new key.
	b.mu.Lock()
	b.refetch = false
	b.keys = map[string]*rsa.PublicKey{kid0: keys[kid0]}
	b.mu.Unlock()
	if _, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst}); err == nil {
		t.Error("a bot with stale keys accepted the rolled-over key")
	}
	in := s.Injected()
	if len(in) != 3 || in[2].Kind != FaultRollover || in[2].Kid != kid1 {
		t.Errorf("injected %+v", in)
	}
	// Later calls end unanswered; keep the test short.
	for _, cl := range []*Call{c, c2} {
		_ = cl.HangUp()
	}
}

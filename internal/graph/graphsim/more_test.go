package graphsim

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/google/go-cmp/cmp"
)

func placeAndWaitFor(t *testing.T, s *Sim, b *fakeBot, spec CallerSpec, state graph.CallState) *Call {
	t.Helper()
	c, err := s.PlaceCall(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, "state "+string(state), func() bool {
		return slices.ContainsFunc(b.seen(c.ID()), func(n seen) bool { return n.N.Call != nil && n.N.Call.State == state })
	})
	return c
}

func answerOnly(b *fakeBot, n graph.Notification) {
	if n.ChangeType == graph.Created {
		b.answer(n.CallID)
	}
}

func TestAnswerValidationAndCallIDForms(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	id := c.ID()
	upper := strings.ToUpper(strings.ReplaceAll(id, "-", ""))
	b.action(id, "answer", map[string]any{"callbackUri": b.srv.URL + "/cb"}, http.StatusBadRequest) // no modalities
	st, out, _ := b.call(http.MethodPost, "/communications/calls/"+id+"/answer", nil)
	if st != http.StatusBadRequest {
		t.Errorf("answer without body: %d %s", st, out)
	}
	req, _ := http.NewRequest(http.MethodPost, s.GraphURL()+"/communications/calls/"+id+"/answer", strings.NewReader("{not json"))
	req.Header.Set("Authorization", "Bearer "+b.accessToken())
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("malformed json: %d", resp.StatusCode)
	}

	b.answer(upper) // ids in the other documented form
	b.action(strings.ToLower(upper), "answer", map[string]any{"acceptedModalities": []string{"audio"}, "mediaConfig": map[string]any{}}, http.StatusBadRequest)
	st, out, _ = b.call(http.MethodGet, "/communications/calls/"+upper, nil)
	var got struct {
		ID, State, Direction, TenantID, MyParticipantID, CallChainID string
	}
	if err := json.Unmarshal(out, &got); err != nil || st != http.StatusOK || got.ID != id ||
		(got.State != "establishing" && got.State != "established") || got.Direction != "incoming" || got.TenantID != testTenant {
		t.Errorf("GET: %d %s", st, out)
	}
	if st, out, _ := b.call(http.MethodPost, "/communications/calls/"+id+"/recordResponse", map[string]any{}); st != http.StatusBadRequest {
		t.Errorf("unsimulated action: %d %s", st, out)
	}
	if st, out, _ := b.call(http.MethodDelete, "/communications/calls/"+upper, nil); st != http.StatusNoContent {
		t.Errorf("delete: %d %s", st, out)
	}
	res := waitDone(t, c)
	if res.Outcome != OutcomeBotHangUp {
		t.Errorf("result %+v", res)
	}
}

func TestGzipRequestBody(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	_, _ = zw.Write([]byte(`{"callbackUri":"` + b.srv.URL + `/cb","acceptedModalities":["audio"],"mediaConfig":{"@odata.type":"#microsoft.graph.serviceHostedMediaConfig"}}`))
	_ = zw.Close()
	req, _ := http.NewRequest(http.MethodPost, s.GraphURL()+"/communications/calls/"+c.ID()+"/answer", &buf)
	req.Header.Set("Authorization", "Bearer "+b.accessToken())
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Content-Encoding", "gzip") // what kiota's compression handler sends
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("gzip answer: %d", resp.StatusCode)
	}
	rs := s.RequestsFor(c.ID())
	if len(rs) != 1 || !bytes.Contains(rs[0].Body, []byte(`"acceptedModalities"`)) {
		t.Errorf("recorded body %q", rs[0].Body)
	}
	_ = c.HangUp()
	waitDone(t, c)
}

func TestRedirect(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		answers []AgentAnswer
		agent   string
		code    int
		statsA  AgentStats
	}{
		{"second agent accepts", []AgentAnswer{AgentDecline, AgentAccept}, agentB, 0, AgentStats{Offered: 1, Declined: 1, MaxConcurrentOffers: 1}},
		{"nobody answers", []AgentAnswer{AgentNoAnswer, AgentDecline}, "", 480, AgentStats{Offered: 1, Missed: 1, MaxConcurrentOffers: 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, b := newHarness(t, fastOptions(), func(b *fakeBot, n graph.Notification) {
				if n.ChangeType == graph.Created {
					b.action(n.CallID, "redirect", map[string]any{
						"callbackUri": b.srv.URL + "/api/calls/redirected",
						"timeout":     20,
						"targets": []any{
							map[string]any{"identity": map[string]any{"user": map[string]any{"id": agentA}}},
							map[string]any{"identity": map[string]any{"user": map[string]any{"id": agentB}}},
						},
					}, http.StatusAccepted)
				}
			})
			s.AddAgent(AgentSpec{ID: agentA, Answer: tc.answers[0]})
			s.AddAgent(AgentSpec{ID: agentB, DisplayName: "Bea", Answer: tc.answers[1]})
			c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
			if err != nil {
				t.Fatal(err)
			}
			res := waitDone(t, c)
			notes := b.seen(c.ID())
			if len(notes) != 2 || notes[1].Path != "/api/calls/redirected" || !notes[1].N.Ended() {
				t.Fatalf("notifications %v", summary(notes))
			}
			if res.Outcome != OutcomeRedirected || res.Agent != tc.agent || res.EndCode != tc.code {
				t.Errorf("result %+v", res)
			}
			if tc.agent != "" {
				ab := notes[1].N.Call.AnsweredBy
				if ab == nil || ab.Identity.User == nil || ab.Identity.User.ID != agentB {
					t.Errorf("answeredBy: %s", notes[1].Raw)
				}
				if got := s.AgentStats(agentB); got.Accepted != 1 {
					t.Errorf("agent B %+v", got)
				}
			}
			if got := s.AgentStats(agentA); got != tc.statsA {
				t.Errorf("agent A %+v, want %+v", got, tc.statsA)
			}
		})
	}
}

func TestCancelMediaProcessing(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	opts.PromptDuration = time.Hour // nothing completes by itself
	var once sync.Once
	s, b := newHarness(t, opts, func(b *fakeBot, n graph.Notification) {
		answerOnly(b, n)
		if n.Kind == graph.ResourceCall && n.Call.MediaState != nil {
			once.Do(func() {
				b.playPrompt(n.CallID, "first", "https://cdn/a.wav", "https://cdn/b.wav")
				b.playPrompt(n.CallID, "second", "https://cdn/c.wav")
				out := b.action(n.CallID, "cancelMediaProcessing", map[string]any{"clientContext": "cancel"}, http.StatusOK)
				if !bytes.Contains(out, []byte(`"status":"completed"`)) {
					b.t.Errorf("cancel response %s", out)
				}
				b.playPrompt(n.CallID, "third", "https://cdn/d.wav")
			})
		}
	})
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	eventually(t, "two cancelled operations", func() bool { return len(b.seen(c.ID())) >= 5 })
	if err := c.HangUp(); err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)
	notes := b.seen(c.ID())
	want := []string{"created incoming", "updated establishing", "updated established",
		"deleted op failed 400/8508", "deleted op failed 400/8508", "deleted terminated 200/540000"}
	if diff := cmp.Diff(summary(notes), want); diff != "" {
		t.Errorf("notifications (-got +want):\n%s", diff)
	}
	if notes[3].N.Operation.ClientContext != "first" || notes[4].N.Operation.ClientContext != "second" {
		t.Errorf("cancelled in the wrong order: %s %s", notes[3].Raw, notes[4].Raw)
	}
	if !slices.Equal(res.Prompts, []string{"https://cdn/a.wav", "https://cdn/d.wav"}) {
		t.Errorf("prompts heard %v", res.Prompts)
	}
	for _, r := range s.RequestsFor(c.ID()) {
		if r.Action == "playPrompt" && r.Status != http.StatusOK {
			t.Errorf("playPrompt %d", r.Status)
		}
	}
}

func TestPlayPromptLocationAndQueue(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	s, b := newHarness(t, opts, func(b *fakeBot, n graph.Notification) {
		answerOnly(b, n)
		if n.Kind == graph.ResourceCall && n.Call.MediaState != nil {
			for _, ctx := range []string{"p1", "p2"} {
				st, out, hdr := b.call(http.MethodPost, "/communications/calls/"+n.CallID+"/playPrompt", map[string]any{
					"clientContext": ctx,
					"prompts":       []any{map[string]any{"mediaInfo": map[string]any{"uri": "https://cdn/" + ctx + ".wav"}}},
				})
				var op struct{ ID string }
				_ = json.Unmarshal(out, &op)
				if st != http.StatusOK || !operationAt(b.s, hdr.Get("Location"), n.CallID, op.ID) {
					b.t.Errorf("playPrompt: %d %s %v", st, out, hdr)
				}
			}
		}
		if n.Kind == graph.ResourceOperation && n.Operation.ClientContext == "p2" {
			b.call(http.MethodDelete, "/communications/calls/"+n.CallID, nil)
		}
	})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)
	var ctxs []string
	for _, n := range b.seen(c.ID()) {
		if n.N.Operation != nil {
			ctxs = append(ctxs, n.N.Operation.ClientContext+" "+string(n.N.Operation.Status))
		}
	}
	if !slices.Equal(ctxs, []string{"p1 completed", "p2 completed"}) || !slices.Equal(res.Prompts, []string{"https://cdn/p1.wav", "https://cdn/p2.wav"}) {
		t.Errorf("operations %v prompts %v", ctxs, res.Prompts)
	}
}

func TestPresence(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	s.AddAgent(AgentSpec{ID: agentA, Availability: "Away", Activity: "Away"})
	s.SetPresence(agentB, "Busy", "InAMeeting")
	ids := []string{strings.ToUpper(agentA), agentB}
	for len(ids) < graph.MaxPresenceIDs {
		ids = append(ids, newID())
	}
	st, out, _ := b.call(http.MethodPost, "/communications/getPresencesByUserId", map[string]any{"ids": ids})
	var got struct{ Value []graph.Presence }
	if err := json.Unmarshal(out, &got); err != nil || st != http.StatusOK {
		t.Fatalf("650 ids: %d %s", st, out)
	}
	if len(got.Value) != graph.MaxPresenceIDs {
		t.Fatalf("%d values", len(got.Value))
	}
	want := []graph.Presence{
		{UserID: ids[0], Availability: "Away", Activity: "Away"},
		{UserID: agentB, Availability: "Busy", Activity: "InAMeeting"},
		{UserID: ids[2], Availability: "PresenceUnknown", Activity: "PresenceUnknown"},
	}
	if diff := cmp.Diff(got.Value[:3], want); diff != "" {
		t.Errorf("presences (-got +want):\n%s", diff)
	}
	st, out, _ = b.call(http.MethodPost, "/communications/getPresencesByUserId", map[string]any{"ids": append(ids, newID())})
	if st != http.StatusBadRequest || !bytes.Contains(out, []byte(`"BadRequest"`)) {
		t.Errorf("651 ids: %d %s", st, out)
	}
	s.SetPresence(agentA, "Available", "Available")
	st, out, _ = b.call(http.MethodPost, "/communications/getPresencesByUserId", map[string]any{"ids": []string{agentA}})
	if st != http.StatusOK || !bytes.Contains(out, []byte(`"availability":"Available"`)) {
		t.Errorf("after SetPresence: %d %s", st, out)
	}
}

func TestCallbackTokenVerifiesAgainstJWKS(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnly)
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	_ = c.HangUp()
	waitDone(t, c)

	keys, err := fetchJWKS(s.Client(), s.OpenIDConfigURL())
	if err != nil {
		t.Fatal(err)
	}
	var meta map[string]any
	if err := getJSON(s.Client(), s.OpenIDConfigURL(), &meta); err != nil || meta["issuer"] != DefaultIssuer ||
		!slices.Equal(meta["id_token_signing_alg_values_supported"].([]any), []any{"RS256"}) {
		t.Errorf("botauth metadata %v %v", meta, err)
	}
	ds := s.Deliveries()
	if len(ds) == 0 {
		t.Fatal("no deliveries")
	}
	for _, d := range ds {
		tok := strings.TrimPrefix(d.Header.Get("Authorization"), "Bearer ")
		claims, err := verifyCallbackToken(tok, keys, testClient, DefaultIssuer, testTenant)
		if err != nil {
			t.Fatalf("delivery token: %v", err)
		}
		exp, _ := claims.GetExpirationTime()
		iat, _ := claims.GetIssuedAt()
		nbf, _ := claims.GetNotBefore()
		if exp.Sub(iat.Time) != 5*time.Minute || nbf == nil || claims["appid"] == "" {
			t.Errorf("claims %v", claims)
		}
		if d.Header.Get("Scenario-Id") == "" || d.Header.Get("client-request-id") == "" || d.Status != http.StatusAccepted {
			t.Errorf("delivery %+v", d)
		}
	}
	for name, claims := range map[string]map[string]any{
		"wrong audience": {"aud": "someone-else"},
		"expired":        {"exp": time.Now().Add(-time.Minute).Unix()},
		"wrong issuer":   {"iss": "https://evil.example"},
		"no tid":         {"tid": nil},
	} {
		tok, err := s.SignToken(claims)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := verifyCallbackToken(tok, keys, testClient, DefaultIssuer, testTenant); err == nil {
			t.Errorf("%s: verified", name)
		}
	}
	tok, _ := s.SignToken(nil)
	if _, err := verifyCallbackToken(tok, keys, testClient, DefaultIssuer, testTenant); err != nil {
		t.Errorf("default SignToken: %v", err)
	}
	if len(b.authErr) != 0 {
		t.Errorf("bot rejected tokens: %v", b.authErr)
	}
}

// TestEveryNotificationDecodes runs every scenario in one simulator and decodes every body it
// sent with graph.Decode (the same check also runs after every other test).
func TestEveryNotificationDecodes(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	opts.AnswerTimeout = 300 * time.Millisecond
	var inviting sync.Map // call key -> the agent the bot invites
	s, _ := newHarness(t, opts, func(b *fakeBot, n graph.Notification) {
		if n.ChangeType == graph.Created {
			switch {
			case strings.HasSuffix(n.Call.Source.Identity.Phone.ID, "5"):
				inviting.Store(graph.CallKey(n.CallID), agentA)
			case strings.HasSuffix(n.Call.Source.Identity.Phone.ID, "6"):
				inviting.Store(graph.CallKey(n.CallID), agentB)
			}
		}
		if agent, ok := inviting.Load(graph.CallKey(n.CallID)); ok {
			inviteBot(agent.(string))(b, n)
			return
		}
		if n.ChangeType == graph.Created {
			switch {
			case strings.HasSuffix(n.Call.Source.Identity.Phone.ID, "1"):
				b.action(n.CallID, "reject", map[string]any{"reason": "busy"}, http.StatusAccepted)
				return
			case strings.HasSuffix(n.Call.Source.Identity.Phone.ID, "2"):
				return // not answered: 408
			case strings.HasSuffix(n.Call.Source.Identity.Phone.ID, "3"):
				b.action(n.CallID, "redirect", map[string]any{"targets": []any{map[string]any{"identity": map[string]any{"user": map[string]any{"id": agentA}}}}}, http.StatusAccepted)
				return
			}
		}
		ivrBot(agentB)(b, n)
	})
	s.AddAgent(AgentSpec{ID: agentA, TalkTime: 10 * time.Millisecond})
	s.AddAgent(AgentSpec{ID: agentB, Answer: AgentDecline})
	var calls []*Call
	for i := range 7 {
		c, err := s.PlaceCall(context.Background(), CallerSpec{
			From: graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+4930555%d", i)}, To: testAppInst,
			Digits: "1", DigitDelay: 30 * time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		calls = append(calls, c)
	}
	var outcomes []string
	for _, c := range calls {
		outcomes = append(outcomes, waitDone(t, c).Outcome)
	}
	want := []string{OutcomeBotHangUp, OutcomeRejected, OutcomeNotAnswered, OutcomeRedirected, OutcomeBotHangUp,
		OutcomeBotHangUp, OutcomeBotHangUp}
	if diff := cmp.Diff(outcomes, want); diff != "" {
		t.Errorf("outcomes (-got +want):\n%s", diff)
	}
	kinds := map[string]bool{}
	for _, d := range s.Deliveries() {
		kinds[d.ChangeType+" "+d.State] = true
	}
	for _, k := range []string{"created incoming", "updated establishing", "updated established", "updated transferring",
		"deleted completed", "updated terminating", "deleted terminated", "deleted ", "deleted failed", "updated "} {
		if !kinds[k] {
			t.Errorf("no %q notification was sent: %v", k, kinds)
		}
	}
	checkDeliveriesDecode(t, s)
}

func TestFailNext(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	s.FailNext("answer", http.StatusServiceUnavailable, 2*time.Second, 1)
	body := map[string]any{"acceptedModalities": []string{"audio"}, "mediaConfig": map[string]any{}}
	st, out, hdr := b.call(http.MethodPost, "/communications/calls/"+c.ID()+"/answer", body)
	if st != http.StatusServiceUnavailable || hdr.Get("Retry-After") != "2" || !bytes.Contains(out, []byte(`"ServiceUnavailable"`)) {
		t.Errorf("injected: %d %v %s", st, hdr, out)
	}
	st, out, _ = b.call(http.MethodGet, "/communications/calls/"+c.ID(), nil)
	if st != http.StatusOK || !bytes.Contains(out, []byte(`"state":"incoming"`)) {
		t.Errorf("the failed answer had an effect: %s", out)
	}
	b.action(c.ID(), "answer", body, http.StatusAccepted)

	s.FailNext("getPresencesByUserId", http.StatusTooManyRequests, time.Second, 2)
	var got []string
	for range 3 {
		st, _, hdr := b.call(http.MethodPost, "/communications/getPresencesByUserId", map[string]any{"ids": []string{agentA}})
		got = append(got, fmt.Sprintf("%d %s", st, hdr.Get("Retry-After")))
	}
	if diff := cmp.Diff(got, []string{"429 1", "429 1", "200 "}); diff != "" {
		t.Errorf("presence (-got +want):\n%s", diff)
	}

	s.FailNext("token", http.StatusServiceUnavailable, 0, 1)
	if st, out := fetchToken(t, s, testClient, testSecret); st != http.StatusServiceUnavailable || out["error"] == nil {
		t.Errorf("token fault: %d %v", st, out)
	}
	if st, _ := fetchToken(t, s, testClient, testSecret); st != http.StatusOK {
		t.Errorf("token after fault: %d", st)
	}
	_ = c.HangUp()
	waitDone(t, c)
}

func TestDeliveryRetriesAndAcks(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnly)
	b.status = func(n int) int {
		if n <= 2 {
			return http.StatusServiceUnavailable
		}
		return 0
	}
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	_ = c.HangUp()
	waitDone(t, c)
	ds := s.Deliveries()
	var got []string
	for _, d := range ds[:4] {
		got = append(got, fmt.Sprintf("%s %d %d", d.State, d.Attempt, d.Status))
	}
	if diff := cmp.Diff(got, []string{"incoming 1 503", "incoming 2 503", "incoming 3 202", "establishing 1 202"}); diff != "" {
		t.Errorf("deliveries (-got +want):\n%s", diff)
	}

	// A bot that always fails: PlaceCall reports it and the call times out unanswered.
	b.status = func(int) int { return http.StatusInternalServerError }
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err == nil || c == nil {
		t.Fatalf("PlaceCall to a failing bot: %v", err)
	}
	n := 0
	for _, d := range s.Deliveries() {
		if d.CallID == c.ID() {
			n++
		}
	}
	if n != 4 {
		t.Errorf("%d attempts, want 4", n)
	}
}

func TestPlaceCallValidation(t *testing.T) {
	t.Parallel()
	s, _ := newHarness(t, fastOptions(), nil)
	for _, spec := range []CallerSpec{
		{To: testAppInst},
		{From: phoneCaller},
		{From: phoneCaller, To: testAppInst, Digits: "12x"},
	} {
		if _, err := s.PlaceCall(context.Background(), spec); err == nil {
			t.Errorf("%+v accepted", spec)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.PlaceCall(ctx, CallerSpec{From: phoneCaller, To: testAppInst}); err == nil {
		t.Error("cancelled context accepted")
	}
	if _, err := New(Options{TenantID: testTenant}); err == nil {
		t.Error("New without client accepted")
	}
}

// TestConcurrentCallsAndClose runs many calls at once against two agents and checks that
// Close leaves no goroutine behind.
func TestConcurrentCallsAndClose(t *testing.T) {
	before := runtime.NumGoroutine()
	opts := fastOptions()
	b := &fakeBot{t: t, notes: map[string][]seen{}, react: ivrBot(agentA), lenient: true}
	srv := newBotServer(b)
	opts.WebhookURL = srv.URL + "/api/calls"
	s, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	b.s = s
	s.AddAgent(AgentSpec{ID: agentA, TalkTime: 10 * time.Millisecond})
	var wg sync.WaitGroup
	results := make(chan CallResult, 20)
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			spec := CallerSpec{From: graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+1555000%02d", i)}, To: testAppInst, Digits: "1", DigitDelay: 30 * time.Millisecond}
			if i%4 == 0 {
				spec.HangUpAfter = 40 * time.Millisecond
			}
			c, err := s.PlaceCall(context.Background(), spec)
			if err != nil {
				t.Error(err)
				return
			}
			select {
			case <-c.Done():
				results <- c.Result()
			case <-time.After(10 * time.Second):
				t.Errorf("call %s did not end", c.ID())
			}
		}()
	}
	wg.Wait()
	close(results)
	n := 0
	for r := range results {
		n++
		if r.Outcome == "" {
			t.Errorf("live call %+v", r)
		}
	}
	if n != 20 || len(s.Calls()) != 20 {
		t.Errorf("%d results, %d calls", n, len(s.Calls()))
	}
	st := s.AgentStats(agentA)
	// a caller who hangs up after 40 ms may do so while the agent rings: offered, never answered
	if st.Accepted == 0 || st.Accepted > st.Offered || st.Declined+st.Missed != 0 {
		t.Errorf("stats %+v", st)
	}
	checkDeliveriesDecode(t, s)

	// A call still live when the simulator closes: its Done channel closes too.
	live, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-live.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("Done not closed by Close")
	}
	if _, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst}); err != ErrClosed {
		t.Errorf("PlaceCall after Close: %v", err)
	}
	srv.Close()
	eventually(t, "goroutines to end", func() bool { return runtime.NumGoroutine() <= before+2 })
}

// A prompt whose URI PromptDurations names plays for that long, not for PromptDuration: hold
// music that lasts minutes next to menu prompts of a few milliseconds.
func TestPromptDurationsByURI(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	opts.PromptDuration = time.Hour // only the named prompt can complete within the test
	opts.PromptDurations = map[string]time.Duration{"https://cdn/short.wav": time.Millisecond}
	s, _ := newHarness(t, opts, func(b *fakeBot, n graph.Notification) {
		answerOnly(b, n)
		if n.Kind == graph.ResourceCall && n.Call.MediaState != nil {
			b.playPrompt(n.CallID, "short", "https://cdn/short.wav")
		}
		if n.Kind == graph.ResourceOperation && n.Operation.ClientContext == "short" {
			b.call(http.MethodDelete, "/communications/calls/"+n.CallID, nil)
		}
	})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)
	if !slices.Equal(res.Prompts, []string{"https://cdn/short.wav"}) {
		t.Errorf("prompts heard %v", res.Prompts)
	}
}

// A prompt of PromptFailures fails: PromptFailInResponse in the playPrompt response (200, the
// operation failed, no notification follows), PromptFailNotified in a failed operation
// notification once its turn comes, after the prompt queued before it has played. Neither plays.
func TestPromptFailures(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	opts.PromptFailures = map[string]PromptFailure{
		"https://cdn/gone.wav": PromptFailInResponse, "https://cdn/bad.wav": PromptFailNotified,
	}
	var (
		mu       sync.Mutex
		response []string
	)
	s, b := newHarness(t, opts, func(b *fakeBot, n graph.Notification) {
		answerOnly(b, n)
		if n.Kind == graph.ResourceCall && n.Call.MediaState != nil {
			for _, p := range []string{"gone", "ok", "bad"} {
				st, out, _ := b.call(http.MethodPost, "/communications/calls/"+n.CallID+"/playPrompt", map[string]any{
					"clientContext": p,
					"prompts":       []any{map[string]any{"mediaInfo": map[string]any{"uri": "https://cdn/" + p + ".wav"}}},
				})
				var op graph.OperationResource
				if err := json.Unmarshal(out, &op); st != http.StatusOK || err != nil {
					b.t.Errorf("playPrompt %s: %d %s", p, st, out)
				}
				mu.Lock()
				response = append(response, p+" "+string(op.Status))
				if op.ResultInfo != nil {
					response[len(response)-1] += fmt.Sprintf(" %d", op.ResultInfo.Code)
				}
				mu.Unlock()
			}
		}
		if n.Kind == graph.ResourceOperation && n.Operation.ClientContext == "bad" {
			b.call(http.MethodDelete, "/communications/calls/"+n.CallID, nil)
		}
	})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)
	var notified []string
	for _, n := range b.seen(c.ID()) {
		if op := n.N.Operation; op != nil {
			notified = append(notified, op.ClientContext+" "+string(op.Status))
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if want := []string{"gone failed 400", "ok running", "bad running"}; !slices.Equal(response, want) {
		t.Errorf("playPrompt responses %v, want %v", response, want)
	}
	if want := []string{"ok completed", "bad failed"}; !slices.Equal(notified, want) {
		t.Errorf("operation notifications %v, want %v", notified, want)
	}
	if !slices.Equal(res.Prompts, []string{"https://cdn/ok.wav"}) {
		t.Errorf("prompts heard %v, want only ok.wav", res.Prompts)
	}
}

// Graph writes one id in two forms (graph/WIRE.md a.2): as the call-answer page shows them, the
// establishing and established notifications name the call upper case without hyphens and carry
// no id, and as the call-playprompt page shows it, a prompt's completion names the call and the
// operation so; the other notifications use the form the call was created with.
func TestNotificationsWriteIDsInBothForms(t *testing.T) {
	t.Parallel()
	var (
		mu   sync.Mutex
		opID string
	)
	s, b := newHarness(t, fastOptions(), func(b *fakeBot, n graph.Notification) {
		answerOnly(b, n)
		if n.Kind == graph.ResourceCall && n.Call.MediaState != nil {
			id := b.playPrompt(n.CallID, "p", promptURI)
			mu.Lock()
			opID = id
			mu.Unlock()
		}
		if n.Kind == graph.ResourceOperation {
			b.hangUp(n.CallID)
		}
	})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	waitDone(t, c)
	compact := strings.ToUpper(strings.ReplaceAll(c.ID(), "-", ""))
	mu.Lock()
	defer mu.Unlock()
	var got []string
	for _, n := range b.seen(c.ID()) {
		line := string(n.N.ChangeType) + " " + strings.Replace(n.N.ResourceURL, compact, "COMPACT", 1)
		switch {
		case n.N.Call != nil:
			line += " id=" + strings.Replace(n.N.Call.ID, c.ID(), "hyphenated", 1)
		case n.N.Operation != nil:
			if graph.CallKey(n.N.OperationID) != graph.CallKey(opID) || n.N.OperationID == opID {
				t.Errorf("operation id %q in the completion, want %q in the other form", n.N.OperationID, opID)
			}
			line = strings.Replace(line, n.N.OperationID, "OP", 1)
		}
		got = append(got, line)
	}
	want := []string{
		"created /communications/calls/" + c.ID() + " id=hyphenated",
		"updated /communications/calls/COMPACT id=",
		"updated /communications/calls/COMPACT id=",
		"deleted /communications/calls/COMPACT/operations/OP",
		"updated /communications/calls/" + c.ID() + " id=hyphenated",
		"deleted /communications/calls/" + c.ID() + " id=hyphenated",
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("notifications (-got +want):\n%s", diff)
	}
}

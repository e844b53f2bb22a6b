package graphsim

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/golang-jwt/jwt/v5"
	"github.com/google/go-cmp/cmp"
)

func TestTokenEndpointAndOpenIDConfig(t *testing.T) {
	t.Parallel()
	s, _ := newHarness(t, fastOptions(), nil)

	var cfg map[string]any
	if err := getJSON(s.Client(), s.URL()+"/"+testTenant+"/v2.0/.well-known/openid-configuration", &cfg); err != nil {
		t.Fatal(err)
	}
	base := s.URL() + "/" + testTenant
	for k, want := range map[string]string{
		"issuer":                 base + "/v2.0",
		"token_endpoint":         base + "/oauth2/v2.0/token",
		"authorization_endpoint": base + "/oauth2/v2.0/authorize",
		"jwks_uri":               base + "/discovery/v2.0/keys",
	} {
		if cfg[k] != want {
			t.Errorf("openid-configuration %s = %v, want %s", k, cfg[k], want)
		}
	}
	if _, ok := cfg["response_types_supported"].([]any); !ok {
		t.Errorf("response_types_supported missing: %v", cfg)
	}
	resp, err := s.Client().Get(s.URL() + "/other-tenant/v2.0/.well-known/openid-configuration")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("unknown tenant: %d", resp.StatusCode)
	}

	st, out := fetchToken(t, s, testClient, testSecret)
	if st != http.StatusOK || out["token_type"] != "Bearer" || out["expires_in"] != float64(3599) || out["ext_expires_in"] != float64(3599) {
		t.Fatalf("token: %d %v", st, out)
	}
	tok, _ := out["access_token"].(string)
	keys, err := fetchKeys(s.Client(), cfg["jwks_uri"].(string))
	if err != nil {
		t.Fatal(err)
	}
	claims := jwt.MapClaims{}
	if _, err := jwt.ParseWithClaims(tok, claims, func(t *jwt.Token) (any, error) {
		return keys[t.Header["kid"].(string)], nil
	}, jwt.WithAudience(GraphResource), jwt.WithValidMethods([]string{"RS256"}), jwt.WithIssuer(base+"/v2.0")); err != nil {
		t.Fatalf("access token: %v", err)
	}
	if claims["tid"] != testTenant || claims["appid"] != testClient || !slices.Contains(claims["roles"].([]any), any("Calls.Initiate.All")) {
		t.Errorf("claims %v", claims)
	}

	for _, tc := range []struct{ client, secret string }{{testClient, "wrong"}, {"someone-else", testSecret}} {
		st, out := fetchToken(t, s, tc.client, tc.secret)
		if st != http.StatusUnauthorized || out["error"] != "invalid_client" {
			t.Errorf("client %s secret %s: %d %v", tc.client, tc.secret, st, out)
		}
	}
	resp, err = s.Client().PostForm(base+"/oauth2/v2.0/token", map[string][]string{
		"grant_type": {"client_credentials"}, "client_id": {testClient}, "client_secret": {testSecret}, "scope": {"openid"},
	})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("scope without graph: %d", resp.StatusCode)
	}
	if got := s.TokenRequests(); got != 4 {
		t.Errorf("TokenRequests = %d, want 4", got)
	}
}

func TestGraphRequiresAValidToken(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	expired, err := s.issueAccessToken(time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	forged, err := s.SignToken(map[string]any{"aud": GraphResource, "appid": testClient})
	if err != nil {
		t.Fatal(err)
	}
	for name, tok := range map[string]string{
		"none": "", "garbage": "not-a-jwt", "expired": expired, "callback key": forged,
	} {
		st, out, hdr := doGraph(t, s, tok, http.MethodGet, "/communications/calls/"+newID(), nil)
		var e struct {
			Error struct {
				Code       string
				InnerError map[string]string `json:"innerError"`
			}
		}
		_ = json.Unmarshal(out, &e)
		if st != http.StatusUnauthorized || e.Error.Code != "InvalidAuthenticationToken" ||
			hdr.Get("request-id") == "" || e.Error.InnerError["request-id"] != hdr.Get("request-id") ||
			e.Error.InnerError["client-request-id"] != "crid-GET" || e.Error.InnerError["date"] == "" {
			t.Errorf("%s: %d %s %v", name, st, out, hdr)
		}
	}
	st, out, hdr := b.call(http.MethodGet, "/communications/calls/"+newID(), nil)
	if st != http.StatusNotFound || hdr.Get("request-id") == "" {
		t.Errorf("valid token, unknown call: %d %s", st, out)
	}
}

func TestHappyPathTransferToAcceptingAgent(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), ivrBot(agentA))
	s.AddAgent(AgentSpec{ID: agentA, DisplayName: "Heidi", TalkTime: 600 * time.Millisecond})

	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst, Digits: "1", DigitDelay: 80 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)

	notes := b.seen(c.ID())
	want := []string{
		"created incoming",
		"updated establishing",
		"updated established",
		"deleted op completed 200/0",
		"updated established tone1",
		"updated transferring",
		"updated transferAccepted",
		"deleted terminated 0/7015",
	}
	if diff := cmp.Diff(summary(notes), want); diff != "" {
		t.Errorf("notifications (-got +want):\n%s", diff)
	}
	created := notes[0].N.Call
	if notes[0].Path != "/api/calls" || created.Source.Identity.Phone.ID != phoneCaller.ID ||
		created.Targets[0].Identity.ApplicationInstance.ID != testAppInst || created.TenantID != testTenant ||
		created.MyParticipantID == "" || created.CallChainID == "" || created.Direction != "incoming" || !strings.HasSuffix(created.CallbackURI, "/api/calls") {
		t.Errorf("created: path %s %+v", notes[0].Path, created)
	}
	for _, n := range notes[1:] {
		if n.Path != "/api/calls/cb/"+c.ID() {
			t.Errorf("%s went to %s, want the callbackUri", n.N.ResourceURL, n.Path)
		}
		if n.ScenarioID != notes[0].ScenarioID || n.ScenarioID == "" {
			t.Errorf("scenario id %q, first %q", n.ScenarioID, notes[0].ScenarioID)
		}
	}
	if op := notes[3].N.Operation; op.ClientContext != "welcome" {
		t.Errorf("clientContext not echoed: %+v", op)
	}
	if notes[2].N.Call.MediaState == nil || notes[2].N.Call.MediaState.Audio != "active" {
		t.Errorf("established without mediaState: %s", notes[2].Raw)
	}
	if tone := notes[4].N.Call.ToneInfo; tone.SequenceID != 1 {
		t.Errorf("tone %+v", tone)
	}
	if notes[7].N.Call.ResultInfo.Message != "GracefulTransferCompleted" {
		t.Errorf("terminated: %s", notes[7].Raw)
	}

	wantRes := CallResult{
		ID: c.ID(), ScenarioID: notes[0].ScenarioID, From: phoneCaller, To: testAppInst, Answered: true,
		Prompts: []string{promptURI}, Tones: []string{"1"}, TransferAttempts: []string{agentA},
		Agent: agentA, Outcome: OutcomeTransferred, EndCode: 0, EndSubcode: 7015,
	}
	if diff := cmp.Diff(res, wantRes, cmpIgnoreTimes); diff != "" {
		t.Errorf("result (-got +want):\n%s", diff)
	}
	if res.PlacedAt.IsZero() || res.AnsweredAt.Before(res.PlacedAt) || res.EndedAt.Before(res.AnsweredAt) {
		t.Errorf("times %v %v %v", res.PlacedAt, res.AnsweredAt, res.EndedAt)
	}
	if got := s.AgentStats(agentA); got != (AgentStats{Offered: 1, Accepted: 1, MaxConcurrentOffers: 1}) {
		t.Errorf("agent stats %+v", got)
	}
	if p := s.Presence(agentA); p.Availability != "Busy" || p.Activity != "InACall" {
		t.Errorf("presence during the call %+v", p)
	}
	eventually(t, "agent back to Available", func() bool { return s.Presence(agentA).Availability == "Available" })

	var actions []string
	for _, r := range s.RequestsFor(c.ID()) {
		actions = append(actions, fmt.Sprintf("%s %d", r.Action, r.Status))
	}
	if diff := cmp.Diff(actions, []string{"answer 202", "subscribeToTone 200", "playPrompt 200", "transfer 202"}); diff != "" {
		t.Errorf("graph requests (-got +want):\n%s", diff)
	}
	if got := s.Calls(); len(got) != 1 || got[0].Outcome != OutcomeTransferred {
		t.Errorf("Calls() = %+v", got)
	}
}

var cmpIgnoreTimes = cmp.FilterPath(func(p cmp.Path) bool {
	switch p.Last().String() {
	case ".PlacedAt", ".AnsweredAt", ".EndedAt", ".ConnectedAt":
		return true
	}
	return false
}, cmp.Ignore())

func TestTransferFails(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		answer AgentAnswer
		agent  string
		stats  AgentStats
	}{
		{"declined", AgentDecline, agentA, AgentStats{Offered: 1, Declined: 1, MaxConcurrentOffers: 1}},
		{"no answer", AgentNoAnswer, agentA, AgentStats{Offered: 1, Missed: 1, MaxConcurrentOffers: 1}},
		{"unknown agent", AgentAccept, "not-an-agent", AgentStats{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, b := newHarness(t, fastOptions(), ivrBot(tc.agent))
			s.AddAgent(AgentSpec{ID: agentA, Answer: tc.answer})
			c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst, Digits: "1", DigitDelay: 50 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			res := waitDone(t, c)
			notes := b.seen(c.ID())
			want := []string{
				"created incoming", "updated establishing", "updated established", "deleted op completed 200/0",
				"updated established tone1", "updated transferring", "updated established 500/7000",
				"updated terminating", "deleted terminated 200/7000",
			}
			if diff := cmp.Diff(summary(notes), want); diff != "" {
				t.Errorf("notifications (-got +want):\n%s", diff)
			}
			if raw := notes[6].Raw; !bytes.Contains(raw, []byte(`"subCode":7000`)) {
				t.Errorf("transfer failed is not spelled like the documented example: %s", raw)
			}
			if res.Outcome != OutcomeBotHangUp || res.Agent != "" || res.EndCode != 200 || res.EndSubcode != 7000 ||
				!slices.Equal(res.TransferAttempts, []string{tc.agent}) {
				t.Errorf("result %+v", res)
			}
			if got := s.AgentStats(agentA); got != tc.stats {
				t.Errorf("stats %+v, want %+v", got, tc.stats)
			}
		})
	}
}

func TestCallerHangsUp(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		from    graph.Party
		subcode int
	}{
		{phoneCaller, 540000},
		{graph.Party{Kind: graph.KindUser, ID: "8d1e6ab6-26c5-4e22-a1bc-06ea7343958e"}, 4097},
	} {
		t.Run(string(tc.from.Kind), func(t *testing.T) {
			s, b := newHarness(t, fastOptions(), ivrBot(agentA))
			c, err := s.PlaceCall(context.Background(), CallerSpec{From: tc.from, To: testAppInst, HangUpAfter: 150 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			res := waitDone(t, c)
			notes := b.seen(c.ID())
			if got := summary(notes); got[len(got)-1] != fmt.Sprintf("deleted terminated 200/%d", tc.subcode) {
				t.Errorf("notifications %v", got)
			}
			if res.Outcome != OutcomeCallerHangUp || res.EndSubcode != tc.subcode || !res.Answered {
				t.Errorf("result %+v", res)
			}
			if tc.from.Kind == graph.KindUser {
				if u := notes[0].N.Call.Source.Identity.User; u == nil || u.ID != tc.from.ID || u.TenantID != testTenant {
					t.Errorf("source %s", notes[0].Raw)
				}
			}
			if err := c.HangUp(); err != ErrCallEnded {
				t.Errorf("second hang-up: %v", err)
			}
			if st, _, _ := b.call(http.MethodPost, "/communications/calls/"+c.ID()+"/keepAlive", nil); st != http.StatusNotFound {
				t.Errorf("keepAlive after the end: %d", st)
			}
		})
	}
}

func TestCallerHangUpAndPress(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), func(b *fakeBot, n graph.Notification) {
		if n.Kind == graph.ResourceCall && n.Call.MediaState != nil {
			b.action(n.CallID, "subscribeToTone", nil, http.StatusOK)
		}
	})
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Press("1"); !errors.Is(err, ErrNotInCall) {
		t.Errorf("press before the call was answered: %v", err)
	}
	b.answer(c.ID())
	eventually(t, "tone subscription", func() bool {
		return slices.ContainsFunc(s.RequestsFor(c.ID()), func(r Request) bool { return r.Action == "subscribeToTone" && r.Status == 200 })
	})
	if err := c.Press("*#9"); err != nil {
		t.Fatal(err)
	}
	if err := c.Press("x"); err == nil {
		t.Error("invalid key accepted")
	}
	if err := c.HangUp(); err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)
	if !slices.Equal(res.Tones, []string{"*", "#", "9"}) {
		t.Errorf("tones %v", res.Tones)
	}
	got := summary(b.seen(c.ID()))
	want := []string{"created incoming", "updated establishing", "updated established",
		"updated established star", "updated established pound", "updated established tone9", "deleted terminated 200/540000"}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("notifications (-got +want):\n%s", diff)
	}
}

func TestAnswerDeadline(t *testing.T) {
	t.Parallel()
	opts := fastOptions()
	opts.AnswerTimeout = 100 * time.Millisecond
	s, b := newHarness(t, opts, nil) // a bot that never answers
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	res := waitDone(t, c)
	if diff := cmp.Diff(summary(b.seen(c.ID())), []string{"created incoming", "deleted terminated 408/1106"}); diff != "" {
		t.Errorf("notifications (-got +want):\n%s", diff)
	}
	if res.Outcome != OutcomeNotAnswered || res.Answered || res.EndCode != 408 || res.EndSubcode != 1106 {
		t.Errorf("result %+v", res)
	}
	b.action(c.ID(), "answer", map[string]any{"acceptedModalities": []string{"audio"}, "mediaConfig": map[string]any{}}, http.StatusNotFound)
}

func TestRejectAndActionsInTheWrongState(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	// Not answered yet: transfer and playPrompt are refused.
	b.action(c.ID(), "transfer", map[string]any{"transferTarget": map[string]any{"identity": map[string]any{"user": map[string]any{"id": agentA}}}}, http.StatusBadRequest)
	b.action(c.ID(), "playPrompt", map[string]any{"prompts": []any{map[string]any{"mediaInfo": map[string]any{"uri": promptURI}}}}, http.StatusBadRequest)
	b.action(c.ID(), "reject", map[string]any{"reason": "sometimes"}, http.StatusBadRequest)
	b.action(c.ID(), "reject", map[string]any{"reason": "busy", "callbackUri": b.srv.URL + "/api/calls/rejected"}, http.StatusAccepted)
	b.action(c.ID(), "reject", map[string]any{"reason": "busy"}, http.StatusNotFound)
	res := waitDone(t, c)
	notes := b.seen(c.ID())
	if diff := cmp.Diff(summary(notes), []string{"created incoming", "deleted"}); diff != "" {
		t.Errorf("notifications (-got +want):\n%s", diff)
	}
	if notes[1].Path != "/api/calls/rejected" || !notes[1].N.Ended() {
		t.Errorf("deleted after reject: %s %s", notes[1].Path, notes[1].Raw)
	}
	if res.Outcome != OutcomeRejected || res.Answered {
		t.Errorf("result %+v", res)
	}
	var statuses []string
	for _, r := range s.RequestsFor(strings.ToUpper(strings.ReplaceAll(c.ID(), "-", ""))) {
		statuses = append(statuses, fmt.Sprintf("%s %d", r.Action, r.Status))
	}
	want := []string{"transfer 400", "playPrompt 400", "reject 400", "reject 202", "reject 404"}
	if diff := cmp.Diff(statuses, want); diff != "" {
		t.Errorf("requests (-got +want):\n%s", diff)
	}
}

package graphsim

import (
	"bytes"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/google/go-cmp/cmp"
)

// ctl sends one control API request over HTTPS, as curl would.
func ctl(t *testing.T, s *Sim, method, path, body string) (int, []byte) {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, s.URL()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusNoContent && !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Errorf("%s %s: content type %q", method, path, resp.Header.Get("Content-Type"))
	}
	return resp.StatusCode, out
}

// ctlWant sends a request, checks its status and decodes the answer into v (when not nil).
func ctlWant(t *testing.T, s *Sim, method, path, body string, want int, v any) {
	t.Helper()
	st, out := ctl(t, s, method, path, body)
	if st != want {
		t.Fatalf("%s %s %s: %d %s, want %d", method, path, body, st, out, want)
	}
	if v != nil {
		if err := json.Unmarshal(out, v); err != nil {
			t.Fatalf("%s %s: %v: %s", method, path, err, out)
		}
	}
}

func TestControlAPI(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), ivrBot(agentA))
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := s.WriteCAFile(ca); err != nil {
		t.Fatal(err)
	}

	var info struct {
		GraphURL string            `json:"graphUrl"`
		Seed     uint64            `json:"seed"`
		Env      map[string]string `json:"env"`
	}
	ctlWant(t, s, "GET", "/_sim/", "", 200, &info)
	if info.GraphURL != s.GraphURL() || info.Seed != s.Seed() || info.Env["CALLBOT_CA_FILE"] != ca ||
		info.Env["CALLBOT_OPENID_CONFIG_URL"] != s.OpenIDConfigURL() || info.Env["CALLBOT_CLIENT_SECRET"] != testSecret {
		t.Errorf("info %+v", info)
	}

	// Agents.
	var agent struct {
		AgentJSON
		Presence graph.Presence
		Stats    AgentStats
	}
	ctlWant(t, s, "PUT", "/_sim/agents/"+agentA, `{"displayName":"Heidi","answer":"decline","talkTime":"50ms"}`, 201, &agent)
	if agent.ID != agentA || agent.Answer != "decline" || agent.TalkTime != "50ms" || agent.Presence.Availability != "Available" {
		t.Errorf("new agent %+v", agent)
	}
	ctlWant(t, s, "PUT", "/_sim/agents/"+agentA, `{"id":"`+strings.ToUpper(agentA)+`","displayName":"Heidi","talkTime":"50ms"}`, 200, &agent)
	if agent.Answer != "accept" {
		t.Errorf("replaced agent %+v", agent)
	}
	for _, tc := range []struct{ method, path, body, msg string }{
		{"PUT", "/_sim/agents/" + agentA, `{"answer":"maybe"}`, `answer: "maybe" is not accept, decline or no-answer`},
		{"PUT", "/_sim/agents/" + agentA, `{"talkTime":"soon"}`, `talkTime: "soon" is not a duration`},
		{"PUT", "/_sim/agents/" + agentA, `{"id":"someone-else"}`, "is not the agent"},
		{"PUT", "/_sim/agents/" + agentA, `{"colour":"blue"}`, `unknown field "colour"`},
		{"PUT", "/_sim/agents/" + agentA, ``, "body is empty"},
		{"PUT", "/_sim/agents/" + agentA + "/presence", `{"availability":"available"}`, `availability "available" is not one of Available,`},
		{"PUT", "/_sim/agents/" + agentA + "/presence", `{"availability":"Busy","activity":"Napping"}`, `activity "Napping"`},
		{"PUT", "/_sim/agents/" + agentA + "/answer", `{"answer":""}`, ""}, // "" is accept: no error
		{"POST", "/_sim/calls", `{"to":"x"}`, `from: give the caller as {"kind":"phone"`},
		{"POST", "/_sim/calls", `{"from":{"kind":"fax","id":"1"}}`, `from.kind: "fax"`},
		{"POST", "/_sim/calls", `{"from":{"kind":"phone"}}`, "from.id is required"},
		{"POST", "/_sim/calls", `{"from":{"kind":"phone","id":"+1"},"digits":"1x"}`, `digits: graphsim: invalid caller spec: 'x' is not a DTMF key`},
		{"POST", "/_sim/calls", `{"from":{"kind":"phone","id":"+1"},"digitDelay":"100"}`, `digitDelay: "100" is not a duration`},
		{"POST", "/_sim/calls", `{"from":{"kind":"phone","id":"+1"},"hangUpAfter":"-1s"}`, `hangUpAfter: "-1s" is negative`},
		{"POST", "/_sim/calls", `{"from":{"kind":"phone","id":"+1"}} {}`, "data after the object"},
		{"POST", "/_sim/calls", `[1]`, "invalid JSON body"},
		{"POST", "/_sim/faults", `{"kind":"status","action":"answer","status":503}`, "set count (the next N matching events) or probability"},
		{"POST", "/_sim/faults", `{"kind":"latency","action":"answer","latency":"fast","count":1}`, `latency: "fast" is not a duration`},
		{"POST", "/_sim/faults", `{"kind":"rollover","count":1}`, "a rollover takes no other field"},
		{"POST", "/_sim/faults", `{"id":"f9","kind":"drop","count":1}`, "id is assigned"},
	} {
		st, out := ctl(t, s, tc.method, tc.path, tc.body)
		var e struct{ Error string }
		_ = json.Unmarshal(out, &e)
		if tc.msg == "" {
			if st != 200 {
				t.Errorf("%s %s %s: %d %s", tc.method, tc.path, tc.body, st, out)
			}
			continue
		}
		if st != 400 || !strings.Contains(e.Error, tc.msg) {
			t.Errorf("%s %s %s: %d %s, want 400 with %q", tc.method, tc.path, tc.body, st, out, tc.msg)
		}
	}
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/_sim/agents/" + agentB, ""},
		{"PUT", "/_sim/agents/" + agentB + "/answer", `{"answer":"accept"}`},
		{"GET", "/_sim/calls/" + newID(), ""},
		{"POST", "/_sim/calls/" + newID() + "/press", `{"digits":"1"}`},
		{"POST", "/_sim/calls/" + newID() + "/hangup", ""},
		{"DELETE", "/_sim/faults/f42", ""},
		{"GET", "/_sim/nothing-here", ""},
	} {
		if st, out := ctl(t, s, tc.method, tc.path, tc.body); st != 404 || !bytes.Contains(out, []byte(`"error"`)) {
			t.Errorf("%s %s: %d %s, want 404", tc.method, tc.path, st, out)
		}
	}
	// Presence works for any user, agent or not.
	var p graph.Presence
	ctlWant(t, s, "PUT", "/_sim/agents/"+agentB+"/presence", `{"availability":"Busy","activity":"InAMeeting"}`, 200, &p)
	if s.Presence(agentB).Activity != "InAMeeting" || p.Availability != "Busy" {
		t.Errorf("presence %+v", p)
	}
	ctlWant(t, s, "PUT", "/_sim/agents/"+agentA+"/presence", `{"availability":"Away"}`, 200, &p)
	ctlWant(t, s, "PUT", "/_sim/agents/"+agentA+"/presence", `{"availability":"Available","activity":"Available"}`, 200, nil)

	// A call that presses 1 and is transferred to agent A.
	var placed struct{ ID, DeliveryError string }
	ctlWant(t, s, "POST", "/_sim/calls", `{"from":{"kind":"phone","id":"+14255550100"},"digits":"1","digitDelay":"40ms"}`, 201, &placed)
	if placed.ID == "" || placed.DeliveryError != "" {
		t.Fatalf("placed %+v", placed)
	}
	var got callJSON
	eventually(t, "the transfer", func() bool {
		ctlWant(t, s, "GET", "/_sim/calls/"+strings.ToUpper(placed.ID), "", 200, &got)
		return got.Outcome != ""
	})
	if got.Outcome != OutcomeTransferred || got.Agent != agentA || got.State != "terminated" || got.To != DefaultResourceAccount ||
		!slices.Equal(got.Tones, []string{"1"}) || got.From.ID != "+14255550100" || got.EndSubcode != 7015 {
		t.Errorf("call %+v", got)
	}
	ctlWant(t, s, "GET", "/_sim/agents/"+agentA, "", 200, &agent)
	if agent.Stats != (AgentStats{Offered: 1, Accepted: 1, MaxConcurrentOffers: 1}) {
		t.Errorf("agent stats %+v", agent.Stats)
	}
	if st, out := ctl(t, s, "POST", "/_sim/calls/"+placed.ID+"/press", `{"digits":"2"}`); st != 409 || !bytes.Contains(out, []byte("call has ended")) {
		t.Errorf("press on an ended call: %d %s", st, out)
	}
	if st, _ := ctl(t, s, "POST", "/_sim/calls/"+placed.ID+"/hangup", ""); st != 409 {
		t.Errorf("hang up an ended call: %d", st)
	}

	// A call driven by hand: press keys, then hang up.
	ctlWant(t, s, "POST", "/_sim/calls", `{"from":{"kind":"user","id":"8d1e6ab6-26c5-4e22-a1bc-06ea7343958e"},"to":"`+testAppInst+`"}`, 201, &placed)
	if st, out := ctl(t, s, "POST", "/_sim/calls/"+placed.ID+"/press", `{}`); st != 400 || !bytes.Contains(out, []byte("digits is required")) {
		t.Errorf("press nothing: %d %s", st, out)
	}
	eventually(t, "the bot's first prompt", func() bool {
		return slices.ContainsFunc(s.RequestsFor(placed.ID), func(r Request) bool { return r.Action == "playPrompt" && r.Status != 0 })
	})
	ctlWant(t, s, "POST", "/_sim/calls/"+placed.ID+"/press", `{"digits":"*9"}`, 204, nil)
	ctlWant(t, s, "POST", "/_sim/calls/"+placed.ID+"/hangup", "", 204, nil)
	eventually(t, "the hang-up", func() bool {
		ctlWant(t, s, "GET", "/_sim/calls/"+placed.ID, "", 200, &got)
		return got.Outcome != ""
	})
	if got.Outcome != OutcomeCallerHangUp || got.EndSubcode != 4097 || !slices.Equal(got.Tones, []string{"*", "9"}) {
		t.Errorf("call %+v", got)
	}
	var list []callJSON
	ctlWant(t, s, "GET", "/_sim/calls", "", 200, &list)
	if len(list) != 2 || list[1].ID != placed.ID {
		t.Errorf("calls %+v", list)
	}

	// Requests and deliveries of a call.
	var reqs []struct {
		Action  string
		CallID  string
		Status  int
		Headers map[string]string
		Body    map[string]any
	}
	ctlWant(t, s, "GET", "/_sim/requests?call="+placed.ID, "", 200, &reqs)
	if len(reqs) == 0 || reqs[0].Action != "answer" || reqs[0].Status != 202 || reqs[0].Headers["Authorization"] != "Bearer [redacted]" ||
		reqs[0].Body["acceptedModalities"] == nil {
		t.Errorf("requests %+v", reqs)
	}
	var tokenReqs []struct{ Action, Body string }
	ctlWant(t, s, "GET", "/_sim/requests?action=token", "", 200, &tokenReqs)
	if len(tokenReqs) != 1 || tokenReqs[0].Action != "token" || !strings.Contains(tokenReqs[0].Body, "grant_type=client_credentials") {
		t.Errorf("token requests %+v", tokenReqs)
	}
	var ds []struct {
		State  string
		Status int
		Body   struct {
			Value []map[string]any
		}
	}
	eventually(t, "the last delivery", func() bool {
		ctlWant(t, s, "GET", "/_sim/deliveries?call="+placed.ID, "", 200, &ds)
		return len(ds) > 0 && ds[len(ds)-1].State == "terminated"
	})
	if len(ds) < 4 || ds[0].State != "incoming" || ds[len(ds)-1].State != "terminated" || len(ds[0].Body.Value) != 1 {
		t.Errorf("deliveries %+v", ds)
	}
	for _, r := range s.Requests() {
		if strings.HasPrefix(r.Path, ControlPrefix) {
			t.Errorf("a control request was recorded as Graph traffic: %s %s", r.Method, r.Path)
		}
	}

	// Faults.
	var created struct{ ID, Kid string }
	ctlWant(t, s, "POST", "/_sim/faults", `{"kind":"status","action":"getPresencesByUserId","status":429,"retryAfter":"2s","count":1}`, 201, &created)
	ctlWant(t, s, "POST", "/_sim/faults", `{"kind":"duplicate","state":"incoming","probability":0.25}`, 201, nil)
	ctlWant(t, s, "POST", "/_sim/faults", `{"kind":"latency","action":"*","latency":"1ms","count":3}`, 201, nil)
	var faults struct {
		Rules    []faultJSON
		Injected []InjectedFault
	}
	ctlWant(t, s, "GET", "/_sim/faults", "", 200, &faults)
	if len(faults.Rules) != 3 || faults.Rules[0] != (faultJSON{ID: created.ID, Kind: FaultStatus, Action: "getPresencesByUserId",
		Status: 429, RetryAfter: "2s", Count: 1}) || faults.Rules[1].Probability != 0.25 {
		t.Errorf("rules %+v", faults.Rules)
	}
	st, _, hdr := b.call(http.MethodPost, "/communications/getPresencesByUserId", map[string]any{"ids": []string{agentA}})
	if st != 429 || hdr.Get("Retry-After") != "2" {
		t.Errorf("injected 429: %d %v", st, hdr)
	}
	ctlWant(t, s, "GET", "/_sim/faults", "", 200, &faults)
	if len(faults.Rules) != 2 || len(faults.Injected) != 2 || faults.Injected[0].Kind != FaultLatency ||
		faults.Injected[1].Kind != FaultStatus || faults.Injected[1].Status != 429 {
		t.Errorf("after one request: %+v", faults)
	}
	ctlWant(t, s, "DELETE", "/_sim/faults/"+faults.Rules[0].ID, "", 204, nil)
	ctlWant(t, s, "POST", "/_sim/faults", `{"kind":"rollover"}`, 201, &created)
	if created.Kid == "" || created.Kid != s.CallbackKeyID() {
		t.Errorf("rollover %+v, signing with %s", created, s.CallbackKeyID())
	}
	ctlWant(t, s, "DELETE", "/_sim/faults", "", 204, nil)
	if len(s.Faults()) != 0 {
		t.Errorf("rules after DELETE: %+v", s.Faults())
	}
}

func TestControlAPIWithoutWebhook(t *testing.T) {
	t.Parallel()
	s, err := New(Options{TenantID: testTenant, ClientID: testClient, ClientSecret: testSecret})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.Seed() == 0 {
		t.Error("no seed picked")
	}
	st, out := ctl(t, s, "POST", "/_sim/calls", `{"from":{"kind":"phone","id":"+14255550100"}}`)
	if st != http.StatusConflict || !bytes.Contains(out, []byte("no webhook URL")) {
		t.Errorf("place call without a webhook: %d %s", st, out)
	}
	if env := s.BotEnv(""); env[3] != (EnvVar{"CALLBOT_CA_FILE", ""}) || len(env) != 8 {
		t.Errorf("env %v", env)
	}
}

func TestAddrAndHostname(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	_, port, _ := net.SplitHostPort(addr)
	s, err := New(Options{TenantID: testTenant, ClientID: testClient, ClientSecret: testSecret, Addr: addr, Hostname: "localhost",
		WebhookURL: "http://127.0.0.1:8080/api/calls"})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if s.URL() != "https://localhost:"+port || s.Addr() != addr {
		t.Errorf("URL %s Addr %s", s.URL(), s.Addr())
	}
	if st, _ := ctl(t, s, "GET", "/_sim/", ""); st != 200 { // the certificate names localhost
		t.Errorf("info: %d", st)
	}
	env := s.BotEnv("/tmp/ca.pem")
	want := []EnvVar{
		{"CALLBOT_GRAPH_URL", "https://localhost:" + port + "/v1.0"},
		{"CALLBOT_AUTHORITY_HOST", "https://localhost:" + port + "/"},
		{"CALLBOT_OPENID_CONFIG_URL", "https://localhost:" + port + "/botauth/.well-known/OpenIdConfiguration"},
		{"CALLBOT_CA_FILE", "/tmp/ca.pem"},
		{"CALLBOT_TENANT_ID", testTenant},
		{"CALLBOT_CLIENT_ID", testClient},
		{"CALLBOT_CLIENT_SECRET", testSecret},
		{"CALLBOT_TOKEN_ISSUERS", DefaultIssuer},
		{"CALLBOT_PUBLIC_URL", "http://127.0.0.1:8080"},
	}
	if diff := cmp.Diff(env, want); diff != "" {
		t.Errorf("env (-got +want):\n%s", diff)
	}
	if _, err := New(Options{TenantID: testTenant, ClientID: testClient, ClientSecret: testSecret, Addr: addr}); err == nil {
		t.Error("a second simulator listened on the same address")
	}
	if got := urlHost("", &net.TCPAddr{IP: net.IPv4zero, Port: 1}); got != "127.0.0.1" {
		t.Errorf("host for 0.0.0.0: %s", got)
	}
}

func TestParseAgents(t *testing.T) {
	t.Parallel()
	yml := `
- id: 550fae72-d251-43ec-868c-373732c2704f
  displayName: Heidi
  answer: decline
  talkTime: 30s
- id: 98da8a1a-1b87-452c-a713-65d3f10b1253
  availability: Away
`
	got, err := ParseAgents([]byte(yml))
	if err != nil {
		t.Fatal(err)
	}
	want := []AgentSpec{
		{ID: agentA, DisplayName: "Heidi", Answer: AgentDecline, TalkTime: 30 * time.Second},
		{ID: agentB, Availability: "Away"},
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("agents (-got +want):\n%s", diff)
	}
	got, err = ParseAgents([]byte(`[{"id":"a1","answer":"no-answer","availability":"Busy","activity":"InACall"}]`))
	if err != nil || len(got) != 1 || got[0].Answer != AgentNoAnswer || got[0].Activity != "InACall" {
		t.Errorf("json: %+v %v", got, err)
	}
	if got, err := ParseAgents([]byte("  \n")); err != nil || got != nil {
		t.Errorf("empty file: %v %v", got, err)
	}
	for _, tc := range []struct{ in, want string }{
		{"id: a1", "want a list"},
		{"- {id: a1, mood: happy}", "field mood not found"},
		{"- {id: a1}\n- {displayName: X}", "entry 2 (line 2): id"},
		{"- {id: a1}\n- {id: A1}", "entry 2 (line 2): agent A1 is listed twice (first at entry 1)"},
		{"- {id: a1, answer: later}", `entry 1 (line 1): answer: "later"`},
		{"- {id: a1, availability: Sleeping}", `availability "Sleeping"`},
	} {
		if _, err := ParseAgents([]byte(tc.in)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseAgents(%q) = %v, want %q", tc.in, err, tc.want)
		}
	}
}

// TestEndSequences checks the documented notification sequences of the ways a call ends that
// the other tests do not cover end to end (the redirect, keepAlive and Delete call pages of the
// Graph reference; docs/graphsim.md, "Sources").
func TestEndSequences(t *testing.T) {
	t.Parallel()
	redirectTo := func(ids ...string) func(b *fakeBot, n graph.Notification) {
		return func(b *fakeBot, n graph.Notification) {
			if n.ChangeType != graph.Created {
				return
			}
			var targets []any
			for _, id := range ids {
				targets = append(targets, map[string]any{"identity": map[string]any{"user": map[string]any{"id": id}}})
			}
			b.action(n.CallID, "redirect", map[string]any{"targets": targets, "timeout": 15}, http.StatusAccepted)
		}
	}
	// keepAlive sends a keepAlive every 40ms from the moment the call is established until
	// Graph answers 404 (the call is gone).
	keepAlive := func(wg *sync.WaitGroup) func(b *fakeBot, n graph.Notification) {
		return func(b *fakeBot, n graph.Notification) {
			answerOnly(b, n)
			if n.Kind == graph.ResourceCall && n.Call.State == graph.CallEstablished {
				wg.Go(func() {
					for range 50 {
						time.Sleep(40 * time.Millisecond)
						if st, _, _ := b.call(http.MethodPost, "/communications/calls/"+n.CallID+"/keepAlive", nil); st != http.StatusOK {
							return
						}
					}
				})
			}
		}
	}
	plain := func(f func(b *fakeBot, n graph.Notification)) func(*sync.WaitGroup) func(b *fakeBot, n graph.Notification) {
		return func(*sync.WaitGroup) func(b *fakeBot, n graph.Notification) { return f }
	}
	for _, tc := range []struct {
		name     string
		bot      func(*sync.WaitGroup) func(b *fakeBot, n graph.Notification)
		spec     CallerSpec
		want     []string
		outcome  string
		minTime  time.Duration
		checkRaw func(t *testing.T, last seen)
	}{
		{
			name: "redirect rings out", bot: plain(redirectTo(agentA, "not-an-agent")),
			want: []string{"created incoming", "deleted terminated 480/10076"}, outcome: OutcomeRedirected, minTime: 100 * time.Millisecond,
		},
		{
			name: "redirect to nobody known", bot: plain(redirectTo("not-an-agent")),
			want: []string{"created incoming", "deleted terminated 480/10076"}, outcome: OutcomeRedirected,
		},
		{
			name: "reject", bot: plain(func(b *fakeBot, n graph.Notification) {
				if n.ChangeType == graph.Created {
					b.action(n.CallID, "reject", map[string]any{"reason": "none"}, http.StatusAccepted)
				}
			}),
			want: []string{"created incoming", "deleted"}, outcome: OutcomeRejected,
			checkRaw: func(t *testing.T, last seen) {
				// The documented bare form: @odata.type and @odata.id only, no state.
				var env struct {
					Value []struct{ ResourceData map[string]any }
				}
				if err := json.Unmarshal(last.Raw, &env); err != nil || len(env.Value) != 1 {
					t.Fatalf("%v %s", err, last.Raw)
				}
				var keys []string
				for k := range env.Value[0].ResourceData {
					keys = append(keys, k)
				}
				slices.Sort(keys)
				if !slices.Equal(keys, []string{"@odata.id", "@odata.type"}) {
					t.Errorf("deleted after reject carries %v", keys)
				}
			},
		},
		{
			name: "no keepAlive", bot: plain(answerOnly),
			want:    []string{"created incoming", "updated establishing", "updated established", "deleted terminated 408/8537"},
			outcome: OutcomeDropped, minTime: 150 * time.Millisecond,
		},
		{
			name: "keepAlive keeps the call", bot: keepAlive, spec: CallerSpec{HangUpAfter: 250 * time.Millisecond},
			want:    []string{"created incoming", "updated establishing", "updated established", "deleted terminated 200/540000"},
			outcome: OutcomeCallerHangUp, minTime: 250 * time.Millisecond,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			opts := fastOptions()
			opts.KeepAliveTimeout = 150 * time.Millisecond
			var wg sync.WaitGroup
			s, b := newHarness(t, opts, tc.bot(&wg))
			defer wg.Wait() // before the harness closes the simulator
			s.AddAgent(AgentSpec{ID: agentA, Answer: AgentNoAnswer})
			spec := tc.spec
			spec.From, spec.To = phoneCaller, testAppInst
			start := time.Now()
			c, err := s.PlaceCall(t.Context(), spec)
			if err != nil {
				t.Fatal(err)
			}
			res := waitDone(t, c)
			notes := b.seen(c.ID())
			if diff := cmp.Diff(summary(notes), tc.want); diff != "" {
				t.Errorf("notifications (-got +want):\n%s", diff)
			}
			if res.Outcome != tc.outcome {
				t.Errorf("outcome %q, want %q", res.Outcome, tc.outcome)
			}
			if d := time.Since(start); d < tc.minTime {
				t.Errorf("ended after %v, before %v", d, tc.minTime)
			}
			if last := notes[len(notes)-1]; !last.N.Ended() {
				t.Errorf("last notification does not end the call: %s", last.Raw)
			} else if tc.checkRaw != nil {
				tc.checkRaw(t, last)
			}
		})
	}
}

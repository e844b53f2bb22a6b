package graphsim

import (
	"context"
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/callbot/callbot/internal/graph"
)

// Where graphsim departed from Microsoft's Graph reference (docs/graphsim.md, "Sources") and the
// payload examples copied from it (../testdata/payloads), found by a review; each case
// failed before its fix.

// placeIncoming places a call from a phone and returns it, ringing.
func placeIncoming(t *testing.T, s *Sim) *Call {
	t.Helper()
	c, err := s.PlaceCall(context.Background(), CallerSpec{From: phoneCaller, To: testAppInst})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// clientContext is limited to 256 characters ("Max limit is 256 chars", the commsOperation and
// action pages), not bytes.
func TestClientContextLimitCountsCharacters(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnly)
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	path := "/communications/calls/" + c.ID()
	prompts := []any{map[string]any{"mediaInfo": map[string]any{"uri": promptURI}}}
	if st, out, _ := b.call("POST", path+"/playPrompt", map[string]any{"clientContext": strings.Repeat("é", 256), "prompts": prompts}); st != http.StatusOK {
		t.Errorf("256 characters (512 bytes): %d %s, want 200", st, out)
	}
	if st, _, _ := b.call("POST", path+"/playPrompt", map[string]any{"clientContext": strings.Repeat("é", 257), "prompts": prompts}); st != http.StatusBadRequest {
		t.Errorf("257 characters: %d, want 400", st)
	}
}

// playPrompt, subscribeToTone and cancelMediaProcessing are for service-hosted media only (the
// playPrompt and subscribeToTone pages: calls with serviceHostedMediaConfig only; the media
// operations cancelMediaProcessing cancels are those): a call answered with app-hosted media
// refuses them.
func TestMediaActionsRefusedOnAppHostedMedia(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c := placeIncoming(t, s)
	path := "/communications/calls/" + c.ID()
	if st, out, _ := b.call("POST", path+"/answer", map[string]any{"callbackUri": b.srv.URL + "/cb", "acceptedModalities": []string{"audio"},
		"mediaConfig": map[string]any{"@odata.type": "#microsoft.graph.appHostedMediaConfig", "blob": "<media configuration blob>"}}); st != http.StatusAccepted {
		t.Fatalf("answer with app-hosted media: %d %s", st, out)
	}
	eventually(t, "established", func() bool {
		return slices.ContainsFunc(b.seen(c.ID()), func(n seen) bool { return n.N.Call != nil && n.N.Call.State == graph.CallEstablished })
	})
	for action, body := range map[string]any{
		"playPrompt":            map[string]any{"prompts": []any{map[string]any{"mediaInfo": map[string]any{"uri": promptURI}}}},
		"subscribeToTone":       map[string]any{},
		"cancelMediaProcessing": map[string]any{},
	} {
		if st, out, _ := b.call("POST", path+"/"+action, body); st != http.StatusBadRequest {
			t.Errorf("%s on an app-hosted-media call: %d %s, want 400", action, st, out)
		}
	}
}

// The incoming (created) notification carries callbackUri, as Graph's does (the call-redirect
// page's example, payloads/notification-incoming-to-app-instance-pstn-bot.json).
func TestIncomingNotificationCarriesCallbackURI(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c := placeIncoming(t, s)
	eventually(t, "incoming", func() bool { return len(b.seen(c.ID())) > 0 })
	if n := b.seen(c.ID())[0].N; n.Call == nil || n.Call.CallbackURI == "" {
		t.Errorf("incoming notification without callbackUri: %+v", n)
	}
}

// A callbackUri must be https (the call-answer page); graphsim takes http to a loopback host,
// where a bot under test listens, and nothing else.
func TestPlainHTTPCallbackRefused(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c := placeIncoming(t, s)
	answer := func(cb string) int {
		st, _, _ := b.call("POST", "/communications/calls/"+c.ID()+"/answer", map[string]any{"callbackUri": cb,
			"acceptedModalities": []string{"audio"}, "mediaConfig": map[string]any{"@odata.type": "#microsoft.graph.serviceHostedMediaConfig"}})
		return st
	}
	if st := answer("http://bot.contoso.com/api/calls"); st != http.StatusBadRequest {
		t.Errorf("http callbackUri to a public host: %d, want 400", st)
	}
	if st := answer("http://127.0.0.1:8080/api/calls"); st != http.StatusAccepted {
		t.Errorf("http callbackUri to loopback: %d, want 202", st)
	}
}

// A token request that fails authentication does not use up a fault (docs/graphsim.md).
func TestBadSecretDoesNotUseUpATokenFault(t *testing.T) {
	t.Parallel()
	s, _ := newHarness(t, fastOptions(), nil)
	if _, err := s.AddFault(Fault{Kind: FaultStatus, Action: "token", Status: 503, Count: 1}); err != nil {
		t.Fatal(err)
	}
	if st, _ := fetchToken(t, s, testClient, "wrong-secret"); st != http.StatusUnauthorized {
		t.Errorf("bad secret: %d, want 401", st)
	}
	if st, _ := fetchToken(t, s, testClient, testSecret); st != http.StatusServiceUnavailable {
		t.Errorf("good secret after a bad one: %d, want the fault's 503", st)
	}
}

// After a DELETE, Graph's terminated notification writes resultInfo's code and subcode as JSON
// strings ("200", "5001": payloads/notification-terminated.json, from the call-delete page). A
// bot that decodes them into plain integers passed against graphsim's numbers and failed
// on Graph's first hang-up.
func TestTerminatedAfterDeleteCarriesStringCodes(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnly)
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	b.hangUp(c.ID())
	waitDone(t, c)
	var raw []byte
	for _, d := range s.Deliveries() {
		if d.CallID == c.ID() && d.State == string(graph.CallTerminated) {
			raw = d.Body
		}
	}
	var env struct {
		Value []struct {
			ResourceData struct {
				ResultInfo map[string]json.RawMessage `json:"resultInfo"`
			} `json:"resourceData"`
		} `json:"value"`
	}
	if err := json.Unmarshal(raw, &env); err != nil || len(env.Value) != 1 {
		t.Fatalf("terminated notification %s: %v", raw, err)
	}
	ri := env.Value[0].ResourceData.ResultInfo
	if string(ri["code"]) != `"200"` || string(ri["subcode"]) != `"7000"` {
		t.Errorf("resultInfo code %s subcode %s, want the strings \"200\" and \"7000\": %s", ri["code"], ri["subcode"], raw)
	}
}

// Graph's participants/invite response spells the operation status "Running", in PascalCase
// (payloads/response-participants-invite-operation.json, from the participant-invite page),
// while playPrompt's is "running". A bot comparing the invite's status case-sensitively with
// "running" passed against graphsim and failed on Graph.
func TestInviteResponseStatusIsPascalCase(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), answerOnly)
	s.AddAgent(AgentSpec{ID: agentA, Answer: AgentNoAnswer})
	c := placeAndWaitFor(t, s, b, CallerSpec{From: phoneCaller, To: testAppInst}, graph.CallEstablished)
	st, out, _ := b.call(http.MethodPost, "/communications/calls/"+c.ID()+"/participants/invite", map[string]any{
		"participants": []any{map[string]any{"identity": map[string]any{"user": map[string]any{"id": agentA}}}},
	})
	var op struct{ Status string }
	if err := json.Unmarshal(out, &op); st != http.StatusOK || err != nil || op.Status != "Running" {
		t.Errorf("invite: %d %s, want 200 with status \"Running\"", st, out)
	}
}

// answer's acceptedModalities are Graph's modality values: audio, video, videoBasedScreenSharing
// (the call-answer page). graphsim took any string, so a bot answering with a misspelt modality
// ("Voice", "audio " ...) passed here and had its answer refused by Graph.
func TestAnswerRefusesUnknownModality(t *testing.T) {
	t.Parallel()
	s, b := newHarness(t, fastOptions(), nil)
	c := placeIncoming(t, s)
	answer := func(modalities ...string) (int, []byte) {
		st, out, _ := b.call("POST", "/communications/calls/"+c.ID()+"/answer", map[string]any{
			"callbackUri": b.srv.URL + "/cb", "acceptedModalities": modalities,
			"mediaConfig": map[string]any{"@odata.type": "#microsoft.graph.serviceHostedMediaConfig"}})
		return st, out
	}
	for _, m := range [][]string{{"voice"}, {"audio", "speech"}, {""}} {
		if st, out := answer(m...); st != http.StatusBadRequest {
			t.Errorf("acceptedModalities %q: %d %s, want 400", m, st, out)
		}
	}
	if st, out := answer("audio", "video"); st != http.StatusAccepted {
		t.Errorf("acceptedModalities audio, video: %d %s, want 202", st, out)
	}
}

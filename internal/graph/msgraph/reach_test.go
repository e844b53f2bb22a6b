package msgraph_test

import (
	"context"
	"net/http"
	"testing"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

// Reach tells an answer from Graph, whatever its status, from no answer at all, and Probe
// reports which it had; a request the caller cancelled says nothing either way.
func TestReachTellsAnAnswerFromNone(t *testing.T) {
	f := newFakeGraph(t)
	f.respond(http.MethodPost, "/v1.0/communications/calls/"+callID+"/answer", response{Status: http.StatusAccepted})
	f.respond(http.MethodGet, "/v1.0/communications/calls/00000000-0000-0000-0000-000000000000",
		response{Status: http.StatusNotFound, Body: `{"error":{"code":"8519","message":"call not found"}}`})
	c := newClient(t, f)
	ctx := context.Background()
	if answered, failed := c.Reach(); !answered.IsZero() || !failed.IsZero() {
		t.Fatalf("before any request: answered %v, failed %v; want both zero", answered, failed)
	}
	if err := c.Answer(ctx, callID, graph.AnswerRequest{}); err != nil {
		t.Fatal(err)
	}
	answered, failed := c.Reach()
	if answered.IsZero() || !failed.IsZero() {
		t.Fatalf("after a 202: answered %v, failing since %v; want an answer and no failure", answered, failed)
	}
	if err := c.Probe(ctx); err != nil { // the 404 is Graph answering
		t.Fatalf("probe answered 404: %v, want nil", err)
	}
	if again, _ := c.Reach(); !again.After(answered) {
		t.Errorf("the probe's 404 did not count as an answer: %v, then %v", answered, again)
	}

	addr, _ := closingListener(t) // connections closed at once: no answer
	cut := newClientCfg(t, f, func(cfg *msgraph.Config) { cfg.GraphURL = "https://" + addr + "/v1.0" })
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	cut.KeepAlive(cancelled, callID)
	if answered, failed := cut.Reach(); !answered.IsZero() || !failed.IsZero() {
		t.Fatalf("a request its caller cancelled: answered %v, failing since %v; want neither", answered, failed)
	}
	if err := cut.Probe(ctx); err == nil {
		t.Fatal("probe with no answer: nil, want the error")
	}
	answered, failed = cut.Reach()
	if !answered.IsZero() || failed.IsZero() {
		t.Fatalf("no answer: answered %v, failing since %v; want a failure and no answer", answered, failed)
	}
	cut.Probe(ctx)
	if _, again := cut.Reach(); !again.Equal(failed) {
		t.Errorf("failing since %v, then %v: want the first failure since the last answer kept", failed, again)
	}
}

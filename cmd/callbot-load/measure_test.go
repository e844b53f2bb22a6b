package main

import (
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// Every POST the bot was sent has a time, whatever its answer: a POST that timed out after 5 s
// or was refused is part of the tail the webhook p99 judges, not left out of it. Before, only
// the 2xx ones were timed, and a run where 5 of 100 POSTs timed out reported a p99 of 1 ms.
func TestWebhookLatencyCountsEveryPost(t *testing.T) {
	start := time.Now()
	var posts []post
	for i := range 100 {
		p := post{start: start.Add(time.Duration(i) * time.Millisecond), dur: time.Millisecond, status: 202}
		switch {
		case i%20 == 0:
			p.dur, p.status = 5*time.Second, 0 // timed out: transport error
		case i%20 == 1:
			p.dur, p.status = 300*time.Millisecond, 503
		}
		posts = append(posts, p)
	}
	lat, acked, _, _, non2xx := webhookTimes(posts, start, start.Add(time.Second))
	if acked != 90 || non2xx["transport error"] != 5 || non2xx["503"] != 5 {
		t.Errorf("acked %d, not acknowledged %v; want 90 acked, 5 transport errors, 5 503s", acked, non2xx)
	}
	l := latency(lat)
	if l.N != 100 || l.P99 < 5000 {
		t.Errorf("webhook latency %+v; want all 100 POSTs, p99 >= 5000 ms (the timeouts)", l)
	}
}

// A call the bot never answered (or never put through to an agent) waited at least until it
// ended, or until the run ended: it counts with that time. Before, such calls were left out,
// and a run where 10 of 100 callers were never answered reported an incoming->answer p99 of 1 ms.
func TestCallTimesCountCallsNeverAnswered(t *testing.T) {
	start := time.Now()
	end := start.Add(20 * time.Second)
	var calls []graphsim.CallResult
	answerAt := map[string]time.Time{}
	for i := range 100 {
		c := graphsim.CallResult{ID: agentID(i), PlacedAt: start.Add(time.Duration(i) * time.Millisecond)}
		switch {
		case i%10 == 0 && i < 50: // not answered in time: graphsim ended it
			c.Outcome, c.EndedAt = graphsim.OutcomeNotAnswered, c.PlacedAt.Add(15*time.Second)
		case i%10 == 0: // still ringing when the run ended
		default:
			answerAt[graph.CallKey(c.ID)] = c.PlacedAt.Add(time.Millisecond)
			c.Answered, c.Outcome, c.EndedAt = true, graphsim.OutcomeTransferred, c.PlacedAt.Add(10*time.Millisecond)
		}
		calls = append(calls, c)
	}
	toAnswer, toAgent := callTimes(calls, answerAt, start, end)
	a, g := latency(toAnswer), latency(toAgent)
	if a.N != 100 || a.P90 > 1 || a.P99 < 15000 {
		t.Errorf("incoming->answer %+v; want all 100 calls, p90 1 ms, p99 >= 15 s (the calls never answered)", a)
	}
	if g.N != 100 || g.P90 > 10 || g.P99 < 15000 {
		t.Errorf("placed->agent %+v; want all 100 calls, p90 10 ms, p99 >= 15 s (the calls never put through)", g)
	}
}

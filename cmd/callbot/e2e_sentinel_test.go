package main

import (
	"context"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/redistest"
)

// onSentinel is a redisBackend on a Sentinel set-up (a master, a replica, a Sentinel) that
// starts from an empty master for each world, as it would from a Redis of its own.
func onSentinel(s *redistest.Sentinel) redisBackend {
	return func(t *testing.T) string {
		rdb := s.Client(t)
		ctx := context.Background()
		if err := rdb.FlushAll(ctx).Err(); err != nil {
			t.Fatalf("flush the master: %v", err)
		}
		t.Cleanup(func() { // after callbot stopped
			if n, err := rdb.DBSize(ctx).Result(); err != nil || n == 0 {
				t.Errorf("callbot wrote no key through the Sentinel (%d keys, %v)", n, err)
			}
		})
		return s.URL()
	}
}

// TestE2EOnRedisSentinel runs every end-to-end scenario with callbot configured, as in
// production, with a sentinel:// URL: it finds the master through a real Sentinel.
func TestE2EOnRedisSentinel(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	s := redistest.StartSentinel(t)
	for _, sc := range e2eScenarios {
		t.Run(sc.name, func(t *testing.T) { sc.run(t, onSentinel(s)) })
	}
}

// The master dies while a caller waits in the queue. The Sentinel promotes the replica; callbot
// follows it without a restart: readiness is 200 again, the waiting caller (its place in the
// queue replicated before the crash) reaches the agent who becomes available, and a new caller
// is served too. callbot waits for the replica (CALLBOT_REDIS_REPLICAS=1) while there is one,
// and not once the promoted master is alone.
func TestE2ESentinelFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	s := redistest.StartSentinel(t)
	w := newWorld(t, onSentinel(s), away(agent1), away(agent2), away(agent3))
	w.env["CALLBOT_REDIS_REPLICAS"] = "1"
	w.start(t)
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	waitMetric(t, w, "callbot_redis_replicas 1")
	waiting := w.call(t, graphsim.CallerSpec{Digits: "1"})
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(waiting.Result().Prompts, "https://media.test/hold.wav") { // queued
		if time.Now().After(deadline) {
			t.Fatalf("the caller did not reach the queue: %+v", waiting.Result())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // what callbot acknowledged is on the replica: CALLBOT_REDIS_REPLICAS=1
	old, err := s.KillMaster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	newMaster, err := s.WaitFailover(old, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatalf("after the failover: %v", err)
	}
	t.Logf("master %s killed; %s promoted and callbot ready %s later", old, newMaster, time.Since(t0).Round(time.Millisecond))

	waitMetric(t, w, "callbot_redis_replicas 0")
	w.sim.SetPresence(agent2, "Available", "Available")
	r := waitDone(t, waiting, 20*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent2 {
		t.Fatalf("the caller who waited through the failover experienced %+v; want transferred to %s", r, agent2)
	}
	w.sim.SetPresence(agent3, "Available", "Available")
	r = waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 20*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent == "" {
		t.Fatalf("a caller after the failover experienced %+v; want transferred to an agent", r)
	}
}

// TestE2EOnPasswordAndTLSSentinel: Sentinel as a self-run production set-up has it (the Bitnami
// chart with TLS, for one): the master and the replica want a password and speak TLS only, and
// so does the Sentinel. callbot reaches them with a rediss-sentinel:// URL (the password
// percent-encoded) and CALLBOT_CA_FILE holding the CA that signed their certificate, beside
// graphsim's; a caller reaches an agent, and, once the master is killed, a caller reaches an
// agent through the promoted replica, whose certificate is checked too. Without that CA callbot
// does not start, and says why.
func TestE2EOnPasswordAndTLSSentinel(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	s := redistest.StartSentinelWith(t, redistest.ClusterOptions{Password: "p@ss:w0rd%", TLS: true})
	if !strings.HasPrefix(s.URL(), "rediss-sentinel://:p%40ss%3Aw0rd%25@127.0.0.1:") {
		t.Fatalf("URL %s: want the rediss-sentinel:// scheme and the password encoded", s.URL())
	}
	w := newWorld(t, onSentinel(s), available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))

	trustRedisCA(t, w, s.CAFile())
	w.startServing(t)
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 15*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 {
		t.Fatalf("caller experienced %+v; want answered and transferred to %s", r, agent1)
	}

	old, err := s.KillMaster(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.WaitFailover(old, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatalf("after the failover: %v", err)
	}
	r = waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 30*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 {
		t.Fatalf("a caller after the failover experienced %+v; want transferred to %s", r, agent1)
	}
}

// waitMetric waits until callbot's /metrics has the line.
func waitMetric(t *testing.T, w *world, line string) {
	t.Helper()
	var body []byte
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		resp, err := http.Get(w.botURL + "/metrics")
		if err != nil {
			continue
		}
		body, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, l := range strings.Split(string(body), "\n") {
			if l == line {
				return
			}
		}
	}
	t.Fatalf("/metrics has no %q within 10s:\n%s", line, body)
}

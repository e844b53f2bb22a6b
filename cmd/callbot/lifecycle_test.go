package main

import (
	"context"
	"errors"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/redistest"
)

// metric reads one line of callbot's /metrics that starts with prefix ("" when absent).
func (w *world) metric(t *testing.T, prefix string) string {
	t.Helper()
	resp, err := http.Get(w.botURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(body), "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

// stopAndWait sends w's callbot SIGTERM and waits for it to exit.
func stopAndWait(t *testing.T, w *world) {
	t.Helper()
	w.stop()
	select {
	case err := <-w.done:
		w.done <- err // for the cleanup
	case <-time.After(30 * time.Second):
		t.Fatal("the stopped instance did not exit")
	}
}

// replacement is a second callbot for w's simulator and configuration, named instance (a rolling
// restart's new pod); it listens where w did once started with botURL set.
func replacement(w *world, instance string) *world {
	r := &world{sim: w.sim, stdout: &syncBuffer{}, logs: &syncBuffer{}, env: maps.Clone(w.env)}
	r.env["CALLBOT_INSTANCE_ID"] = instance
	return r
}

// An instance stopped with SIGTERM hands back the reconciler's lease: the instance that starts
// next (a rolling restart: a new pod, a new name) reconciles at once, and closes a call Graph no
// longer knows. Before, the stopped instance's lease held for 7.5 minutes, so the next instance's
// start-up pass was skipped, and the call stayed live for up to 10 minutes.
func TestShutdownHandsBackTheReconcileLease(t *testing.T) {
	var rdb *redis.Client
	rds := func(t *testing.T) string {
		s := redistest.Start(t)
		rdb = s.Client(t)
		return "redis://" + s.Addr + "/0"
	}
	a := newWorld(t, rds, away(agent1), away(agent2), away(agent3))
	a.env["CALLBOT_INSTANCE_ID"] = "a"
	b := replacement(a, "b")
	a.start(t)
	if err := a.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if h, _ := rdb.Get(ctx, "cb:{lease:reconcile}").Result(); h == "a" {
			break // a reconciled at start and holds the lease
		}
		if time.Now().After(deadline) {
			t.Fatal("the first instance did not take the reconciler's lease")
		}
	}
	stopAndWait(t, a)

	// While no instance ran, a queued caller hung up and its notification was lost: Graph no
	// longer knows the call (graphsim answers 404), callbot's record says it is waiting.
	id := "5b0c0a1e-0000-4000-8000-00000000c0de"
	created := time.Now().Add(-3 * time.Minute)
	call := &callstate.Call{ID: id, Tenant: demoTenant, State: callstate.StateQueued, Queue: "sales",
		Caller: graph.Party{Kind: graph.KindPhone, ID: "+14255550123"}, CreatedAt: created, AnsweredAt: created, QueuedAt: created}
	if err := callstate.NewStore(rdb, "cb").CreateWith(ctx, call, callstate.Write{}); err != nil {
		t.Fatal(err)
	}

	b.botURL = a.botURL // the same address, free again
	b.start(t)
	if err := b.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if b.metric(t, "callbot_calls_closed_total") == "callbot_calls_closed_total 1" {
			break
		}
		if time.Now().After(deadline) {
			h, _ := rdb.Get(ctx, "cb:{lease:reconcile}").Result()
			t.Fatalf("the call Graph no longer knows is not closed 5 s after the next instance started "+
				"(%q; reconciler's lease held by %q)", b.metric(t, "callbot_calls_closed_total"), h)
		}
	}
}

// A tenant id written in capitals is a GUID, and the configuration accepts it; Graph writes
// tids in lower case. Callers are served all the same. Before, the tenant was compared as written:
// every notification's token was refused (403 "tenant ... not allowed") and no call was answered.
func TestConfigTenantIDInCapitals(t *testing.T) {
	w := newWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	w.env["CALLBOT_TENANT_ID"] = strings.ToUpper(demoTenant)
	w.startServing(t)
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", HangUpAfter: 10 * time.Second}), 20*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred {
		refused := 0
		for _, d := range w.sim.Deliveries() {
			if d.Status == 403 {
				refused++
			}
		}
		t.Fatalf("caller experienced %+v (%d notifications refused with 403); want answered and transferred", r, refused)
	}
}

// An instance stopped with SIGTERM hands back the presence lease: the instance that replaces it
// polls presence at once. Before, the stopped instance's lease held for three intervals (15 s by
// default), and agents' presence went unread meanwhile: an agent who became available was
// offered no caller.
func TestShutdownHandsBackThePresenceLease(t *testing.T) {
	a := newWorld(t, standaloneRedis, away(agent1), away(agent2), away(agent3))
	a.env["CALLBOT_INSTANCE_ID"], a.env["CALLBOT_PRESENCE_INTERVAL"] = "a", "4s"
	b := replacement(a, "b")
	a.start(t)
	if err := a.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond) // a polled at start, and holds the lease
	stopAndWait(t, a)
	polls := func() int {
		n := 0
		for _, r := range a.sim.Requests() {
			if r.Action == "getPresencesByUserId" {
				n++
			}
		}
		return n
	}
	before := polls()
	b.botURL = a.botURL
	b.start(t)
	if err := b.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if polls() == before {
		t.Errorf("the new instance has not polled presence 1 s after it started (interval 4 s): the stopped one's lease kept it from it")
	}
}

// An instance stopped while its Redis hangs (a server that takes connections and never answers:
// a hung process, a black-holed network) exits within its grace, with an error (exit code 1)
// that says the grace ran out, rather than running on until Kubernetes kills it with nothing
// logged. What it leaves is in Redis, and another instance carries the call on: the caller
// waiting in the queue when it stopped reaches an agent. Before, the shutdown waited for its
// background loops, and then for the reconciler's lease hand-back, without a limit of its own:
// each step was bounded only by its own timeouts (the timer loop's claim by the outbox lease, 12 s
// here; every Redis read by the client's 3 s read timeout, which ignores a context's deadline),
// and the instance, with a 1 s grace, exited 8.6 s after SIGTERM.
func TestShutdownWithinGraceWhenRedisHangs(t *testing.T) {
	var srv *redistest.Server
	rds := func(t *testing.T) string {
		srv = redistest.Start(t)
		return "redis://" + srv.Addr + "/0"
	}
	a := newWorld(t, rds, away(agent1), away(agent2), away(agent3))
	a.env["CALLBOT_INSTANCE_ID"], a.env["CALLBOT_SHUTDOWN_GRACE"], a.env["CALLBOT_OUTBOX_LEASE"] = "a", "1s", "12s"
	b := replacement(a, "b")
	a.start(t)
	if err := a.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	c := a.call(t, graphsim.CallerSpec{Digits: "1", HangUpAfter: 60 * time.Second})
	for deadline := time.Now().Add(10 * time.Second); !slices.Contains(c.Result().Prompts, "https://media.test/hold.wav"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the caller is not in the queue 10 s after calling: %+v", c.Result())
		}
	}

	resume := srv.Hang(t)
	time.Sleep(1500 * time.Millisecond) // hung for a while when the stop comes: the loops wait on it
	stopped := time.Now()
	a.stop()
	select {
	case err := <-a.done:
		a.done <- nil // for the cleanup: the error is this test's to check
		if !errors.Is(err, errGraceOver) {
			t.Errorf("serve returned %v %s after SIGTERM; want %v (exit code 1)", err, time.Since(stopped).Round(time.Millisecond), errGraceOver)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("still shutting down 3 s after SIGTERM with a 1 s grace, Redis hung")
	}

	resume()
	b.botURL = a.botURL // the same address: Graph's notifications for the call reach b
	b.start(t)
	if err := b.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	a.sim.SetPresence(agent1, "Available", "Available")
	if r := waitDone(t, c, 40*time.Second); r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 {
		t.Errorf("caller experienced %+v; want transferred to %s by the instance that took over", r, agent1)
	}
}

// An instance stopped while a request still holds its HTTP drain takes on no new work: its
// dispatcher offers nobody (nor its outbox loop re-drives, nor its timer loop claims) after
// SIGTERM, whatever becomes possible meanwhile; that is for the instances that go on. Before, the
// loops were stopped only once the drain was over: here, an agent who became available 1 s into
// a drain held by a slow client was offered the waiting caller by the instance shutting down.
func TestShutdownTakesNoNewWorkWhileRequestsDrain(t *testing.T) {
	w := newWorld(t, standaloneRedis, away(agent1), away(agent2), away(agent3))
	w.env["CALLBOT_SHUTDOWN_GRACE"] = "10s"
	w.start(t)
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	c := w.call(t, graphsim.CallerSpec{Digits: "1", HangUpAfter: 20 * time.Second})
	for deadline := time.Now().Add(10 * time.Second); !slices.Contains(c.Result().Prompts, "https://media.test/hold.wav"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the caller is not in the queue 10 s after calling: %+v", c.Result())
		}
	}
	// A request whose body never comes keeps the connection active: the drain waits for it.
	conn, err := net.Dial("tcp", strings.TrimPrefix(w.botURL, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, "POST /api/calls HTTP/1.1\r\nHost: callbot\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond) // the request is in
	w.stop()
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(w.logs.String(), `"msg":"shutting down"`); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("no shutdown 5 s after SIGTERM")
		}
	}
	time.Sleep(time.Second)
	w.sim.SetPresence(agent1, "Available", "Available")
	time.Sleep(2 * time.Second) // four presence polls (500 ms) and eight dispatcher ticks
	if sent, _ := requests(w, c.ID(), "transfer"); sent > 0 {
		t.Errorf("the instance shutting down transferred the caller to an agent who became available during its drain (%d transfer requests): new work after SIGTERM", sent)
	}
	conn.Close()
	stopAndWait(t, w)
}

// A Redis whose ACL refuses SCAN (a hardened user: +@all -scan) serves callbot as it did before
// the registry of a tenant's queues: the one SCAN callbot makes, to fill that registry at the
// first start, is refused, and callbot starts all the same, says what it could not do, and
// registers its flow's queues. It refused to start ("NOPERM ... scan"), the whole contact center
// down for a sweep of ghosts in the queues of older flows.
func TestStartsOnARedisWhoseACLRefusesScan(t *testing.T) {
	var srv *redistest.Server
	rds := func(t *testing.T) string {
		srv = redistest.Start(t)
		if err := srv.Client(t).Do(context.Background(), "ACL", "SETUSER", "callbot", "on", ">secret", "~*", "&*", "+@all", "-scan").Err(); err != nil {
			t.Fatal(err)
		}
		return "redis://callbot:secret@" + srv.Addr + "/0"
	}
	w := newWorld(t, rds, away(agent1), available(agent2, graphsim.AgentAccept), away(agent3))
	w.start(t)
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(w.logs.String(), "Redis refused the SCAN") {
		t.Errorf("no warning that the queues of older flows are not swept:\n%s", w.logs.String())
	}
	queues, err := srv.Client(t).SMembers(context.Background(), "cb:{tenant:"+demoTenant+"}:queues").Result()
	if err != nil || !slices.Contains(queues, "sales") {
		t.Errorf("registry of the tenant's queues %v (%v), want the flow's, sales among them", queues, err)
	}
	time.Sleep(700 * time.Millisecond) // one presence poll
	if r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 15*time.Second); r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent2 {
		t.Errorf("caller experienced %+v; want transferred to %s", r, agent2)
	}
}

// When the grace runs out, serve names what it left, and only that: an instance whose loops
// were held up by a hung Redis, with no call's Graph commands under way, does not say it left
// Graph commands ("queued Graph commands (0 calls sending)"): once the grace was over, every
// step after the one that ran it out was named, whether it had anything to do or not, and the
// operator reading the log looked for commands that were never there.
func TestShutdownNamesOnlyWhatItLeft(t *testing.T) {
	var srv *redistest.Server
	rds := func(t *testing.T) string {
		srv = redistest.Start(t)
		return "redis://" + srv.Addr + "/0"
	}
	w := newWorld(t, rds, away(agent1), away(agent2), away(agent3))
	w.env["CALLBOT_SHUTDOWN_GRACE"] = "500ms"
	w.start(t)
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	srv.Hang(t)
	time.Sleep(500 * time.Millisecond) // the loops wait on it
	w.stop()
	select {
	case err := <-w.done:
		w.done <- nil // for the cleanup: the error is this test's to check
		if !errors.Is(err, errGraceOver) {
			t.Fatalf("serve returned %v; want %v", err, errGraceOver)
		}
		if strings.Contains(err.Error(), "Graph commands") {
			t.Errorf("serve returned %q: it names Graph commands, and no call had any under way", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("still shutting down 10 s after SIGTERM with a 500 ms grace, Redis hung")
	}
}

//go:build chaos

package chaos

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/graph/graphsim"
)

// TestInstancePartitionedFromRedis: two instances behind a round-robin balancer that checks
// /readyz (as a Kubernetes readiness probe does), one of them reaching Redis through a link
// that is cut for CHAOS_PARTITION (default 10 s, past the outbox lease) while calls are in
// menus, queues and transfers, then restored. The cut is a partition, not a crash: the
// instance lives, Graph and the balancer still reach it, and what it sent Redis, or Redis sent
// it, is held in the network, not lost: delivered when the link comes back, long after its
// sender gave up on it (writes of a record the other instance has moved on since, a
// reservation's script, an acknowledgement, a lease renewal). Meanwhile the other instance
// must take over what the cut one held (its outboxes and claimed timers, a lease later; its
// presence and reconciler leases), and the late writes must undo none of it.
//
// Every caller must end as they chose; no agent may be offered two callers at once; the
// webhooks must answer nothing but 2xx and 503 (a 500 would make Graph drop a notification);
// once the calls are over every record must be settled and no caller left in a queue nor any
// agent reserved; and the instance cut off must be back in service after the link returns,
// serving notifications again.
func TestInstancePartitionedFromRedis(t *testing.T) {
	partitionUnderLoad(t, "Redis", envDuration(t, "CHAOS_PARTITION", 10*time.Second), false)
}

// TestInstancePartitionedFromGraph: TestInstancePartitionedFromRedis with the other path cut:
// one instance reaches Redis and the load balancer, and not Graph (an egress firewall rule, a
// NAT gateway out of ports, a DNS failure on one host), for CHAOS_GRAPH_PARTITION (default
// 20 s). Its readiness, the notifications it takes and the commands it decides on must not
// turn it into a hole that callers fall into: every caller must still end as they chose. Two
// ways: the path drops what is sent (nothing answers: each request waits for its deadline, or
// for HTTP/2's health check to close its connection), or refuses it (every connection reset:
// each request fails at once).
func TestInstancePartitionedFromGraph(t *testing.T) {
	cutFor := envDuration(t, "CHAOS_GRAPH_PARTITION", 20*time.Second)
	t.Run("drop", func(t *testing.T) { partitionUnderLoad(t, "Graph", cutFor, false) })
	t.Run("refuse", func(t *testing.T) { partitionUnderLoad(t, "Graph", cutFor, true) })
}

// partitionUnderLoad runs the partition tests: bot-a's path to to ("Redis" or "Graph") goes
// through a link, cut one way for oneWay then both ways (or, with refuse, every connection
// reset), for cutFor in all, under load.
func partitionUnderLoad(t *testing.T, to string, cutFor time.Duration, refuse bool) {
	const (
		calls = 80
		every = 200 * time.Millisecond // 80 calls in 16 s
		cutAt = 15                     // before call 15 (~3 s)
		// graphLatency is added to every call action graphsim serves, so that at the cut the
		// instance has commands saved and not yet acknowledged (TestInstanceKilled's).
		graphLatency = 150 * time.Millisecond
		// oneWay is how long the link stays cut one way only (to the instance) before it is cut
		// both ways: what the instance writes meanwhile takes effect and it hears nothing back
		// (a save it answers 503 for, whose commands it does not send; a reservation it asks for
		// again; a Graph command that took effect, its answer lost), as at the moment any
		// partition begins, made long enough to be met.
		oneWay = 500 * time.Millisecond
	)
	sd := seed(t)
	rs := startRedis(t, false)
	rdb := rs.client(t)
	lb := newBalancerChecking(t, "/readyz")
	talk := time.Second
	sim, ca := newSim(t, lb.URL()+"/api/calls", flowAgents(talk))
	for _, action := range []string{"answer", "subscribeToTone", "playPrompt", "cancelMediaProcessing", "transfer", "delete"} {
		if _, err := sim.AddFault(graphsim.Fault{Kind: graphsim.FaultLatency, Action: action, Latency: graphLatency, Probability: 1}); err != nil {
			t.Fatal(err)
		}
	}
	lease, set := outboxLease(t)
	envA := baseEnv(sim, ca, rs.addr, lb.URL())
	envB := baseEnv(sim, ca, rs.addr, lb.URL())
	var link *link
	switch to {
	case "Redis":
		link = newLink(t, rs.addr)
		envA["CALLBOT_REDIS_URL"] = "redis://" + link.addr() + "/0"
	case "Graph":
		// Graph's API only: the token endpoint names itself in its discovery document (the
		// issuer), which a proxy's address would not match; a token lasts an hour, and is had
		// before the cut, as are the callback tokens' signing keys
		u, err := url.Parse(sim.GraphURL())
		if err != nil {
			t.Fatal(err)
		}
		link = newLink(t, u.Host)
		envA["CALLBOT_GRAPH_URL"] = strings.Replace(envA["CALLBOT_GRAPH_URL"], u.Host, link.addr(), 1)
	default:
		t.Fatalf("no partition from %q", to)
	}
	if set {
		envA["CALLBOT_OUTBOX_LEASE"], envB["CALLBOT_OUTBOX_LEASE"] = lease.String(), lease.String()
	}
	t.Logf("outbox lease %s (set by the test: %v); link to %s cut for %s", lease, set, to, cutFor)
	// a starts first: it takes the presence and reconciler leases, which b must take over
	a := startCallbot(t, "bot-a", "127.0.0.1:"+strconv.Itoa(freePort(t)), envA)
	time.Sleep(300 * time.Millisecond)
	b := startCallbot(t, "bot-b", "127.0.0.1:"+strconv.Itoa(freePort(t)), envB)
	lb.add(a.name, a.addr)
	lb.add(b.name, b.addr)
	time.Sleep(1200 * time.Millisecond) // a presence poll or two: agents routable

	t0 := time.Now()
	var cut, healed time.Time
	var atCut map[string]int
	var servedAtHeal int64
	done := make(chan struct{})
	callers := placeCalls(t, sim, sd, calls, every, func(i int) {
		if i != cutAt {
			return
		}
		atCut = recordStates(rdb)
		if refuse {
			link.refuse()
		} else {
			link.cutReplies()
		}
		cut = time.Now()
		how := fmt.Sprintf("link from %s to %s cut, the other way %s later", to, a.name, oneWay)
		if refuse {
			how = fmt.Sprintf("link between %s and %s refusing: every connection reset", a.name, to)
		}
		t.Logf("t=%s: %s; records then: [%s]", since(t0, cut), how, fmtCounts(atCut))
		go func() {
			defer close(done)
			time.Sleep(oneWay)
			if !refuse {
				link.cut()
			}
			time.Sleep(cutFor - oneWay)
			servedAtHeal = lb.served(a.name)
			link.heal()
			healed = time.Now()
		}()
	})
	<-done
	t.Logf("t=%s: link restored; %d calls placed by t=%s", since(t0, healed), calls, since(t0, time.Now()))

	// What the cut instance held comes back a lease after it last renewed it; allow that and
	// 45 s for the calls to end after the link returns.
	stuck := waitEnded(t, t0, callers, healed.Add(lease+45*time.Second))
	known := judgeStuck(t, sim, rdb, stuck, a, b)
	counts, misrouted := checkOutcomes(t, callers, a, b)
	known = append(known, misrouted...)
	offered, accepted := checkAgents(t, sim)

	statuses := map[string]int{}
	for _, d := range sim.Deliveries() {
		st := strconv.Itoa(d.Status)
		switch {
		case d.Err != "":
			st = "error" // graphsim's client gave up waiting (an instance waiting on Redis)
		case d.Status == http.StatusServiceUnavailable, d.Status >= 200 && d.Status < 300:
		default:
			t.Errorf("delivery %s %s (attempt %d) at t=%s answered %d: want 2xx, or 503 while Redis cannot take it",
				d.State, d.ResourceURL, d.Attempt, since(t0, d.Time), d.Status)
		}
		if d.Time.After(cut) && d.Time.Before(healed) {
			statuses[st]++
		}
	}
	if len(stuck) == 0 {
		settled := checkSettled(t, rdb, lease)
		t.Logf("records at the end: [%s]", fmtCounts(settled))
		checkNothingWaiting(t, rdb)
	}

	// Back in service: ready again (a probe of Graph a second or two after the link returns),
	// and serving notifications of the calls placed since.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		code, err := readyz(a.url())
		if code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%s not ready 10 s after the link returned: %d %v", a.name, code, err)
			break
		}
	}
	if n := lb.served(a.name) - servedAtHeal; n == 0 && healed.Before(t0.Add(time.Duration(calls-10)*every)) {
		t.Errorf("%s served no notification after the link returned (%s)", a.name, lb.stats())
	}
	ma := scrapeMetrics(t, a.url())
	switch cuts := ma["callbot_graph_cut_offs_total"]; {
	case to == "Graph" && (cuts < 1 || ma["callbot_graph_commands_handed_over_total"] < 1):
		t.Errorf("%s cut off from Graph: found cut off %v times, handed %v batches of commands over; want it found and its commands handed over",
			a.name, cuts, ma["callbot_graph_commands_handed_over_total"])
	case to == "Graph" && ma["callbot_graph_cut_off"] != 0:
		t.Errorf("%s still cut off from Graph after the link returned", a.name)
	case to == "Redis" && cuts != 0:
		t.Errorf("%s, cut off from Redis, was found cut off from Graph %v times", a.name, cuts)
	}
	// What the callers went through: how long they rang, how long their calls took.
	var rang, took []time.Duration
	for _, c := range callers {
		r := c.call.Result()
		if !r.AnsweredAt.IsZero() {
			rang = append(rang, r.AnsweredAt.Sub(r.PlacedAt))
		}
		if !r.EndedAt.IsZero() {
			took = append(took, r.EndedAt.Sub(r.PlacedAt))
		}
	}
	slices.Sort(rang)
	slices.Sort(took)
	pct := func(d []time.Duration, p float64) time.Duration {
		if len(d) == 0 {
			return 0
		}
		return d[min(len(d)-1, int(float64(len(d))*p))].Round(10 * time.Millisecond)
	}
	t.Logf("callers: rang p50 %s, p90 %s, max %s; calls took p50 %s, p90 %s, max %s", pct(rang, .5), pct(rang, .9), pct(rang, 1),
		pct(took, .5), pct(took, .9), pct(took, 1))
	t.Logf("summary: %d calls, outcomes [%s]; live at the cut [%s]; deliveries during the cut [%s]; held by the cut: %d writes to %s, %d replies; agents offered %d, accepted %d; "+
		"%s found cut off from Graph %v times, handed %v batches of commands over; "+
		"%s kept %v, applied %v; outboxes %s re-drove %d; balancer: %s; warnings/errors %s %d/%d, %s %d/%d",
		calls, fmtCounts(counts), fmtCounts(atCut), fmtCounts(statuses), link.heldUp.Load(), to, link.heldDown.Load(), offered, accepted,
		a.name, ma["callbot_graph_cut_offs_total"], ma["callbot_graph_commands_handed_over_total"],
		a.name, ma["callbot_notifications_kept_total"], ma["callbot_notifications_kept_applied_total"],
		b.name, countLines(b.logPath, "re-driving commands left unacknowledged"), lb.stats(),
		a.name, countLines(a.logPath, `"level":"warn"`), countLines(a.logPath, `"level":"error"`),
		b.name, countLines(b.logPath, `"level":"warn"`), countLines(b.logPath, `"level":"error"`))
	if t.Failed() {
		for _, p := range []*callbotProc{a, b} {
			t.Logf("%s warnings and errors:\n%s", p.name, strings.Join(lastN(grep(p.logPath, `"level":"warn"`, `"level":"error"`), 40), "\n"))
		}
	}
	skipKnown(t, known, calls)
}

// checkSettled waits until no record is live or holds unacknowledged commands (the
// acknowledgements of what a re-drive did or skipped may wait a lease or two), then fails the
// test for each that is not: a record live after Graph ended its call is a call stuck in
// callbot. It returns the records' states.
func checkSettled(t *testing.T, rdb *redis.Client, lease time.Duration) map[string]int {
	t.Helper()
	var settled map[string]int
	settledBy := time.Now().Add(2*max(lease, 5*time.Second) + 10*time.Second)
	for {
		settled = recordStates(rdb)
		open := 0
		for s, n := range settled {
			if s != "terminated" {
				open += n
			}
		}
		if open == 0 || time.Now().After(settledBy) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	for s, n := range settled {
		if s != "terminated" && n > 0 {
			t.Errorf("%d callbot records %s after every call ended in Graph (records: [%s]): callbot did not settle them",
				n, s, fmtCounts(settled))
		}
	}
	return settled
}

// checkNothingWaiting fails the test for every queue holding a caller, and for an agent still
// reserved or a call still in the live set, once every call is over (the releases of the last
// calls may come with their outbox's re-drive, a lease later: it waits up to 20 s).
func checkNothingWaiting(t *testing.T, rdb *redis.Client) {
	t.Helper()
	ctx := context.Background()
	var left map[string]int64
	deadline := time.Now().Add(20 * time.Second)
	for {
		left = map[string]int64{}
		for _, k := range scanKeys(ctx, rdb, keyPrefix+":*") {
			if strings.Contains(k, ":queue:") || strings.HasSuffix(k, ":busy") || strings.HasSuffix(k, "{active}") {
				if n, err := rdb.ZCard(ctx, k).Result(); err == nil && n > 0 {
					left[k] = n
				}
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	for k, n := range left {
		t.Errorf("%s holds %d entries after every call ended", k, n)
	}
}

// link is a TCP proxy between one callbot instance and Redis that can be cut as a network
// partition cuts a path, each way on its own: nothing passes and nothing is closed (no RST, no
// FIN: the sender learns nothing but its own timeout); a new connection is taken and then hears
// nothing. What is sent meanwhile stays in the network (the proxy and the kernel's buffers)
// and is delivered when the link is restored, each connection's bytes in order, a connection
// its client has closed meanwhile included: as TCP retransmits what it has not had
// acknowledged, after its sender gave up waiting for the reply.
type link struct {
	t      *testing.T
	ln     net.Listener
	target string

	up, down gate // to Redis, from it
	// refusing: every connection is reset (RST) and new ones are reset as soon as taken, as a
	// path that refuses rather than drops (a firewall's reject, a DNS name gone)
	refusing atomic.Bool
	// reads (of writes to Redis, of its replies) that waited for the link to come back
	heldUp, heldDown atomic.Int64

	mu    sync.Mutex
	conns []net.Conn
}

// gate holds what passes one way while it is shut.
type gate struct {
	mu   sync.Mutex
	open chan struct{} // closed while the gate is open
}

// init opens g.
func (g *gate) init() {
	g.open = make(chan struct{})
	close(g.open)
}

func (g *gate) shut() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
		g.open = make(chan struct{})
	default: // shut already
	}
}

func (g *gate) reopen() {
	g.mu.Lock()
	defer g.mu.Unlock()
	select {
	case <-g.open:
	default:
		close(g.open)
	}
}

// pass returns once the gate is open, and whether it had to wait.
func (g *gate) pass() bool {
	g.mu.Lock()
	open := g.open
	g.mu.Unlock()
	select {
	case <-open:
		return false
	default:
	}
	<-open
	return true
}

func newLink(t *testing.T, target string) *link {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := &link{t: t, ln: ln, target: target}
	l.up.init()
	l.down.init()
	go l.accept()
	t.Cleanup(func() {
		l.heal()
		ln.Close()
		l.mu.Lock()
		for _, c := range l.conns {
			c.Close()
		}
		l.mu.Unlock()
	})
	return l
}

func (l *link) addr() string { return l.ln.Addr().String() }

// cutReplies stops what Redis sends, until heal: what the instance sends still arrives and is
// executed, and it hears nothing back (the reply lost, after the write took effect).
func (l *link) cutReplies() { l.down.shut() }

// cut stops everything passing, each way, until heal.
func (l *link) cut() { l.down.shut(); l.up.shut() }

// heal lets through what was held and everything after it, and takes connections again.
func (l *link) heal() { l.refusing.Store(false); l.up.reopen(); l.down.reopen() }

// refuse resets every connection and every new one until heal.
func (l *link) refuse() {
	l.refusing.Store(true)
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		reset(c)
	}
	l.conns = nil
}

// reset closes c with an RST, not a FIN.
func reset(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.Close()
}

func (l *link) accept() {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		go l.serve(c)
	}
}

// serve joins a client's connection to one of its own to Redis, then copies each way.
func (l *link) serve(c net.Conn) {
	if l.refusing.Load() {
		reset(c)
		return
	}
	s, err := net.Dial("tcp", l.target)
	if err != nil {
		c.Close()
		return
	}
	l.mu.Lock()
	l.conns = append(l.conns, c, s)
	l.mu.Unlock()
	go l.copy(s, c, &l.up, &l.heldUp)
	l.copy(c, s, &l.down, &l.heldDown)
}

// copy moves bytes from src to dst, each read waiting for g to be open before it is written;
// when src ends, it closes dst's writing side once what it read is through.
func (l *link) copy(dst, src net.Conn, g *gate, held *atomic.Int64) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if g.pass() {
				held.Add(1)
			}
			if _, werr := dst.Write(buf[:n]); werr != nil {
				src.Close()
				return
			}
		}
		if err != nil {
			if tc, ok := dst.(*net.TCPConn); ok && errors.Is(err, io.EOF) {
				tc.CloseWrite()
			} else {
				dst.Close()
			}
			return
		}
	}
}

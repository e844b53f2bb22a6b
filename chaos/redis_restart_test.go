//go:build chaos

package chaos

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// redisDown is how long Redis stays dead (CHAOS_REDIS_DOWN, default 2s): by default within
// graphsim's delivery retries (the first try and three more, each after the 1s callbot's 503
// asks for in Retry-After), so a notification refused while Redis is down is delivered again
// once it is back.
func redisDown(t *testing.T) time.Duration {
	if v := os.Getenv("CHAOS_REDIS_DOWN"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatalf("CHAOS_REDIS_DOWN: %v", err)
		}
		return d
	}
	return 2 * time.Second
}

// retryBudget is about how long graphsim keeps delivering a notification callbot answers 503
// with Retry-After: 1 (three retries a second apart, plus the requests themselves).
const retryBudget = 3 * time.Second

// keptOutage is how long Redis may be down for callbot's keeping of the notifications it refused
// (15 s from the first refusal) to cover them: the outage, Redis's start and loading the AOF,
// with a margin.
const keptOutage = 10 * time.Second

// TestRedisRestartAOF: one callbot instance on a Redis with appendonly yes / appendfsync
// everysec; Redis is SIGKILLed while calls are live and started again on the same port with the
// same directory. While it is down the webhook must answer 503 (so Graph delivers again) and
// /readyz 503; once it is back /readyz must say 200 within 5s, no call record may have lost a
// version, and every call must end as its caller chose: those whose incoming or key press
// graphsim gave up too (CHAOS_REDIS_DOWN past its retries, under keptOutage), as callbot kept
// what it refused.
func TestRedisRestartAOF(t *testing.T) { testRedisRestart(t, redisDown(t)) }

// TestRedisRestartOutlastingRetries is TestRedisRestartAOF with Redis down for 5 s, past
// graphsim's retries: graphsim gives up notifications (incoming calls among them), and every
// caller must still end as they chose, as callbot kept what it refused and applied it once Redis
// was back (callbot_notifications_kept_applied_total). Skipped when CHAOS_REDIS_DOWN sets the
// outage of TestRedisRestartAOF.
func TestRedisRestartOutlastingRetries(t *testing.T) {
	if os.Getenv("CHAOS_REDIS_DOWN") != "" {
		t.Skip("CHAOS_REDIS_DOWN is set: TestRedisRestartAOF runs that outage")
	}
	testRedisRestart(t, 5*time.Second)
}

func testRedisRestart(t *testing.T, down time.Duration) {
	const (
		calls  = 40
		every  = 150 * time.Millisecond // 40 calls in 6s
		killAt = 20                     // before call 20 (~3s)
	)
	sd := seed(t)
	rs := startRedis(t, true)
	rdb := rs.client(t)
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	talk := time.Second
	sim, ca := newSim(t, "http://"+addr+"/api/calls", flowAgents(talk))
	lease, set := outboxLease(t)
	env := baseEnv(sim, ca, rs.addr, "http://"+addr)
	if set {
		env["CALLBOT_OUTBOX_LEASE"] = lease.String()
	}
	t.Logf("outbox lease %s (set by the test: %v); Redis down for %s", lease, set, down)
	bot := startCallbot(t, "bot", addr, env)
	time.Sleep(1200 * time.Millisecond)

	// /readyz, sampled every 100ms for the whole test.
	type sample struct {
		start, end time.Time
		code       int
	}
	var (
		smu     sync.Mutex
		samples []sample
	)
	sctx, stopSampling := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for sctx.Err() == nil {
			s := sample{start: time.Now()}
			s.code, _ = readyz(bot.url())
			s.end = time.Now()
			smu.Lock()
			samples = append(samples, s)
			smu.Unlock()
			select {
			case <-sctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	t.Cleanup(func() { stopSampling(); <-sampled })

	t0 := time.Now()
	var (
		killed, restarting, restarted time.Time
		before                        map[string]int64
		atKill                        map[string]int
		restartErr                    error
		lost                          []string
		outage                        sync.WaitGroup
	)
	// Callers who hang up in the menu while Redis is down: the end of a call is a notification
	// callbot must refuse (503) then, not acknowledge and lose. Placed a few calls before the
	// kill, without a key, they hang up 1 s after the answer, within the outage.
	var hangers []*caller
	var placing sync.WaitGroup
	callers := placeCalls(t, sim, sd, calls, every, func(i int) {
		if i == killAt-3 || i == killAt-1 {
			c := &caller{n: calls + len(hangers), kind: "hangup", spec: graphsim.CallerSpec{
				From: graph.Party{Kind: graph.KindPhone, ID: fmt.Sprintf("+1425557%04d", i)}, To: accountID,
				HangUpAfter: time.Second}}
			hangers = append(hangers, c)
			c.place(&placing, sim)
		}
		if i != killAt {
			return
		}
		atKill = recordStates(rdb)
		before = versions(rdb)
		rs.kill()
		killed = time.Now()
		outage.Go(func() {
			time.Sleep(down)
			restarting = time.Now()
			restartErr = rs.start()
			restarted = time.Now()
			// Versions only grow: one lower than before the kill is a lost acknowledged write.
			after := versions(rdb)
			for k, v := range before {
				if after[k] < v {
					lost = append(lost, fmt.Sprintf("%s v%d -> v%d", k, v, after[k]))
				}
			}
		})
	})
	outage.Wait()
	placing.Wait()
	for _, c := range hangers {
		if c.call == nil {
			t.Fatalf("call %d not placed: %v", c.n, c.err)
		}
	}
	callers = append(callers, hangers...)
	if restartErr != nil {
		t.Fatalf("restart redis-server: %v", restartErr)
	}
	t.Logf("t=%s: Redis SIGKILLed with call records [%s]; t=%s restarted (ready after %s); %d calls placed by t=%s",
		since(t0, killed), fmtCounts(atKill), since(t0, restarting), restarted.Sub(restarting).Round(time.Millisecond),
		calls, since(t0, time.Now()))
	if len(lost) > 0 {
		t.Errorf("acknowledged transitions lost with the restart (record versions went back): %v", lost)
	}
	if len(before) == 0 {
		t.Errorf("no call record in Redis at the kill: the test killed nothing")
	}

	deadline := restarted.Add(max(lease, 30*time.Second) + 45*time.Second)
	stuck := waitEnded(t, t0, callers, deadline)
	known := judgeStuck(t, sim, rdb, stuck, bot)

	// The webhook while Redis was down: 503 (with graphsim retrying), nothing else but 202 for
	// notifications callbot can drop without Redis (the event changes nothing).
	statuses := map[string]int{}
	var in503, gaveUp int
	var endsAcked []graphsim.Delivery // a call's end acknowledged (202) while Redis was down
	var endsDown int                  // ends delivered while Redis was down
	for _, d := range sim.Deliveries() {
		if d.Status >= 500 && d.Attempt == 4 {
			gaveUp++
		}
		if d.Time.Before(killed) || !d.Time.Before(restarting) {
			continue
		}
		st := strconv.Itoa(d.Status)
		if d.Err != "" {
			st = "error"
		}
		statuses[st]++
		if d.State == "terminated" {
			endsDown++
		}
		switch d.Status {
		case http.StatusServiceUnavailable:
			in503++
		case http.StatusAccepted:
			if d.State == "terminated" {
				endsAcked = append(endsAcked, d)
			}
		default:
			t.Errorf("delivery while Redis was down answered %s (%s %s attempt %d), want 503", st, d.State, d.ResourceURL, d.Attempt)
		}
	}
	if in503 == 0 {
		t.Errorf("no webhook delivery was answered 503 while Redis was down (deliveries then: %v)", statuses)
	}
	// A 202 is what callbot may answer for a notification that changes nothing (one its cached
	// record shows stale). A call's end always changes something, unless callbot's record had
	// already ended: acknowledged while Redis was down, Graph does not deliver it again, and a
	// record that does not show it is a call left live in callbot (queued, reserving an agent,
	// transferring) that Graph has ended. The 202 is right only if the record shows this end,
	// with the result code Graph sent, no later than that delivery could have written it (Redis
	// may have come back while it was being handled: the webhook's 5 s). A record ended later by
	// callbot's own timers (a menu timeout's prompt finding the call gone) does not make up for
	// it: it carries no result code, and meanwhile the call was live in callbot.
	if endsDown == 0 {
		t.Errorf("no call's end was delivered while Redis was down: the callers hanging up then did not (deliveries then: %v)", statuses)
	}
	results := map[string]graphsim.CallResult{}
	for _, c := range callers {
		r := c.call.Result()
		results[r.ID] = r
	}
	store := callstate.NewStore(rdb, keyPrefix)
	for _, d := range endsAcked {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		rec, err := store.Get(ctx, graph.CallKey(d.CallID))
		cancel()
		r := results[d.CallID]
		if err != nil || !rec.State.Terminal() || rec.EndedAt.After(d.Time.Add(6*time.Second)) ||
			rec.EndCode != int64(r.EndCode) || rec.EndSubcode != int64(r.EndSubcode) {
			t.Errorf("the end of call %s (%d/%d, attempt %d at %s) was acknowledged (202) while Redis was down, but callbot's "+
				"record does not show it: state %s ended %s with %d/%d (%v)", d.CallID, r.EndCode, r.EndSubcode, d.Attempt,
				since(t0, d.Time), rec.State, since(t0, rec.EndedAt), rec.EndCode, rec.EndSubcode, err)
		}
	}
	switch {
	case gaveUp > 0 && down < retryBudget:
		t.Errorf("%d notifications were refused on all 4 attempts: graphsim gave up on them", gaveUp)
	case gaveUp > 0:
		t.Logf("%d notifications were refused on all 4 attempts (Redis down %s, longer than graphsim's retries): "+
			"what callbot kept of them (incoming calls, key presses, transfer failures, ends) it applied once Redis was back", gaveUp, down)
	case down >= retryBudget+time.Second:
		t.Errorf("Redis down %s, past graphsim's retries, and no notification given up: the test proves nothing of the keeping", down)
	}
	if applied := scrapeMetrics(t, bot.url())["callbot_notifications_kept_applied_total"]; down >= retryBudget+time.Second && applied == 0 {
		t.Errorf("Redis down %s, %d notifications given up by graphsim, and none applied by callbot from what it kept", down, gaveUp)
	}

	// /readyz: 503 for every probe made entirely within the outage, 200 again within 5s.
	stopSampling()
	<-sampled
	var probesDown, downNot503 int
	var readyAgain time.Time
	for _, s := range samples {
		switch {
		case s.start.After(killed) && s.end.Before(restarting):
			probesDown++
			if s.code != http.StatusServiceUnavailable {
				downNot503++
				t.Errorf("/readyz answered %d at %s while Redis was down, want 503", s.code, since(t0, s.start))
			}
		case s.start.After(restarted) && s.code == http.StatusOK && readyAgain.IsZero():
			readyAgain = s.end
		}
	}
	if probesDown == 0 {
		t.Errorf("no /readyz probe fell within the outage")
	}
	switch {
	case readyAgain.IsZero():
		t.Errorf("/readyz never said 200 again after Redis came back")
	case readyAgain.Sub(restarted) > 5*time.Second:
		t.Errorf("/readyz said 200 only %s after Redis came back, want <= 5s", readyAgain.Sub(restarted).Round(time.Millisecond))
	}

	// The instance lives through the outage, keeping what Redis refused (callstate's keep) for
	// 15 s: with Redis down for less than keptOutage, every caller ends as they chose, answered
	// even if graphsim gave their incoming up.
	counts, misrouted := checkOutcomesKept(t, callers, down < keptOutage, bot)
	known = append(known, misrouted...)
	offered, accepted := checkAgents(t, sim)
	var ackedBefore, ackedDuring, unacked int
	var last time.Time
	for _, c := range callers {
		switch {
		case c.acked.IsZero():
			unacked++
		case c.acked.Before(killed):
			ackedBefore++
		default:
			ackedDuring++
		}
		if r := c.call.Result(); r.EndedAt.After(last) {
			last = r.EndedAt
		}
	}
	t.Logf("summary: %d calls (%d acknowledged before the kill, %d after, %d never), outcomes [%s]; "+
		"record versions checked across the restart: %d, lost: %d; deliveries during the outage [%s], "+
		"given up %d; /readyz probes in the outage %d (not 503: %d), 200 again %s after Redis was up; "+
		"last call ended %s after the restart; agents offered %d, accepted %d; callbot warnings %d, errors %d",
		calls, ackedBefore, ackedDuring, unacked, fmtCounts(counts), len(before), len(lost), fmtCounts(statuses), gaveUp,
		probesDown, downNot503, readyAgain.Sub(restarted).Round(time.Millisecond), last.Sub(restarted).Round(100*time.Millisecond),
		offered, accepted, countLines(bot.logPath, `"level":"warn"`), countLines(bot.logPath, `"level":"error"`))
	if t.Failed() {
		t.Logf("callbot warnings and errors:\n%s", strings.Join(lastN(grep(bot.logPath, `"level":"warn"`, `"level":"error"`), 40), "\n"))
	}
	skipKnown(t, known, calls)
}

// versions returns the version of every call record in Redis.
func versions(rdb redis.UniversalClient) map[string]int64 {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	out := map[string]int64{}
	for _, k := range scanKeys(ctx, rdb, keyPrefix+":{call:*") {
		v, err := rdb.HGet(ctx, k, "v").Int64()
		if err == nil {
			out[k] = v
		}
	}
	return out
}

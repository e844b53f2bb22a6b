//go:build chaos

package chaos

import (
	"context"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/graph/graphsim"
)

// TestRedisMemoryFull: one callbot instance under load on a Redis with maxmemory-policy
// noeviction (docs/deployment.md) whose maxmemory is set a little above what it uses, so that it
// fills within a second and stays at the limit, refusing writes while the deletes of calls
// that end free a little now and then (a pipeline may then have some of its writes taken and
// others refused); then the limit is lifted. The webhook must answer nothing but 2xx and 503 (a
// 500 would make Graph drop the notification), Redis must evict nothing, every caller must end
// as they chose (what Graph gave up delivering, callbot kept and applied), no agent may be
// offered two callers at once, and once the calls are over no caller may be left in a queue nor
// any agent reserved.
func TestRedisMemoryFull(t *testing.T) {
	const (
		calls  = 60
		every  = 100 * time.Millisecond // 60 calls in 6 s
		fillAt = 15                     // before call 15 (~1.5 s)
		margin = 16 << 10               // bytes above used_memory: about 8 live calls' worth
	)
	// how long Redis stays at its memory limit: past graphsim's retries, within what callbot
	// keeps of the notifications it refused
	full := envDuration(t, "CHAOS_MEMORY_FULL", 4*time.Second)
	sd := seed(t)
	rs := startRedis(t, false)
	rdb := rs.client(t)
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	talk := time.Second
	sim, ca := newSim(t, "http://"+addr+"/api/calls", []graphsim.AgentSpec{
		agent(1, graphsim.AgentAccept, true, talk), agent(2, graphsim.AgentAccept, true, talk),
		agent(3, graphsim.AgentAccept, true, talk), agent(4, graphsim.AgentAccept, true, talk),
		agent(5, graphsim.AgentAccept, false, talk), agent(6, graphsim.AgentAccept, true, talk),
		agent(7, graphsim.AgentAccept, true, talk), agent(8, graphsim.AgentAccept, false, talk),
	})
	env := baseEnv(sim, ca, rs.addr, "http://"+addr)
	bot := startCallbot(t, "bot", addr, env)
	time.Sleep(1200 * time.Millisecond)
	ctx := context.Background()
	if err := rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err(); err != nil {
		t.Fatal(err)
	}

	t0 := time.Now()
	var limited, lifted time.Time
	var limitErr error
	done := make(chan struct{})
	callers := placeCalls(t, sim, sd, calls, every, func(i int) {
		if i != fillAt {
			return
		}
		used := memoryInfo(ctx, rdb, "used_memory")
		limitErr = rdb.ConfigSet(ctx, "maxmemory", strconv.FormatInt(used+margin, 10)).Err()
		limited = time.Now()
		go func() {
			defer close(done)
			time.Sleep(full)
			if err := rdb.ConfigSet(ctx, "maxmemory", "0").Err(); err != nil && limitErr == nil {
				limitErr = err
			}
			lifted = time.Now()
		}()
	})
	<-done
	if limitErr != nil {
		t.Fatalf("CONFIG SET maxmemory: %v", limitErr)
	}
	t.Logf("t=%s: maxmemory set %d bytes above used_memory; t=%s lifted; %d calls placed by t=%s",
		since(t0, limited), margin, since(t0, lifted), calls, since(t0, time.Now()))

	stuck := waitEnded(t, t0, callers, lifted.Add(60*time.Second))
	known := judgeStuck(t, sim, rdb, stuck, bot)

	statuses := map[string]int{}
	var refused, gaveUp int
	for _, d := range sim.Deliveries() {
		st := strconv.Itoa(d.Status)
		if d.Err != "" {
			st = "error"
		}
		if d.Time.After(limited) && d.Time.Before(lifted) {
			statuses[st]++
		}
		switch {
		case d.Status == http.StatusServiceUnavailable:
			refused++
			if d.Attempt == 4 {
				gaveUp++
			}
		case d.Status < 200 || d.Status >= 300:
			t.Errorf("delivery %s %s (attempt %d) at t=%s answered %s: want 2xx, or 503 while Redis refuses writes",
				d.State, d.ResourceURL, d.Attempt, since(t0, d.Time), st)
		}
	}
	if refused == 0 {
		t.Errorf("no delivery was answered 503: Redis never refused a write, the test proved nothing (deliveries at the limit: %v)", statuses)
	}
	if n := memoryInfo(ctx, rdb, "evicted_keys"); n != 0 {
		t.Errorf("Redis evicted %d keys with noeviction", n)
	}

	counts, misrouted := checkOutcomesKept(t, callers, true, bot)
	known = append(known, misrouted...)
	offered, accepted := checkAgents(t, sim)

	// Nobody left waiting or reserved once every call is over (the releases of the last calls
	// may come with their outbox's re-drive, a lease later).
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
	m := scrapeMetrics(t, bot.url())
	t.Logf("summary: %d calls, outcomes [%s]; deliveries while at the limit [%s]; 503s %d, given up by graphsim %d; "+
		"kept %v, applied from what was kept %v; agents offered %d, accepted %d; callbot warnings %d, errors %d",
		calls, fmtCounts(counts), fmtCounts(statuses), refused, gaveUp, m["callbot_notifications_kept_total"],
		m["callbot_notifications_kept_applied_total"], offered, accepted,
		countLines(bot.logPath, `"level":"warn"`), countLines(bot.logPath, `"level":"error"`))
	if t.Failed() {
		t.Logf("callbot warnings and errors:\n%s", strings.Join(lastN(grep(bot.logPath, `"level":"warn"`, `"level":"error"`), 40), "\n"))
	}
	skipKnown(t, known, calls)
}

// memoryInfo is a field of Redis's INFO (memory and stats), 0 if absent.
func memoryInfo(ctx context.Context, rdb *redis.Client, field string) int64 {
	info, err := rdb.Info(ctx, "memory", "stats").Result()
	if err != nil {
		return 0
	}
	for line := range strings.Lines(info) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

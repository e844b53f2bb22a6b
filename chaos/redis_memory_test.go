//go:build chaos

package chaos

import (
	"context"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// TestRedisMemoryFull: one callbot instance under load on a Redis with maxmemory-policy
// noeviction (docs/deployment.md) whose maxmemory is set a little above what it uses, so that it
// fills within a second and stays at the limit, refusing writes while the deletes of calls
// that end free a little now and then (a pipeline may then have some of its writes taken and
// others refused); then the limit is lifted. On top of redisFaultUnderLoad's checks, Redis must
// evict nothing.
func TestRedisMemoryFull(t *testing.T) {
	const margin = 16 << 10 // bytes above used_memory: about 8 live calls' worth
	// how long Redis stays at its memory limit: past graphsim's retries, within what callbot
	// keeps of the notifications it refused
	full := envDuration(t, "CHAOS_MEMORY_FULL", 4*time.Second)
	ctx := context.Background()
	redisFaultUnderLoad(t, redisFault{
		what: fmt.Sprintf("maxmemory set %d bytes above used_memory", margin), lasts: full,
		prepare: func(rs *redisServer, rdb *redis.Client) error {
			return rdb.ConfigSet(ctx, "maxmemory-policy", "noeviction").Err()
		},
		inject: func(rs *redisServer, rdb *redis.Client) error {
			used := memoryInfo(ctx, rdb, "used_memory")
			return rdb.ConfigSet(ctx, "maxmemory", strconv.FormatInt(used+margin, 10)).Err()
		},
		end: func(rs *redisServer, rdb *redis.Client) error { return rdb.ConfigSet(ctx, "maxmemory", "0").Err() },
		check: func(rdb *redis.Client) {
			if n := memoryInfo(ctx, rdb, "evicted_keys"); n != 0 {
				t.Errorf("Redis evicted %d keys with noeviction", n)
			}
		},
	})
}

// redisFault is a fault of Redis that redisFaultUnderLoad injects: inject starts it, end ends it
// lasts later; prepare runs once callbot is up, check once every call is over.
type redisFault struct {
	what           string
	lasts          time.Duration
	prepare        func(*redisServer, *redis.Client) error
	inject, end    func(*redisServer, *redis.Client) error
	check          func(*redis.Client)
	transportError bool // a delivery may fail on its way (graphsim's client timed out) rather than be answered
}

// redisFaultUnderLoad runs one callbot instance on a redis-server of its own, places 60 calls
// one every 100 ms, injects f before the 15th (t ≈ 1.5 s) and ends it f.lasts later. The
// webhook must answer nothing but 2xx and 503 (a 500 would make Graph drop the notification),
// and some 503 (else the fault was not felt); every caller must end as they chose (what Graph
// gave up delivering, callbot kept and applied); no agent may be offered two callers at once;
// and once the calls are over no caller may be left in a queue nor any agent reserved.
func redisFaultUnderLoad(t *testing.T, f redisFault) {
	const (
		calls   = 60
		every   = 100 * time.Millisecond // 60 calls in 6 s
		faultAt = 15                     // before call 15 (~1.5 s)
	)
	sd := seed(t)
	rs := startRedis(t, false)
	rdb := rs.client(t)
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	talk := time.Second
	sim, ca := newSim(t, "http://"+addr+"/api/calls", flowAgents(talk))
	env := baseEnv(sim, ca, rs.addr, "http://"+addr)
	bot := startCallbot(t, "bot", addr, env)
	time.Sleep(1200 * time.Millisecond)
	if f.prepare != nil {
		if err := f.prepare(rs, rdb); err != nil {
			t.Fatal(err)
		}
	}

	t0 := time.Now()
	var began, ended time.Time
	var faultErr error
	done := make(chan struct{})
	callers := placeCalls(t, sim, sd, calls, every, func(i int) {
		if i != faultAt {
			return
		}
		faultErr = f.inject(rs, rdb)
		began = time.Now()
		go func() {
			defer close(done)
			time.Sleep(f.lasts)
			if err := f.end(rs, rdb); err != nil && faultErr == nil {
				faultErr = err
			}
			ended = time.Now()
		}()
	})
	<-done
	if faultErr != nil {
		t.Fatalf("%s: %v", f.what, faultErr)
	}
	t.Logf("t=%s: %s; t=%s ended; %d calls placed by t=%s", since(t0, began), f.what, since(t0, ended), calls, since(t0, time.Now()))

	stuck := waitEnded(t, t0, callers, ended.Add(60*time.Second))
	known := judgeStuck(t, sim, rdb, stuck, bot)

	statuses := map[string]int{}
	var refused, gaveUp int
	for _, d := range sim.Deliveries() {
		st := strconv.Itoa(d.Status)
		if d.Err != "" {
			st = "error"
		}
		if d.Time.After(began) && d.Time.Before(ended) {
			statuses[st]++
		}
		switch {
		case d.Status == http.StatusServiceUnavailable || d.Err != "" && f.transportError:
			refused++
			if d.Attempt == 4 {
				gaveUp++
			}
		case d.Status < 200 || d.Status >= 300:
			t.Errorf("delivery %s %s (attempt %d) at t=%s answered %s: want 2xx, or 503 while Redis cannot take it",
				d.State, d.ResourceURL, d.Attempt, since(t0, d.Time), st)
		}
	}
	if refused == 0 {
		t.Errorf("no delivery was answered 503: the fault was not felt, the test proved nothing (deliveries during it: %v)", statuses)
	}
	if f.check != nil {
		f.check(rdb)
	}

	counts, misrouted := checkOutcomesKept(t, callers, true, bot)
	known = append(known, misrouted...)
	offered, accepted := checkAgents(t, sim)

	checkNothingWaiting(t, rdb)
	m := scrapeMetrics(t, bot.url())
	t.Logf("summary: %d calls, outcomes [%s]; deliveries during the fault [%s]; refused %d, given up by graphsim %d; "+
		"kept %v, applied from what was kept %v; agents offered %d, accepted %d; callbot warnings %d, errors %d",
		calls, fmtCounts(counts), fmtCounts(statuses), refused, gaveUp, m["callbot_notifications_kept_total"],
		m["callbot_notifications_kept_applied_total"], offered, accepted,
		countLines(bot.logPath, `"level":"warn"`), countLines(bot.logPath, `"level":"error"`))
	if t.Failed() {
		t.Logf("callbot warnings and errors:\n%s", strings.Join(lastN(grep(bot.logPath, `"level":"warn"`, `"level":"error"`), 40), "\n"))
	}
	skipKnown(t, known, calls)
}

// TestRedisStall: Redis stops answering without dying (SIGSTOP: a fork or an fsync that stalls
// it, a VM paused) for CHAOS_REDIS_STALL (default 8 s: past go-redis's 3 s read timeout and the
// webhook's 5 s, so that requests fail; a 4 s stall is only waited out), then carries on
// (SIGCONT) and executes what was sent to it meanwhile, the writes whose callers had given up on
// them included: a save answered 503 may have taken effect, as with a reply lost. Graph's
// client gives up on a delivery that waits past its timeout (a transport error, delivered
// again). redisFaultUnderLoad's checks.
func TestRedisStall(t *testing.T) {
	stall := envDuration(t, "CHAOS_REDIS_STALL", 8*time.Second)
	signal := func(sig syscall.Signal) func(*redisServer, *redis.Client) error {
		return func(rs *redisServer, _ *redis.Client) error {
			rs.mu.Lock()
			defer rs.mu.Unlock()
			return rs.cmd.Process.Signal(sig)
		}
	}
	redisFaultUnderLoad(t, redisFault{what: "Redis stopped (SIGSTOP)", lasts: stall,
		inject: signal(syscall.SIGSTOP), end: signal(syscall.SIGCONT), transportError: true})
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

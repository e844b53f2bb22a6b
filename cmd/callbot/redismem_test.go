package main

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/redistest"
)

func TestParseMemoryInfo(t *testing.T) {
	// an excerpt of Redis 7's INFO, with its CRLF line ends
	info := strings.ReplaceAll(`# Memory
used_memory:1048576
used_memory_human:1.00M
maxmemory:2097152
maxmemory_human:2.00M
maxmemory_policy:volatile-lru

# Stats
evicted_keys:12
`, "\n", "\r\n")
	m, ok := parseMemoryInfo(info)
	if !ok || m != (masterMemory{Policy: "volatile-lru", Max: 2 << 20, Used: 1 << 20, Evicted: 12}) || !m.evicts() {
		t.Errorf("parsed %+v, %v (evicts %v); want volatile-lru, 2 MiB of 1 MiB used, 12 evicted, evicting", m, ok, m.evicts())
	}
	// miniredis answers INFO with clients and stats only: nothing to say of its memory
	if m, ok := parseMemoryInfo("# Clients\r\nconnected_clients:1\r\n# Stats\r\ntotal_connections_received:1\r\n"); ok {
		t.Errorf("parsed %+v from an INFO without a memory section", m)
	}
	for _, c := range []struct {
		m    masterMemory
		want bool
	}{
		{masterMemory{Policy: "noeviction", Max: 100}, false},
		{masterMemory{Policy: "allkeys-lru", Max: 100}, true},
		{masterMemory{Policy: "allkeys-lru"}, false}, // no maxmemory: Redis never evicts
	} {
		if c.m.evicts() != c.want {
			t.Errorf("%+v evicts: %v, want %v", c.m, c.m.evicts(), c.want)
		}
	}
}

// realRedis is a redis-server of the test's own (the watch reads what only a real one reports).
func realRedis(t *testing.T) *redis.Client {
	t.Helper()
	srv := redistest.Start(t)
	if !srv.Real {
		t.Skip("needs redis-server")
	}
	return srv.Client(t)
}

func configSet(t *testing.T, rdb *redis.Client, kv ...string) {
	t.Helper()
	for i := 0; i < len(kv); i += 2 {
		if err := rdb.ConfigSet(context.Background(), kv[i], kv[i+1]).Err(); err != nil {
			t.Fatalf("CONFIG SET %s %s: %v", kv[i], kv[i+1], err)
		}
	}
}

// logsAt returns the messages logged at lvl, and forgets every entry.
func logsAt(logs *observer.ObservedLogs, lvl zapcore.Level) []string {
	var out []string
	for _, e := range logs.TakeAll() {
		if e.Level == lvl {
			out = append(out, e.Message)
		}
	}
	return out
}

func oneContaining(t *testing.T, what string, msgs []string, part string) {
	t.Helper()
	if len(msgs) != 1 || !strings.Contains(msgs[0], part) {
		t.Errorf("%s: %q, want one message saying %q", what, msgs, part)
	}
}

func TestRedisMemoryWarnsOfAPolicyThatEvicts(t *testing.T) {
	rdb := realRedis(t)
	ctx := context.Background()
	core, logs := observer.New(zap.DebugLevel)
	m := &redisMemory{rdb: rdb, log: zap.New(core)}

	m.look(ctx) // redis-server's defaults: noeviction, no maxmemory
	if f := m.figures(); !f.Read || f.Evicting != 0 || f.Limited || f.Evicted != 0 {
		t.Errorf("defaults read as %+v, want read, nothing evicting, no limit", f)
	}
	if got := logs.FilterLevelExact(zap.WarnLevel).Len() + logs.FilterLevelExact(zap.ErrorLevel).Len(); got != 0 {
		t.Errorf("%d warnings for a Redis that does not evict: %v", got, logs.All())
	}
	logs.TakeAll()

	// Azure Cache for Redis's default policy
	configSet(t, rdb, "maxmemory", "100mb", "maxmemory-policy", "volatile-lru")
	m.look(ctx)
	oneContaining(t, "warnings", logsAt(logs, zap.WarnLevel), "maxmemory-policy volatile-lru")
	if f := m.figures(); f.Evicting != 1 || !f.Limited || f.Ratio <= 0 || f.Ratio >= 0.5 {
		t.Errorf("figures %+v, want 1 evicting master, a small used ratio", f)
	}
	m.look(ctx) // nothing changed: nothing said again
	if msgs := logsAt(logs, zap.WarnLevel); len(msgs) != 0 {
		t.Errorf("warned again of the same policy: %q", msgs)
	}

	configSet(t, rdb, "maxmemory-policy", "noeviction")
	m.look(ctx)
	oneContaining(t, "info", logsAt(logs, zap.InfoLevel), "no longer evicts")
	if f := m.figures(); f.Evicting != 0 {
		t.Errorf("figures %+v after noeviction, want nothing evicting", f)
	}
}

func TestRedisMemoryReportsEvictionsAndAFullMemory(t *testing.T) {
	rdb := realRedis(t)
	ctx := context.Background()
	core, logs := observer.New(zap.DebugLevel)
	m := &redisMemory{rdb: rdb, log: zap.New(core)}
	used := func() int64 {
		info, err := rdb.Info(ctx, "memory").Result()
		if err != nil {
			t.Fatal(err)
		}
		mm, _ := parseMemoryInfo(info + "\nmaxmemory_policy:x\n")
		return mm.Used
	}

	// nearly full, with noeviction: writes will soon be refused
	configSet(t, rdb, "maxmemory", fmt.Sprint(used()+used()/20))
	m.look(ctx)
	oneContaining(t, "warnings", logsAt(logs, zap.WarnLevel), "refuses writes")
	if f := m.figures(); f.Ratio < memoryFullRatio {
		t.Errorf("used ratio %.3f, want past %.1f", f.Ratio, memoryFullRatio)
	}
	m.look(ctx)
	if msgs := logsAt(logs, zap.WarnLevel); len(msgs) != 0 {
		t.Errorf("warned again of the same full memory: %q", msgs)
	}
	configSet(t, rdb, "maxmemory", "1gb")
	m.look(ctx)
	oneContaining(t, "info", logsAt(logs, zap.InfoLevel), "no longer nearly full")

	// a policy that evicts, and keys written past the limit: Redis drops some
	configSet(t, rdb, "maxmemory", fmt.Sprint(used()+(1<<20)), "maxmemory-policy", "allkeys-random")
	m.look(ctx)
	logs.TakeAll()
	value := strings.Repeat("x", 1000)
	for i := range 4000 { // about 4 MB, past the 1 MB left
		if err := rdb.Set(ctx, fmt.Sprintf("k%d", i), value, 0).Err(); err != nil {
			t.Fatal(err)
		}
	}
	m.look(ctx)
	errs := logsAt(logs, zap.ErrorLevel)
	oneContaining(t, "errors", errs, "keys: call records, queue entries or timers may be lost")
	f := m.figures()
	if f.Evicted == 0 || !strings.Contains(errs[0], fmt.Sprintf("evicted %d keys", f.Evicted)) {
		t.Errorf("evicted %d keys in the figures, error %q: want the count Redis gives", f.Evicted, errs)
	}

	// an instance that starts on a Redis that has evicted already says so at once
	core2, logs2 := observer.New(zap.DebugLevel)
	m2 := &redisMemory{rdb: rdb, log: zap.New(core2)}
	m2.look(ctx)
	warns := logsAt(logs2, zap.WarnLevel)
	all := strings.Join(warns, "|")
	if len(warns) != 3 || !strings.Contains(all, "maxmemory-policy allkeys-random") || !strings.Contains(all, "has evicted") ||
		!strings.Contains(all, "nearly full: past maxmemory it evicts keys") {
		t.Errorf("warnings at start %q, want the policy, the keys evicted before and the memory full (Redis evicts at the limit)", warns)
	}
}

func TestRedisMemoryWithoutAMemorySection(t *testing.T) {
	rdb := redis.NewClient(&redis.Options{Addr: miniredis.RunT(t).Addr()})
	defer rdb.Close()
	core, logs := observer.New(zap.DebugLevel)
	m := &redisMemory{rdb: rdb, log: zap.New(core)}
	m.look(context.Background())
	m.look(context.Background())
	oneContaining(t, "info", logsAt(logs, zap.InfoLevel), "not watched")
	if f := m.figures(); f.Read {
		t.Errorf("figures %+v from a Redis that reports no memory", f)
	}
}

func TestRedisMemoryOnEveryClusterMaster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a Redis Cluster")
	}
	cluster := redistest.StartCluster(t)
	rdb := cluster.Client(t)
	ctx := context.Background()
	addrs := cluster.Addrs()
	one := cluster.NodeClient(t, addrs[1])
	configSet(t, one, "maxmemory", "100mb", "maxmemory-policy", "allkeys-lru")
	core, logs := observer.New(zap.DebugLevel)
	m := &redisMemory{rdb: rdb, log: zap.New(core)}
	deadline := time.Now().Add(10 * time.Second)
	for len(m.masters) < 3 && time.Now().Before(deadline) { // the client learns the slot map
		m.look(ctx)
	}
	if f := m.figures(); len(m.masters) != 3 || f.Evicting != 1 {
		t.Fatalf("masters read %v, figures %+v: want 3 masters, 1 evicting", m.masters, f)
	}
	warns := logs.FilterLevelExact(zap.WarnLevel).All()
	if len(warns) != 1 || warns[0].ContextMap()["redis"] != addrs[1] {
		t.Errorf("warnings %v, want one naming %s", warns, addrs[1])
	}
}

// TestE2ERedisMemoryFullLosesNoCaller: a Redis whose memory is full (maxmemory-policy
// noeviction, the setting docs/deployment.md asks for) refuses callbot's writes. The incoming
// call is answered 503, so Graph delivers it again; nothing of it is written; and once memory
// is freed the caller is answered and reaches the agent, even after Graph gave up delivering.
func TestE2ERedisMemoryFullLosesNoCaller(t *testing.T) {
	var srv *redistest.Server
	w := startWorld(t, func(t *testing.T) string {
		if srv = redistest.Start(t); !srv.Real {
			t.Skip("needs redis-server: miniredis has no maxmemory")
		}
		return "redis://" + srv.Addr + "/0"
	}, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	rdb := srv.Client(t)
	ctx := context.Background()

	configSet(t, rdb, "maxmemory", "1") // far below what Redis uses: every write refused
	c, err := w.sim.PlaceCall(ctx, graphsim.CallerSpec{From: graph.Party{Kind: graph.KindPhone, ID: "+14255550100"},
		To: demoAccount, Digits: "1"})
	if c == nil {
		t.Fatalf("place call: %v", err)
	}
	if err == nil {
		t.Fatal("callbot acknowledged the incoming call while Redis refused every write")
	}
	var statuses []int
	for _, d := range w.sim.Deliveries() {
		if d.CallID == c.ID() {
			statuses = append(statuses, d.Status)
		}
	}
	if len(statuses) < 2 || slices.ContainsFunc(statuses, func(s int) bool { return s != http.StatusServiceUnavailable }) {
		t.Errorf("deliveries of the incoming call answered %v, want 503 to each (Graph delivers it again)", statuses)
	}
	// nothing of the call was written: no record, no entry in the live calls
	if keys, err := rdb.Keys(ctx, "*"+graph.CallKey(c.ID())+"*").Result(); err != nil || len(keys) > 0 {
		t.Errorf("keys of the call written while Redis refused writes: %v %v", keys, err)
	}
	if live, err := rdb.ZRange(ctx, "cb:{active}", 0, -1).Result(); err != nil || slices.Contains(live, graph.CallKey(c.ID())) {
		t.Errorf("the call is listed live while Redis refused writes: %v %v", live, err)
	}

	configSet(t, rdb, "maxmemory", "0") // memory freed
	r := waitDone(t, c, 20*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 {
		t.Errorf("caller experienced %+v; want answered and transferred to %s once Redis took writes again", r, agent1)
	}
	// (the look for the call's keys above would find its record, kept a while after the end)
	if keys, err := rdb.Keys(ctx, "*"+graph.CallKey(c.ID())+"*").Result(); err != nil || len(keys) == 0 {
		t.Errorf("no key of the call once it was served: %v %v", keys, err)
	}
}

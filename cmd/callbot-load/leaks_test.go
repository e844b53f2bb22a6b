package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/redistest"
)

func TestKeyPattern(t *testing.T) {
	for key, want := range map[string]string{
		"cb:{call:0a1b2c}":                       "cb:{call:*}",
		"cb:{outbox}":                            "cb:{outbox}",
		"cb:{tenant:3f2b-8c1d}:queue:load":       "cb:{tenant:*}:queue:load",
		"cb:{tenant:3f2b-8c1d}:reserving:AB12CD": "cb:{tenant:*}:reserving:*",
		"cb:{lease:reconcile}":                   "cb:{lease:reconcile}",
	} {
		if got := keyPattern(key); got != want {
			t.Errorf("keyPattern(%q) = %q, want %q", key, got, want)
		}
	}
}

// The snapshot reads keys by pattern, entries of the structures, and which call records still
// have a live call's TTL, from a real redis-server; callbot's figures are -1 when /metrics is
// not there.
func TestLeakSnapshot(t *testing.T) {
	srv := redistest.Start(t)
	rdb := srv.Client(t)
	ctx := context.Background()
	rdb.HSet(ctx, "cb:{call:a}", "v", 1)
	rdb.PExpire(ctx, "cb:{call:a}", 26*time.Hour)
	rdb.HSet(ctx, "cb:{call:b}", "v", 2)
	rdb.PExpire(ctx, "cb:{call:b}", 4*time.Hour)
	rdb.ZAdd(ctx, "cb:{outbox}", redisZ(1, "a"), redisZ(2, "b"))
	rdb.ZAdd(ctx, "cb:{tenant:T}:cool", redisZ(1, "x"), redisZ(2, "y"), redisZ(3, "z"))
	rdb.HSet(ctx, "cb:{tenant:T}:busy", "x", "a")
	rdb.Set(ctx, "cb:{lease:reconcile}", "me", time.Minute)

	w := &world{redisAddr: srv.Addr, botURL: "http://127.0.0.1:1"}
	s, err := w.leakSnapshot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for p, n := range map[string]int64{"cb:{call:*}": 2, "cb:{outbox}": 1, "cb:{tenant:*}:cool": 1, "cb:{lease:reconcile}": 1} {
		if s.Keys[p] != n {
			t.Errorf("keys %s: %d, want %d (%v)", p, s.Keys[p], n, s.Keys)
		}
	}
	for p, n := range map[string]int64{"cb:{outbox}": 2, "cb:{tenant:*}:cool": 3, "cb:{tenant:*}:busy": 1} {
		if s.Entries[p] != n {
			t.Errorf("entries %s: %d, want %d (%v)", p, s.Entries[p], n, s.Entries)
		}
	}
	if s.LiveTTL != 1 {
		t.Errorf("%d call records with a live TTL, want 1", s.LiveTTL)
	}
	if s.Goroutines != -1 || s.RSS != -1 {
		t.Errorf("callbot's figures without /metrics: %+v", s)
	}
}

func redisZ(score float64, m string) redis.Z { return redis.Z{Score: score, Member: m} }

func TestCompareLeaks(t *testing.T) {
	snap := func(keys, entries map[string]int64, live, goroutines, rss int64) LeakSnapshot {
		return LeakSnapshot{Keys: keys, Entries: entries, LiveTTL: live, Goroutines: goroutines, Heap: -1, RSS: rss, FDs: 20}
	}
	before := snap(map[string]int64{"cb:{call:*}": 10, "cb:{outbox}": 1, "cb:{tenant:*}:cool": 1},
		map[string]int64{"cb:{outbox}": 10, "cb:{tenant:*}:cool": 10}, 0, 20, 20<<20)

	clean := compareLeaks(before, snap(map[string]int64{"cb:{call:*}": 2010, "cb:{tenant:*}:cool": 1},
		map[string]int64{"cb:{tenant:*}:cool": 200}, 0, 22, 24<<20), 2000, 15*time.Second)
	if len(clean.Residue) != 0 {
		t.Errorf("residue of a clean run (records with an ended TTL, the outbox gone, agents cooling): %v", clean.Residue)
	}
	if clean.Per1000["goroutines"] != 1 || clean.Per1000["rss_bytes"] != 2<<20 {
		t.Errorf("per 1,000 calls: %v, want 1 goroutine and 2 MB", clean.Per1000)
	}
	if _, ok := clean.Per1000["heap_bytes"]; ok {
		t.Errorf("per 1,000 calls: %v; the heap was not read", clean.Per1000)
	}
	if text := clean.text(); !strings.Contains(text, "residue: none") || !strings.Contains(text, "rss +2.00 MB") {
		t.Errorf("text:\n%s", text)
	}

	leaky := compareLeaks(before, snap(map[string]int64{"cb:{call:*}": 2010, "cb:{outbox}": 1, "cb:{active}": 1, "cb:{tenant:*}:cool": 1},
		map[string]int64{"cb:{outbox}": 11, "cb:{active}": 3, "cb:{tenant:*}:cool": 200}, 4, 20, 20<<20), 2000, 15*time.Second)
	want := []string{"4 call records", "cb:{active}: 1 keys", "cb:{outbox}: 11 entries"}
	if len(leaky.Residue) != len(want) {
		t.Fatalf("residue %q, want %d lines", leaky.Residue, len(want))
	}
	for i, w := range want {
		if !strings.HasPrefix(leaky.Residue[i], w) {
			t.Errorf("residue[%d] = %q, want it to start with %q", i, leaky.Residue[i], w)
		}
	}
	if text := leaky.text(); strings.Count(text, "RESIDUE") != 3 {
		t.Errorf("text:\n%s", text)
	}
}

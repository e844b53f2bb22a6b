package clock_test

import (
	"context"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/clock"
	"github.com/callbot/callbot/internal/redistest"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// skewed is a clock that follows rdb from a host whose clock is off by skew.
func skewed(rdb redis.UniversalClient, skew time.Duration, log *zap.Logger) *clock.Redis {
	c := clock.New(rdb, "t", log)
	c.Local = func() time.Time { return time.Now().Add(skew) }
	return c
}

// A host whose clock is off, either way, tells the time of the Redis it shares with the other
// instances once synced; here Redis runs on this machine, so that time is this machine's.
func TestSyncCorrectsAHostClockThatIsOff(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	for _, skew := range []time.Duration{-20 * time.Second, -1500 * time.Millisecond, 0, 9 * time.Second, 3 * time.Hour} {
		c := skewed(rdb, skew, nil)
		if got := time.Until(c.Now()); (got - skew).Abs() > time.Millisecond {
			t.Fatalf("skew %v: before any sync Now is off by %v, want the host's own clock", skew, got)
		}
		if err := c.Sync(context.Background()); err != nil {
			t.Fatal(err)
		}
		if !c.Synced() {
			t.Errorf("skew %v: not synced after a Sync", skew)
		}
		if off := time.Until(c.Now()); off.Abs() > 50*time.Millisecond {
			t.Errorf("skew %v: synced Now is off by %v from Redis's time", skew, off)
		}
		if d := c.Offset() + skew; d.Abs() > 50*time.Millisecond {
			t.Errorf("skew %v: Offset %v, want about %v", skew, c.Offset(), -skew)
		}
	}
}

// An offset past a second is logged, once, with how far off the host is; a sync that finds the
// same offset again does not log it again; one back within a second says so.
func TestSyncLogsAClockThatIsOff(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	core, logs := observer.New(zap.InfoLevel)
	skew := -30 * time.Second
	c := clock.New(rdb, "t", zap.New(core))
	c.Local = func() time.Time { return time.Now().Add(skew) }
	ctx := context.Background()
	for range 3 {
		if err := c.Sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	warned := logs.FilterLevelExact(zap.WarnLevel).All()
	if len(warned) != 1 {
		t.Fatalf("%d warnings over three syncs 30 s off, want 1: %v", len(warned), warned)
	}
	if d, ok := warned[0].ContextMap()["redis_minus_host"].(time.Duration); !ok || (d-30*time.Second).Abs() > time.Second {
		t.Errorf("warning gives redis_minus_host %v, want about 30s", warned[0].ContextMap()["redis_minus_host"])
	}
	skew = 0 // NTP fixed the host
	if err := c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	if n := logs.FilterMessageSnippet("back within a second").Len(); n != 1 {
		t.Errorf("%d lines saying the clock is back, want 1", n)
	}
}

// While Redis cannot be reached, Sync fails and the offset measured before holds.
func TestSyncKeepsTheOffsetWhileRedisIsDown(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	c := skewed(rdb, -10*time.Second, nil)
	ctx := context.Background()
	if err := c.Sync(ctx); err != nil {
		t.Fatal(err)
	}
	off := c.Offset()
	down := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", MaxRetries: -1, DialTimeout: 100 * time.Millisecond})
	defer down.Close()
	c2 := skewed(down, -10*time.Second, nil)
	if err := c2.Sync(ctx); err == nil {
		t.Fatal("Sync against no Redis succeeded")
	}
	if c2.Synced() || c2.Offset() != 0 {
		t.Errorf("a clock never synced: synced %v, offset %v; want false, 0", c2.Synced(), c2.Offset())
	}
	rdb.Close()
	if err := c.Sync(ctx); err == nil {
		t.Fatal("Sync on a closed client succeeded")
	}
	if c.Offset() != off {
		t.Errorf("offset %v after a failed sync, want %v kept", c.Offset(), off)
	}
}

// In a Redis Cluster the TIME goes to one master, the same for every instance: the script is
// routed by its key.
func TestSyncOnACluster(t *testing.T) {
	cl := redistest.StartCluster(t)
	c := skewed(cl.Client(t), 5*time.Second, nil)
	if err := c.Sync(context.Background()); err != nil {
		t.Fatal(err)
	}
	if off := time.Until(c.Now()); off.Abs() > 50*time.Millisecond {
		t.Errorf("synced Now is off by %v", off)
	}
}

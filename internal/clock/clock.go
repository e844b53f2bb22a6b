// Package clock gives every callbot instance one time: Redis's.
//
// Instances decide with their own clock and write what they decided to Redis for the others: a
// timer due at now+5 s, an outbox leased until now+8 s, an agent idle since now, cooling down
// until now+10 s. Another instance then compares those times with its own clock. An instance
// whose host clock is behind by more than a lease makes every other instance take its outboxes
// at once, while it is still sending them (a transfer could be sent twice), and fire its timers
// early (a menu's no-input timeout at once); one ahead does the same to everybody else's. NTP keeps
// hosts within milliseconds, but a VM resumed from a pause, a container on a host without NTP, or
// a step of the clock is enough.
//
// Redis is the one place every instance already reaches, so its clock is the reference: Redis
// measures this host's offset from Redis's TIME (the sample with the shortest round trip of a
// few, taken as at its midpoint) and Now is the host's clock corrected by it. The TIME runs in a
// script on a key with a fixed hash tag, so in a Redis Cluster every instance asks the same
// master. The offset is measured again every few seconds; while Redis cannot be reached the last
// offset holds.
package clock

import (
	"cmp"
	"context"
	"errors"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// timeScript returns Redis's TIME. It names a key (never read) only to be routed: in a Redis
// Cluster the same master answers every instance.
var timeScript = redis.NewScript(`return redis.call('TIME')`)

// samples is how many round trips one Sync takes; the shortest gives the offset.
const samples = 3

// WarnOffset is the offset past which Redis logs a warning: the host's clock is off by that
// much, and callbot would misbehave without the correction.
const WarnOffset = time.Second

// Redis is a clock that follows Redis's. The zero value is not usable: use New.
type Redis struct {
	rdb redis.UniversalClient
	key string
	log *zap.Logger
	// Local is the host's clock (time.Now; tests skew it).
	Local func() time.Time

	offset atomic.Int64 // Redis's clock minus Local, ns
	synced atomic.Bool  // a Sync succeeded once

	mu     sync.Mutex    // one Sync at a time
	warned time.Duration // the offset last logged
}

// New returns a clock that follows the Redis rdb, offset 0 until Sync. Its script names the key
// prefix:{clock} (prefix default "cb", as the stores' keys), which it never reads or writes.
func New(rdb redis.UniversalClient, prefix string, log *zap.Logger) *Redis {
	if log == nil {
		log = zap.NewNop()
	}
	return &Redis{rdb: rdb, key: cmp.Or(prefix, "cb") + ":{clock}", log: log, Local: time.Now}
}

// Now is the host's time corrected by the last offset measured.
func (c *Redis) Now() time.Time {
	return c.Local().Add(time.Duration(c.offset.Load()))
}

// Offset is Redis's clock minus the host's, as last measured (0 before the first Sync).
func (c *Redis) Offset() time.Duration { return time.Duration(c.offset.Load()) }

// Synced reports whether the offset was ever measured.
func (c *Redis) Synced() bool { return c.synced.Load() }

// Sync measures the offset again. On error the offset measured before stays.
func (c *Redis) Sync(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	best, bestRTT := time.Duration(0), time.Duration(math.MaxInt64)
	for range samples {
		sent := c.Local()
		v, err := timeScript.Run(ctx, c.rdb, []string{c.key}).Int64Slice()
		got := c.Local()
		if err != nil {
			return err
		}
		if len(v) != 2 {
			return errBadTime
		}
		rtt := got.Sub(sent)
		if rtt < 0 { // the host's clock stepped back meanwhile: no measure
			continue
		}
		redisNow := time.Unix(v[0], v[1]*int64(time.Microsecond))
		if rtt < bestRTT {
			best, bestRTT = redisNow.Sub(sent.Add(rtt/2)), rtt
		}
	}
	if bestRTT == math.MaxInt64 {
		return errBadTime
	}
	c.offset.Store(int64(best))
	c.synced.Store(true)
	c.report(best, bestRTT)
	return nil
}

// report logs an offset past WarnOffset, once, and again only when it moves by WarnOffset.
func (c *Redis) report(off, rtt time.Duration) {
	if (off - c.warned).Abs() < WarnOffset {
		return
	}
	c.warned = off
	if off.Abs() >= WarnOffset {
		c.log.Warn("this host's clock is off from Redis's; callbot follows Redis's (fix NTP on this host)",
			zap.Duration("redis_minus_host", off), zap.Duration("round_trip", rtt))
	} else {
		c.log.Info("this host's clock is back within a second of Redis's", zap.Duration("redis_minus_host", off))
	}
}

// unsyncedEvery is how often Run tries while the offset was never measured: until then the
// host's clock serves, however far off it is.
const unsyncedEvery = time.Second

// Run syncs every interval until ctx ends (the first at once, unless already synced). Until a
// sync has succeeded it tries every second: an instance that started while Redis could not be
// reached decides on its host's clock until then, and the other instances, on Redis's, would
// find its timers and outbox leases due early (a host 20 s behind: at once).
func (c *Redis) Run(ctx context.Context, every time.Duration) {
	if !c.Synced() {
		c.syncLogged(ctx)
	}
	for {
		wait := every
		if !c.Synced() {
			wait = min(every, unsyncedEvery)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
			c.syncLogged(ctx)
		}
	}
}

func (c *Redis) syncLogged(ctx context.Context) {
	if err := c.Sync(ctx); err != nil && ctx.Err() == nil {
		c.log.Debug("clock not synced with Redis's; the last offset holds", zap.Error(err), zap.Duration("offset", c.Offset()))
	}
}

var errBadTime = errors.New("clock: Redis's TIME gave no usable answer")

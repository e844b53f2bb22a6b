package main

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// redisMemory looks, for the admin, at what each Redis master does when its memory is full.
// With maxmemory-policy noeviction (docs/deployment.md) a full Redis refuses writes: the webhook
// answers 503 and Graph delivers the notification again, nothing lost. Any other policy evicts
// keys instead, without a word to callbot: a call's record (every record has a TTL, so the
// volatile-* policies, the default of Azure Cache for Redis, ElastiCache and Memorystore, take
// them first), a waiting caller's queue entry, a timer. So callbot reads INFO on every master at
// start and every redisMemoryEvery: it warns about a policy that evicts, warns when a master
// passes memoryFullRatio of its maxmemory (past it every notification would get 503), logs an
// error for every key evicted meanwhile, and shows all three in /metrics.
type redisMemory struct {
	rdb redis.UniversalClient
	log *zap.Logger

	mu      sync.Mutex
	masters map[string]masterMemory // by address, as last read; a master not read keeps its last
	read    bool                    // some master reported its memory
	full    map[string]bool         // past memoryFullRatio when last read (warned)
	quiet   bool                    // INFO gave no memory section: said once
}

// masterMemory is what INFO says of one master's memory.
type masterMemory struct {
	Policy  string // maxmemory_policy
	Max     int64  // maxmemory, bytes; 0: no limit
	Used    int64  // used_memory, bytes
	Evicted int64  // evicted_keys since the master started
}

// evicts reports whether the master drops keys when full: a policy other than noeviction, and a
// limit (with maxmemory 0 Redis never evicts).
func (m masterMemory) evicts() bool { return m.Policy != "noeviction" && m.Max > 0 }

const (
	redisMemoryEvery = 30 * time.Second
	// memoryFullRatio of maxmemory used is warned about; memoryEasedRatio says it is over.
	memoryFullRatio  = 0.9
	memoryEasedRatio = 0.8
)

// parseMemoryInfo reads a master's memory from the text of INFO; false when INFO has no memory
// section (an embedded Redis such as miniredis, or INFO renamed away).
func parseMemoryInfo(info string) (masterMemory, bool) {
	var m masterMemory
	policy, used := false, false
	for line := range strings.Lines(info) {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		switch k {
		case "maxmemory_policy":
			m.Policy, policy = v, true
		case "maxmemory":
			m.Max, _ = strconv.ParseInt(v, 10, 64)
		case "used_memory":
			m.Used, _ = strconv.ParseInt(v, 10, 64)
			used = true
		case "evicted_keys":
			m.Evicted, _ = strconv.ParseInt(v, 10, 64)
		}
	}
	return m, policy && used
}

// look reads every master's INFO and says what changed since the last look.
func (r *redisMemory) look(ctx context.Context) {
	read := map[string]masterMemory{}
	var mu sync.Mutex
	lookAt := func(ctx context.Context, c *redis.Client) error {
		info, err := c.Info(ctx).Result() // the default sections: memory and stats among them
		if err != nil {
			return err
		}
		m, ok := parseMemoryInfo(info)
		if !ok {
			return nil
		}
		mu.Lock()
		read[c.Options().Addr] = m
		mu.Unlock()
		return nil
	}
	var err error
	switch c := r.rdb.(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(ctx, lookAt)
	case *redis.Client:
		err = lookAt(ctx, c)
	default:
		return
	}
	if err != nil {
		r.log.Debug("redis memory not read", zap.Error(err))
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(read) == 0 {
		if err == nil && !r.read && !r.quiet {
			r.quiet = true
			r.log.Info("redis reports no memory section in INFO: its maxmemory-policy and evictions are not watched")
		}
		return
	}
	if r.masters == nil {
		r.masters, r.full = map[string]masterMemory{}, map[string]bool{}
	}
	if err == nil { // every master read: one no longer a master (failed over) is forgotten
		for addr := range r.masters {
			if _, ok := read[addr]; !ok {
				delete(r.masters, addr)
				delete(r.full, addr)
			}
		}
	}
	for _, addr := range slices.Sorted(maps.Keys(read)) {
		m := read[addr]
		last, known := r.masters[addr]
		r.masters[addr] = m
		fields := []zap.Field{zap.String("redis", addr), zap.String("maxmemory_policy", m.Policy), zap.Int64("maxmemory", m.Max)}
		switch {
		case m.evicts() && (!known || !last.evicts() || last.Policy != m.Policy):
			r.log.Warn("redis evicts keys when its memory is full (maxmemory-policy "+m.Policy+"): a call's record, a waiting caller's queue entry or a timer can vanish; set maxmemory-policy noeviction, with which a full Redis refuses writes and Graph delivers the notification again", fields...)
		case !m.evicts() && known && last.evicts():
			r.log.Info("redis no longer evicts keys when its memory is full", fields...)
		}
		switch {
		case !known && m.Evicted > 0:
			r.log.Warn(fmt.Sprintf("redis has evicted %d keys since it started: call state may have been lost before this instance started", m.Evicted), fields...)
		case known && m.Evicted > last.Evicted:
			r.log.Error(fmt.Sprintf("redis evicted %d keys: call records, queue entries or timers may be lost; set maxmemory-policy noeviction", m.Evicted-last.Evicted), fields...)
		case known && m.Evicted < last.Evicted && m.Evicted > 0: // the master restarted meanwhile
			r.log.Error(fmt.Sprintf("redis evicted %d keys (it restarted since the last look): call records, queue entries or timers may be lost; set maxmemory-policy noeviction", m.Evicted), fields...)
		}
		if m.Max == 0 {
			delete(r.full, addr) // no limit now: nothing to be full of
		} else {
			ratio := float64(m.Used) / float64(m.Max)
			fields = append(fields, zap.Int64("used_memory", m.Used), zap.Float64("used_ratio", ratio))
			switch {
			case ratio >= memoryFullRatio && !r.full[addr]:
				r.full[addr] = true
				if m.evicts() {
					r.log.Warn("redis memory nearly full: past maxmemory it evicts keys (call state lost)", fields...)
				} else {
					r.log.Warn("redis memory nearly full: past maxmemory it refuses writes, and every notification is answered 503 until memory is freed", fields...)
				}
			case ratio < memoryEasedRatio && r.full[addr]:
				delete(r.full, addr)
				r.log.Info("redis memory no longer nearly full", fields...)
			}
		}
	}
	r.read = true
}

// run looks every interval until ctx ends.
func (r *redisMemory) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		r.look(lctx)
		cancel()
	}
}

// memoryFigures is what /metrics shows of the masters' memory, as last read.
type memoryFigures struct {
	Read     bool    // a master reported its memory
	Evicting int     // masters that evict keys when full
	Limited  bool    // some master has a maxmemory
	Ratio    float64 // the fullest limited master's used_memory / maxmemory
	Evicted  int64   // keys the masters evicted since they started, summed
}

func (r *redisMemory) figures() memoryFigures {
	r.mu.Lock()
	defer r.mu.Unlock()
	f := memoryFigures{Read: r.read}
	for _, m := range r.masters {
		if m.evicts() {
			f.Evicting++
		}
		if m.Max > 0 {
			f.Limited = true
			f.Ratio = max(f.Ratio, float64(m.Used)/float64(m.Max))
		}
		f.Evicted += m.Evicted
	}
	return f
}

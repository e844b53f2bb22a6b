package main

import (
	"context"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// -leaks: what a run leaves behind once its calls ended (docs/performance.md, "Leaks").

// endedTTL is the TTL callbot gives an ended call's record (callstate.EndedTTL): a record with a
// longer one is still live for callbot, 26 h.
const endedTTL = 4 * time.Hour

// LeakSnapshot is what Redis and callbot hold at one moment.
type LeakSnapshot struct {
	// Keys counts keys by pattern (keyPattern); Entries the members or fields of the keys of each
	// pattern but call records (sorted sets, hashes, sets).
	Keys    map[string]int64 `json:"keys"`
	Entries map[string]int64 `json:"entries"`
	// LiveTTL counts call records whose TTL is a live call's (more than 4 h).
	LiveTTL int64 `json:"call_records_live_ttl"`
	// From callbot's /metrics; -1 when absent.
	Goroutines int64 `json:"goroutines"`
	Heap       int64 `json:"heap_bytes"`
	RSS        int64 `json:"rss_bytes"`
	FDs        int64 `json:"open_fds"`
}

// Leaks compares the snapshot taken before the calls with the one taken Settle after they ended.
type Leaks struct {
	Settle string       `json:"settle"`
	Calls  int          `json:"calls"`
	Before LeakSnapshot `json:"before"`
	After  LeakSnapshot `json:"after"`
	// Residue lists what stayed that should not: call records with a live TTL, and keys or
	// entries of the call, outbox, timer, queue and reservation structures that grew. The agent
	// records (routable, idle, free, cool, members) grow up to the number of agents and are not
	// counted.
	Residue []string `json:"residue"`
	// Per1000 is the growth of each process figure per 1,000 calls.
	Per1000 map[string]float64 `json:"per_1000_calls"`
}

var (
	patternCall   = regexp.MustCompile(`\{call:[^}]*\}`)
	patternTenant = regexp.MustCompile(`\{tenant:[^}]*\}`)
	patternDisp   = regexp.MustCompile(`:reserving:.*$`)
	agentRecords  = regexp.MustCompile(`:(routable|idle|free|cool|members:.*)$`)
)

// keyPattern names a key without the ids in it: cb:{call:*}, cb:{tenant:*}:queue:load...
func keyPattern(k string) string {
	k = patternCall.ReplaceAllString(k, "{call:*}")
	k = patternTenant.ReplaceAllString(k, "{tenant:*}")
	return patternDisp.ReplaceAllString(k, ":reserving:*")
}

func isCallRecord(pattern string) bool { return strings.Contains(pattern, "{call:*}") }

// leakSnapshot reads every key of the tool's redis-server and callbot's process figures.
func (w *world) leakSnapshot(ctx context.Context) (LeakSnapshot, error) {
	s := LeakSnapshot{Keys: map[string]int64{}, Entries: map[string]int64{}}
	c, err := dialRESP(w.redisAddr)
	if err != nil {
		return s, err
	}
	defer c.close()
	for cursor := "0"; ; {
		v, err := c.do("SCAN", cursor, "COUNT", "1000")
		page, ok := v.([]any)
		if err != nil || !ok || len(page) != 2 {
			return s, fmt.Errorf("scan: %v", err)
		}
		keys, _ := page[1].([]any)
		for _, k := range keys {
			key, _ := k.(string)
			p := keyPattern(key)
			s.Keys[p]++
			if isCallRecord(p) {
				if ms, _ := c.do("PTTL", key); ms != nil && ms.(int64) > endedTTL.Milliseconds() {
					s.LiveTTL++
				}
				continue
			}
			typ, _ := c.do("TYPE", key)
			cmd := map[any]string{"zset": "ZCARD", "hash": "HLEN", "set": "SCARD"}[typ]
			if cmd == "" {
				continue
			}
			if n, err := c.do(cmd, key); err == nil {
				s.Entries[p] += n.(int64)
			}
		}
		if cursor, _ = page[0].(string); cursor == "0" {
			break
		}
	}
	m := scrapeMetrics(ctx, w.botURL, "go_goroutines", "go_memstats_heap_alloc_bytes", "process_resident_memory_bytes", "process_open_fds")
	get := func(name string) int64 {
		if v, ok := m[name]; ok {
			return int64(v)
		}
		return -1
	}
	s.Goroutines, s.Heap = get("go_goroutines"), get("go_memstats_heap_alloc_bytes")
	s.RSS, s.FDs = get("process_resident_memory_bytes"), get("process_open_fds")
	return s, nil
}

// compareLeaks says what the run left behind.
func compareLeaks(before, after LeakSnapshot, calls int, settle time.Duration) *Leaks {
	l := &Leaks{Settle: settle.String(), Calls: calls, Before: before, After: after, Residue: []string{}, Per1000: map[string]float64{}}
	if after.LiveTTL > 0 {
		l.Residue = append(l.Residue, fmt.Sprintf("%d call records with a live call's TTL (26 h) after every call ended", after.LiveTTL))
	}
	patterns := slices.Sorted(maps.Keys(after.Keys))
	for _, p := range patterns {
		if isCallRecord(p) || agentRecords.MatchString(p) {
			continue
		}
		if strings.HasSuffix(p, ":{graph-reach}") && after.Entries[p] <= 1 {
			continue // one field per instance, written once its Graph requests have an answer
		}
		if after.Keys[p] > before.Keys[p] {
			l.Residue = append(l.Residue, fmt.Sprintf("%s: %d keys, %d before", p, after.Keys[p], before.Keys[p]))
		} else if after.Entries[p] > before.Entries[p] {
			l.Residue = append(l.Residue, fmt.Sprintf("%s: %d entries, %d before", p, after.Entries[p], before.Entries[p]))
		}
	}
	if calls > 0 {
		for name, v := range map[string][2]int64{"goroutines": {before.Goroutines, after.Goroutines}, "heap_bytes": {before.Heap, after.Heap},
			"rss_bytes": {before.RSS, after.RSS}, "open_fds": {before.FDs, after.FDs}} {
			if v[0] >= 0 && v[1] >= 0 {
				l.Per1000[name] = round(float64(v[1]-v[0])*1000/float64(calls), 2)
			}
		}
	}
	return l
}

// text is the report's section on leaks.
func (l *Leaks) text() string {
	var b strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	p("leaks (%d calls; read %s after they ended):", l.Calls, l.Settle)
	for _, k := range slices.Sorted(maps.Keys(mergeKeys(l.Before.Keys, l.After.Keys))) {
		line := fmt.Sprintf("  %-34s keys %6d -> %6d", k, l.Before.Keys[k], l.After.Keys[k])
		if isCallRecord(k) {
			line += fmt.Sprintf(" (%d with a live call's TTL)", l.After.LiveTTL)
		} else if l.Before.Entries[k]+l.After.Entries[k] > 0 {
			line += fmt.Sprintf(", entries %6d -> %6d", l.Before.Entries[k], l.After.Entries[k])
		}
		p("%s", line)
	}
	fig := func(name string, a, z int64, unit func(int64) string) {
		if a < 0 || z < 0 {
			p("  callbot %-12s not in /metrics", name)
			return
		}
		p("  callbot %-12s %s -> %s", name, unit(a), unit(z))
	}
	n := func(v int64) string { return strconv.FormatInt(v, 10) }
	fig("goroutines", l.Before.Goroutines, l.After.Goroutines, n)
	fig("heap", l.Before.Heap, l.After.Heap, mb)
	fig("rss", l.Before.RSS, l.After.RSS, mb)
	fig("open fds", l.Before.FDs, l.After.FDs, n)
	if len(l.Per1000) > 0 {
		var parts []string
		for _, k := range slices.Sorted(maps.Keys(l.Per1000)) {
			v := l.Per1000[k]
			if name, ok := strings.CutSuffix(k, "_bytes"); ok {
				parts = append(parts, fmt.Sprintf("%s %+.2f MB", name, v/(1<<20)))
				continue
			}
			parts = append(parts, fmt.Sprintf("%s %+.1f", k, v))
		}
		p("  per 1,000 calls: %s", strings.Join(parts, ", "))
	}
	if len(l.Residue) == 0 {
		p("  residue: none")
	}
	for _, r := range l.Residue {
		p("  RESIDUE: %s", r)
	}
	return b.String()
}

func mergeKeys(a, b map[string]int64) map[string]int64 {
	out := map[string]int64{}
	maps.Copy(out, a)
	maps.Copy(out, b)
	return out
}

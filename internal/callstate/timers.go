package callstate

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Timer is a durable timer of a call.
type Timer struct {
	Tenant string
	Call   string // call key
	Kind   TimerKind
	Token  int64
	At     time.Time // when it is due (when setting one)
	member string
}

// Member is the timer's entry in the sorted set.
func (t Timer) Member() string {
	if t.member != "" {
		return t.member
	}
	return member(t.Tenant, t.Call, t.Kind, t.Token)
}

func timersKey(prefix string) string { return prefix + ":{timers}" }

// Timers keeps durable timers in one Redis sorted set scored by due time (ms). Any instance
// claims due timers: a claim moves the timer's score forward by a lease, so a timer claimed by
// an instance that dies before finishing it becomes due again and another instance takes it.
type Timers struct {
	rdb redis.UniversalClient
	key string
}

// NewTimers returns the timer set of a key prefix (default "cb").
func NewTimers(rdb redis.UniversalClient, prefix string) *Timers {
	if prefix == "" {
		prefix = "cb"
	}
	return &Timers{rdb: rdb, key: timersKey(prefix)}
}

func member(tenant, call string, kind TimerKind, token int64) string {
	return tenant + "|" + call + "|" + string(kind) + "|" + strconv.FormatInt(token, 10)
}

// Set arms a timer to fire at at.
func (t *Timers) Set(ctx context.Context, tenant, call string, kind TimerKind, token int64, at time.Time) error {
	if err := t.rdb.ZAdd(ctx, t.key, redis.Z{Score: float64(at.UnixMilli()), Member: member(tenant, call, kind, token)}).Err(); err != nil {
		return fmt.Errorf("set timer %s of call %s: %w", kind, call, err)
	}
	return nil
}

var claimScript = redis.NewScript(`
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], m) end
return due`)

// Claim takes up to limit timers due at now, leasing them for lease.
func (t *Timers) Claim(ctx context.Context, now time.Time, lease time.Duration, limit int) ([]Timer, error) {
	res, err := claimScript.Run(ctx, t.rdb, []string{t.key}, now.UnixMilli(), now.Add(lease).UnixMilli(), limit).StringSlice()
	if err != nil {
		return nil, fmt.Errorf("claim timers: %w", err)
	}
	out := make([]Timer, 0, len(res))
	for _, m := range res {
		p := strings.Split(m, "|")
		if len(p) != 4 {
			t.rdb.ZRem(ctx, t.key, m) // not ours to understand; drop it
			continue
		}
		tok, _ := strconv.ParseInt(p[3], 10, 64)
		out = append(out, Timer{Tenant: p[0], Call: p[1], Kind: TimerKind(p[2]), Token: tok, member: m})
	}
	return out, nil
}

// Done removes a fired timer.
func (t *Timers) Done(ctx context.Context, tm Timer) error {
	return t.rdb.ZRem(ctx, t.key, tm.member).Err()
}

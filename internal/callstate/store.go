package callstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/graph"
)

// Store errors.
var (
	ErrNotFound = errors.New("call not found")
	ErrExists   = errors.New("call already exists")
	ErrConflict = errors.New("call changed concurrently")
)

// TTLs of call records: an active call may last a day (Graph drops calls without keepAlive
// after 45 minutes, but a connected call can run for hours); a finished one is kept long enough
// to absorb late and repeated notifications.
const (
	ActiveTTL = 26 * time.Hour
	EndedTTL  = 4 * time.Hour
)

// Store keeps call records in Redis: one hash per call, key cb:{call:KEY} (the hash tag makes
// every script touch one slot), fields v (version) and d (the JSON record).
type Store struct {
	rdb    redis.UniversalClient
	prefix string
}

// NewStore returns a store whose keys start with prefix (default "cb").
func NewStore(rdb redis.UniversalClient, prefix string) *Store {
	if prefix == "" {
		prefix = "cb"
	}
	return &Store{rdb: rdb, prefix: prefix}
}

func (s *Store) key(callKey string) string { return s.prefix + ":{call:" + callKey + "}" }

var createScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'd', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`)

var saveScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(v) + 1, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1`)

func ttl(c *Call) time.Duration {
	if c.State.Terminal() {
		return EndedTTL
	}
	return ActiveTTL
}

// Create stores a new call record with version 1. It returns ErrExists when the call has a
// record already (a repeated incoming notification).
func (s *Store) Create(ctx context.Context, c *Call) error {
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("create call %s: %w", c.ID, err)
	}
	n, err := createScript.Run(ctx, s.rdb, []string{s.key(graph.CallKey(c.ID))}, b, ttl(c).Milliseconds()).Int()
	if err != nil {
		return fmt.Errorf("create call %s: %w", c.ID, err)
	}
	if n == 0 {
		return ErrExists
	}
	c.Version = 1
	return nil
}

// Get loads a call. It returns ErrNotFound when there is no record.
func (s *Store) Get(ctx context.Context, callKey string) (Call, error) {
	vals, err := s.rdb.HMGet(ctx, s.key(callKey), "v", "d").Result()
	if err != nil {
		return Call{}, fmt.Errorf("get call %s: %w", callKey, err)
	}
	vs, _ := vals[0].(string)
	ds, _ := vals[1].(string)
	if vs == "" || ds == "" {
		return Call{}, ErrNotFound
	}
	var c Call
	if err := json.Unmarshal([]byte(ds), &c); err != nil {
		return Call{}, fmt.Errorf("get call %s: corrupt record: %w", callKey, err)
	}
	c.Version, err = strconv.ParseInt(vs, 10, 64)
	if err != nil {
		return Call{}, fmt.Errorf("get call %s: corrupt version %q", callKey, vs)
	}
	return c, nil
}

// Save writes c if the stored version is still c.Version, and bumps c.Version. It returns
// ErrConflict when another writer got there first.
func (s *Store) Save(ctx context.Context, c *Call) error {
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("save call %s: %w", c.ID, err)
	}
	n, err := saveScript.Run(ctx, s.rdb, []string{s.key(graph.CallKey(c.ID))}, strconv.FormatInt(c.Version, 10), b, ttl(c).Milliseconds()).Int()
	if err != nil {
		return fmt.Errorf("save call %s: %w", c.ID, err)
	}
	if n == 0 {
		return ErrConflict
	}
	c.Version++
	return nil
}

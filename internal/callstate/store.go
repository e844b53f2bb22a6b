package callstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/graph"
)

// Store errors.
var (
	ErrNotFound = errors.New("call not found")
	ErrExists   = errors.New("call already exists")
	ErrConflict = errors.New("call changed concurrently")
	// ErrNotReplicated: the write was applied on the master, but fewer replicas than the store
	// waits for (WaitForReplicas) acknowledged it in time, so a failover now could lose it. It
	// is a failed write: the notification is refused (503) and delivered again, and the commands
	// it decided wait in the outbox for the re-drive.
	ErrNotReplicated = errors.New("write not acknowledged by enough replicas")
)

// TTLs of call records: an active call may last a day (Graph drops calls without keepAlive
// after 45 minutes, but a connected call can run for hours); a finished one is kept long enough
// to absorb late and repeated notifications.
const (
	ActiveTTL = 26 * time.Hour
	EndedTTL  = 4 * time.Hour
)

// Store keeps call records in Redis: one hash per call, key cb:{call:KEY} (the hash tag makes
// every script touch one slot), fields v (version), d (the JSON record, outbox included), s and
// g (the acknowledgement watermarks of the outbox's storage and Graph commands). A sorted set
// cb:{outbox} indexes calls that may have unacknowledged commands, scored by the time after
// which another instance may re-drive them.
type Store struct {
	rdb    redis.UniversalClient
	prefix string
	index  string
	active string // sorted set of live calls (call key -> creation ms), for recovery
	timers string // the timers' sorted set (see Timers)
	// replicas a record write waits for (WAIT), and for how long; 0: none
	replicas       int
	replicaTimeout time.Duration
	// master counts the replicas of the master (standalone, Sentinel): how many a write waits
	// for at most
	master replicaCount
	// On Redis Cluster: the cluster client, and with replicas to wait for (onNodes) the count of
	// each master's replicas (by address: *replicaCount) and the fewest any master has had.
	cluster *redis.ClusterClient
	onNodes bool
	nodes   sync.Map
	fewest  atomic.Int64
	// Unreplicated counts writes that returned ErrNotReplicated: record writes (and Sync), and on
	// Redis Cluster also the writes waited for with Durably (queue writes, left in the outbox for
	// the re-drive; reservations, asked for again), which refuse no notification.
	Unreplicated atomic.Int64
}

// replicaCount is how many replicas a write on one master waits for at most: the most that
// master (its replid) has had connected and in sync; -1 before the first look.
type replicaCount struct {
	counted atomic.Int64
	mu      sync.Mutex
	replid  string
	peak    int64
}

// look reads the master's replication id and connected replicas (INFO replication on c), and
// counts the most replicas the master has had. It returns the replication id, and whether it
// could read them.
func (r *replicaCount) look(ctx context.Context, c redis.Cmdable) (string, bool) {
	info, err := c.Info(ctx, "replication").Result()
	if err != nil {
		return "", false
	}
	id, n, ok := replicationInfo(info)
	if !ok {
		return "", false
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if id != r.replid {
		r.replid, r.peak = id, 0 // another master (a promotion), or one restarted without its data
	}
	r.peak = max(r.peak, int64(n))
	r.counted.Store(r.peak)
	return id, true
}

// id is the replication id the last look read ("" before the first).
func (r *replicaCount) id() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.replid
}

// WaitForReplicas makes every write of a call record wait until n replicas have it (WAIT n, in
// the write's own round trip, so it covers everything written before it too: Redis replicates
// one ordered stream); a write they do not acknowledge within timeout returns ErrNotReplicated.
// A write waits for no more replicas than the current master has had connected and in sync
// (state=online: one still receiving the master's data does not count yet; WatchReplicas
// counts them per master_replid, which a promotion changes): a replica that drops off for a
// moment still counts, since Sentinel would still promote it, so writes are refused until it is
// back; a promoted master that is alone has no replica to fail over to and is not waited on.
//
// On Redis Cluster a record and the entries written with it live on different masters, and a
// WAIT covers only the master it is sent to: each master a write writes to is waited on, on the
// connection that wrote, and in an order that keeps a failover safe (writeOnNodes). The writes
// of queue commands that go with a save are then carried out as outbox commands, each waited for
// before it is acknowledged (WaitsOnNodes, Durably).
func (s *Store) WaitForReplicas(n int, timeout time.Duration) {
	s.replicas, s.replicaTimeout = n, timeout
	s.master.counted.Store(-1)
	s.fewest.Store(-1)
	s.onNodes = s.cluster != nil && n > 0
}

// WatchReplicas looks at the master's replicas (INFO replication) every interval until ctx
// ends, for WaitForReplicas. A failed look keeps the last count.
func (s *Store) WatchReplicas(ctx context.Context, every time.Duration) {
	if s.replicas == 0 {
		return
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		rctx, cancel := context.WithTimeout(ctx, every)
		if s.onNodes {
			s.lookAtMasters(rctx)
		} else {
			s.master.look(rctx, s.rdb)
		}
		cancel()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// ConnectedReplicas is the most replicas the current master has had connected and in sync; -1 before the
// first look. A write waits for the smaller of this and WaitForReplicas' n. On Redis Cluster it
// is the fewest of any master's (each master's own count is what a write on it waits for).
func (s *Store) ConnectedReplicas() int64 {
	if s.onNodes {
		return s.fewest.Load()
	}
	return s.master.counted.Load()
}

// replicationInfo reads master_replid and the replicas in sync from INFO replication: those
// whose `slaveN:` line says state=online. A replica that has just connected and is still being
// sent the master's data (state wait_bgsave or send_bulk: with Redis 7's default diskless sync
// it waits 5 s before the transfer begins) has none of the master's writes yet, and Sentinel
// would not promote it (its link to the master is down): counted, it made every write wait for
// it until its sync was over, refused as unreplicated, so a master promoted alone stopped
// callbot for the whole sync when a replica joined it (the old master back, or a new node),
// though a failover then had nowhere to go and nothing was made safer. connected_slaves must be
// there (a reply without it is no INFO replication).
func replicationInfo(info string) (replid string, online int, ok bool) {
	found := 0
	for _, line := range strings.Split(info, "\n") {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "connected_slaves:"); ok {
			if _, err := strconv.Atoi(v); err != nil {
				return "", 0, false
			}
			found++
		}
		if v, ok := strings.CutPrefix(line, "master_replid:"); ok {
			replid = v
			found++
		}
		if name, fields, ok := strings.Cut(line, ":"); ok && strings.HasPrefix(name, "slave") && name != "slave_read_only" {
			if _, err := strconv.Atoi(strings.TrimPrefix(name, "slave")); err == nil &&
				slices.Contains(strings.Split(fields, ","), "state=online") {
				online++
			}
		}
	}
	return replid, online, found == 2
}

// replicated checks the answer to a WAIT for need replicas, sent to the master c whose replicas
// r counts; sent is the replication id r had when the write was sent. A short one is looked at
// again: the write may have gone to a master promoted since the last look, alone (nothing to
// fail over to, so nothing to wait for). But if the look finds another master than the one the
// write was sent to (sent), the WAIT may have been the old master's (its replica stalled, the
// failover under way, a partition keeping it alive): the write counts only if the master now
// serving has it (has; nil: it cannot tell, refused), or a failover that lost it would be
// acknowledged. A write sent before any look succeeded (sent "": an instance just started, or
// whose looks have failed since) cannot tell which master it went to, and is checked the same way.
func (s *Store) replicated(ctx context.Context, c redis.Cmdable, r *replicaCount, wait *redis.Cmd, need int, sent string, has func(context.Context) bool) error {
	got, err := wait.Int64()
	if err == nil && got >= int64(need) {
		return nil
	}
	if err == nil {
		if id, ok := r.look(ctx, c); ok && got >= int64(s.replicasToWaitOn(r)) &&
			(sent != "" && id == sent || has != nil && has(ctx)) {
			return nil
		}
	}
	s.Unreplicated.Add(1)
	return fmt.Errorf("%w: %d of %d within %s (%v)", ErrNotReplicated, got, need, s.replicaTimeout, err)
}

// holds returns whether the record of key on c is the one a write made: version v, data d.
func holds(c redis.Cmdable, key, v string, d []byte) func(context.Context) bool {
	return func(ctx context.Context) bool {
		vals, err := c.HMGet(ctx, key, "v", "d").Result()
		if err != nil || len(vals) != 2 {
			return false
		}
		gv, _ := vals[0].(string)
		gd, _ := vals[1].(string)
		return gv == v && gd == string(d)
	}
}

// Sync waits until the replicas a write waits for have everything the master has, for a change
// callbot acknowledges without writing it: a notification delivered again after its change was
// refused as unreplicated finds the change on the master (a repeated incoming, an ignored event)
// and would be acknowledged while no replica has it. A write of its own on the same connection
// (a key of the store's) makes the WAIT cover the master's whole stream so far. ErrNotReplicated
// as for a write; nil at once when the store waits for no replica. On Redis Cluster the master
// waited on is the one of the call's record (callKey): what a change writes elsewhere is
// replicated before its record is written.
func (s *Store) Sync(ctx context.Context, callKey string) error {
	if s.onNodes {
		return s.Durably(ctx, s.key(callKey), nil)
	}
	need := s.replicasToWait()
	if need == 0 {
		return nil
	}
	sent := s.master.id()
	var wait *redis.Cmd
	_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, s.prefix+":{sync}", 1, time.Minute)
		wait = p.Do(ctx, "WAIT", need, s.replicaTimeout.Milliseconds())
		return nil
	})
	if err != nil {
		return err
	}
	return s.replicated(ctx, s.rdb, &s.master, wait, need, sent, nil)
}

// replicasToWait is how many replicas a write waits for now (standalone, Sentinel).
func (s *Store) replicasToWait() int { return s.replicasToWaitOn(&s.master) }

// replicasToWaitOn is how many replicas a write on the master r counts waits for now.
func (s *Store) replicasToWaitOn(r *replicaCount) int {
	n := int64(s.replicas)
	if c := r.counted.Load(); c >= 0 {
		n = min(n, c)
	}
	return int(n)
}

// NewStore returns a store whose keys start with prefix (default "cb").
func NewStore(rdb redis.UniversalClient, prefix string) *Store {
	if prefix == "" {
		prefix = "cb"
	}
	s := &Store{rdb: rdb, prefix: prefix, index: prefix + ":{outbox}", active: prefix + ":{active}", timers: timersKey(prefix)}
	s.cluster, _ = rdb.(*redis.ClusterClient)
	return s
}

func (s *Store) key(callKey string) string { return s.prefix + ":{call:" + callKey + "}" }

var createScript = redis.NewScript(`
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[3], 'd', ARGV[1], 's', 0, 'g', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1`)

var saveScript = redis.NewScript(`
local v = redis.call('HGET', KEYS[1], 'v')
if v ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(v) + 1, 'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1`)

// ackScript records that a batch of one kind's commands is done: the commands of that kind after
// prev up to hi. ARGV: the watermark field, the field of batches done ahead of it, prev, hi.
// The watermark moves to hi when every command of the kind up to prev is done; otherwise the batch
// waits in the second field ("prev:hi,...") until the watermark reaches its prev. So a batch
// another instance finished first does not retire an older batch nobody has sent yet.
var ackScript = redis.NewScript(`
local w = redis.call('HGET', KEYS[1], ARGV[1])
if not w then return 0 end
w = tonumber(w)
local pend = redis.call('HGET', KEYS[1], ARGV[2])
local list = {{tonumber(ARGV[3]), tonumber(ARGV[4])}}
if pend then
  for p, h in string.gmatch(pend, '(%d+):(%d+)') do list[#list + 1] = {tonumber(p), tonumber(h)} end
end
local moved = true
while moved do
  moved = false
  for i = #list, 1, -1 do
    if list[i][1] <= w or list[i][2] <= w then
      if list[i][2] > w then w = list[i][2] end
      table.remove(list, i)
      moved = true
    end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], w)
if #list > 0 then
  local out = {}
  for _, e in ipairs(list) do out[#out + 1] = e[1] .. ':' .. e[2] end
  redis.call('HSET', KEYS[1], ARGV[2], table.concat(out, ','))
elseif pend then
  redis.call('HDEL', KEYS[1], ARGV[2])
end
return 1`)

func ttl(c *Call) time.Duration {
	if c.State.Terminal() {
		return EndedTTL
	}
	return ActiveTTL
}

// zadd is a sorted-set entry written ahead of a record.
type zadd struct {
	key    string
	score  int64
	member string
	nx     bool // only if the entry is missing: one there keeps its score
	// lower: only if the entry is missing or due later (lowerScoreScript): a create's.
	lower bool
}

// lowerScoreScript adds a sorted-set entry, or lowers its score; it never raises it. A create's
// writes ahead of its record use it (the outbox index entry, the timers), so that a create
// repeated (Graph delivered the incoming again, the instance applied again what it kept), which
// finds the record made, never puts off the lease or the timers of the create that made it.
// Before, a create swapped its own due in and put back the one it had seen when it found the
// record made; the creates of a call queued behind a stalled Redis reached it one behind the
// other and undid each other's puts-back, and the outbox's lease and the answer's timer ended at
// a later create's, past Graph's answer deadline: the caller was never answered (TestRedisStall,
// TestRepeatedCreatesQueuedBehindAStallKeepTheFirstLeaseAndTimers). Now they end at the earliest
// create's, no later than the one that made the record. A repeated create that finds the entry
// gone (the commands done) writes it again: the claim that finds nothing pending takes it out.
const lowerScoreScript = `local old = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not old or tonumber(ARGV[1]) < tonumber(old) then return redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2]) end
return 0`

// add sends z on c (a client or a pipeline).
func (z zadd) add(ctx context.Context, c redis.Cmdable) redis.Cmder {
	if z.lower {
		return c.Eval(ctx, lowerScoreScript, []string{z.key}, z.score, z.member)
	}
	if z.nx {
		return c.ZAddNX(ctx, z.key, redis.Z{Score: float64(z.score), Member: z.member})
	}
	return c.ZAdd(ctx, z.key, redis.Z{Score: float64(z.score), Member: z.member})
}

// ahead lists what goes with a write of c, ahead of it: the outbox index entry when the record
// carries pending commands (an index entry without a saved record is harmless, a saved outbox
// without an index entry would not be re-driven after a crash), the entry in the set of live
// calls when the call is new, and the timers the transition armed (a timer whose record was
// not saved fires with a token the record does not know, and changes nothing). With keep (a
// save that adds no command: Write.KeepLease) the index entry is written only where missing.
func (s *Store) ahead(c *Call, due time.Time, keep, created bool, timers []Timer) []zadd {
	member := graph.CallKey(c.ID)
	var out []zadd
	if len(c.Outbox) > 0 && !due.IsZero() {
		out = append(out, zadd{key: s.index, score: due.UnixMilli(), member: member, nx: keep, lower: created})
	}
	if created {
		out = append(out, zadd{key: s.active, score: c.CreatedAt.UnixMilli(), member: member})
	}
	for _, t := range timers {
		out = append(out, zadd{key: s.timers, score: t.At.UnixMilli(), member: t.Member(), lower: created})
	}
	return out
}

// write runs a create or save script in one round trip with the writes that go ahead of it and
// those that go behind it: behind (the queue writes of the transition) and, for a call that
// ended, its removal from the set of live calls. The writes behind run even if the script finds
// a conflict; only writes that are harmless then go there (the caller decides again, and the
// reconciler repairs what a spurious one leaves).
func (s *Store) write(ctx context.Context, c *Call, script *redis.Script, args []any, data []byte, pre []zadd, behind func(redis.Pipeliner)) (int, error) {
	keys := []string{s.key(graph.CallKey(c.ID))}
	version := strconv.FormatInt(c.Version+1, 10) // what the script writes
	if c.State.Terminal() {
		queued := behind
		behind = func(p redis.Pipeliner) {
			if queued != nil {
				queued(p)
			}
			p.ZRem(ctx, s.active, graph.CallKey(c.ID))
		}
	}
	if s.onNodes {
		return s.writeOnNodes(ctx, keys, script, args, version, data, pre, behind)
	}
	need, sent := s.replicasToWait(), ""
	if need > 0 {
		sent = s.master.id() // a lock: only when waiting for replicas
	}
	if len(pre) == 0 && behind == nil && need == 0 {
		return script.Run(ctx, s.rdb, keys, args...).Int()
	}
	if _, cluster := s.rdb.(*redis.ClusterClient); cluster {
		// On Redis Cluster these keys and the call live on different nodes, and go-redis
		// sends each node's part of a pipeline concurrently: the order that makes a crash safe
		// (index entry first) only holds if the writes are sent one after the other.
		for _, z := range pre {
			if err := z.add(ctx, s.rdb).Err(); err != nil {
				return 0, err
			}
		}
		n, err := script.Run(ctx, s.rdb, keys, args...).Int()
		if err != nil || n == 0 || behind == nil {
			return n, err
		}
		_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error { behind(p); return nil })
		return n, err
	}
	for attempt := 0; ; attempt++ {
		var (
			res  *redis.Cmd
			wait *redis.Cmd
		)
		_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, z := range pre {
				z.add(ctx, p)
			}
			if attempt == 0 {
				res = script.EvalSha(ctx, p, keys, args...)
			} else {
				res = script.Eval(ctx, p, keys, args...)
			}
			if behind != nil {
				behind(p)
			}
			if need > 0 {
				wait = p.Do(ctx, "WAIT", need, s.replicaTimeout.Milliseconds())
			}
			return nil
		})
		if attempt == 0 && res != nil && res.Err() != nil && strings.HasPrefix(res.Err().Error(), "NOSCRIPT") {
			continue // script cache empty (restart, failover): send the script itself once
		}
		if res != nil && res.Err() != nil {
			return 0, res.Err()
		}
		if err != nil {
			return 0, err
		}
		n, err := res.Int()
		if err != nil || n != 1 || wait == nil {
			return n, err
		}
		return n, s.replicated(ctx, s.rdb, &s.master, wait, need, sent, holds(s.rdb, keys[0], version, data))
	}
}

// Create stores a new call record with version 1. It returns ErrExists when the call has a
// record already (a repeated incoming notification). outboxDue is when another instance may
// re-drive the record's commands if this one has not acknowledged them.
func (s *Store) Create(ctx context.Context, c *Call, outboxDue time.Time, timers ...Timer) error {
	return s.CreateWith(ctx, c, Write{OutboxDue: outboxDue, Timers: timers})
}

// Write is what goes with a record into the round trip that creates or saves it.
type Write struct {
	OutboxDue time.Time // when other instances may re-drive the record's outbox
	// KeepLease: the save adds no command to the outbox, so the outbox's lease stays as it is
	// (the instance carrying out its commands, or re-driving them, keeps them); only a missing
	// index entry is written, due at OutboxDue. A save that adds commands leases the outbox
	// anew: this instance carries them out.
	KeepLease bool
	Timers    []Timer // timers the transition arms, written ahead of the record
	// Behind adds writes after the record's; they run even when the save meets a conflict (on
	// Redis Cluster, only once it succeeded). On Redis Cluster with WaitForReplicas they are not
	// waited for (WaitsOnNodes): only writes whose loss is harmless may go there.
	Behind func(redis.Pipeliner)
}

// CreateWith is Create with the writes that go with the record.
func (s *Store) CreateWith(ctx context.Context, c *Call, w Write) error {
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("create call %s: %w", c.ID, err)
	}
	v := strconv.FormatInt(c.Version+1, 10) // 1, or above any version a lost record of the call had (EvAdopt)
	pre := s.ahead(c, w.OutboxDue, false, true, w.Timers)
	n, err := s.write(ctx, c, createScript, []any{b, ttl(c).Milliseconds(), v}, b, pre, w.Behind)
	if n == 1 {
		c.Version++
	}
	if err != nil {
		return fmt.Errorf("create call %s: %w", c.ID, err)
	}
	if n == 0 {
		return ErrExists
	}
	return nil
}

// Get loads a call, its outbox reduced to the commands not acknowledged yet. It returns
// ErrNotFound when there is no record.
func (s *Store) Get(ctx context.Context, callKey string) (Call, error) {
	vals, err := s.rdb.HMGet(ctx, s.key(callKey), recordFields...).Result()
	if err != nil {
		return Call{}, fmt.Errorf("get call %s: %w", callKey, err)
	}
	return decodeRecord(callKey, vals)
}

// recordFields are the fields of a call's hash that make its record (Get).
var recordFields = []string{"v", "d", "s", "g", "sp", "gp"}

// Pending reports, for each call, whether its outbox holds commands not acknowledged yet (false
// for a call with no record): one round trip (on Redis Cluster, one per node) for them all. A
// record that cannot be read or understood counts as pending, for Redrive to look at.
func (s *Store) Pending(ctx context.Context, callKeys []string) ([]bool, error) {
	cmds := make([]*redis.SliceCmd, len(callKeys))
	if _, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range callKeys {
			cmds[i] = p.HMGet(ctx, s.key(k), recordFields...)
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("read %d calls: %w", len(callKeys), err)
	}
	out := make([]bool, len(callKeys))
	for i, cmd := range cmds {
		c, err := decodeRecord(callKeys[i], cmd.Val())
		out[i] = len(c.Outbox) > 0 || (err != nil && !errors.Is(err, ErrNotFound))
	}
	return out, nil
}

// decodeRecord makes a call's record from the values of its recordFields.
func decodeRecord(callKey string, vals []any) (Call, error) {
	if len(vals) != len(recordFields) {
		return Call{}, fmt.Errorf("get call %s: %d fields read", callKey, len(vals))
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
	var err error
	if c.Version, err = strconv.ParseInt(vs, 10, 64); err != nil {
		return Call{}, fmt.Errorf("get call %s: corrupt version %q", callKey, vs)
	}
	as, _ := vals[2].(string)
	ag, _ := vals[3].(string)
	c.AckedStorage, _ = strconv.ParseInt(as, 10, 64)
	c.AckedGraph, _ = strconv.ParseInt(ag, 10, 64)
	sp, _ := vals[4].(string)
	gp, _ := vals[5].(string)
	c.pruneOutbox(parseAhead(sp), parseAhead(gp))
	return c, nil
}

// parseAhead reads the batches acknowledged ahead of the watermark ("prev:hi,...").
func parseAhead(s string) [][2]int64 {
	if s == "" {
		return nil
	}
	var out [][2]int64
	for _, e := range strings.Split(s, ",") {
		p, h, ok := strings.Cut(e, ":")
		pv, err1 := strconv.ParseInt(p, 10, 64)
		hv, err2 := strconv.ParseInt(h, 10, 64)
		if ok && err1 == nil && err2 == nil {
			out = append(out, [2]int64{pv, hv})
		}
	}
	return out
}

// pruneOutbox drops the commands acknowledged: at or below their kind's watermark, or in a batch
// acknowledged ahead of it (prev < seq <= hi).
func (c *Call) pruneOutbox(storageAhead, graphAhead [][2]int64) {
	if len(c.Outbox) == 0 {
		return
	}
	out := make([]Pending, 0, len(c.Outbox))
	for _, p := range c.Outbox {
		acked, ahead := c.AckedStorage, storageAhead
		if p.Cmd.Kind.Graph() {
			acked, ahead = c.AckedGraph, graphAhead
		}
		done := p.Seq <= acked
		for _, b := range ahead {
			done = done || (p.Seq > b[0] && p.Seq <= b[1])
		}
		if !done {
			out = append(out, p)
		}
	}
	c.Outbox = out
}

// Save writes c if the stored version is still c.Version, and bumps c.Version, arming timers
// in the same round trip. It returns ErrConflict when another writer got there first.
func (s *Store) Save(ctx context.Context, c *Call, outboxDue time.Time, timers ...Timer) error {
	return s.SaveWith(ctx, c, Write{OutboxDue: outboxDue, Timers: timers})
}

// SaveWith is Save with the writes that go with the record.
func (s *Store) SaveWith(ctx context.Context, c *Call, w Write) error {
	b, err := json.Marshal(c)
	if err != nil {
		return fmt.Errorf("save call %s: %w", c.ID, err)
	}
	n, err := s.write(ctx, c, saveScript, []any{strconv.FormatInt(c.Version, 10), b, ttl(c).Milliseconds()}, b, s.ahead(c, w.OutboxDue, w.KeepLease, false, w.Timers), w.Behind)
	if err != nil {
		return fmt.Errorf("save call %s: %w", c.ID, err)
	}
	if n == 0 {
		return ErrConflict
	}
	c.Version++
	return nil
}

// Ack says a batch of a call's commands of one kind (Graph or storage) is done: those after Prev
// up to Seq. Prev is the last command of that kind the batch's transition found not yet done
// (0 when none): until it is done, the batch is recorded ahead of the watermark.
type Ack struct {
	Call  string // call key
	Graph bool
	Prev  int64
	Seq   int64 // 0: no commands acknowledged, only Timers
	// Timers are members of the timer set that a saved transition of the call disarmed
	// (superseded, cancelled, or left by the call's end): taken out with the acknowledgements,
	// so that they do not fire for nothing.
	Timers []string
	// Writes, if not nil, are the commands this acknowledges (Seq), written in the batch's
	// pipeline ahead of its acknowledgements (a queue write sharing the batch's round trip);
	// Done is called once the batch is written.
	Writes func(redis.Pipeliner)
	Done   func()
}

func (a Ack) fields() (watermark, ahead string) {
	if a.Graph {
		return "g", "gp"
	}
	return "s", "sp"
}

func (a Ack) args() []any {
	w, ahead := a.fields()
	return []any{w, ahead, a.Prev, a.Seq}
}

// Ack records that a call's commands of one kind (Graph or storage) are done up to seq, all of
// them (a re-drive, which carries out everything left).
func (s *Store) Ack(ctx context.Context, callKey string, graphKind bool, seq int64) error {
	return s.AckMany(ctx, Ack{Call: callKey, Graph: graphKind, Seq: seq})
}

// AckMany records acknowledgements, in one round trip.
func (s *Store) AckMany(ctx context.Context, acks ...Ack) error {
	var stale []string
	for _, a := range acks {
		stale = append(stale, a.Timers...)
	}
	if len(acks) == 1 && len(stale) == 0 && acks[0].Writes == nil {
		a := acks[0]
		if err := ackScript.Run(ctx, s.rdb, []string{s.key(a.Call)}, a.args()...).Err(); err != nil {
			return fmt.Errorf("ack commands of call %s: %w", a.Call, err)
		}
		return nil
	}
	run := func(eval bool) error {
		_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			if len(stale) > 0 {
				p.ZRem(ctx, s.timers, stale)
			}
			for _, a := range acks {
				if a.Writes != nil {
					a.Writes(p) // ahead of every acknowledgement: Redis applies a pipeline in order
				}
			}
			for _, a := range acks {
				if a.Seq == 0 {
					continue
				}
				if eval {
					ackScript.Eval(ctx, p, []string{s.key(a.Call)}, a.args()...)
				} else {
					ackScript.EvalSha(ctx, p, []string{s.key(a.Call)}, a.args()...)
				}
			}
			return nil
		})
		return err
	}
	err := run(false)
	if err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
		err = run(true) // script cache empty (restart, failover)
	}
	if err != nil {
		return fmt.Errorf("ack commands of %d calls: %w", len(acks), err)
	}
	return nil
}

var claimOutboxScript = redis.NewScript(`
local due = redis.call('ZRANGE', KEYS[1], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[3])
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], 'XX', ARGV[2], m) end
return due`)

// ClaimOutbox takes up to limit calls whose outbox lease has run out, leasing them to the caller
// until now+lease, and returns their keys and the lease's score. A claim's score ends in .5 ms
// and a save's is whole: DoneOutbox can tell a claim still in place from a save since.
func (s *Store) ClaimOutbox(ctx context.Context, now time.Time, lease time.Duration, limit int) ([]string, float64, error) {
	score := float64(now.Add(lease).UnixMilli()) + 0.5
	keys, err := claimOutboxScript.Run(ctx, s.rdb, []string{s.index}, now.UnixMilli(), strconv.FormatFloat(score, 'f', -1, 64), limit).StringSlice()
	if err != nil {
		return nil, 0, fmt.Errorf("claim outboxes: %w", err)
	}
	return keys, score, nil
}

// RenewOutbox moves the lease of the given calls' outboxes forward to due: the calls whose
// commands the caller is still carrying out, so that no other instance re-drives them while it
// lives (a command to a slow Graph may take longer than a lease). Only index entries that exist
// are touched (an outbox done and removed stays removed), and a lease is never shortened.
func (s *Store) RenewOutbox(ctx context.Context, callKeys []string, due time.Time) error {
	const chunk = 1000
	score := float64(due.UnixMilli())
	for len(callKeys) > 0 {
		n := min(len(callKeys), chunk)
		zs := make([]redis.Z, n)
		for i, k := range callKeys[:n] {
			zs[i] = redis.Z{Score: score, Member: k}
		}
		if err := s.rdb.ZAddArgs(ctx, s.index, redis.ZAddArgs{XX: true, GT: true, Members: zs}).Err(); err != nil {
			return fmt.Errorf("renew %d outbox leases: %w", n, err)
		}
		callKeys = callKeys[n:]
	}
	return nil
}

var handBackOutboxScript = redis.NewScript(`
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[1] then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i]) end
end
return 0`)

// OutboxLease returns the score of the call's entry in the outbox index (when its lease runs
// out, in Unix milliseconds), and false when it has none.
func (s *Store) OutboxLease(ctx context.Context, callKey string) (float64, bool, error) {
	score, err := s.rdb.ZScore(ctx, s.index, callKey).Result()
	if errors.Is(err, redis.Nil) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("read outbox lease of call %s: %w", callKey, err)
	}
	return score, true, nil
}

// HandBackOutbox makes the given calls' outboxes, claimed with score and not re-driven (an
// instance shutting down), due again at now for any instance; one re-leased since is left alone.
func (s *Store) HandBackOutbox(ctx context.Context, callKeys []string, score float64, now time.Time) error {
	if len(callKeys) == 0 {
		return nil
	}
	args := make([]any, 0, len(callKeys)+2)
	args = append(args, strconv.FormatFloat(score, 'f', -1, 64), now.UnixMilli())
	for _, k := range callKeys {
		args = append(args, k)
	}
	return handBackOutboxScript.Run(ctx, s.rdb, []string{s.index}, args...).Err()
}

var handBackOutboxesScript = redis.NewScript(`
for i = 1, #ARGV, 3 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i+1] then redis.call('ZADD', KEYS[1], ARGV[i+2], ARGV[i]) end
end
return 0`)

// HandBack is an outbox lease to hand back (HandBackOutboxes): the call's outbox, leased with
// Score, is made due at Due.
type HandBack struct {
	Call  string
	Score float64
	Due   time.Time
}

// HandBackOutboxes is HandBackOutbox for outboxes leased with different scores, in one round
// trip for up to a thousand.
func (s *Store) HandBackOutboxes(ctx context.Context, hs []HandBack) error {
	const chunk = 1000
	for len(hs) > 0 {
		n := min(len(hs), chunk)
		args := make([]any, 0, 3*n)
		for _, h := range hs[:n] {
			args = append(args, h.Call, strconv.FormatFloat(h.Score, 'f', -1, 64), h.Due.UnixMilli())
		}
		if err := handBackOutboxesScript.Run(ctx, s.rdb, []string{s.index}, args...).Err(); err != nil {
			return fmt.Errorf("hand back %d outboxes: %w", n, err)
		}
		hs = hs[n:]
	}
	return nil
}

var doneOutboxScript = redis.NewScript(`
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0`)

var doneOutboxesScript = redis.NewScript(`
local n = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[1] then n = n + redis.call('ZREM', KEYS[1], ARGV[i]) end
end
return n`)

// OutboxClaimed reports whether the call's outbox index entry is still the claim made with
// score: a save since (its entry, written ahead of its record, replaces the claim) or a renewal
// by the instance carrying the commands out takes it back. An entry gone (Redis lost it: no
// instance removes another's claim) leaves the claim standing, or nobody would re-drive it.
func (s *Store) OutboxClaimed(ctx context.Context, callKey string, score float64) (bool, error) {
	got, err := s.rdb.ZScore(ctx, s.index, callKey).Result()
	if errors.Is(err, redis.Nil) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("read outbox lease of %s: %w", callKey, err)
	}
	return got == score, nil
}

// DoneOutboxes is DoneOutbox for several calls claimed with the same score, in one round trip.
func (s *Store) DoneOutboxes(ctx context.Context, callKeys []string, score float64) error {
	if len(callKeys) == 0 {
		return nil
	}
	args := make([]any, 0, len(callKeys)+1)
	args = append(args, strconv.FormatFloat(score, 'f', -1, 64))
	for _, k := range callKeys {
		args = append(args, k)
	}
	return doneOutboxesScript.Run(ctx, s.rdb, []string{s.index}, args...).Err()
}

// DoneOutbox removes a call from the outbox index if nobody re-leased it since the claim that
// returned score (a save in between re-adds it with a new score, and keeps it).
func (s *Store) DoneOutbox(ctx context.Context, callKey string, score float64) error {
	return doneOutboxScript.Run(ctx, s.rdb, []string{s.index}, callKey, strconv.FormatFloat(score, 'f', -1, 64)).Err()
}

// Ended reports, for each call, whether its record is terminal or absent (expired, lost): a call
// that will never wait in a queue again. A record that cannot be understood (a state a newer
// callbot wrote) counts as not ended. The records are read in one round trip (on Redis Cluster,
// one per node).
func (s *Store) Ended(ctx context.Context, callKeys []string) ([]bool, error) {
	cmds := make([]*redis.SliceCmd, len(callKeys))
	if _, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range callKeys {
			cmds[i] = p.HMGet(ctx, s.key(k), "v", "d")
		}
		return nil
	}); err != nil {
		return nil, fmt.Errorf("read %d calls: %w", len(callKeys), err)
	}
	out := make([]bool, len(callKeys))
	for i, c := range cmds {
		vals := c.Val()
		vs, _ := vals[0].(string)
		ds, _ := vals[1].(string)
		if vs == "" || ds == "" {
			out[i] = true // as Get: no record
			continue
		}
		var r struct {
			State State `json:"state"`
		}
		out[i] = json.Unmarshal([]byte(ds), &r) == nil && r.State.Terminal()
	}
	return out, nil
}

// Live returns up to limit calls of the set of live calls created before the given time, oldest
// first.
func (s *Store) Live(ctx context.Context, before time.Time, limit int64) ([]string, error) {
	return s.LivePage(ctx, before, 0, limit)
}

// LivePage is Live from the offset-th call on.
func (s *Store) LivePage(ctx context.Context, before time.Time, offset, limit int64) ([]string, error) {
	return s.rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: s.active, Start: "-inf", Stop: before.UnixMilli(), ByScore: true,
		Offset: offset, Count: limit}).Result()
}

// Forget removes a call from the set of live calls (it ended, or its record expired).
func (s *Store) Forget(ctx context.Context, callKey string) error {
	return s.rdb.ZRem(ctx, s.active, callKey).Err()
}

// TryLease takes or renews the lease name for holder for ttl; it reports whether holder has it.
// Instances use it to share work that one of them is enough for (the reconciler's pass).
func (s *Store) TryLease(ctx context.Context, name, holder string, ttl time.Duration) (bool, error) {
	return TryLeaseAt(ctx, s.rdb, s.prefix+":{lease:"+name+"}", holder, ttl)
}

// ReleaseLease gives up the lease name if holder has it (an instance shutting down), so that
// another instance takes it at once instead of when it expires.
func (s *Store) ReleaseLease(ctx context.Context, name, holder string) error {
	return ReleaseLeaseAt(ctx, s.rdb, s.prefix+":{lease:"+name+"}", holder)
}

// ReleaseLeaseAt is ReleaseLease on a key of the caller's choosing (TryLeaseAt's).
func ReleaseLeaseAt(ctx context.Context, rdb redis.Scripter, key, holder string) error {
	return releaseLeaseScript.Run(ctx, rdb, []string{key}, holder).Err()
}

var releaseLeaseScript = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0`)

// TryLeaseAt is TryLease on a key of the caller's choosing (one in the slot of the data the
// lease guards, so a script can check the lease as it writes).
func TryLeaseAt(ctx context.Context, rdb redis.Scripter, key, holder string, ttl time.Duration) (bool, error) {
	n, err := leaseScript.Run(ctx, rdb, []string{key}, holder, ttl.Milliseconds()).Int()
	return n == 1, err
}

var leaseScript = redis.NewScript(`
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0`)

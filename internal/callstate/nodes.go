package callstate

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Waiting for replicas on Redis Cluster.
//
// WAIT covers the writes made before it on its own connection, on one master. A record write
// touches up to four masters: the entries that go ahead of it (outbox index, live calls, timers)
// in their own slots, the record in its call's. Each master's part goes in one pipeline on one
// connection to that master (ClusterClient.MasterForKey), followed by a WAIT there, and in this
// order: the entries ahead first, each master's waited for, then the record and the WAIT on its
// master. So a record a failover can keep always has its entries on a replica (a saved outbox the
// index does not hold would never be re-driven; a timer its record waits for, gone, would leave
// the caller waiting for nothing), and a change refused as unreplicated at the first step has not
// touched the record at all. What follows a save on another master (the removal of the timers it
// disarmed, with the acknowledgements; its queue writes, as outbox commands) is written only once
// the save is replicated, so it cannot outlive the save on a replica.
//
// A command that meets a slot on the move (MOVED, ASK: resharding) or a cluster down is not
// followed to the other master: WAIT must be sent on the connection that wrote. It fails the
// write, as Redis being away does (503, and Graph delivers the notification again), and the
// cluster client reloads the slot map for the next attempt.

// WaitsOnNodes reports whether the store waits for replicas on Redis Cluster: then the writes
// that go with a change on other masters than its record's must be waited for on their own
// (Durably) before what depends on them is acknowledged.
func (s *Store) WaitsOnNodes() bool { return s.onNodes }

// Clustered reports whether the store is on Redis Cluster, where one pipeline may span masters
// and part of it be applied while another part fails.
func (s *Store) Clustered() bool { return s.cluster != nil }

// Durably runs write in one pipeline on the master serving key and then, when that master has
// replicas to wait for, a write of the store's own in key's slot (its hash tag, key:
// PREFIX:{tag}:sync, a minute) and WAIT on the same connection: so it returns nil only once the
// master's replicas have everything the master had, write included, whether or not write
// changed anything (a write repeated after one refused as unreplicated changes nothing, and
// must be covered all the same). It returns ErrNotReplicated as a record write does, and an
// error for a slot on the move or a cluster down; the results of write's own commands are the
// caller's to read. Only with WaitsOnNodes; otherwise it runs write in a pipeline.
func (s *Store) Durably(ctx context.Context, key string, write func(redis.Pipeliner)) error {
	if !s.onNodes {
		if write == nil {
			return nil
		}
		_, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error { write(p); return nil })
		if errors.Is(err, redis.Nil) {
			err = nil
		}
		return err
	}
	node, err := s.cluster.MasterForKey(ctx, key)
	if err != nil {
		return err
	}
	return s.durablyOn(ctx, node, key, write)
}

// durablyOn is Durably on node, the master serving key.
func (s *Store) durablyOn(ctx context.Context, node *redis.Client, key string, write func(redis.Pipeliner)) error {
	r := s.nodeCount(node)
	need, sent := s.replicasToWaitOn(r), r.id()
	if need == 0 && write == nil {
		return nil
	}
	sync, err := s.syncKey(key)
	if err != nil {
		return err
	}
	var set *redis.StatusCmd
	var wait *redis.Cmd
	cmds, _ := node.Pipelined(ctx, func(p redis.Pipeliner) error {
		if write != nil {
			write(p)
		}
		if need > 0 {
			set = p.Set(ctx, sync, 1, time.Minute)
			wait = p.Do(ctx, "WAIT", need, s.replicaTimeout.Milliseconds())
		}
		return nil
	})
	if err := s.redirected(ctx, cmds); err != nil {
		return err
	}
	if wait == nil {
		return nil
	}
	if err := set.Err(); err != nil {
		return err
	}
	return s.replicated(ctx, node, r, wait, need, sent, nil)
}

// writeOnNodes is write on Redis Cluster with replicas to wait for: the entries ahead of the
// record on their masters, each waited for; then the record and WAIT on its master; then the
// writes behind it (not waited for), if the script wrote.
func (s *Store) writeOnNodes(ctx context.Context, keys []string, script *redis.Script, args []any, version string, data []byte, pre []zadd, behind func(redis.Pipeliner)) (int, error) {
	if err := s.aheadOnNodes(ctx, pre); err != nil {
		return 0, err
	}
	node, err := s.cluster.MasterForKey(ctx, keys[0])
	if err != nil {
		return 0, err
	}
	r := s.nodeCount(node)
	need, sent := s.replicasToWaitOn(r), r.id()
	for attempt := 0; ; attempt++ {
		var res, wait *redis.Cmd
		cmds, _ := node.Pipelined(ctx, func(p redis.Pipeliner) error {
			if attempt == 0 {
				res = script.EvalSha(ctx, p, keys, args...)
			} else {
				res = script.Eval(ctx, p, keys, args...)
			}
			if need > 0 {
				// the script writes whenever it succeeds: the WAIT covers it
				wait = p.Do(ctx, "WAIT", need, s.replicaTimeout.Milliseconds())
			}
			return nil
		})
		if err := s.redirected(ctx, cmds); err != nil {
			return 0, err
		}
		if attempt == 0 && res.Err() != nil && strings.HasPrefix(res.Err().Error(), "NOSCRIPT") {
			continue // script cache empty (restart, failover): send the script itself once
		}
		n, err := res.Int()
		if err != nil {
			return 0, err
		}
		if n != 1 {
			return n, nil
		}
		if wait != nil {
			if err := s.replicated(ctx, node, r, wait, need, sent, holds(node, keys[0], version, data)); err != nil {
				return n, err
			}
		}
		if behind != nil {
			_, err = s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error { behind(p); return nil })
		}
		return n, err
	}
}

// aheadOnNodes writes the entries that go ahead of a record, each master's in one pipeline
// with its WAIT (Durably), the masters at once.
func (s *Store) aheadOnNodes(ctx context.Context, pre []zadd) error {
	type part struct {
		node *redis.Client
		key  string
		zs   []zadd
	}
	var parts []*part
	for _, z := range pre {
		node, err := s.cluster.MasterForKey(ctx, z.key)
		if err != nil {
			return err
		}
		i := 0
		for i < len(parts) && parts[i].node != node {
			i++
		}
		if i == len(parts) {
			parts = append(parts, &part{node: node, key: z.key})
		}
		parts[i].zs = append(parts[i].zs, z)
	}
	run := func(pt *part) error {
		var adds []redis.Cmder
		err := s.durablyOn(ctx, pt.node, pt.key, func(p redis.Pipeliner) {
			for _, z := range pt.zs {
				adds = append(adds, z.add(ctx, p))
			}
		})
		for _, a := range adds {
			if err == nil {
				err = a.Err()
			}
		}
		return err
	}
	if len(parts) == 1 {
		return run(parts[0])
	}
	errs := make([]error, len(parts))
	var wg sync.WaitGroup
	for i, pt := range parts {
		wg.Go(func() { errs[i] = run(pt) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// nodeCount is the count of the replicas of the master node.
func (s *Store) nodeCount(node *redis.Client) *replicaCount {
	addr := node.Options().Addr
	if r, ok := s.nodes.Load(addr); ok {
		return r.(*replicaCount)
	}
	r := &replicaCount{}
	r.counted.Store(-1)
	got, _ := s.nodes.LoadOrStore(addr, r)
	return got.(*replicaCount)
}

// lookAtMasters counts the replicas of every master of the cluster (WatchReplicas), and the
// fewest any has had.
func (s *Store) lookAtMasters(ctx context.Context) {
	var mu sync.Mutex
	fewest, seen := int64(0), false
	s.cluster.ForEachMaster(ctx, func(ctx context.Context, c *redis.Client) error {
		r := s.nodeCount(c)
		r.look(ctx, c)
		n := r.counted.Load()
		mu.Lock()
		if !seen || n < fewest {
			fewest, seen = n, true
		}
		mu.Unlock()
		return nil
	})
	if seen {
		s.fewest.Store(fewest)
	}
}

// syncKey is the store's own key in key's slot: PREFIX:{tag}:sync for key's hash tag.
func (s *Store) syncKey(key string) (string, error) {
	i := strings.IndexByte(key, '{')
	if i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			return s.prefix + ":{" + key[i+1:i+1+j] + "}:sync", nil
		}
	}
	return "", fmt.Errorf("key %q has no hash tag to wait for its replicas by", key)
}

// redirected fails a pipeline sent to one master whose commands met a slot on the move or a
// cluster down, and has the cluster client reload the slot map; it does the same when the
// master could not be reached (it may have failed over).
func (s *Store) redirected(ctx context.Context, cmds []redis.Cmder) error {
	for _, c := range cmds {
		err := c.Err()
		if err == nil {
			continue
		}
		_, moved := redis.IsMovedError(err)
		_, ask := redis.IsAskError(err)
		if moved || ask || redis.IsTryAgainError(err) || redis.IsClusterDownError(err) {
			s.cluster.ReloadState(ctx)
			return fmt.Errorf("slot moving or cluster down, not waited for here: %w", err)
		}
		var reply redis.Error
		if !errors.As(err, &reply) {
			s.cluster.ReloadState(ctx) // not a reply: the master is away
			return err
		}
	}
	return nil
}

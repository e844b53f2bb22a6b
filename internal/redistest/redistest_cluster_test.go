package redistest_test

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/redistest"
)

func TestStartCluster(t *testing.T) {
	start := time.Now()
	c := redistest.StartCluster(t)
	t.Logf("3-master cluster %v ready in %s", c.Addrs(), time.Since(start).Round(time.Millisecond))
	ctx := context.Background()
	rdb := c.Client(t)

	if n := len(c.Addrs()); n != redistest.ClusterSize {
		t.Fatalf("%d addresses, want %d", n, redistest.ClusterSize)
	}
	masters := map[string]bool{}
	//lint:ignore SA1019 CLUSTER SLOTS still answers on Redis 7 and also on the Redis 6 some machines have
	slots, err := rdb.ClusterSlots(ctx).Result()
	if err != nil {
		t.Fatal(err)
	}
	covered := 0
	for _, r := range slots {
		covered += r.End - r.Start + 1
		masters[r.Nodes[0].Addr] = true
	}
	if covered != 16384 || len(masters) != redistest.ClusterSize {
		t.Fatalf("slots cover %d of 16384 on %d masters %v", covered, len(masters), masters)
	}

	// keys spread over every master, and each one lives where CLUSTER KEYSLOT says
	seen := map[string]bool{}
	for i := 0; i < 30; i++ {
		key := fmt.Sprintf("k:{%d}", i)
		if err := rdb.Set(ctx, key, i, 0).Err(); err != nil {
			t.Fatalf("set %s: %v", key, err)
		}
		slot, addr, err := c.SlotOf(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		if n, err := c.NodeClient(t, addr).Exists(ctx, key).Result(); err != nil || n != 1 {
			t.Fatalf("%s (slot %d) not on its master %s: %d %v", key, slot, addr, n, err)
		}
		seen[addr] = true
	}
	if len(seen) != redistest.ClusterSize {
		t.Errorf("30 keys landed on %d masters, want %d", len(seen), redistest.ClusterSize)
	}

	// it is a real cluster: a multi-key command across slots fails, within one tag it works
	if err := rdb.Do(ctx, "MSET", "{a}x", 1, "{b}x", 2).Err(); err == nil || !strings.Contains(err.Error(), "CROSSSLOT") {
		t.Errorf("MSET across slots: %v, want CROSSSLOT", err)
	}
	if err := rdb.MSet(ctx, "{a}x", 1, "{a}y", 2).Err(); err != nil {
		t.Errorf("MSET within one hash tag: %v", err)
	}
}

func TestStartStandaloneStillWorks(t *testing.T) {
	s := redistest.Start(t)
	if err := s.Client(t).Ping(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
}

// The Sentinel set-up: a client through the Sentinel writes to the master, and after the master
// is killed the Sentinel promotes the replica, which has the data replicated before
// HoldReplication and not what came after.
func TestStartSentinel(t *testing.T) {
	s := redistest.StartSentinelWithLink(t)
	ctx := context.Background()
	c := s.Client(t)
	var acked *redis.Cmd
	if _, err := c.Pipelined(ctx, func(p redis.Pipeliner) error { // WAIT counts this connection's writes
		p.Set(ctx, "k", "v", 0)
		acked = p.Do(ctx, "WAIT", 1, 1000)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if n, err := acked.Int64(); err != nil || n != 1 {
		t.Fatalf("SET then WAIT 1: %d replicas, %v", n, err)
	}
	s.HoldReplication() // what is written from now on does not reach the replica
	if err := c.Set(ctx, "late", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	old, err := s.KillMaster(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	addr, err := s.WaitFailover(old, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("failover from %s to %s in %s", old, addr, time.Since(t0).Round(time.Millisecond))
	got, err := c.Get(ctx, "k").Result()
	if err != nil || got != "v" {
		t.Errorf("after the failover: %q %v, want the value written before", got, err)
	}
	if n, err := c.Exists(ctx, "late").Result(); err != nil || n != 0 {
		t.Errorf("the write made while replication was held: exists=%d %v, want lost with the master", n, err)
	}
	if !strings.HasPrefix(s.URL(), "sentinel://127.0.0.1:") || !strings.HasSuffix(s.URL(), "/"+redistest.SentinelMaster) {
		t.Errorf("URL %s", s.URL())
	}
}

// The cluster with replicas: each master has its replica in sync (a WAIT on the master's
// connection counts it), a cut replica leaves a write on no replica (WAIT times out), and a
// master killed with its replica cut fails over to it without that write.
func TestStartClusterWithReplicas(t *testing.T) {
	start := time.Now()
	c := redistest.StartClusterWithReplicas(t)
	t.Logf("3 masters with a replica each ready in %s", time.Since(start).Round(time.Millisecond))
	ctx := context.Background()
	rdb := c.Client(t)
	if err := rdb.Set(ctx, "{r}k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	_, addr, err := c.SlotOf(ctx, "{r}k")
	if err != nil {
		t.Fatal(err)
	}
	if c.ReplicaOf(addr) == "" {
		t.Fatalf("master %s has no replica", addr)
	}
	wait := func(key string) int64 {
		t.Helper()
		node := c.NodeClient(t, addr)
		var w *redis.Cmd
		if _, err := node.Pipelined(ctx, func(p redis.Pipeliner) error {
			p.Set(ctx, key, "v", 0)
			w = p.Do(ctx, "WAIT", 1, 300)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		n, _ := w.Int64()
		return n
	}
	if n := wait("{r}a"); n != 1 {
		info, _ := c.NodeClient(t, addr).Info(ctx, "replication").Result()
		t.Fatalf("WAIT 1 on %s: %d replicas; %s; replica %s", addr, n, info, c.ReplicaOf(addr))
	}
	resume := c.CutReplica(t, addr)
	if n := wait("{r}late"); n != 0 {
		t.Fatalf("WAIT 1 with the replica cut: %d replicas", n)
	}
	keys, clients := map[string]string{}, map[string]*redis.Client{}
	for _, m := range c.Addrs() {
		// no retries: go-redis would retry a CLUSTERDOWN reply for a while and hide it
		keys[m], clients[m] = keyOn(t, c, m), redis.NewClient(&redis.Options{Addr: m, MaxRetries: -1})
		defer clients[m].Close()
	}
	c.StopNode(addr)
	resume()
	t0 := time.Now()
	promoted, err := c.WaitFailover(addr, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("failover from %s to %s in %s", addr, promoted, time.Since(t0).Round(time.Millisecond))
	// the cluster is healthy again on every node, not only on the one promoted: the other masters
	// serve their own slots at once (they answered CLUSTERDOWN until they heard of the promotion,
	// some 30-70 ms after the promoted node said cluster_state:ok, and a test that read them then
	// took the error for data gone)
	for _, m := range c.Addrs() {
		if m == addr {
			continue
		}
		if err := clients[m].Get(ctx, keys[m]).Err(); err != nil && err != redis.Nil {
			t.Errorf("a read on master %s right after the failover: %v, want it served", m, err)
		}
		if info, err := clients[m].ClusterInfo(ctx).Result(); err != nil || !strings.Contains(info, "cluster_state:ok") {
			t.Errorf("master %s right after the failover: %v %q, want cluster_state:ok", m, err, firstLine(info))
		}
	}
	pc := c.NodeClient(t, promoted)
	if n, err := pc.Exists(ctx, "{r}a").Result(); err != nil || n != 1 {
		t.Errorf("the write the replica acknowledged: exists=%d %v", n, err)
	}
	if n, err := pc.Exists(ctx, "{r}late").Result(); err != nil || n != 0 {
		t.Errorf("the write made while the replica was cut: exists=%d %v, want lost", n, err)
	}
}

// A killed master rejoins as the replica of the one promoted in its place (Rejoin), so that the
// promoted master can fail over in turn, back to it, with what was written before.
func TestClusterRejoinFailsBack(t *testing.T) {
	c := redistest.StartClusterWith(t, redistest.ClusterOptions{Replicas: 1, NodeTimeout: time.Second})
	ctx := context.Background()
	rdb := c.Client(t)
	_, old, err := c.SlotOf(ctx, "{r}k")
	if err != nil {
		t.Fatal(err)
	}
	c.StopNode(old)
	t0 := time.Now()
	promoted, err := c.WaitFailover(old, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("failover from %s to %s in %s (cluster-node-timeout 1s)", old, promoted, time.Since(t0).Round(time.Millisecond))
	// the client learns the new slot map from the error of a command sent to the old master
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		err := rdb.Set(ctx, "{r}k", "v", 0).Err()
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
	}
	if err := c.Rejoin(old, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := c.ReplicaOf(promoted); got != old {
		t.Fatalf("replica of %s is %q, want the rejoined %s", promoted, got, old)
	}
	if !slices.Contains(c.Addrs(), promoted) || slices.Contains(c.Addrs(), old) {
		t.Fatalf("masters %v, want %s and not %s", c.Addrs(), promoted, old)
	}
	c.StopNode(promoted)
	back, err := c.WaitFailover(promoted, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if back != old {
		t.Fatalf("failed over to %s, want %s", back, old)
	}
	if got, err := c.NodeClient(t, old).Get(ctx, "{r}k").Result(); err != nil || got != "v" {
		t.Errorf("after failing back: %q %v, want the value written on the promoted master", got, err)
	}
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}

// keyOn returns a key of a slot the master at addr serves.
func keyOn(t *testing.T, c *redistest.Cluster, addr string) string {
	t.Helper()
	for i := 0; i < 1000; i++ {
		key := fmt.Sprintf("k:{%d}", i)
		if _, at, err := c.SlotOf(context.Background(), key); err == nil && at == addr {
			return key
		}
	}
	t.Fatalf("no key found on %s", addr)
	return ""
}

// TestStartClusterWithPasswordAndTLS: a cluster as a managed service runs it, every node
// requiring a password and speaking TLS only, with a replica each.
func TestStartClusterWithPasswordAndTLS(t *testing.T) {
	c := redistest.StartClusterWith(t, redistest.ClusterOptions{Replicas: 1, Password: "s3cret", TLS: true})
	ctx := context.Background()
	rdb := c.Client(t)
	for i := range 10 {
		if err := rdb.Set(ctx, fmt.Sprintf("k:{%d}", i), i, 0).Err(); err != nil {
			t.Fatalf("set over TLS with the password: %v", err)
		}
	}
	if c.CAFile() == "" {
		t.Fatal("no CA file for a TLS cluster")
	}
	// without the password a node refuses, and without TLS it does not answer at all
	addr := c.Addrs()[0]
	noPass := redis.NewClient(&redis.Options{Addr: addr, TLSConfig: c.Client(t).Options().TLSConfig, MaxRetries: -1})
	defer noPass.Close()
	if err := noPass.Ping(ctx).Err(); err == nil || !strings.Contains(err.Error(), "NOAUTH") {
		t.Errorf("PING without the password: %v, want NOAUTH", err)
	}
	plain := redis.NewClient(&redis.Options{Addr: addr, Password: "s3cret", MaxRetries: -1, ReadTimeout: time.Second})
	defer plain.Close()
	if err := plain.Ping(ctx).Err(); err == nil {
		t.Error("PING over plain TCP answered: the node is not TLS only")
	}
}

package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ClusterSize is the number of masters StartCluster starts.
const ClusterSize = 3

// Cluster is a Redis Cluster of ClusterSize masters (no replicas) for one test: real
// redis-server processes on free loopback ports, joined with `redis-cli --cluster create`.
type Cluster struct {
	addrs []string
	nodes []*node
}

// StartCluster starts a Redis Cluster that lives until the test ends. It returns once every
// node reports cluster_state:ok with all 16384 slots assigned and all nodes known. Without
// redis-server or redis-cli on PATH the test is skipped, or fails with CALLBOT_REQUIRE_REDIS=1.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	server, err1 := exec.LookPath("redis-server")
	cli, err2 := exec.LookPath("redis-cli")
	if err := errors.Join(err1, err2); err != nil {
		if os.Getenv("CALLBOT_REQUIRE_REDIS") == "1" {
			t.Fatalf("CALLBOT_REQUIRE_REDIS=1 but a Redis Cluster cannot be started: %v", err)
		}
		t.Skipf("redis cluster: %v", err)
	}
	dir := t.TempDir()
	var lastErr error
	for attempt := 1; attempt <= 4; attempt++ {
		c, err := startCluster(server, cli, filepath.Join(dir, fmt.Sprintf("attempt-%d", attempt)))
		if err == nil {
			t.Cleanup(c.stop)
			return c
		}
		lastErr = err
		t.Logf("redis cluster attempt %d: %v", attempt, err)
	}
	t.Fatalf("start redis cluster: %v", lastErr)
	return nil
}

// Addrs returns the host:port of every master.
func (c *Cluster) Addrs() []string { return append([]string(nil), c.addrs...) }

// Client returns a cluster client, closed when the test ends.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs()})
	t.Cleanup(func() { cc.Close() })
	return cc
}

// NodeClient returns a plain client of the node at addr (one of Addrs), closed when the test
// ends: what a node holds can be inspected without the cluster client's redirections.
func (c *Cluster) NodeClient(t testing.TB, addr string) *redis.Client {
	cl := redis.NewClient(&redis.Options{Addr: addr})
	t.Cleanup(func() { cl.Close() })
	return cl
}

// SlotOf returns the hash slot of key (CLUSTER KEYSLOT) and the address of the master serving
// it (CLUSTER SLOTS).
func (c *Cluster) SlotOf(ctx context.Context, key string) (slot int64, addr string, err error) {
	cl := redis.NewClient(&redis.Options{Addr: c.addrs[0]})
	defer cl.Close()
	if slot, err = cl.ClusterKeySlot(ctx, key).Result(); err != nil {
		return 0, "", fmt.Errorf("cluster keyslot %q: %w", key, err)
	}
	//lint:ignore SA1019 CLUSTER SLOTS still answers on Redis 7 and also on the Redis 6 some machines have
	ranges, err := cl.ClusterSlots(ctx).Result()
	if err != nil {
		return 0, "", fmt.Errorf("cluster slots: %w", err)
	}
	for _, r := range ranges {
		if int64(r.Start) <= slot && slot <= int64(r.End) && len(r.Nodes) > 0 {
			return slot, r.Nodes[0].Addr, nil
		}
	}
	return slot, "", fmt.Errorf("slot %d of %q is not served", slot, key)
}

func startCluster(server, cli, dir string) (c *Cluster, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	ports, err := clusterPorts(ClusterSize)
	if err != nil {
		return nil, err
	}
	c = &Cluster{}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	for i, port := range ports {
		n := filepath.Join(dir, "nodes-"+strconv.Itoa(i+1))
		nd, err := startNode(server, port, n+".log", dir,
			"--cluster-enabled", "yes", "--cluster-config-file", n+".conf", "--cluster-node-timeout", "2000")
		if err != nil {
			return c, err
		}
		c.nodes = append(c.nodes, nd)
		c.addrs = append(c.addrs, nd.addr)
	}
	for _, nd := range c.nodes {
		if err := nd.waitReady(5 * time.Second); err != nil {
			return c, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args := append(append([]string{"--cluster", "create"}, c.addrs...), "--cluster-replicas", "0", "--cluster-yes")
	out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput()
	if err != nil {
		return c, fmt.Errorf("redis-cli --cluster create: %w: %s", err, lastLines(string(out), 5))
	}
	if err := c.waitOK(10 * time.Second); err != nil {
		return c, err
	}
	return c, nil
}

// clusterPorts picks n distinct free ports P whose cluster bus port P+10000 is free too.
func clusterPorts(n int) ([]int, error) {
	var held []net.Listener
	defer func() {
		for _, l := range held {
			l.Close()
		}
	}()
	var ports []int
	for tries := 0; len(ports) < n; tries++ {
		if tries > 100 {
			return nil, errors.New("no free port pairs (P, P+10000)")
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		held = append(held, ln)
		p := ln.Addr().(*net.TCPAddr).Port
		if p+10000 > 65535 {
			continue
		}
		bus, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p+10000))
		if err != nil {
			continue
		}
		held = append(held, bus)
		ports = append(ports, p)
	}
	return ports, nil
}

// waitOK waits until every node reports a healthy cluster that covers every slot and knows
// every node, so that a client gets the same slot map from any of them.
func (c *Cluster) waitOK(within time.Duration) error {
	deadline := time.Now().Add(within)
	want := map[string]string{
		"cluster_state":          "ok",
		"cluster_slots_assigned": "16384",
		"cluster_slots_ok":       "16384",
		"cluster_known_nodes":    strconv.Itoa(len(c.nodes)),
		"cluster_size":           strconv.Itoa(len(c.nodes)),
	}
	clients := make([]*redis.Client, len(c.addrs))
	for i, a := range c.addrs {
		clients[i] = redis.NewClient(&redis.Options{Addr: a, MaxRetries: -1})
		defer clients[i].Close()
	}
	for {
		var problem error
		for i, cl := range clients {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			info, err := cl.ClusterInfo(ctx).Result()
			cancel()
			if err != nil {
				problem = fmt.Errorf("cluster info on %s: %w", c.addrs[i], err)
				break
			}
			if bad := infoMismatch(info, want); bad != "" {
				problem = fmt.Errorf("cluster not ready on %s: %s", c.addrs[i], bad)
				break
			}
		}
		if problem == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return problem
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func infoMismatch(info string, want map[string]string) string {
	got := map[string]string{}
	for _, line := range strings.Split(info, "\n") {
		if k, v, ok := strings.Cut(strings.TrimSpace(line), ":"); ok {
			got[k] = v
		}
	}
	for k, v := range want {
		if got[k] != v {
			return fmt.Sprintf("%s:%s, want %s", k, got[k], v)
		}
	}
	return ""
}

func (c *Cluster) stop() {
	for _, nd := range c.nodes {
		nd.stop()
	}
}

// StopNode kills the master at addr (one of Addrs) at once, as a crash would. Its slots stay
// assigned to it: commands for them fail, the other masters keep serving theirs until the
// cluster marks the node as failed (cluster-node-timeout, 2 s).
func (c *Cluster) StopNode(addr string) {
	for _, nd := range c.nodes {
		if nd.addr == addr {
			nd.stop()
		}
	}
}

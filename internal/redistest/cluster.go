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
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ClusterSize is the number of masters StartCluster starts.
const ClusterSize = 3

// Cluster is a Redis Cluster of ClusterSize masters (no replicas, or one each) for one test:
// real redis-server processes on free loopback ports, joined with `redis-cli --cluster create`.
type Cluster struct {
	addrs   []string          // the masters (as of the start, or of the last Rejoin)
	nodes   []*node           // every node, masters and replicas
	replica map[string]string // master -> its replica (StartClusterWithReplicas)
	dir     string            // the nodes' configuration files and logs
	access  *access           // the nodes' password and TLS
}

// StartCluster starts a Redis Cluster that lives until the test ends. It returns once every
// node reports cluster_state:ok with all 16384 slots assigned and all nodes known. Without
// redis-server or redis-cli on PATH the test is skipped, or fails with CALLBOT_REQUIRE_REDIS=1.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	return StartClusterWith(t, ClusterOptions{})
}

// StartClusterWithReplicas is StartCluster with one replica per master (six processes). It
// returns once every replica's link to its master is up, so that each master can fail over.
func StartClusterWithReplicas(t testing.TB) *Cluster {
	t.Helper()
	return StartClusterWith(t, ClusterOptions{Replicas: 1})
}

// ClusterOptions are StartClusterWith's choices.
type ClusterOptions struct {
	// Replicas per master: 0 or 1.
	Replicas int
	// NodeTimeout is cluster-node-timeout: how long a master may not answer before the cluster
	// flags it as failed and its replica is elected (about half a second to a second more). 2 s
	// when zero.
	NodeTimeout time.Duration
	// Password every node requires (requirepass, and masterauth for its replica); "" for none.
	Password string
	// TLS: the nodes listen, replicate and talk on the cluster bus over TLS only, with a
	// certificate for 127.0.0.1 signed by a CA of the test's own (CAFile).
	TLS bool
}

// StartClusterWith is StartCluster with o's choices.
func StartClusterWith(t testing.TB, o ClusterOptions) *Cluster {
	t.Helper()
	if o.Replicas < 0 || o.Replicas > 1 {
		t.Fatalf("redistest: %d replicas per master, want 0 or 1", o.Replicas)
	}
	if o.NodeTimeout == 0 {
		o.NodeTimeout = 2 * time.Second
	}
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
		c, err := startCluster(server, cli, filepath.Join(dir, fmt.Sprintf("attempt-%d", attempt)), o)
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

// Addrs returns the host:port of every master the cluster started with (after a Rejoin: of
// every master then).
func (c *Cluster) Addrs() []string { return append([]string(nil), c.addrs...) }

// Dir returns the directory of the nodes' logs (nodes-N.log) and cluster configuration files.
func (c *Cluster) Dir() string { return c.dir }

// CAFile is the PEM file of the CA that signed the nodes' certificate (ClusterOptions.TLS); ""
// without TLS.
func (c *Cluster) CAFile() string { return c.access.caFile }

// Client returns a cluster client, closed when the test ends.
func (c *Cluster) Client(t testing.TB) *redis.ClusterClient {
	o := c.access.options("")
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: c.Addrs(), Password: o.Password, TLSConfig: o.TLSConfig})
	t.Cleanup(func() { cc.Close() })
	return cc
}

// NodeClient returns a plain client of the node at addr (one of Addrs), closed when the test
// ends: what a node holds can be inspected without the cluster client's redirections.
func (c *Cluster) NodeClient(t testing.TB, addr string) *redis.Client {
	cl := redis.NewClient(c.access.options(addr))
	t.Cleanup(func() { cl.Close() })
	return cl
}

// SlotOf returns the hash slot of key (CLUSTER KEYSLOT) and the address of the master serving
// it (CLUSTER SLOTS).
func (c *Cluster) SlotOf(ctx context.Context, key string) (slot int64, addr string, err error) {
	cl := redis.NewClient(c.access.options(c.addrs[0]))
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

func startCluster(server, cli, dir string, o ClusterOptions) (c *Cluster, err error) {
	replicas, nodeTimeout := o.Replicas, o.NodeTimeout
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	a, err := newAccess(o, dir)
	if err != nil {
		return nil, err
	}
	ports, err := clusterPorts(ClusterSize * (1 + replicas))
	if err != nil {
		return nil, err
	}
	c = &Cluster{dir: dir, access: a}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	var all []string
	for i, port := range ports {
		n := filepath.Join(dir, "nodes-"+strconv.Itoa(i+1))
		// a replica's first sync starts at once (the default waits 5 s for more replicas)
		nd, err := startNodeWith(server, port, n+".log", dir, a,
			"--cluster-enabled", "yes", "--cluster-config-file", n+".conf", "--cluster-node-timeout", strconv.FormatInt(nodeTimeout.Milliseconds(), 10),
			"--repl-diskless-sync-delay", "0")
		if err != nil {
			return c, err
		}
		c.nodes = append(c.nodes, nd)
		all = append(all, nd.addr)
	}
	for _, nd := range c.nodes {
		if err := nd.waitReady(5 * time.Second); err != nil {
			return c, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	args := append(append(a.cliArgs(), append([]string{"--cluster", "create"}, all...)...), "--cluster-replicas", strconv.Itoa(replicas), "--cluster-yes")
	out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput()
	if err != nil {
		return c, fmt.Errorf("redis-cli --cluster create: %w: %s", err, lastLines(string(out), 5))
	}
	if replicas == 0 {
		c.addrs = all
	} else if err := c.readRoles(ctx); err != nil {
		return c, err
	}
	if err := c.waitOK(15 * time.Second); err != nil {
		return c, err
	}
	return c, nil
}

// readRoles finds which nodes are masters and which master each replica follows (redis-cli
// picks them): each node's own INFO replication, until every replica has its master.
func (c *Cluster) readRoles(ctx context.Context) error {
	for {
		c.addrs, c.replica = nil, map[string]string{}
		for _, nd := range c.nodes {
			cl := c.client(nd.addr)
			info, err := cl.Info(ctx, "replication").Result()
			cl.Close()
			if err != nil {
				return fmt.Errorf("info replication on %s: %w", nd.addr, err)
			}
			switch infoValue(info, "role") {
			case "master":
				c.addrs = append(c.addrs, nd.addr)
			case "slave":
				c.replica[net.JoinHostPort(infoValue(info, "master_host"), infoValue(info, "master_port"))] = nd.addr
			}
		}
		if len(c.addrs) == ClusterSize && len(c.replica) == ClusterSize {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d masters and %d replicas, want %d each: %w", len(c.addrs), len(c.replica), ClusterSize, ctx.Err())
		case <-time.After(25 * time.Millisecond):
		}
	}
}

// ReplicaOf returns the address of the replica of the master at addr (StartClusterWithReplicas).
func (c *Cluster) ReplicaOf(addr string) string { return c.replica[addr] }

// CutReplica stops the replica of the master at addr (SIGSTOP) and has the master drop its
// link (CLIENT KILL TYPE replica), as a replica that stalls and a link that breaks: what the
// master writes from now on is on no replica, and a failover to the replica loses it (a pause
// alone would not: the kernel still takes the stream in for the stopped process). resume starts
// the replica again (SIGCONT), which reconnects and catches up if its master lives; it is called
// when the test ends too.
func (c *Cluster) CutReplica(t testing.TB, addr string) (resume func()) {
	t.Helper()
	nd := c.node(c.replica[addr])
	if nd == nil {
		t.Fatalf("redistest: %s is not a master with a replica", addr)
	}
	if err := nd.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	mc := redis.NewClient(c.access.options(addr))
	defer mc.Close()
	if err := mc.Do(context.Background(), "CLIENT", "KILL", "TYPE", "replica").Err(); err != nil {
		nd.cmd.Process.Signal(syscall.SIGCONT)
		t.Fatalf("cut the replica of %s: %v", addr, err)
	}
	var once sync.Once
	resume = func() { once.Do(func() { nd.cmd.Process.Signal(syscall.SIGCONT) }) }
	t.Cleanup(resume)
	return resume
}

// WaitFailover waits until the replica of old (a master StopNode killed) has been promoted and
// the cluster is healthy again on every node still running, and returns the replica's address.
// The promoted replica reports cluster_state:ok as soon as it has taken the slots; the other
// nodes hear of it tens of milliseconds later and until then answer CLUSTERDOWN for their own
// slots as well: a test reading them then would take the error for data gone.
func (c *Cluster) WaitFailover(old string, within time.Duration) (string, error) {
	addr := c.replica[old]
	if addr == "" {
		return "", fmt.Errorf("%s has no replica", old)
	}
	deadline := time.Now().Add(within)
	for {
		err := c.failedOver(old, addr)
		if err == nil {
			return addr, nil
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("replica %s of %s not promoted within %s (%v); log: %s", addr, old, within, err, c.node(addr).logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// failedOver returns nil once addr, the replica of old, is a master and every node still running
// reports a healthy cluster (cluster_state:ok) in which old serves no slot; otherwise what is
// not so yet.
func (c *Cluster) failedOver(old, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	for _, nd := range c.nodes {
		select {
		case <-nd.exited:
			continue // killed (old, or another node StopNode stopped)
		default:
		}
		cl := c.client(nd.addr)
		err := func() error {
			defer cl.Close()
			if nd.addr == addr {
				info, err := cl.Info(ctx, "replication").Result()
				if err != nil {
					return err
				}
				if bad := infoMismatch(info, map[string]string{"role": "master"}); bad != "" {
					return fmt.Errorf("%s: %s", addr, bad)
				}
			}
			state, err := cl.ClusterInfo(ctx).Result()
			if err != nil {
				return err
			}
			if bad := infoMismatch(state, map[string]string{"cluster_state": "ok"}); bad != "" {
				return fmt.Errorf("%s: %s", nd.addr, bad)
			}
			//lint:ignore SA1019 CLUSTER SLOTS still answers on Redis 7 and also on the Redis 6 some machines have
			ranges, err := cl.ClusterSlots(ctx).Result()
			if err != nil {
				return err
			}
			for _, r := range ranges {
				if len(r.Nodes) > 0 && r.Nodes[0].Addr == old {
					return fmt.Errorf("%s: slots %d-%d still served by %s", nd.addr, r.Start, r.End, old)
				}
			}
			return nil
		}()
		if err != nil {
			return err
		}
	}
	return nil
}

// client is a client of the node at addr that does not retry (the caller does).
func (c *Cluster) client(addr string) *redis.Client {
	o := c.access.options(addr)
	o.MaxRetries = -1
	return redis.NewClient(o)
}

func (c *Cluster) node(addr string) *node {
	for _, nd := range c.nodes {
		if nd.addr == addr {
			return nd
		}
	}
	return nil
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
		"cluster_size":           strconv.Itoa(ClusterSize),
	}
	clients := make([]*redis.Client, len(c.nodes))
	for i, nd := range c.nodes {
		clients[i] = c.client(nd.addr)
		defer clients[i].Close()
	}
	replicas := map[string]bool{}
	for _, r := range c.replica {
		replicas[r] = true
	}
	for {
		var problem error
		for i, cl := range clients {
			addr := c.nodes[i].addr
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			info, err := cl.ClusterInfo(ctx).Result()
			var repl string
			if err == nil && len(c.replica) > 0 {
				repl, err = cl.Info(ctx, "replication").Result()
			}
			cancel()
			if err != nil {
				problem = fmt.Errorf("cluster info on %s: %w", addr, err)
				break
			}
			if bad := infoMismatch(info, want); bad != "" {
				problem = fmt.Errorf("cluster not ready on %s: %s", addr, bad)
				break
			}
			if bad := infoMismatch(repl, map[string]string{"master_link_status": "up", "master_sync_in_progress": "0"}); replicas[addr] && bad != "" {
				problem = fmt.Errorf("replica %s not in sync: %s", addr, bad)
				break
			}
			// the master counts its replica for WAIT once it is online (after its first ACK)
			if _, ok := c.replica[addr]; ok && !strings.Contains(infoValue(repl, "slave0"), "state=online") {
				problem = fmt.Errorf("master %s: replica not online: %q", addr, infoValue(repl, "slave0"))
				break
			}
		}
		if problem == nil {
			problem = c.replicasAcknowledge()
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

// replicasAcknowledge checks that a write on each master is acknowledged by its replica (WAIT):
// for a moment after its first sync a replica is online and not yet fed the master's stream.
func (c *Cluster) replicasAcknowledge() error {
	for _, addr := range c.addrs {
		if c.replica[addr] == "" {
			continue
		}
		cl := c.client(addr)
		err := func() error {
			defer cl.Close()
			for i := 0; i < 1000; i++ {
				key := "redistest:{w" + strconv.Itoa(i) + "}"
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				var set *redis.StatusCmd
				var wait *redis.Cmd
				cl.Pipelined(ctx, func(p redis.Pipeliner) error {
					set = p.Set(ctx, key, 1, time.Minute)
					wait = p.Do(ctx, "WAIT", 1, 100)
					return nil
				})
				cancel()
				if _, moved := redis.IsMovedError(set.Err()); moved {
					continue // another master's slot
				}
				if n, err := wait.Int64(); err != nil || set.Err() != nil || n != 1 {
					return fmt.Errorf("master %s: a write not acknowledged by its replica yet (%d, %v, %v)", addr, n, set.Err(), err)
				}
				return nil
			}
			return fmt.Errorf("master %s: no key of its slots found", addr)
		}()
		if err != nil {
			return err
		}
	}
	return nil
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

// Rejoin starts the node at old again (a master StopNode killed, whose replica WaitFailover saw
// promoted) with its own nodes.conf and no data, as a crashed master whose host comes back: it
// rejoins the cluster as the replica of the master that took its slots. It returns once that
// replica is in sync and the cluster healthy; from then on Addrs and ReplicaOf name the masters
// and replicas as they are, so the promoted master can be killed and fail over in turn.
func (c *Cluster) Rejoin(old string, within time.Duration) error {
	nd := c.node(old)
	if nd == nil {
		return fmt.Errorf("redistest: %s is no node of the cluster", old)
	}
	if err := nd.restart(5 * time.Second); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	if err := c.readRoles(ctx); err != nil {
		return fmt.Errorf("rejoin %s: %w", old, err)
	}
	return c.waitOK(time.Until(deadlineOf(ctx)))
}

func deadlineOf(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

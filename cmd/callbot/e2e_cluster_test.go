package main

import (
	"context"
	"errors"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/redistest"
)

// TestE2EOnRedisCluster runs every end-to-end scenario with callbot configured, as in
// production, with a comma-separated list of cluster nodes: a real 3-master Redis Cluster.
func TestE2EOnRedisCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	cluster := redistest.StartCluster(t)
	rdb := cluster.Client(t)
	redisURL := strings.Join(cluster.Addrs(), ",")
	onCluster := func(t *testing.T) string {
		ctx := context.Background()
		// each world starts from an empty cluster, as it would from a Redis of its own
		err := rdb.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error { return m.FlushAll(ctx).Err() })
		if err != nil {
			t.Fatalf("flush cluster: %v", err)
		}
		t.Cleanup(func() { // after callbot stopped: where did its keys go?
			var mu sync.Mutex // ForEachMaster calls fn concurrently
			perNode := map[string]int64{}
			var total int64
			rdb.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error {
				n, err := m.DBSize(ctx).Result()
				mu.Lock()
				defer mu.Unlock()
				total += n
				perNode[m.Options().Addr] = n
				return err
			})
			if total == 0 {
				t.Errorf("callbot wrote no key to the cluster")
			}
			t.Logf("keys per master: %v", perNode)
		})
		return redisURL
	}
	for _, sc := range e2eScenarios {
		t.Run(sc.name, func(t *testing.T) { sc.run(t, onCluster) })
	}
}

// The master of the tenant's queues dies while a caller waits in a queue, on a Redis Cluster whose
// masters have a replica each, with CALLBOT_REDIS_REPLICAS=1: callbot waits for each master's
// replica (callbot_redis_replicas counts the fewest), follows the promotion without a restart,
// and the waiting caller (their place in the queue replicated before the enqueue was
// acknowledged) reaches the agent who becomes available; a new caller is served too.
func TestE2EClusterFailover(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	cluster := redistest.StartClusterWithReplicas(t)
	w := newWorld(t, func(*testing.T) string { return strings.Join(cluster.Addrs(), ",") }, away(agent1), away(agent2), away(agent3))
	w.env["CALLBOT_REDIS_REPLICAS"] = "1"
	w.start(t)
	if err := w.waitReady(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	waitMetric(t, w, "callbot_redis_replicas 1")
	waiting := w.call(t, graphsim.CallerSpec{Digits: "1"})
	deadline := time.Now().Add(10 * time.Second)
	for !slices.Contains(waiting.Result().Prompts, "https://media.test/hold.wav") { // queued
		if time.Now().After(deadline) {
			t.Fatalf("the caller did not reach the queue: %+v", waiting.Result())
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the enqueue, carried out after the hold music was queued, is done
	_, addr, err := cluster.SlotOf(context.Background(), "cb:{tenant:"+demoTenant+"}")
	if err != nil {
		t.Fatal(err)
	}
	cluster.StopNode(addr)
	t0 := time.Now()
	promoted, err := cluster.WaitFailover(addr, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.waitReady(20 * time.Second); err != nil {
		t.Fatalf("after the failover: %v", err)
	}
	t.Logf("master %s killed; %s promoted and callbot ready %s later", addr, promoted, time.Since(t0).Round(time.Millisecond))
	waitMetric(t, w, "callbot_redis_replicas 0") // the promoted master is alone

	w.sim.SetPresence(agent2, "Available", "Available")
	r := waitDone(t, waiting, 30*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent2 {
		t.Fatalf("the caller who waited through the failover experienced %+v; want transferred to %s", r, agent2)
	}
	w.sim.SetPresence(agent3, "Available", "Available")
	r = waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 30*time.Second)
	if r.Outcome != graphsim.OutcomeTransferred || r.Agent == "" {
		t.Fatalf("a caller after the failover experienced %+v; want transferred to an agent", r)
	}
}

// trustRedisCA checks that serve, with only graphsim's CA in CALLBOT_CA_FILE, refuses to start
// and says it is for Redis's certificate; then adds redisCA (the PEM file of the CA that signed
// it) to that file, beside graphsim's.
func trustRedisCA(t *testing.T, w *world, redisCA string) {
	t.Helper()
	err := run(context.Background(), []string{"serve"}, func(k string) string { return w.env[k] }, io.Discard, io.Discard)
	if err == nil || !strings.Contains(err.Error(), "CALLBOT_REDIS_URL: redis unreachable") || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("serve with Redis's CA untrusted: %v; want it refused for the certificate", err)
	}
	caFile := w.env["CALLBOT_CA_FILE"]
	simPEM, err1 := os.ReadFile(caFile)
	redisPEM, err2 := os.ReadFile(redisCA)
	if err := errors.Join(err1, err2, os.WriteFile(caFile, append(simPEM, redisPEM...), 0o600)); err != nil {
		t.Fatal(err)
	}
}

// TestE2EOnPasswordAndTLSCluster: a Redis Cluster as the managed services run one (Azure Cache
// for Redis with clustering, ElastiCache in cluster mode with in-transit encryption): every node
// wants a password and speaks TLS only, and reports its shards by IP address. callbot reaches it
// with a rediss-cluster:// URL (the password percent-encoded) and CALLBOT_CA_FILE holding the
// CA that signed the nodes' certificate, beside graphsim's; a caller reaches an agent. Without
// that CA it does not start, and says why.
func TestE2EOnPasswordAndTLSCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end")
	}
	const password = "p@ss:w0rd%" // characters a URL must encode
	cluster := redistest.StartClusterWith(t, redistest.ClusterOptions{Password: password, TLS: true})
	enc := strings.NewReplacer("%", "%25", "@", "%40", ":", "%3A").Replace(password)
	redisURL := "rediss-cluster://:" + enc + "@" + strings.Join(cluster.Addrs(), ",")
	w := newWorld(t, func(*testing.T) string { return redisURL }, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))

	trustRedisCA(t, w, cluster.CAFile())
	w.startServing(t)
	r := waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1", DigitDelay: 500 * time.Millisecond}), 15*time.Second)
	if !r.Answered || r.Outcome != graphsim.OutcomeTransferred || r.Agent != agent1 {
		t.Fatalf("caller experienced %+v; want answered and transferred to %s", r, agent1)
	}
	var mu sync.Mutex
	var keys int64
	err := cluster.Client(t).ForEachMaster(context.Background(), func(ctx context.Context, m *redis.Client) error {
		n, err := m.DBSize(ctx).Result()
		mu.Lock()
		keys += n
		mu.Unlock()
		return err
	})
	if err != nil || keys == 0 {
		t.Errorf("keys on the cluster: %d, %v; want callbot's state there", keys, err)
	}
}

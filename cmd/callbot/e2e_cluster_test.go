package main

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/redis/go-redis/v9"

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

//go:build chaos

package chaos

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph/graphsim"
	"github.com/callbot/callbot/internal/redistest"
)

// TestRedisClusterFailoverSoak: the failover soak's set-up (startSoak: two instances behind the
// balancer, CALLBOT_REDIS_REPLICAS=1, callers at a steady pace) on a Redis Cluster of three
// masters with a replica each (cluster-node-timeout 1 s), CALLBOT_REDIS_URL the masters'
// addresses. Mid-load a master is SIGKILLed and its replica promoted: in turn the master of the
// tenant's slot (`cb:{tenant:T}`: queues, agents, reservations) and another one (call records,
// and the timers' or the outbox index's slot when it has them). After each failover the killed
// master comes back and rejoins as the replica of the one promoted in its place, so the next
// failover of that slot has a replica to promote. It checks what the Sentinel soak checks
// (soak.finish): every call ends as its caller chose, none stuck; no agent offered two callers
// at once; no caller in two queues, or queued in no queue, or an agent reserved for nobody past
// CHAOS_CLUSOAK_LIMIT; nothing a notification acknowledged lost (a key press lost would end its
// caller at the menu's fallback, a record gone would be adopted back into the menu); no
// notification given up by Graph; and, on the webhook, nothing but 2xx and 503: the gap gets
// 503, which Graph delivers again, never a 500 or a dropped connection.
func TestRedisClusterFailoverSoak(t *testing.T) {
	var (
		rate        = envOr("CHAOS_CLUSOAK_RATE", "8")
		duration    = envDuration(t, "CHAOS_CLUSOAK_DURATION", 14*time.Second)
		steady      = envDuration(t, "CHAOS_CLUSOAK_EVERY", 3*time.Second)
		nodeTimeout = envDuration(t, "CHAOS_CLUSOAK_NODE_TIMEOUT", time.Second)
		kinds       = strings.Split(envOr("CHAOS_CLUSOAK_KILLS", "tenant,calls"), ",")
	)
	perSec, err := strconv.ParseFloat(rate, 64)
	if err != nil || perSec <= 0 {
		t.Fatalf("CHAOS_CLUSOAK_RATE: %q", rate)
	}
	for _, k := range kinds {
		if k != "tenant" && k != "calls" {
			t.Fatalf("CHAOS_CLUSOAK_KILLS: unknown kill %q (tenant, calls)", k)
		}
	}
	calls := int(perSec * duration.Seconds())
	gap := time.Duration(float64(time.Second) / perSec)
	requireRedis(t)
	sd := seed(t)
	cluster := redistest.StartClusterWith(t, redistest.ClusterOptions{Replicas: 1, NodeTimeout: nodeTimeout})
	if dir := os.Getenv("CHAOS_LOG_DIR"); dir != "" { // the nodes' logs too
		t.Cleanup(func() { exec.Command("cp", "-r", cluster.Dir(), dir+"/redis-cluster").Run() })
	}
	rdb := cluster.Client(t)
	rig := startSoak(t, "CHAOS_CLUSOAK", perSec, strings.Join(cluster.Addrs(), ","), rdb)
	sim, bots := rig.sim, rig.bots
	tenantKey := keyPrefix + ":{tenant:" + tenantID + "}"

	t0 := time.Now()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var bg sync.WaitGroup

	// failovers
	type cycle struct {
		kind, victim, holds, promoted  string
		killed, failedOver, ready, met time.Time
		records, wentBack              int
		err                            error
	}
	var (
		mu     sync.Mutex
		cycles []cycle
	)
	bg.Go(func() {
		for k := 0; ; k++ {
			select {
			case <-ctx.Done():
				return
			case <-time.After(steady):
			}
			c := cycle{kind: kinds[k%len(kinds)]}
			c.victim, c.holds, c.err = pickVictim(cluster, c.kind, tenantKey)
			if c.err == nil {
				before := versions(rdb)
				c.records = len(before)
				// taken before the kill: a notification whose save was in flight as the master
				// died is answered 503 for it (EOF), and its attempts belong to this election
				c.killed = time.Now()
				cluster.StopNode(c.victim)
				c.promoted, c.err = cluster.WaitFailover(c.victim, 30*time.Second)
				c.failedOver = time.Now()
				if c.err == nil {
					c.ready = allReady(bots, 10*time.Second)
				}
				c.wentBack = wentBack(before, versions(rdb))
			}
			if c.err == nil {
				c.err = cluster.Rejoin(c.victim, 30*time.Second)
				c.met = time.Now()
			}
			mu.Lock()
			cycles = append(cycles, c)
			mu.Unlock()
			t.Logf("t=%s: failover %d (%s: %s, holding %s): killed t=%s, promoted %s +%s, both ready +%s, %d of %d records went back; rejoined as its replica t=%s %v",
				since(t0, time.Now()), k+1, c.kind, c.victim, c.holds, since(t0, c.killed), c.promoted,
				c.failedOver.Sub(c.killed).Round(10*time.Millisecond), c.ready.Sub(c.killed).Round(10*time.Millisecond),
				c.wentBack, c.records, since(t0, c.met), c.err)
			if c.err != nil {
				return
			}
		}
	})

	callers, placedAll := placeAll(t, sim, sd, calls, t0, gap, newCaller, rig.inv.track, func() { cancel(); bg.Wait() })
	for _, c := range cycles {
		if c.err != nil {
			t.Fatalf("failover (%s) at t=%s: %v", c.kind, since(t0, c.killed), c.err)
		}
	}
	if len(cycles) == 0 {
		t.Fatalf("no failover in %s of calls: CHAOS_CLUSOAK_EVERY %s is too long", duration, steady)
	}
	t.Logf("t=%s: %d calls placed, %d failovers", since(t0, placedAll), calls, len(cycles))

	// An outage lasts until the killed master is back as the replica of the one promoted: until
	// then that master has no replica, and with CALLBOT_REDIS_REPLICAS=1 its writes are refused
	// as unreplicated (503, an offer failed), as configured (seed 5: 5 offers of one caller so
	// refused between both instances ready and the rejoin). A notification answered 503 through
	// it is refused as configured too (seed 23: an incoming given up, its last attempt after both
	// instances were ready and before the rejoin), so an election lasts as long.
	for _, c := range cycles {
		rig.outages = append(rig.outages, [2]time.Time{c.killed, c.met})
		rig.elections = append(rig.elections, [2]time.Time{c.killed, c.met})
	}
	res := rig.finish(t, placedAll, callers)
	// The webhook during a failover: what each delivery from the kill to both instances ready
	// got. Outside 503 (Graph delivers again) and 2xx, nothing: a 500 or a dropped connection
	// is a notification callbot failed on.
	var fo []string
	for _, c := range cycles {
		got := map[string]int{}
		for _, d := range sim.Deliveries() {
			if !d.Time.Before(c.killed) && !d.Time.After(c.ready) {
				got[deliveryStatus(d)]++
			}
		}
		fo = append(fo, fmt.Sprintf("%s@%s(promoted +%s, ready +%s, back %d of %d, webhook meanwhile [%s])", c.kind, since(t0, c.killed),
			c.failedOver.Sub(c.killed).Round(10*time.Millisecond), c.ready.Sub(c.killed).Round(10*time.Millisecond),
			c.wentBack, c.records, fmtCounts(got)))
	}
	for _, d := range sim.Deliveries() {
		if s := deliveryStatus(d); s != "2xx" && s != "503" {
			t.Errorf("notification for call %s (%s %s, attempt %d) answered %s at %s: want 2xx, or 503 while Redis cannot take it",
				d.CallID, d.ChangeType, d.State, d.Attempt, s, d.Time.Format("15:04:05.000"))
		}
	}
	t.Logf("summary: %d calls at %s/s for %s on Redis Cluster (cluster-node-timeout %s); failovers %v; %s",
		calls, rate, duration, nodeTimeout, fo, res)
	rig.end(t, res)
}

// deliveryStatus names what a notification delivery got: "2xx", the status, or "error".
func deliveryStatus(d graphsim.Delivery) string {
	switch {
	case d.Err != "":
		return "error"
	case d.Status >= 200 && d.Status < 300:
		return "2xx"
	default:
		return strconv.Itoa(d.Status)
	}
}

// pickVictim picks the master to kill: "tenant", the master of the tenant's slot; "calls",
// another one, the master of the timers' or the outbox index's slot if it is not the tenant's.
// holds says what the victim serves of callbot's shared keys.
func pickVictim(c *redistest.Cluster, kind, tenantKey string) (victim, holds string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	serves := map[string][]string{}
	for _, k := range []string{tenantKey, keyPrefix + ":{timers}", keyPrefix + ":{outbox}", keyPrefix + ":{active}"} {
		_, addr, err := c.SlotOf(ctx, k)
		if err != nil {
			return "", "", err
		}
		serves[addr] = append(serves[addr], k)
	}
	_, tenantAt, _ := c.SlotOf(ctx, tenantKey)
	if kind == "tenant" {
		victim = tenantAt
	} else {
		for _, addr := range c.Addrs() {
			if addr == tenantAt {
				continue
			}
			if victim == "" || len(serves[addr]) > len(serves[victim]) {
				victim = addr
			}
		}
	}
	holds = "call records"
	if len(serves[victim]) > 0 {
		holds += ", " + strings.Join(serves[victim], ", ")
	}
	return victim, holds, nil
}

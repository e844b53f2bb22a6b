package callstate_test

import (
	"context"
	"errors"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// failoverDuringWait stands for a master with one replica in sync (INFO replication, replid
// "old"), whose replica stalls for the armed write (its WAIT answers 0); once that write's round
// trip is over, the master is failed over: INFO shows another replid ("new") and no replica,
// and onSwitch gives the new master its data.
type failoverDuringWait struct {
	armed, switched atomic.Bool
	onSwitch        func()
}

var replidLine = regexp.MustCompile(`master_replid:[0-9a-f]+`)

func (f *failoverDuringWait) DialHook(next redis.DialHook) redis.DialHook { return next }
func (f *failoverDuringWait) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if c, ok := cmd.(*redis.StringCmd); ok && c.Name() == "info" && c.Err() == nil {
			if f.switched.Load() {
				c.SetVal(replidLine.ReplaceAllString(c.Val(), "master_replid:"+strings.Repeat("b", 40)))
			} else {
				v := replidLine.ReplaceAllString(c.Val(), "master_replid:"+strings.Repeat("a", 40))
				c.SetVal(strings.Replace(v, "connected_slaves:0", "connected_slaves:1\r\nslave0:ip=127.0.0.1,port=1,state=online,offset=0,lag=0", 1))
			}
		}
		return err
	}
}
func (f *failoverDuringWait) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		err := next(ctx, cmds)
		for _, cmd := range cmds {
			if c, ok := cmd.(*redis.Cmd); ok && c.Name() == "wait" && c.Err() == nil {
				if f.armed.Load() || f.switched.Load() {
					c.SetVal(int64(0))
				} else {
					c.SetVal(int64(1))
				}
				if f.armed.CompareAndSwap(true, false) {
					f.onSwitch()
					f.switched.Store(true)
				}
			}
		}
		return err
	}
}

// A save's WAIT comes back short (the replica stalled), and before the store looks at the master
// again (INFO replication) the master has been failed over to a master alone: a new replid, no
// replica. The store took that look for the master the write went to, promoted alone and so not
// waited on, and acknowledged the save, which only the old master had: the failover had lost it
// (a notification acknowledged and lost, what CALLBOT_REDIS_REPLICAS is there to prevent; a
// failover the old master is alive for, a partition, leaves the client writing to it until it
// learns of the switch). When the master has changed since the write was sent, the save is now
// acknowledged only if the new master has it; a save the new master took (promoted alone before
// the write reached it) is still served at once. The same holds for a write sent before the
// store's first look at the master (an instance just started, or whose looks have failed since:
// Redis unreachable, a failover under way), which knows no replication id to compare: that write
// was acknowledged without the check.
func TestASaveTheFailoverLostIsNotAcknowledged(t *testing.T) {
	for _, tc := range []struct {
		name   string
		lost   bool // the new master lacks the save
		looked bool // the store looked at the master before the save
	}{
		{"lost with the old master", true, true}, {"on the new master", false, true},
		{"lost with the old master, before the first look", true, false},
		{"on the new master, before the first look", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			rdb := redistest.Start(t).Client(t)
			h := &failoverDuringWait{}
			rdb.AddHook(h)
			store := callstate.NewStore(rdb, "fo")
			store.WaitForReplicas(1, 20*time.Millisecond)
			if tc.looked {
				watchReplicas(t, store, time.Hour) // one look: the master has one replica
			}
			c := callstate.Call{ID: "c-fo", Tenant: "t1", State: callstate.StateAnswering}
			mustDo(t, store.Create(ctx, &c, time.Time{}))
			c.State = callstate.StateInMenu
			mustDo(t, store.Save(ctx, &c, time.Time{})) // replicated (and the save script loaded)
			key := "fo:{call:" + graph.CallKey(c.ID) + "}"
			before, err := rdb.Dump(ctx, key).Result()
			mustDo(t, err)
			h.onSwitch = func() {
				if tc.lost { // the replica promoted had the record as it was before the save
					mustDo(t, redis.NewClient(rdb.Options()).RestoreReplace(ctx, key, 0, before).Err())
				}
			}

			h.armed.Store(true)
			c.State = callstate.StateQueued
			err = store.Save(ctx, &c, time.Time{})
			got, gerr := store.Get(ctx, graph.CallKey(c.ID))
			mustDo(t, gerr)
			if tc.lost && !errors.Is(err, callstate.ErrNotReplicated) {
				t.Errorf("save: %v, want ErrNotReplicated: the master it went to is gone, and the new one has %s", err, got.State)
			}
			if !tc.lost && err != nil {
				t.Errorf("save on the master promoted alone: %v, want it acknowledged at once", err)
			}
		})
	}
}

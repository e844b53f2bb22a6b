package clock_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/redistest"
	"github.com/redis/go-redis/v9"
)

// unreachable fails every command while down is set, as a Redis not up yet.
type unreachable struct{ down atomic.Bool }

func (u *unreachable) DialHook(next redis.DialHook) redis.DialHook { return next }
func (u *unreachable) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if u.down.Load() {
			return errors.New("dial tcp: connection refused")
		}
		return next(ctx, cmd)
	}
}
func (u *unreachable) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// An instance that starts while Redis cannot be reached decides on its host's clock until its
// first sync: that sync comes within about a second of Redis answering, not an interval (10 s)
// later. A host clock 20 s behind meanwhile armed timers and outbox leases the other instances
// found due at once (a transfer's outbox re-driven, sent twice).
func TestRunSyncsSoonOnceRedisAnswersAfterAFailedStart(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	hook := &unreachable{}
	hook.down.Store(true)
	rdb.AddHook(hook)
	c := skewed(rdb, -20*time.Second, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan struct{})
	go func() { c.Run(ctx, time.Hour); close(done) }()
	time.Sleep(100 * time.Millisecond) // the first sync, Redis down
	if c.Synced() {
		t.Fatal("synced while Redis was down: the test proves nothing")
	}
	hook.down.Store(false)
	for deadline := time.Now().Add(5 * time.Second); !c.Synced(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not synced 5 s after Redis answered: the host's clock (20 s behind) served meanwhile")
		}
	}
	if off := c.Offset(); (off - 20*time.Second).Abs() > 100*time.Millisecond {
		t.Errorf("offset %v, want about 20s", off)
	}
	cancel()
	<-done
}

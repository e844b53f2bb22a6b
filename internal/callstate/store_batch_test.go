package callstate

import (
	"context"
	"errors"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/redistest"
)

// gate is a go-redis hook that holds the pipelines writing a key it names until released, or
// fails them as if Redis were unreachable, and counts the pipelines of writes it sees.
type gate struct {
	mu        sync.Mutex
	hold      map[string]chan struct{}
	fail      map[string]bool
	pipelines int
}

func (g *gate) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (g *gate) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (g *gate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		g.mu.Lock()
		var hold chan struct{}
		fail := false
		for _, c := range cmds {
			if c.Name() == "set" { // not go-redis's own (HELLO on a new connection...)
				g.pipelines++
				break
			}
		}
		for _, c := range cmds {
			if len(c.Args()) < 2 {
				continue
			}
			if k, ok := c.Args()[1].(string); ok {
				if h := g.hold[k]; h != nil {
					hold = h
				}
				fail = fail || g.fail[k]
			}
		}
		g.mu.Unlock()
		if hold != nil {
			<-hold
		}
		if fail {
			err := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
			for _, c := range cmds {
				c.SetErr(err)
			}
			return err
		}
		return next(ctx, cmds)
	}
}

func (g *gate) count() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pipelines
}

func set(key string) func(redis.Pipeliner) {
	return func(p redis.Pipeliner) { p.Set(context.Background(), key, "1", 0) }
}

func newGatedBatcher(t *testing.T, wait time.Duration) (*batcher, *gate, redis.UniversalClient) {
	rdb := redistest.Start(t).Client(t)
	g := &gate{hold: map[string]chan struct{}{}, fail: map[string]bool{}}
	rdb.AddHook(g)
	return &batcher{rdb: rdb, maxInFlight: 2, maxWait: wait}, g, rdb
}

// waitQueued waits until n writes wait for a pipeline.
func waitQueued(t *testing.T, b *batcher, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b.mu.Lock()
		q := len(b.waiting)
		b.mu.Unlock()
		if q == n {
			return
		}
	}
	t.Fatalf("never %d writes queued", n)
}

// Writes that come while two pipelines are in flight go together in the next one, and each
// gets its own result.
func TestBatcherSharesARoundTrip(t *testing.T) {
	b, g, rdb := newGatedBatcher(t, time.Hour)
	release := make(chan struct{})
	g.hold["a"], g.hold["b"] = release, release
	ctx := context.Background()
	errs := make(chan error, 5)
	for _, k := range []string{"a", "b"} {
		go func() { errs <- b.do(ctx, set(k)) }()
	}
	for b.busy() < 2 {
		time.Sleep(time.Millisecond)
	}
	for i, k := range []string{"c", "d", "e"} {
		go func() { errs <- b.do(ctx, set(k)) }()
		waitQueued(t, b, i+1)
	}
	before := g.count()
	close(release)
	for range 5 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if n := g.count() - before; n != 1 {
		t.Fatalf("the three queued writes took %d round trips, want 1", n)
	}
	if n, _ := rdb.Exists(ctx, "a", "b", "c", "d", "e").Result(); n != 5 {
		t.Fatalf("%d of 5 keys written", n)
	}
}

// A write does not wait for pipelines Redis is slow to answer: after maxWait it goes alone.
func TestBatcherWriteGoesAloneWhenRedisIsSlow(t *testing.T) {
	b, g, _ := newGatedBatcher(t, 20*time.Millisecond)
	release := make(chan struct{})
	defer close(release)
	g.hold["a"], g.hold["b"] = release, release
	ctx := context.Background()
	for _, k := range []string{"a", "b"} {
		go func() { _ = b.do(ctx, set(k)) }()
	}
	for b.busy() < 2 {
		time.Sleep(time.Millisecond)
	}
	done := make(chan error, 1)
	go func() { done <- b.do(ctx, set("c")) }()
	select {
	case err := <-done: // only the lone path can get here: both pipelines in flight are held
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a write waited for the held pipelines")
	}
}

// A pipeline that fails for want of Redis fails the writes queued behind it at once, with its
// error, without sending them; until a write succeeds, writes go alone, as without a batcher.
func TestBatcherFailsFastWhenRedisIsGone(t *testing.T) {
	b, g, _ := newGatedBatcher(t, time.Hour)
	release := make(chan struct{})
	g.hold["a"], g.hold["b"] = release, release
	g.fail["a"], g.fail["b"] = true, true
	ctx := context.Background()
	errs := make(chan error, 4)
	for _, k := range []string{"a", "b"} {
		go func() { errs <- b.do(ctx, set(k)) }()
	}
	for b.busy() < 2 {
		time.Sleep(time.Millisecond)
	}
	for i, k := range []string{"c", "d"} {
		go func() { errs <- b.do(ctx, set(k)) }()
		waitQueued(t, b, i+1)
	}
	before := g.count()
	close(release)
	for range 4 {
		if err := <-errs; err == nil || !unreachable(err) {
			t.Fatalf("got %v, want the unreachable Redis's error", err)
		}
	}
	if n := g.count() - before; n != 0 {
		t.Fatalf("%d more round trips for the queued writes, want none", n)
	}
	if !b.failing.Load() {
		t.Fatal("not failing after a pipeline failed for want of Redis")
	}
	if err := b.do(ctx, set("f")); err != nil {
		t.Fatal(err)
	}
	if b.failing.Load() || b.busy() != 0 {
		t.Fatalf("failing %v, %d in flight after a write succeeded", b.failing.Load(), b.busy())
	}
}

func (b *batcher) busy() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.inFlight
}

package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/redistest"
)

// Saves of many calls at once each get their own outcome: a stale version is a conflict for that
// call only, a failing write behind one save fails that save only, and every successful save is
// in Redis with its version bumped once.
func TestConcurrentSavesKeepTheirOwnOutcome(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "grp")
	ctx := context.Background()
	if err := rdb.Set(ctx, "grp:not-a-hash", "x", 0).Err(); err != nil {
		t.Fatal(err)
	}
	const calls, rounds = 48, 20
	cs := make([]*callstate.Call, calls)
	for i := range cs {
		cs[i] = &callstate.Call{ID: fmt.Sprintf("g%d", i), Tenant: "t", State: callstate.StateQueued, CreatedAt: time.Now()}
		if err := store.Create(ctx, cs[i], time.Now().Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, calls*rounds*3)
	for i, c := range cs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				switch {
				case i%3 == 1:
					// a writer behind the times: its version is one old
					stale := *c
					stale.Version--
					if err := store.Save(ctx, &stale, time.Time{}); !errors.Is(err, callstate.ErrConflict) {
						errs <- fmt.Errorf("%s: stale save: %v, want a conflict", c.ID, err)
					}
				case i%3 == 2 && r%2 == 1:
					// a write behind the record fails: the save reports it, others do not see it
					err := store.SaveWith(ctx, c, callstate.Write{Behind: func(p redis.Pipeliner) { p.HSet(ctx, "grp:not-a-hash", "f", 1) }})
					if err == nil || !strings.Contains(err.Error(), "WRONGTYPE") {
						errs <- fmt.Errorf("%s: save with a failing write behind: %v, want WRONGTYPE", c.ID, err)
					}
					c.Version++ // the record was saved all the same: the script ran before the write behind
					continue
				}
				c.Seq++
				if err := store.Save(ctx, c, time.Now().Add(time.Minute)); err != nil {
					errs <- fmt.Errorf("%s: save: %v", c.ID, err)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for _, c := range cs {
		got, err := store.Get(ctx, c.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Version != c.Version || got.Seq != c.Seq {
			t.Errorf("%s: stored version %d seq %d, want %d and %d", c.ID, got.Version, got.Seq, c.Version, c.Seq)
		}
	}
}

// The script cache emptied (a Redis restart or failover) while saves run concurrently: each save
// sends its script again and succeeds.
func TestConcurrentSavesAfterScriptFlush(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "flush")
	ctx := context.Background()
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &callstate.Call{ID: fmt.Sprintf("f%d", i), Tenant: "t", State: callstate.StateQueued, CreatedAt: time.Now()}
			if err := store.Create(ctx, c, time.Time{}); err != nil {
				t.Error(err)
				return
			}
			for r := 0; r < 10; r++ {
				if i == 0 && r == 5 {
					rdb.ScriptFlush(ctx)
				}
				if err := store.Save(ctx, c, time.Time{}); err != nil {
					t.Errorf("%s round %d: %v", c.ID, r, err)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// With Redis gone, every concurrent save and create fails with an error (a create must not look
// like a repeated incoming notification), and none hangs.
func TestConcurrentSavesRedisDown(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "down")
	ctx := context.Background()
	cs := make([]*callstate.Call, 16)
	for i := range cs {
		cs[i] = &callstate.Call{ID: fmt.Sprintf("d%d", i), Tenant: "t", State: callstate.StateQueued, CreatedAt: time.Now()}
		if err := store.Create(ctx, cs[i], time.Time{}); err != nil {
			t.Fatal(err)
		}
	}
	rdb.Do(ctx, "SHUTDOWN", "NOSAVE") // the reply never comes: the server is gone
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Add(2)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			if err := store.Save(ctx, c, time.Time{}); err == nil {
				t.Errorf("%s: saved with Redis down", c.ID)
			}
		}()
		go func() {
			// a new call (an incoming notification) must fail too, not look like a repeat
			defer wg.Done()
			ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			n := &callstate.Call{ID: fmt.Sprintf("new%d", i), Tenant: "t", State: callstate.StateAnswering, CreatedAt: time.Now()}
			if err := store.Create(ctx, n, time.Now().Add(time.Minute)); err == nil || errors.Is(err, callstate.ErrExists) {
				t.Errorf("%s: create with Redis down: %v, want a storage error", n.ID, err)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("saves hang with Redis down")
	}
}

package callstate_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/redistest"
)

// A save refused as unreplicated hands its commands back, due at once for a re-drive (Graph's
// redelivery of the notification finds the record made, and sends nothing). When the master is
// out of reach right after refusing (SIGKILLed as a Sentinel failover began), the hand-back
// failed and was only logged: the answer waited for the whole outbox lease. It is now tried again
// until Redis takes it: the caller is answered a moment after Redis serves again.
func TestRefusedHandBackTriedAgain(t *testing.T) {
	s := redistest.StartSentinel(t)
	rdb := s.Client(t)
	blip := &waitThenDown{down: 700 * time.Millisecond}
	rdb.AddHook(blip)
	store := callstate.NewStore(rdb, "hb")
	store.WaitForReplicas(1, 200*time.Millisecond)
	watchReplicas(t, store, 50*time.Millisecond)
	flow, err := ivr.Parse([]byte(flowYAML), "t.yaml")
	mustDo(t, err)
	g := &fakeGraph{state: graph.CallIncoming} // ringing: the re-drive's look finds the answer not taken
	const lease = time.Minute                  // far longer than the test waits: only a hand-back makes it due
	m := callstate.NewMachine(callstate.Config{Store: store, Timers: callstate.NewTimers(rdb, "hb"), Control: g,
		Queues: &fakeQueues{}, Flow: flow, CallbackURI: "https://bot.test/api/calls", OutboxLease: lease,
		Log: zaptest.NewLogger(t)})
	ctx, stop := context.WithCancel(context.Background())
	var loops sync.WaitGroup
	loops.Go(func() { m.RunOutbox(ctx, 50*time.Millisecond) })
	t.Cleanup(func() { stop(); loops.Wait(); m.Wait() })

	incoming := note("created", realCallID, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)
	blip.arm()
	if err := deliver(m, incoming); !errors.Is(err, graph.ErrUnavailable) {
		t.Fatalf("incoming whose WAIT came back short: %v, want it refused (503)", err)
	}
	if !blip.fired.Load() {
		t.Fatal("the fault was not injected: no WAIT went out")
	}
	var rec callstate.Call
	waitFor(t, "the record read once Redis serves", func() bool {
		rec, err = store.Get(context.Background(), realCallKey)
		return err == nil
	})
	if rec.State != callstate.StateAnswering {
		t.Fatalf("record on the master: %s, want the refused save's (answering)", rec.State)
	}
	// Graph delivers the incoming again once Redis answers: the record is there, nothing decided
	waitFor(t, "the redelivered incoming acknowledged", func() bool { return deliver(m, incoming) == nil })

	deadline := time.Now().Add(5 * time.Second)
	for !sentAnswer(g) {
		if time.Now().After(deadline) {
			t.Fatalf("the answer of the refused save was not sent within 5 s of Redis serving again "+
				"(the outbox lease is %s); Graph was sent %v", lease, g.log())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := strings.Count(strings.Join(g.log(), "\n"), "answer "); n != 1 {
		t.Errorf("answer sent %d times, want once: %v", n, g.log())
	}
}

func sentAnswer(g *fakeGraph) bool {
	for _, c := range g.log() {
		if strings.HasPrefix(c, "answer ") {
			return true
		}
	}
	return false
}

// waitThenDown is a go-redis hook that, once armed, makes the next WAIT answer 0 (the replica
// did not acknowledge in time) and Redis unreachable for down after it, as a master SIGKILLed
// right after its WAIT timed out is.
type waitThenDown struct {
	down  time.Duration
	armed atomic.Bool
	fired atomic.Bool
	until atomic.Int64 // Unix nanoseconds
}

var errDown = errors.New("dial tcp: connect: connection refused (injected)")

func (w *waitThenDown) arm() { w.armed.Store(true) }

func (w *waitThenDown) isDown() bool { return time.Now().UnixNano() < w.until.Load() }

func (w *waitThenDown) DialHook(next redis.DialHook) redis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		if w.isDown() {
			return nil, errDown
		}
		return next(ctx, network, addr)
	}
}

func (w *waitThenDown) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if w.isDown() {
			cmd.SetErr(errDown)
			return errDown
		}
		return next(ctx, cmd)
	}
}

func (w *waitThenDown) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		if w.isDown() {
			for _, c := range cmds {
				c.SetErr(errDown)
			}
			return errDown
		}
		err := next(ctx, cmds)
		if err != nil { // a script not loaded yet (NOSCRIPT): the write is sent again
			return err
		}
		for _, c := range cmds {
			if strings.EqualFold(c.Name(), "wait") && w.armed.CompareAndSwap(true, false) {
				c.(*redis.Cmd).SetVal(int64(0))
				w.until.Store(time.Now().Add(w.down).UnixNano())
				w.fired.Store(true)
			}
		}
		return err
	}
}

// A create that finds the call's record made (Graph delivering the incoming again) never puts
// off the outbox index entry: its own entry, written ahead of the record, pushed the re-drive of
// the record's commands a lease further at each delivery. With the commands acknowledged and
// the entry gone, it writes the entry again, for nothing: the claim that finds nothing pending
// takes it out (lowerScoreScript). With the script cache empty (a restart, a failover) too. Each
// way a record is written: one pipeline (standalone), one write after another (Redis Cluster),
// each master waited for (Redis Cluster with replicas).
func TestRepeatedCreateLeavesTheOutboxLease(t *testing.T) {
	t.Run("standalone", func(t *testing.T) {
		rdb := redistest.Start(t).Client(t)
		testRepeatedCreate(t, rdb, callstate.NewStore(rdb, "rc1"), "rc1")
	})
	t.Run("cluster", func(t *testing.T) {
		rdb := redistest.StartCluster(t).Client(t)
		testRepeatedCreate(t, rdb, callstate.NewStore(rdb, "rc2"), "rc2")
	})
	t.Run("cluster-replicas", func(t *testing.T) {
		_, rdb, store := replicatedCluster(t, "rc3")
		testRepeatedCreate(t, rdb, store, "rc3")
	})
}

func testRepeatedCreate(t *testing.T, rdb redis.UniversalClient, store *callstate.Store, prefix string) {
	ctx := context.Background()
	index := prefix + ":{outbox}"
	answer := []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdAnswer}}}
	first := time.UnixMilli(time.Now().UnixMilli()) // due at once: handed back for a re-drive
	for i, id := range []string{"0b1c0001-0000-4000-8000-000000000001", "0b1c0002-0000-4000-8000-000000000002"} {
		key := graph.CallKey(id)
		c := &callstate.Call{ID: id, Tenant: "t1", State: callstate.StateAnswering, CreatedAt: first, CmdSeq: 1, Outbox: answer}
		if err := store.Create(ctx, c, first); err != nil {
			t.Fatal(err)
		}
		want := float64(first.UnixMilli())
		if i == 1 { // its answer acknowledged, the entry gone
			if err := store.Ack(ctx, key, true, 1); err != nil {
				t.Fatal(err)
			}
			mustDo(t, rdb.ZRem(ctx, index, key).Err())
			want = float64(first.Add(8 * time.Second).UnixMilli()) // written again, for nothing
			defer func() {
				if pending, err := store.Pending(ctx, []string{key}); err != nil || pending[0] {
					t.Errorf("call 2: pending %v %v, want nothing pending (the claim takes the entry out)", pending, err)
				}
			}()
		}
		// as after a restart or a failover: the create is sent again with its script (NOSCRIPT)
		mustDo(t, rdb.ScriptFlush(ctx).Err())
		again := &callstate.Call{ID: id, Tenant: "t1", State: callstate.StateAnswering, CreatedAt: first.Add(time.Second), CmdSeq: 1, Outbox: answer}
		if err := store.Create(ctx, again, first.Add(8*time.Second)); !errors.Is(err, callstate.ErrExists) {
			t.Fatalf("create %s again: %v, want ErrExists", id, err)
		}
		got, err := rdb.ZScore(ctx, index, key).Result()
		if errors.Is(err, redis.Nil) {
			got, err = -1, nil
		}
		mustDo(t, err)
		if got != want {
			t.Errorf("call %d: outbox index entry after a repeated create: %v, want %v (-1: none)", i+1, got, want)
		}
	}
}

// HandBackOutboxes makes due the outboxes still leased with the score handed back, and leaves
// one leased again since (a save, a renewal, another claim) as it is.
func TestHandBackOutboxesLeavesAnOutboxLeasedSince(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	store := callstate.NewStore(rdb, "hbs")
	ctx := context.Background()
	now := time.UnixMilli(time.Now().UnixMilli())
	lease := now.Add(8 * time.Second)
	mustDo(t, rdb.ZAdd(ctx, "hbs:{outbox}", redis.Z{Score: float64(lease.UnixMilli()), Member: "a"},
		redis.Z{Score: float64(lease.UnixMilli()) + 0.5, Member: "b"}, // claimed since
		redis.Z{Score: float64(lease.UnixMilli()), Member: "c"}).Err())
	err := store.HandBackOutboxes(ctx, []callstate.HandBack{
		{Call: "a", Score: float64(lease.UnixMilli()), Due: now},
		{Call: "b", Score: float64(lease.UnixMilli()), Due: now},
		{Call: "c", Score: float64(lease.UnixMilli()), Due: now.Add(time.Second)},
		{Call: "d", Score: float64(lease.UnixMilli()), Due: now}, // gone: done meanwhile
	})
	mustDo(t, err)
	got, err := rdb.ZRangeWithScores(ctx, "hbs:{outbox}", 0, -1).Result()
	mustDo(t, err)
	want := []redis.Z{{Score: float64(now.UnixMilli()), Member: "a"}, {Score: float64(now.Add(time.Second).UnixMilli()), Member: "c"},
		{Score: float64(lease.UnixMilli()) + 0.5, Member: "b"}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("outbox index after the hand-backs: %v, want %v", got, want)
	}
}

package callstate_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/redistest"
)

// BenchmarkSave: saves of a call record with its outbox-index entry and a timer, one call per
// goroutine, against a real redis-server. "serial" is one writer; "parallel" is 64 writers, as
// when many notifications of different calls are applied at once. ns/op is per save.
func BenchmarkSave(b *testing.B) {
	benchSaves(b, callstate.NewStore(redistest.Start(b).Client(b), "bench"))
}

// BenchmarkSaveReplicated: the same saves on a master with a replica (through its Sentinel),
// without waiting for the replica and with CALLBOT_REDIS_REPLICAS=1 (WAIT 1 in each save's
// round trip): what waiting for the replica costs.
func BenchmarkSaveReplicated(b *testing.B) {
	s := redistest.StartSentinel(b)
	for _, wait := range []int{0, 1} {
		b.Run(fmt.Sprintf("wait=%d", wait), func(b *testing.B) {
			store := callstate.NewStore(s.Client(b), fmt.Sprintf("bench%d", wait))
			if wait > 0 {
				store.WaitForReplicas(wait, 100*time.Millisecond)
				watchReplicas(b, store, 100*time.Millisecond)
			}
			benchSaves(b, store)
		})
	}
}

// BenchmarkSaveCluster: the same saves on a Redis Cluster whose masters have a replica each,
// without waiting for the replicas and with CALLBOT_REDIS_REPLICAS=1 (the timer and the outbox
// index entry waited for on their masters, then the record on its own).
func BenchmarkSaveCluster(b *testing.B) {
	cluster := redistest.StartClusterWithReplicas(b)
	for _, wait := range []int{0, 1} {
		b.Run(fmt.Sprintf("wait=%d", wait), func(b *testing.B) {
			store := callstate.NewStore(cluster.Client(b), fmt.Sprintf("benchc%d", wait))
			if wait > 0 {
				store.WaitForReplicas(wait, 100*time.Millisecond)
				watchReplicas(b, store, 100*time.Millisecond)
			}
			benchSaves(b, store)
		})
	}
}

func benchSaves(b *testing.B, store *callstate.Store) {
	ctx := context.Background()
	var next atomic.Int64
	newCall := func() *callstate.Call {
		c := &callstate.Call{ID: fmt.Sprintf("call-%d", next.Add(1)), Tenant: "t", State: callstate.StateQueued,
			Queue: "sales", CreatedAt: time.Now()}
		if err := store.Create(ctx, c, time.Now().Add(time.Minute)); err != nil {
			b.Fatal(err)
		}
		return c
	}
	save := func(c *callstate.Call) {
		c.Seq++
		err := store.SaveWith(ctx, c, callstate.Write{OutboxDue: time.Now().Add(time.Minute),
			Timers: []callstate.Timer{{Tenant: "t", Call: c.ID, Kind: callstate.TimerHold, Token: c.Seq, At: time.Now().Add(time.Minute)}}})
		if err != nil {
			b.Error(err)
		}
	}
	b.Run("serial", func(b *testing.B) {
		c := newCall()
		b.ReportAllocs()
		cpu := cpuTime()
		for b.Loop() {
			save(c)
		}
		b.ReportMetric(float64(cpuTime()-cpu)/float64(b.N), "client-cpu-ns/op")
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(32) // 64 writers on 2 CPUs
		cpu := cpuTime()
		b.RunParallel(func(pb *testing.PB) {
			c := newCall()
			for pb.Next() {
				save(c)
			}
		})
		b.ReportMetric(float64(cpuTime()-cpu)/float64(b.N), "client-cpu-ns/op")
	})
}

// cpuTime is the user+system CPU this process used so far, in ns: the client's side of a save,
// without redis-server's.
func cpuTime() int64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return ru.Utime.Nano() + ru.Stime.Nano()
}

// BenchmarkCreate: creates of new call records, each with its answer in the outbox, its outbox
// index entry and its answer timer, against a real redis-server: one per incoming call. The
// entries ahead of a created record are written so that they only ever lower a due (a script,
// where a save's are plain ZADDs).
func BenchmarkCreate(b *testing.B) {
	store := callstate.NewStore(redistest.Start(b).Client(b), "benchcr")
	ctx := context.Background()
	answer := []callstate.Pending{{Seq: 1, Version: 1, Cmd: callstate.Command{Kind: callstate.CmdAnswer}}}
	n := 0
	b.ReportAllocs()
	cpu := cpuTime()
	for b.Loop() {
		n++
		now := time.Now()
		c := &callstate.Call{ID: fmt.Sprintf("create-%d", n), Tenant: "t", State: callstate.StateAnswering, CreatedAt: now, CmdSeq: 1, Outbox: answer}
		err := store.Create(ctx, c, now.Add(8*time.Second),
			callstate.Timer{Tenant: "t", Call: c.ID, Kind: callstate.TimerAnswer, Token: 1, At: now.Add(10 * time.Second)})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(cpuTime()-cpu)/float64(b.N), "client-cpu-ns/op")
}

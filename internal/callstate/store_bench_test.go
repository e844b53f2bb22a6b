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
	rdb := redistest.Start(b).Client(b)
	store := callstate.NewStore(rdb, "bench")
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

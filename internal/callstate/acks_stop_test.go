package callstate

import (
	"context"
	"runtime"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/callbot/callbot/internal/redistest"
)

// An acknowledgement taken for the batch as RunAcks stops (a shutdown, while the commands in
// flight finish) is written. Before, ack saw batching on, RunAcks turned it off and took what
// was in the channel, and only then did ack put its acknowledgement in: it stayed there, never
// written, with the agent release or the disarmed timers it carried (the release waited for
// another instance's re-drive, a lease later; the commands acknowledged were re-driven too).
// The window is narrow: three goroutines acknowledge as fast as they can while RunAcks stops,
// 500 times; with the fault, one was left in the channel within 200 rounds in each of 12 runs.
func TestAcksTakenAsRunAcksStopsAreWritten(t *testing.T) {
	rdb := redistest.Start(t).Client(t)
	m := NewMachine(Config{Store: NewStore(rdb, "test"), Timers: NewTimers(rdb, "test"), Log: zaptest.NewLogger(t)})
	log := zaptest.NewLogger(t)
	for round := range 500 {
		ctx, cancel := context.WithCancel(context.Background())
		stopped := make(chan struct{})
		go func() { m.RunAcks(ctx, time.Hour); close(stopped) }()
		for !m.batching.Load() {
			runtime.Gosched()
		}
		var acking sync.WaitGroup
		for g := range 3 {
			acking.Go(func() {
				for seq := int64(1); ; seq++ {
					select {
					case <-stopped:
						return
					default:
					}
					m.ack(context.Background(), "call-"+string(rune('a'+g)), true, 0, seq, log)
				}
			})
		}
		for range 10 {
			runtime.Gosched()
		}
		cancel()
		<-stopped
		acking.Wait()
		if n := len(m.acks); n > 0 {
			t.Fatalf("round %d: %d acknowledgements left in the batch channel after RunAcks returned: never written", round, n)
		}
	}
}

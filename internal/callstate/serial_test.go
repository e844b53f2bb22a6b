package callstate

import (
	"fmt"
	"sync"
	"testing"
	"time"
)

// A call's Graph commands run in the order they were decided, one at a time; other calls' run
// meanwhile (a slow Graph request for one caller holds up no other); wait returns only when all
// are done; and goroutines that ran dry are reused for the next calls.
func TestSerialOrderPerKeyAndReuse(t *testing.T) {
	var s serial
	var mu sync.Mutex
	got := map[string][]int{}
	running := map[string]int{}
	record := func(key string, i int) func() {
		return func() {
			mu.Lock()
			running[key]++
			if running[key] > 1 {
				t.Errorf("%s: two functions at once", key)
			}
			mu.Unlock()
			time.Sleep(100 * time.Microsecond)
			mu.Lock()
			running[key]--
			got[key] = append(got[key], i)
			mu.Unlock()
		}
	}
	for round := 0; round < 3; round++ {
		for i := 0; i < 50; i++ {
			for k := 0; k < 8; k++ {
				s.do(fmt.Sprint("call-", round, "-", k), record(fmt.Sprint("call-", round, "-", k), i))
			}
		}
		s.wait()
	}
	for key, seq := range got {
		if len(seq) != 50 {
			t.Fatalf("%s: ran %d of 50", key, len(seq))
		}
		for i, v := range seq {
			if v != i {
				t.Fatalf("%s: order %v", key, seq)
			}
		}
	}
	if len(got) != 24 {
		t.Fatalf("%d keys ran, want 24", len(got))
	}

	// a slow key does not hold up another
	block := make(chan struct{})
	s.do("slow", func() { <-block })
	done := make(chan struct{})
	s.do("fast", func() { close(done) })
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a blocked call held up another call's commands")
	}
	close(block)
	s.wait()
}

// Goroutines that ran dry are reused for the next calls rather than a new one per call.
func TestSerialReusesIdleGoroutines(t *testing.T) {
	var s serial
	for i := 0; i < 200; i++ {
		s.do(fmt.Sprint("call-", i), func() {})
		s.wait()
		time.Sleep(time.Millisecond) // the goroutine parks, waiting for more work
	}
	if n := s.started.Load(); n > 100 {
		t.Fatalf("%d goroutines started for 200 calls run one after another, want most reused", n)
	}
}

package callstate

import (
	"fmt"
	"slices"
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

// A place taken before its function is known keeps its turn: what is queued after it waits for
// it, without a goroutine parked on the key; a place given up lets what follows run at once;
// wait counts reserved places as work.
func TestSerialReservedPlaces(t *testing.T) {
	var s serial
	var mu sync.Mutex
	var got []string
	rec := func(v string) func() {
		return func() { mu.Lock(); got = append(got, v); mu.Unlock() }
	}
	first := s.reserve("call")
	given := s.reserve("call")
	s.do("call", rec("third"))
	time.Sleep(20 * time.Millisecond)
	mu.Lock()
	if len(got) != 0 {
		t.Fatalf("ran %v ahead of a reserved place", got)
	}
	mu.Unlock()
	waited := make(chan struct{})
	go func() { s.wait(); close(waited) }()
	s.fill("call", given, nil) // the second gives up its place
	s.fill("call", first, rec("first"))
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("wait did not return after every place was filled or given up")
	}
	if want := []string{"first", "third"}; !slices.Equal(got, want) {
		t.Fatalf("ran %v, want %v", got, want)
	}

	// a lone place given up leaves nothing behind, and the key works as before
	p := s.reserve("other")
	s.fill("other", p, nil)
	s.mu.Lock()
	left := len(s.q)
	s.mu.Unlock()
	if left != 0 {
		t.Fatalf("%d lanes left after every place ran or was given up", left)
	}
	done := make(chan struct{})
	s.do("other", func() { close(done) })
	<-done
	s.wait()

	// a place reserved while the key's goroutine is busy: it stops there, and fill resumes it
	block := make(chan struct{})
	s.do("busy", func() { <-block })
	late := s.reserve("busy")
	ran := make(chan struct{})
	s.do("busy", func() { close(ran) })
	close(block)
	time.Sleep(20 * time.Millisecond)
	select {
	case <-ran:
		t.Fatal("ran ahead of a reserved place")
	default:
	}
	s.fill("busy", late, func() {})
	select {
	case <-ran:
	case <-time.After(5 * time.Second):
		t.Fatal("filling the place did not resume the key")
	}
	s.wait()
}

// A key's moot mark lasts while it has places and goes with them: a later call with the same key
// (or the same call once its executor ran dry) starts with nothing moot.
func TestSerialSupersedeLastsWhileTheKeyHasWork(t *testing.T) {
	var s serial
	s.supersede("call", 5) // nothing queued: nothing to mark
	if s.superseded("call", 1) {
		t.Fatal("a mark on a key with no places was kept")
	}
	p := s.reserve("call")
	s.supersede("call", 5)
	s.supersede("call", 3) // never lowered
	if !s.superseded("call", 4) || s.superseded("call", 5) || s.superseded("call", 6) {
		t.Fatal("versions before 5 should be moot, 5 and later not")
	}
	s.fill("call", p, func() {})
	s.wait()
	if s.superseded("call", 4) {
		t.Fatal("the mark outlived the key's work")
	}
}

// wait may be called while other goroutines queue work, as a test does while timers fire: it
// returns once nothing is left, and is no data race (a sync.WaitGroup, used before, forbids a
// Wait concurrent with an Add from zero; the race detector failed such tests).
func TestSerialWaitWhileWorkIsQueued(t *testing.T) {
	var s serial
	s.do("warm", func() {}) // the lane map exists, as in a running machine
	s.wait()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			ran := make(chan struct{})
			s.do(fmt.Sprint("call-", i%4), func() { time.Sleep(20 * time.Microsecond); close(ran) })
			<-ran // the count falls to zero, and the next place is taken from zero
		}
	}()
	for i := 0; i < 2000; i++ {
		s.wait()
	}
	close(stop)
	wg.Wait()
	s.wait()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.busy != 0 || len(s.q) != 0 {
		t.Fatalf("after wait: %d places pending, %d lanes", s.busy, len(s.q))
	}
}

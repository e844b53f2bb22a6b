package queue

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/callbot/callbot/internal/graph"
)

// An agent whose presence Graph stops giving (throttled, failing) is routed on the last reading
// for MaxAge, then taken as not routable until a read succeeds: an agent who went home
// meanwhile is not offered callers whose transfer would ring out or land in their voicemail.
func TestPollerTakesPresenceOlderThanItsMaxAgeAsNotRoutable(t *testing.T) {
	ctx := context.Background()
	s := newStore(t)
	must(t, s.SetMembers(ctx, "t", "q", []string{"a1", "a2"}))
	available := &fakePresence{status: map[string]graph.Presence{
		"a1": {UserID: "a1", Availability: "Available", Activity: "Available"},
		"a2": {UserID: "a2", Availability: "Available", Activity: "Available"},
	}}
	throttled := presenceFunc(func(context.Context, []string) ([]graph.Presence, error) {
		return nil, &graph.Error{Op: "getPresencesByUserId", Status: 429, Code: "TooManyRequests"}
	})
	core, logs := observer.New(zap.InfoLevel)
	const maxAge = 300 * time.Millisecond
	p := &Poller{Store: s, Source: available, Tenant: "t", Agents: []string{"a1", "a2"}, Instance: "i1", Log: zap.New(core), MaxAge: maxAge}
	routable := func(when string, want string) {
		t.Helper()
		got, err := s.rdb.HMGet(ctx, s.k("t", "routable"), "a1", "a2").Result()
		if err != nil || got[0] != want || got[1] != want {
			t.Errorf("%s: routable %v %v, want both %s", when, got, err, want)
		}
		free, _ := s.rdb.ZCard(ctx, s.k("t", "free")).Result()
		if (want == "1") != (free == 2) {
			t.Errorf("%s: %d agents free, want routable %s", when, free, want)
		}
	}
	must(t, p.PollOnce(ctx))
	routable("read", "1")

	p.Source = throttled
	if err := p.PollOnce(ctx); err == nil {
		t.Fatal("a throttled poll returned no error")
	}
	routable("a throttled poll within the max age (the last reading holds)", "1")
	if n := logs.FilterMessageSnippet("max age").Len(); n != 0 {
		t.Errorf("%d warnings within the max age", n)
	}

	time.Sleep(maxAge + 50*time.Millisecond)
	p.PollOnce(ctx)
	routable("throttled past the max age", "0")
	if n := logs.FilterMessageSnippet("longer than its max age").Len(); n != 1 {
		t.Errorf("%d warnings when the reading passed its max age, want 1", n)
	}
	p.PollOnce(ctx)
	if n := logs.FilterMessageSnippet("longer than its max age").Len(); n != 1 {
		t.Errorf("%d warnings after a second stale poll, want still 1", n)
	}

	p.Source = available
	must(t, p.PollOnce(ctx))
	routable("read again", "1")
	if n := logs.FilterMessageSnippet("presence read again").Len(); n != 1 {
		t.Errorf("%d notes that presence was read again, want 1", n)
	}

	// Another instance taking the lease knows when the last whole reading was made (Redis), not
	// what this one read: its reading ages from there.
	p2 := &Poller{Store: s, Source: throttled, Tenant: "t", Agents: []string{"a1", "a2"}, Instance: "i2", Log: zap.NewNop(), MaxAge: maxAge}
	p2.PollOnce(ctx)
	routable("a new poller throttled at once", "1")
	time.Sleep(maxAge + 50*time.Millisecond)
	p2.PollOnce(ctx)
	routable("a new poller throttled past the max age of the last whole reading", "0")

	// MaxAge 0: the last reading holds however old
	must(t, (&Poller{Store: s, Source: available, Tenant: "t", Agents: []string{"a1", "a2"}, Instance: "i3", Log: zap.NewNop()}).PollOnce(ctx))
	p3 := &Poller{Store: s, Source: throttled, Tenant: "t", Agents: []string{"a1", "a2"}, Instance: "i3", Log: zap.NewNop()}
	time.Sleep(maxAge + 50*time.Millisecond)
	p3.PollOnce(ctx)
	routable("no max age", "1")
}

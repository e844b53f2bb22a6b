package callstate_test

import (
	"context"
	"testing"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/redistest"
)

// An incoming notification names its call twice: in resourceUrl and in resourceData.id. The
// record is created under the id of resourceData; it must be cached under that id too. It was
// cached under the id of resourceUrl: a tenant-2 token holder could post an incoming call whose
// resourceUrl named tenant-1's call X and whose id named a new call, and the instance then took
// the new call's record for X's. Graph's next notifications of X were refused as of another
// tenant (403, the call stuck), or, within one tenant, applied to the other call.
func TestIncomingNamingAnotherCallInItsURLDoesNotTouchThatCall(t *testing.T) {
	// the call is X's on instance a; the forged notification and X's next one reach instance b
	rdb := redistest.Start(t).Client(t)
	a := instance(t, rdb, "test", &fakeGraph{}, &fakeQueues{}, nil)
	m := instance(t, rdb, "test", &fakeGraph{}, &fakeQueues{}, nil)
	store := callstate.NewStore(rdb, "test")
	x := "57dab8b1-894c-409a-b240-bd8beae78896"
	notify(t, a, note("created", x, `{"@odata.type":"#microsoft.graph.call","state":"incoming"}`)) // tenant-1's call
	notify(t, a, note("updated", x, `{"@odata.type":"#microsoft.graph.call","state":"established"}`))
	before, err := store.Get(context.Background(), graph.CallKey(x))
	if err != nil {
		t.Fatal(err)
	}

	ns, err := graph.Decode([]byte(note("created", x,
		`{"@odata.type":"#microsoft.graph.call","state":"incoming","id":"0b7e5a1c-0000-4000-8000-00000000000f"}`)))
	if err != nil {
		t.Fatal(err)
	}
	m.Notify(context.Background(), "tenant-2", ns) // whatever it answers, X is not touched
	m.Wait()

	// Graph's next notification of X, with tenant-1's token: the caller presses 1
	ns, err = graph.Decode([]byte(note("updated", x,
		`{"@odata.type":"#microsoft.graph.call","state":"established","toneInfo":{"sequenceId":1,"tone":"tone1"}}`)))
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Notify(context.Background(), "tenant-1", ns); err != nil {
		t.Fatalf("tenant-1's notification of its own call after tenant-2's: %v", err)
	}
	m.Wait()
	after, err := store.Get(context.Background(), graph.CallKey(x))
	if err != nil {
		t.Fatal(err)
	}
	if after.Tenant != "tenant-1" || after.State != callstate.StateQueued {
		t.Errorf("call X went %s (%s) -> %s (%s), want queued (tenant-1)", before.State, before.Tenant, after.State, after.Tenant)
	}
}

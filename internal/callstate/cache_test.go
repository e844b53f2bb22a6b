package callstate

import "testing"

// Two events of one call handled at once on this instance: the one saved second may be cached
// first. The older copy must not replace the newer one; as neither is sure to be the latest,
// the next event reads the record.
func TestCacheKeepsNoOlderCopy(t *testing.T) {
	c := newCache(10)
	c.put("call", Call{ID: "call", State: StateQueued, Version: 5})
	c.put("call", Call{ID: "call", State: StateInMenu, Version: 4})
	if v, ok := c.get("call"); ok {
		t.Fatalf("cached version %d after an older save was cached over a newer one", v.Version)
	}
	c.put("call", Call{ID: "call", State: StateInMenu, Version: 4})
	c.put("call", Call{ID: "call", State: StateQueued, Version: 5})
	if v, ok := c.get("call"); !ok || v.Version != 5 {
		t.Fatalf("got version %d (cached %v), want 5", v.Version, ok)
	}
}

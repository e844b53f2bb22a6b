package callstate

import (
	"slices"
	"sync"
)

// cache keeps the records this instance saved last, so a notification that lands on the
// instance that handled the previous one needs no read from Redis: the save's version check
// tells when the copy is stale (another instance changed the call), and the machine then reads
// and decides again. Correctness never depends on it.
type cache struct {
	mu  sync.Mutex
	m   map[string]Call
	max int
}

func newCache(max int) *cache { return &cache{m: map[string]Call{}, max: max} }

func (c *cache) get(key string) (Call, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[key]
	return v, ok
}

func (c *cache) put(key string, v Call) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v.State.Terminal() {
		delete(c.m, key)
		return
	}
	if old, ok := c.m[key]; ok && old.Version > v.Version {
		// A later transition (another event of the call, handled meanwhile) was cached first:
		// neither copy is sure to be the latest, so the next event reads the record.
		delete(c.m, key)
		return
	}
	if _, ok := c.m[key]; !ok && len(c.m) >= c.max {
		for k := range c.m { // evict one at random: cheap, and a miss costs one read
			delete(c.m, k)
			break
		}
	}
	c.m[key] = v
}

func (c *cache) drop(key string) {
	c.mu.Lock()
	delete(c.m, key)
	c.mu.Unlock()
}

// acked drops a batch of done commands (those of one kind after prev up to seq) from the cached
// copy's outbox, so its next save does not carry them.
func (c *cache) acked(key string, graphKind bool, prev, seq int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[key]
	if !ok {
		return
	}
	v.Outbox = slices.DeleteFunc(slices.Clone(v.Outbox), func(p Pending) bool {
		return p.Cmd.Kind.Graph() == graphKind && p.Seq > prev && p.Seq <= seq
	})
	c.m[key] = v
}

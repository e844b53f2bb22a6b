package main

import (
	"context"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// An instance can lose its path to Graph and keep the rest: an egress rule, a NAT gateway out of
// ports, a DNS failure on one host. It still takes notifications (Graph and the load balancer
// reach it) and saves their changes (Redis too), but every command it decides waits for Graph
// in vain, up to the command's deadline, and then its failure is taken for Graph's: callers
// waited in silence or ringing, and one whose tone subscription waited so had their key press
// lost and was hung up on (TestInstancePartitionedFromGraph: calls took a median 16.4-16.9 s
// against 3.3 s, docs/chaos.md).
// So each instance watches whether it reaches Graph (msgraph.Client.Reach) and, once a second,
// tells the others in Redis when it last had an answer from Graph and reads theirs. An instance
// whose requests have failed without an answer for graphFailingFor, while another instance has
// had one since, is cut off: Graph is up, the path from here is not. It then leaves Graph's work
// to the others (readiness 503, so that a load balancer sends the notifications elsewhere; no
// timer, outbox, offer, presence poll or reconciler pass; its Graph commands handed back, due at
// once), and probes Graph, one probe at a time, until it has an answer again. An instance that
// has had no answer for graphIdleProbe (no call under way) probes too, so that the others know.
// Before that second is up, a command that fails here without an answer while another instance
// has just had one (othersReachGraph) is handed over already, not taken for Graph's failure.
//
// An instance is never cut off for a failure every instance shares: the others must have had an
// answer after its own requests began to fail. In an outage of Graph, or of the path they all
// share, they fail alike and stay in service (the one with the latest answer, at least), where
// taking them all out would have added an outage of callbot to Graph's.

// reachSource is what graphReach needs of the Graph client (msgraph.Client).
type reachSource interface {
	Reach() (answered, failingSince time.Time)
	Probe(ctx context.Context) error
}

const (
	// graphReachEvery is how often an instance publishes its last answer and reads the others'.
	graphReachEvery = time.Second
	// graphFailingFor is how long an instance's requests must have failed without an answer
	// before it counts as cut off (one connection reset does not take it out).
	graphFailingFor = time.Second
	// graphProbeTimeout bounds a probe of Graph. A slow answer is an answer: a Graph that
	// answers in seconds (a brownout) must not keep an instance out for want of patience, while
	// the instances left in service take its work. A probe under way when the path comes back
	// is answered then.
	graphProbeTimeout = 5 * time.Second
	// graphIdleProbe: an instance whose last answer from Graph is older than that probes Graph,
	// so that an idle instance still says whether it reaches Graph. Otherwise, with no call
	// under way, an instance cut off while polling presence (the lease holder, the only one
	// asking Graph anything) would find no other instance answered since, and keep the lease
	// while every agent's presence aged past its max age.
	graphIdleProbe = 10 * time.Second
	// graphOthersRecent: another instance that had an answer from Graph within that reaches it
	// now (othersReachGraph): a command that fails here without an answer is theirs to re-drive.
	// Each instance writes its last answer once a second and reads the others' as often: what
	// one knows of another's is up to 2 s old.
	graphOthersRecent = 3 * time.Second
	// graphReachForget: an instance that has not had an answer for that long (stopped, long
	// since) is taken out of the hash.
	graphReachForget = 24 * time.Hour
)

// graphReach decides whether this instance is cut off from Graph (cutOff).
type graphReach struct {
	src      reachSource
	rdb      redis.UniversalClient
	key      string // a hash: instance -> last answer from Graph, Unix ms on Redis's clock
	instance string
	now      func() time.Time // Redis's clock (clock.Redis)
	log      *zap.Logger
	// onCut runs, on a goroutine of its own, each time the instance is found cut off: the
	// machine hands the commands it is carrying out to the others (HandOverCarried).
	onCut func()

	cut       atomic.Bool
	probing   atomic.Bool
	others    atomic.Int64 // the latest answer another instance had, as last read (Unix ms, Redis's clock)
	published int64        // the last answer written (graphReach's goroutine only)
	cuts      atomic.Int64
}

func newGraphReach(src reachSource, rdb redis.UniversalClient, prefix, instance string, now func() time.Time, log *zap.Logger) *graphReach {
	return &graphReach{src: src, rdb: rdb, key: prefix + ":{graph-reach}", instance: instance, now: now, log: log}
}

// cutOff reports whether this instance leaves Graph's work to the others.
func (g *graphReach) cutOff() bool { return g != nil && g.cut.Load() }

// othersReachGraph reports whether another instance had an answer from Graph within
// graphOthersRecent, as the last look read it (a second old at most).
func (g *graphReach) othersReachGraph() bool {
	if g == nil {
		return false
	}
	at := g.others.Load()
	return at != 0 && g.now().Sub(time.UnixMilli(at)) < graphOthersRecent
}

// run looks every interval until ctx ends, and then takes this instance out of the hash.
func (g *graphReach) run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			g.rdb.HDel(dctx, g.key, g.instance)
			cancel()
			return
		case <-t.C:
		}
		g.look(ctx)
	}
}

// look publishes this instance's last answer from Graph, reads the others', and decides.
func (g *graphReach) look(ctx context.Context) {
	answered, failing := g.src.Reach()
	now := g.now()
	offset := now.Sub(time.Now()) // Reach's times are this host's; the hash's are Redis's
	if !answered.IsZero() {
		answered = answered.Add(offset)
	}
	if !failing.IsZero() {
		failing = failing.Add(offset)
	}
	rctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var all *redis.MapStringStringCmd
	_, err := g.rdb.Pipelined(rctx, func(p redis.Pipeliner) error {
		if ms := answered.UnixMilli(); !answered.IsZero() && ms != g.published {
			p.HSet(rctx, g.key, g.instance, ms)
		}
		all = p.HGetAll(rctx, g.key)
		return nil
	})
	if err != nil {
		return // Redis away: readiness says so; the last decision stands meanwhile
	}
	if !answered.IsZero() {
		g.published = answered.UnixMilli()
	}
	var others time.Time
	var gone []string
	for inst, v := range all.Val() {
		ms, err := strconv.ParseInt(v, 10, 64)
		if err != nil || inst == g.instance {
			continue
		}
		at := time.UnixMilli(ms)
		if now.Sub(at) > graphReachForget {
			gone = append(gone, inst)
		} else if at.After(others) {
			others = at
		}
	}
	if len(gone) > 0 {
		g.rdb.HDel(rctx, g.key, gone...)
	}
	if !others.IsZero() {
		g.others.Store(others.UnixMilli())
	}
	cut := cutOffFromGraph(now, failing, others)
	switch was := g.cut.Swap(cut); {
	case cut && !was:
		g.cuts.Add(1)
		if g.onCut != nil {
			go g.onCut()
		}
		g.log.Warn("Graph not reached from this instance while another instance reaches it: out of service (readiness 503), Graph's work left to the others until Graph answers here again",
			zap.Duration("failing_for", now.Sub(failing).Round(time.Millisecond)),
			zap.Duration("others_answered_ago", now.Sub(others).Round(time.Millisecond)))
	case !cut && was:
		g.log.Info("Graph reached from this instance again: back in service")
	}
	idle := answered.IsZero() || now.Sub(answered) > graphIdleProbe
	if (cut || idle) && g.probing.CompareAndSwap(false, true) {
		go func() {
			defer g.probing.Store(false)
			pctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), graphProbeTimeout)
			defer cancel()
			g.src.Probe(pctx) // an answer ends a cut at the next look, and tells the others
		}()
	}
}

// cutOffFromGraph decides, on Redis's clock: this instance's requests have failed without an
// answer since failing (zero: its last request had one), for graphFailingFor at least, and
// another instance had an answer since then (others; zero: none ever had).
func cutOffFromGraph(now, failing, others time.Time) bool {
	return !failing.IsZero() && now.Sub(failing) >= graphFailingFor && others.After(failing)
}

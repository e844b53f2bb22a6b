package main

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/clock"
	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/ivr"
	"github.com/callbot/callbot/internal/queue"
)

// graphClient is what the bot needs from Graph: call control and presence.
type graphClient interface {
	callstate.CallControl
	queue.PresenceSource
}

// botDeps are the parts a bot is assembled from; serve builds them from the environment, demo
// from its embedded Redis and simulator, tests from theirs.
type botDeps struct {
	Redis       redis.UniversalClient
	KeyPrefix   string
	Graph       graphClient
	Auth        graph.Authenticator
	Flow        *ivr.Flow
	TenantID    string
	CallbackURI string
	// Instance names this instance (affinity hint, presence lease holder); random when empty.
	Instance    string
	OutboxLease time.Duration
	// RedisReplicas a call's change waits for (WAIT) within ReplicaTimeout; 0: none.
	RedisReplicas  int
	ReplicaTimeout time.Duration
	PresenceEvery  time.Duration
	// PresenceMaxAge: how old a reading routing goes by (queue.Poller.MaxAge); 0 none.
	PresenceMaxAge time.Duration
	// ReconcileEvery: how often the reconciler passes over the live calls (default 5 minutes).
	ReconcileEvery time.Duration
	// FailCooldown: an agent who declined or missed an offer is skipped this long (default 10s).
	FailCooldown time.Duration
	// ConnectedGuard: an agent who just took a call is skipped this long even if polled presence
	// still says Available (default: two presence polls).
	ConnectedGuard time.Duration
	Log            *zap.Logger
	OnEnd          func(callstate.Call)
}

// bot is one running callbot instance.
type bot struct {
	deps       botDeps
	machine    *callstate.Machine
	dispatcher *queue.Dispatcher
	queues     *queue.Store
	store      *callstate.Store
	handler    http.Handler
	instance   string
	draining   atomic.Bool
	metrics    *metrics
	clock      *clock.Redis // the time every instance agrees on: Redis's
	redisMem   *redisMemory // what Redis does when its memory is full
	reach      *graphReach  // whether this instance is cut off from Graph; nil: not watched
}

func newBot(ctx context.Context, d botDeps) (*bot, error) {
	b := &bot{deps: d, instance: cmp.Or(d.Instance, randomID()), metrics: newMetrics()}
	onEnd := d.OnEnd
	d.OnEnd = func(c callstate.Call) {
		b.metrics.callEnded(c)
		if onEnd != nil {
			onEnd(c)
		}
	}
	// Every time written to Redis for the other instances (timers, outbox leases, idle and
	// cooldown scores) is on Redis's clock, this host's corrected by its offset: a host clock
	// off by more than a lease would have the other instances take its outboxes while it sends
	// them, and fire its timers early. Measured before anything is decided; if Redis does not
	// answer yet, the host's clock serves until the clock loop's first sync.
	b.clock = clock.New(d.Redis, d.KeyPrefix, d.Log.Named("clock"))
	sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	if err := b.clock.Sync(sctx); err != nil {
		d.Log.Warn("clock not synced with Redis's yet; this host's clock serves meanwhile", zap.Error(err))
	}
	cancel()
	// A maxmemory-policy that evicts keys is said at start, before any call is taken.
	b.redisMem = &redisMemory{rdb: d.Redis, log: d.Log.Named("redis")}
	lctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	b.redisMem.look(lctx)
	cancel()
	b.queues = queue.NewStore(d.Redis, d.KeyPrefix)
	b.queues.Now = b.clock.Now
	b.queues.FailCooldown = cmp.Or(d.FailCooldown, 10*time.Second)
	b.queues.ConnectedGuard = cmp.Or(d.ConnectedGuard, 2*d.PresenceEvery)
	queueIDs := make([]string, 0, len(d.Flow.Queues))
	members := make(map[string][]string, len(d.Flow.Queues))
	for id, q := range d.Flow.Queues {
		queueIDs = append(queueIDs, id)
		members[id] = q.Agents
	}
	if err := b.queues.SetQueues(ctx, d.TenantID, members); errors.Is(err, queue.ErrRegistryNotSeeded) {
		// the reconciler's sweep is the narrower for it (the queues only older callbots' flows
		// had), not a reason to keep the contact center down
		d.Log.Warn("queues older callbots had are not swept of ghosts: Redis refused the SCAN that finds them", zap.Error(err))
	} else if err != nil {
		return nil, err
	}
	b.dispatcher = queue.NewDispatcher(b.queues, nil, d.TenantID, queueIDs, d.Log.Named("dispatch"))
	b.dispatcher.Now = b.clock.Now
	if src, ok := d.Graph.(reachSource); ok {
		b.reach = newGraphReach(src, d.Redis, d.KeyPrefix, b.instance, b.clock.Now, d.Log.Named("graph"))
	}
	b.dispatcher.Paused = b.reach.cutOff
	b.store = callstate.NewStore(d.Redis, d.KeyPrefix)
	if d.RedisReplicas > 0 {
		b.store.WaitForReplicas(d.RedisReplicas, d.ReplicaTimeout)
	}
	if b.store.WaitsOnNodes() {
		// Redis Cluster: the queues live on other masters than the records that point at them
		b.queues.Durable = b.store.Durably
	}
	b.machine = callstate.NewMachine(callstate.Config{
		Store:       b.store,
		Timers:      callstate.NewTimers(d.Redis, d.KeyPrefix),
		Control:     d.Graph,
		Queues:      b.dispatcher,
		Flow:        d.Flow,
		CallbackURI: d.CallbackURI,
		OutboxLease: d.OutboxLease,
		Tenants:     []string{d.TenantID},
		Log:         d.Log.Named("call"),
		OnEnd:       d.OnEnd,
		Now:         b.clock.Now,
		CutOff:      b.reach.cutOff,
		// a command failing here without Graph's answer while another instance has had one
		// is left to them, before this one has failed long enough to be found cut off
		OthersReachGraph: b.reach.othersReachGraph,
	})
	if b.reach != nil {
		b.reach.onCut = b.machine.HandOverCarried
	}
	b.dispatcher.Offer = b.machine
	b.handler = b.routes()
	return b, nil
}

// clockSyncEvery is how often an instance measures its clock's offset from Redis's.
const clockSyncEvery = 10 * time.Second

// routes is every HTTP route of callbot.
func (b *bot) routes() http.Handler {
	r := chi.NewRouter()
	webhook := timed(b.metrics.webhook, limitInFlight(maxWebhookInFlight, &graph.Webhook{Auth: b.deps.Auth, Sink: b.machine, Log: b.deps.Log.Named("webhook")}))
	r.Post("/api/calls", webhook.ServeHTTP)
	r.Post("/api/calls/*", webhook.ServeHTTP) // the path may carry an instance-affinity hint
	r.Get("/metrics", b.serveMetrics)
	r.Get("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	r.Get("/readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
		defer cancel()
		if err := b.deps.Redis.Ping(ctx).Err(); err != nil {
			http.Error(w, "redis unreachable: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		if b.draining.Load() {
			http.Error(w, "shutting down", http.StatusServiceUnavailable)
			return
		}
		if b.reach.cutOff() {
			http.Error(w, "Graph not reached from this instance while the other instances reach it", http.StatusServiceUnavailable)
			return
		}
		if b.deps.Flow == nil {
			http.Error(w, "no flow loaded", http.StatusServiceUnavailable)
			return
		}
		if keys, ok := b.deps.Auth.(signingKeys); ok {
			if err := keys.Ready(); err != nil { // every notification would get 503 until then
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	return r
}

// serve runs the HTTP server and the background loops (timers, dispatcher, presence poller)
// until ctx ends, then shuts down within grace: in-flight requests finish, queued Graph
// commands are sent. Whatever is not done when grace is over is left (it is in Redis, where the
// other instances take it on) and serve returns errGraceOver, naming it.
func (b *bot) serve(ctx context.Context, ln net.Listener, grace time.Duration) error {
	// IdleTimeout outlives the keep-alive of Graph's (and load balancers') connection pools, so a
	// request is not sent on a connection the server is closing.
	srv := &http.Server{Handler: b.handler, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 15 * time.Second, IdleTimeout: 120 * time.Second, MaxHeaderBytes: 64 << 10}
	loops, stopLoops := context.WithCancel(context.WithoutCancel(ctx))
	var running loopGroup
	running.Go("timers", func() { b.machine.RunTimers(loops, 100*time.Millisecond) })
	running.Go("outbox", func() { b.machine.RunOutbox(loops, time.Second) })
	running.Go("acknowledgements", func() { b.machine.RunAcks(loops, 20*time.Millisecond) })
	running.Go("kept notifications", func() { b.machine.RunKept(loops, 100*time.Millisecond) })
	running.Go("reconciler", func() { b.machine.RunReconcile(loops, cmp.Or(b.deps.ReconcileEvery, 5*time.Minute), b.instance) })
	running.Go("dispatcher", func() { b.dispatcher.Run(loops, 250*time.Millisecond) })
	running.Go("replicas", func() { b.store.WatchReplicas(loops, time.Second) })
	running.Go("clock", func() { b.clock.Run(loops, clockSyncEvery) })
	running.Go("redis memory", func() { b.redisMem.run(loops, redisMemoryEvery) })
	if b.reach != nil {
		running.Go("graph reach", func() { b.reach.run(loops, graphReachEvery) })
	}
	poller := &queue.Poller{Store: b.queues, Source: b.deps.Graph, Tenant: b.deps.TenantID, Agents: b.deps.Flow.Agents(),
		Instance: b.instance, Log: b.deps.Log.Named("presence"), OnChange: b.dispatcher.PokeAgents,
		MaxAge: b.deps.PresenceMaxAge, Paused: b.reach.cutOff}
	running.Go("presence", func() { poller.Run(loops, b.deps.PresenceEvery) })
	if keys, ok := b.deps.Auth.(signingKeys); ok {
		running.Go("signing keys", func() { prefetchKeys(loops, keys, b.deps.Log) })
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	var err error
	select {
	case err = <-errc:
	case <-ctx.Done():
	}
	// Stop taking new work: readiness fails so a load balancer stops sending, the listener
	// closes, requests in flight finish; the loops stop at once (what they have begun they carry
	// through), not once the requests are done: meanwhile they would offer callers, claim timers
	// and other instances' outboxes, work the instances that go on take at once. Graph commands
	// already queued are sent within the grace period; whatever is left stays in Redis outboxes
	// and timers for the other instances.
	b.draining.Store(true)
	stopLoops()
	b.deps.Log.Info("shutting down", zap.Duration("grace", grace))
	// Every step below waits at most until sctx ends, whatever it waits on: a Redis or a Graph
	// that never answers holds a step only as long as the client's own timeouts (go-redis reads
	// ignore a context's deadline), which add up past the grace, and past it Kubernetes kills
	// the process without a word.
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	// The outbox leases of the commands still being sent are renewed until they are (or the
	// grace is over): with the loops stopped, another instance would send them again.
	rctx, stopRenewing := context.WithCancel(sctx)
	defer stopRenewing()
	renewing := make(chan struct{})
	go func() { b.machine.RenewLeases(rctx); close(renewing) }()
	var left []string // what the grace was too short for
	if srv.Shutdown(sctx) != nil {
		left = append(left, "requests in flight")
	}
	if names := running.wait(sctx); len(names) > 0 {
		left = append(left, "loops: "+strings.Join(names, ", "))
	}
	// The reconciler's lease goes back at once: the instance that replaces this one (a new name,
	// in a rolling restart) reconciles at its start instead of when the lease runs out.
	if !within(sctx, func() {
		if err := b.store.ReleaseLease(sctx, "reconcile", b.instance); err != nil && sctx.Err() == nil {
			b.deps.Log.Warn("reconciler's lease not handed back", zap.Error(err))
		}
	}) {
		left = append(left, "the reconciler's lease")
	}
	var calls []string // those whose Graph commands are still being sent
	if !within(sctx, b.machine.Wait) {
		// the grace may have run out on an earlier step, with nothing to send here: only the
		// calls whose commands are not done count, as only the loops still running do
		if calls = b.machine.Carrying(); len(calls) > 0 {
			slices.Sort(calls)
			left = append(left, fmt.Sprintf("queued Graph commands (%d calls sending)", len(calls)))
		}
	}
	stopRenewing()
	within(sctx, func() { <-renewing })
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	if len(left) > 0 {
		// Nothing is lost with it: what was not done is in Redis as a crash would leave it. The
		// commands' outboxes and the timers this instance claimed fall due for the other
		// instances once their leases run out (no longer renewed), a notification not answered
		// is as one lost on its way (the call's guard timers and the reconciler cover those), a
		// reservation not undone is the reconciler's.
		b.deps.Log.Error("shutdown grace over: exiting with work unfinished, left in Redis for the other instances",
			zap.Duration("grace", grace), zap.Strings("unfinished", left), zap.Strings("calls", calls))
		err = errors.Join(err, fmt.Errorf("%w (%s): %s", errGraceOver, grace, strings.Join(left, "; ")))
	}
	return err
}

// errGraceOver: the shutdown's grace ran out with work unfinished (callbot exits with code 1).
var errGraceOver = errors.New("shutdown grace over with work unfinished")

// within runs f and waits for it until ctx ends; it reports whether f returned. An f still
// running then is left to itself: the process is about to exit.
func within(ctx context.Context, f func()) bool {
	done := make(chan struct{})
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return true
	case <-ctx.Done():
		select { // both ready: f did finish
		case <-done:
			return true
		default:
			return false
		}
	}
}

// loopGroup runs the background loops and knows, by name, which have not returned.
type loopGroup struct {
	wg      sync.WaitGroup
	mu      sync.Mutex
	running map[string]bool
}

func (g *loopGroup) Go(name string, f func()) {
	g.mu.Lock()
	if g.running == nil {
		g.running = map[string]bool{}
	}
	g.running[name] = true
	g.mu.Unlock()
	g.wg.Go(func() {
		defer func() {
			g.mu.Lock()
			delete(g.running, name)
			g.mu.Unlock()
		}()
		f()
	})
}

// wait waits for the loops until ctx ends, and returns the names of those still running then.
func (g *loopGroup) wait(ctx context.Context) []string {
	if within(ctx, g.wg.Wait) {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Sorted(maps.Keys(g.running))
}

// signingKeys is the part of graph.Verifier that start-up and readiness use.
type signingKeys interface {
	Prefetch(ctx context.Context) error
	Ready() error
}

// prefetchKeys fetches the signing keys at start, retrying from 1 s doubling to 30 s until it
// has them or ctx ends, so the first notifications do not wait for the metadata URL and
// readiness can say whether tokens can be verified.
func prefetchKeys(ctx context.Context, keys signingKeys, log *zap.Logger) {
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		err := keys.Prefetch(ctx)
		if err == nil || ctx.Err() != nil {
			return
		}
		log.Warn("signing keys not fetched; webhook answers 503 until they are", zap.Error(err), zap.Duration("retry_in", wait))
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// maxWebhookInFlight bounds the notifications applied at once; past it the webhook answers 503
// with Retry-After, so an overload makes Graph retry instead of growing memory without bound.
const maxWebhookInFlight = 1024

func limitInFlight(n int, next http.Handler) http.Handler {
	sem := make(chan struct{}, n)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case sem <- struct{}{}:
			defer func() { <-sem }()
			next.ServeHTTP(w, r)
		default:
			w.Header().Set("Retry-After", "1")
			w.Header().Set("Content-Type", "application/json") // the webhook's Error answer
			w.WriteHeader(http.StatusServiceUnavailable)
			w.Write([]byte(`{"error":"too many notifications in flight, retry"}` + "\n"))
		}
	})
}

func randomID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

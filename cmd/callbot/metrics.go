package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	rtmetrics "runtime/metrics"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/callbot/callbot/internal/callstate"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

// metrics are the figures `GET /metrics` exposes in the Prometheus text format. They are this
// instance's counts since it started; sum them across instances.
type metrics struct {
	mu    sync.Mutex
	ended map[string]uint64 // calls that ended through this instance, by outcome
	// webhook times each POST to /api/calls, from its headers read to its handler's return
	// (the response written), 503s of the in-flight cap included.
	webhook *msgraph.LatencyHistogram
}

// webhookBuckets bound callbot_webhook_duration_seconds: fine around the load run's 10 ms
// target, up to the 5 s within which Graph wants its notifications answered.
var webhookBuckets = []time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond, 25 * time.Millisecond,
	50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second,
}

func newMetrics() *metrics {
	return &metrics{ended: map[string]uint64{}, webhook: msgraph.NewLatencyHistogram(webhookBuckets...)}
}

// timed observes how long each request to next takes in h.
func timed(h *msgraph.LatencyHistogram, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		next.ServeHTTP(w, r)
		h.Observe(time.Since(start))
	})
}

// writeHistogram writes s as the Prometheus histogram name, in seconds.
func writeHistogram(w io.Writer, name, help string, s msgraph.LatencySnapshot) {
	fmt.Fprintf(w, "# HELP %s %s\n", name, help)
	fmt.Fprintf(w, "# TYPE %s histogram\n", name)
	for i, n := range s.Cumulative() {
		fmt.Fprintf(w, "%s_bucket{le=\"%g\"} %d\n", name, s.Bounds[i].Seconds(), n)
	}
	fmt.Fprintf(w, "%s_bucket{le=\"+Inf\"} %d\n", name, s.Count)
	fmt.Fprintf(w, "%s_sum %g\n", name, s.Sum.Seconds())
	fmt.Fprintf(w, "%s_count %d\n", name, s.Count)
}

func (m *metrics) callEnded(c callstate.Call) {
	m.mu.Lock()
	m.ended[c.Outcome]++
	m.mu.Unlock()
}

// answerLatency is implemented by the Graph client (msgraph) that measures it.
type answerLatency interface {
	AnswerLatency() *msgraph.LatencyHistogram
}

// graphConnections is implemented by the Graph client (msgraph) that counts its connections.
type graphConnections interface {
	GraphConnections() (open, opened int64)
}

func (b *bot) serveMetrics(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	ctx, cancel := context.WithTimeout(r.Context(), 2*time.Second)
	defer cancel()
	b.writeMetrics(ctx, w)
}

func (b *bot) writeMetrics(ctx context.Context, w io.Writer) {
	m := b.metrics
	m.mu.Lock()
	outcomes := make([]string, 0, len(m.ended))
	for o := range m.ended {
		outcomes = append(outcomes, o)
	}
	sort.Strings(outcomes)
	fmt.Fprintln(w, "# HELP callbot_calls_ended_total Calls that ended through this instance, by outcome.")
	fmt.Fprintln(w, "# TYPE callbot_calls_ended_total counter")
	for _, o := range outcomes {
		fmt.Fprintf(w, "callbot_calls_ended_total{outcome=\"%s\"} %d\n", labelValue(o), m.ended[o])
	}
	m.mu.Unlock()

	counter := func(name, help string, v int64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %d\n", name, help, name, name, v)
	}
	counter("callbot_outbox_redriven_total", "Commands re-driven from outboxes an instance left unacknowledged.", b.machine.Redriven.Load())
	counter("callbot_outbox_skipped_total", "Re-driven commands skipped because Graph showed they had taken effect.", b.machine.Skipped.Load())
	counter("callbot_redis_unreplicated_total", "Writes not acknowledged by CALLBOT_REDIS_REPLICAS replicas in time: call changes (the notification was refused with 503) and, on Redis Cluster, queue writes (re-driven a lease later) and agent reservations (asked for again).", b.store.Unreplicated.Load())
	counter("callbot_offers_lost_total", "Offers saved on the Redis master but refused as unreplicated that a failover then lost: the dispatcher put the caller back in the queue at their place and freed the agent, a follow-up within 2 minutes of the offer.", b.dispatcher.LostOffers.Load())
	counter("callbot_graph_commands_superseded_total", "Prompts and media cancellations not sent because a transfer decided after them went first.", b.machine.Superseded.Load())
	counter("callbot_calls_closed_total", "Calls the reconciler ended because Graph no longer knew them.", b.machine.Closed.Load())
	counter("callbot_reconcile_passes_total", "Passes of the reconciler this instance completed (one instance at a time does them, by lease, every CALLBOT_RECONCILE_INTERVAL).", b.machine.ReconcilePasses.Load())
	counter("callbot_reconcile_calls_checked_total", "Live calls the reconciler's passes on this instance checked with Graph (a GET, or a keepAlive for a call older than 15 minutes).", b.machine.ReconcileChecked.Load())
	fmt.Fprintln(w, "# HELP callbot_reconcile_last_pass_seconds How long this instance's last completed pass of the reconciler took (0: none yet). Past CALLBOT_RECONCILE_INTERVAL, passes come late: keepAlives too.")
	fmt.Fprintln(w, "# TYPE callbot_reconcile_last_pass_seconds gauge")
	fmt.Fprintf(w, "callbot_reconcile_last_pass_seconds %.3f\n", time.Duration(b.machine.ReconcileLastPass.Load()).Seconds())
	fmt.Fprintln(w, "# HELP callbot_reconcile_last_pass_calls How many live calls this instance's last completed pass of the reconciler checked.")
	fmt.Fprintln(w, "# TYPE callbot_reconcile_last_pass_calls gauge")
	fmt.Fprintf(w, "callbot_reconcile_last_pass_calls %d\n", b.machine.ReconcileLastCalls.Load())
	counter("callbot_keepalives_sent_total", "keepAlives Graph took for calls older than 15 minutes (one per call on each pass of the reconciler).", b.machine.KeepAlives.Load())
	counter("callbot_keepalive_failures_total", "keepAlives Graph refused or did not answer (not counting calls it no longer had, which are closed). The next pass sends them again; Graph ends a call that had none for 45 minutes. Alert on a rise.", b.machine.KeepAliveFailures.Load())
	counter("callbot_queue_ghosts_removed_total", "Queue entries the reconciler removed because their call had ended or its record was gone (callers who were no longer waiting).", b.machine.Ghosts.Load())
	counter("callbot_invalid_transitions_total", "Decisions the transition table refused: a bug, logged as an error with the call, event and state (a notification's is dropped; a timer's is removed, and its caller hung up if nothing else can move the call on and Graph shows them alone with callbot). Alert on any.", b.machine.InvalidTransitions.Load())
	counter("callbot_tone_given_up_total", "Calls whose subscribeToTone failed seven times (the first try and six retries over about a minute): callbot stopped asking, the caller's keys do nothing for the rest of the call and menus reach only their fallbacks. A rise means Graph refuses tone subscriptions.", b.machine.ToneGivenUp.Load())
	counter("callbot_hangup_given_up_total", "Calls whose hangup Graph refused four times (a 4xx other than 404 and 429; the first try and three retries over about 7 s): callbot stopped sending it again quickly and hangs up only every hang-up grace (30 s) until the call ends, the caller in silence meanwhile. A rise means Graph refuses hangups (a permission missing).", b.machine.HangupGivenUp.Load())
	counter("callbot_calls_adopted_total", "Calls Graph had established and callbot had no record of (lost with Redis data), taken back: their menu started again.", b.machine.Adopted.Load())
	counter("callbot_notifications_kept_total", "Notifications Redis refused (answered 503) that this instance kept to apply again itself, in case Graph does not deliver them again: incoming calls, established, key presses, prompt and invite ends, transfer failures, call ends.", b.machine.Kept.Load())
	counter("callbot_notifications_kept_applied_total", "Kept notifications that this instance applied before Graph delivered them again (without it, an incoming call not answered, a key press to make again, a caller in silence until the transfer's timer).", b.machine.KeptApplied.Load())
	counter("callbot_notifications_kept_given_up_total", "Kept notifications Redis still refused 15 s after the first refusal, or when the instance stopped: left to Graph to deliver again.", b.machine.KeptGivenUp.Load())
	counter("callbot_notifications_kept_dropped_total", "Notifications Redis refused that were not kept because 10,000 already were: left to Graph to deliver again.", b.machine.KeptDropped.Load())
	if b.deps.RedisReplicas > 0 {
		fmt.Fprintln(w, "# HELP callbot_redis_replicas The most replicas the current Redis master has had connected and in sync (-1 before the first look); a change waits for the smaller of this and CALLBOT_REDIS_REPLICAS. On Redis Cluster, the fewest of any master's (each master's own is what a change on it waits for).")
		fmt.Fprintln(w, "# TYPE callbot_redis_replicas gauge")
		fmt.Fprintf(w, "callbot_redis_replicas %d\n", b.store.ConnectedReplicas())
	}

	fmt.Fprintln(w, "# HELP callbot_queue_waiting Callers waiting in each queue.")
	fmt.Fprintln(w, "# TYPE callbot_queue_waiting gauge")
	ids := make([]string, 0, len(b.deps.Flow.Queues))
	for id := range b.deps.Flow.Queues {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		if n, err := b.queues.Length(ctx, b.deps.TenantID, id); err == nil {
			fmt.Fprintf(w, "callbot_queue_waiting{queue=\"%s\"} %d\n", labelValue(id), n)
		}
	}

	if at, err := b.queues.PresenceReadAt(ctx, b.deps.TenantID); err == nil {
		age := -1.0
		if !at.IsZero() {
			age = max(b.clock.Now().Sub(at).Seconds(), 0)
		}
		fmt.Fprintln(w, "# HELP callbot_presence_age_seconds Seconds since a poll last read every agent's presence from Graph (-1: never); the same on every instance. Routing goes by the presence last read: while Graph refuses presence reads (throttling, a missing Presence.Read.All) this grows, agents keep their last reading up to CALLBOT_PRESENCE_MAX_AGE, and past it are offered no caller. Alert when it passes a few poll intervals.")
		fmt.Fprintln(w, "# TYPE callbot_presence_age_seconds gauge")
		fmt.Fprintf(w, "callbot_presence_age_seconds %.3f\n", age)
	}

	fmt.Fprintln(w, "# HELP callbot_clock_offset_seconds Redis's clock minus this host's, as last measured (every 10 s). callbot decides on Redis's clock, so every instance agrees on when a timer is due or a lease runs out; past a second the host's NTP needs looking at (logged as a warning).")
	fmt.Fprintln(w, "# TYPE callbot_clock_offset_seconds gauge")
	fmt.Fprintf(w, "callbot_clock_offset_seconds %.6f\n", b.clock.Offset().Seconds())

	if f := b.redisMem.figures(); f.Read {
		fmt.Fprintln(w, "# HELP callbot_redis_evicting_masters Redis masters whose maxmemory-policy evicts keys when memory is full (a maxmemory set and a policy other than noeviction), as last read (every 30 s). Evicted keys are lost call state: a call's record, a waiting caller's queue entry, a timer. Alert on anything but 0.")
		fmt.Fprintln(w, "# TYPE callbot_redis_evicting_masters gauge")
		fmt.Fprintf(w, "callbot_redis_evicting_masters %d\n", f.Evicting)
		if f.Limited {
			fmt.Fprintln(w, "# HELP callbot_redis_memory_used_ratio The fullest Redis master's used_memory over its maxmemory, as last read (every 30 s; masters without a maxmemory are left out). Past 1 a master with noeviction refuses writes: every notification whose change it holds is answered 503 until memory is freed. Warned about in the log from 0.9.")
			fmt.Fprintln(w, "# TYPE callbot_redis_memory_used_ratio gauge")
			fmt.Fprintf(w, "callbot_redis_memory_used_ratio %.4f\n", f.Ratio)
		}
		counter("callbot_redis_evicted_keys_total", "Keys the Redis masters evicted since they started (INFO evicted_keys, summed over the masters, as last read): Redis's count, the same on every instance, so do not sum it across instances; it starts again from 0 when a master restarts. Any rise is call state lost.", f.Evicted)
	}

	if b.reach != nil {
		cut := 0
		if b.reach.cutOff() {
			cut = 1
		}
		fmt.Fprintln(w, "# HELP callbot_graph_cut_off 1 while this instance does not reach Graph and another instance does (its requests failed without an answer for 1 s, another had an answer since): it is out of service (readiness 503) and leaves Graph's work to the others until Graph answers it again. Alert on 1 that lasts: this host's egress to Graph is broken.")
		fmt.Fprintln(w, "# TYPE callbot_graph_cut_off gauge")
		fmt.Fprintf(w, "callbot_graph_cut_off %d\n", cut)
		counter("callbot_graph_cut_offs_total", "Times this instance was found cut off from Graph while another instance reached it (callbot_graph_cut_off turned 1).", b.reach.cuts.Load())
	}
	counter("callbot_graph_commands_handed_over_total", "Batches of a call's Graph commands this instance left to the other instances (their outbox made due at once) because it did not reach Graph while they did.", b.machine.HandedOver.Load())

	if gc, ok := b.deps.Graph.(graphConnections); ok {
		open, opened := gc.GraphConnections()
		fmt.Fprintln(w, "# HELP callbot_graph_connections Connections to Graph open now (HTTP/2: one carries many requests at once; HTTP/1.1, behind a proxy that only speaks it: one per request in flight).")
		fmt.Fprintln(w, "# TYPE callbot_graph_connections gauge")
		fmt.Fprintf(w, "callbot_graph_connections %d\n", open)
		counter("callbot_graph_connections_opened_total", "Connections to Graph opened (each a TCP and TLS handshake).", opened)
	}

	if al, ok := b.deps.Graph.(answerLatency); ok {
		writeHistogram(w, "callbot_answer_latency_seconds",
			"Time from the incoming notification to Graph accepting the answer (Graph's deadline is 15 s).", al.AnswerLatency().Snapshot())
	}
	writeHistogram(w, "callbot_webhook_duration_seconds",
		"Time callbot took to answer a notification, from its headers read to the response written (Graph wants an answer within 5 s).",
		b.metrics.webhook.Snapshot())
	writeProcessMetrics(w)
}

// writeProcessMetrics writes what a leak grows in an instance that runs for weeks, under the
// names Prometheus' Go and process collectors use: goroutines, live heap, and on Linux resident
// memory and open file descriptors (sockets included).
func writeProcessMetrics(w io.Writer) {
	gauge := func(name, help string, v int64) {
		fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s gauge\n%s %d\n", name, help, name, name, v)
	}
	gauge("go_goroutines", "Goroutines that currently exist.", int64(runtime.NumGoroutine()))
	heap := []rtmetrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
	rtmetrics.Read(heap)
	if heap[0].Value.Kind() == rtmetrics.KindUint64 {
		gauge("go_memstats_heap_alloc_bytes", "Bytes of heap objects, live or not yet swept.", int64(heap[0].Value.Uint64()))
	}
	if statm, err := os.ReadFile("/proc/self/statm"); err == nil {
		if f := strings.Fields(string(statm)); len(f) > 1 {
			if pages, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				gauge("process_resident_memory_bytes", "Resident memory size in bytes.", pages*int64(os.Getpagesize()))
			}
		}
	}
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		gauge("process_open_fds", "Open file descriptors.", int64(len(fds)))
	}
}

// labelValue escapes a Prometheus label value as the text exposition format allows: backslash,
// double quote and newline only (Go's %q writes \t, \u00a0... which scrapers refuse). Queue ids
// are any YAML key.
var labelValue = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace

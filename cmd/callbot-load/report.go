package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"runtime"
	"slices"
	"strings"
	"time"
)

// Report is everything one run measured; -json prints it as is.
type Report struct {
	Tool     string    `json:"tool"`
	When     time.Time `json:"when"`
	Commit   string    `json:"commit"`
	Machine  Machine   `json:"machine"`
	Settings Settings  `json:"settings"`
	Mode     string    `json:"mode"` // rate, closed-loop or hold

	Calls         CallStats         `json:"calls"`
	Notifications NotificationStats `json:"notifications"`
	// Webhook is the time of each POST to the bot, as graphsim's HTTP client saw it.
	Webhook Latency `json:"webhook"`
	// WebhookServer is the same POSTs as callbot's own callbot_webhook_duration_seconds timed
	// them: from the request's headers read to the response written, without the network, the
	// kernel's queues and this tool's scheduling.
	WebhookServer *BucketLatency `json:"webhook_in_callbot,omitempty"`
	InFlight      InFlight       `json:"webhook_in_flight"`
	// Answer is from PlaceCall (the created notification is queued) to graphsim receiving
	// the bot's answer request.
	Answer Latency `json:"incoming_to_answer"`
	// WebhookByLive (hold mode) splits the webhook times by how many calls were live.
	WebhookByLive []LiveLatency `json:"webhook_by_live_calls,omitempty"`
	PlacedToAgent Latency       `json:"placed_to_agent"`
	// ToolDelay is how late a goroutine of this tool woke from a 1 ms sleep during the run: a
	// floor under the webhook and answer times this tool can measure.
	ToolDelay   Latency        `json:"load_tool_sched_delay"`
	Graph       map[string]int `json:"graph_requests,omitempty"`
	GraphErrors map[string]int `json:"graph_errors,omitempty"`
	// GraphConns is what callbot's /metrics says of its connections to Graph during the run.
	GraphConns     *GraphConnStats `json:"graph_connections,omitempty"`
	Redis          RedisStats      `json:"redis"`
	CPU            CPUStats        `json:"cpu"`
	CallbotRSS     int64           `json:"callbot_rss_bytes"`
	CallbotPeakRSS int64           `json:"callbot_peak_rss_bytes"`
	Baseline       *Baseline       `json:"noop_baseline,omitempty"`
	Ratio          *Ratio          `json:"ratio,omitempty"`
	Memory         *Memory         `json:"memory,omitempty"`
	Targets        []Target        `json:"targets,omitempty"`
	Leaks          *Leaks          `json:"leaks,omitempty"`
	Log            LogStats        `json:"callbot_log"`
	// Profile is `go tool pprof -top -cum` of callbot's CPU profile during the run (-cpuprofile).
	Profile     []string `json:"callbot_profile_top,omitempty"`
	ProfileFile string   `json:"callbot_profile_file,omitempty"`
}

type Machine struct {
	CPUs     int     `json:"cpus"`
	CPUModel string  `json:"cpu_model,omitempty"`
	MemoryGB float64 `json:"memory_gb,omitempty"`
	Kernel   string  `json:"kernel,omitempty"`
	GOOS     string  `json:"goos"`
	Go       string  `json:"go"`
	Redis    string  `json:"redis,omitempty"`
}

type Settings struct {
	Rate        float64 `json:"rate"`
	Duration    string  `json:"duration"`
	Concurrency int     `json:"concurrency"`
	Agents      int     `json:"agents"`
	Talk        string  `json:"talk"`
	Prompt      string  `json:"prompt"`
	HoldPrompt  string  `json:"hold_prompt"`
	Step        string  `json:"step"`
	DigitDelay  string  `json:"digit_delay"`
	GraphLat    string  `json:"graph_latency,omitempty"`
	Presence    string  `json:"presence_interval"`
	Hold        int     `json:"hold,omitempty"`
	LogLevel    string  `json:"log_level"`
	RedisProxy  bool    `json:"redis_proxy"`
	Callbot     string  `json:"callbot"`
	Pinning     string  `json:"pinning"`
}

func settingsOf(o options) Settings {
	return Settings{Rate: o.rate, Duration: o.duration.String(), Concurrency: o.concurrency, Agents: o.agents,
		Talk: o.talk.String(), Prompt: o.prompt.String(), HoldPrompt: o.holdPrompt.String(), Step: o.step.String(), DigitDelay: o.digitDelay.String(),
		GraphLat: durationOrEmpty(o.graphLat),
		Presence: o.presence.String(), Hold: o.hold, LogLevel: o.logLevel, RedisProxy: o.redisProxy}
}

// steadyFrom is when, after the first call, the work each call leaves for later comes due at
// the rate calls are placed: a lease (8 s) after the first calls' last save, plus a margin.
const steadyFrom = 10 * time.Second

// defaultDuration is how long a run places calls unless told: long enough that most of the run
// is at steady state (from steadyFrom on).
const defaultDuration = 40 * time.Second

// wholeRunNote says how the whole run's Redis counts per notification undercount: they stop when
// the last call ends, before the work the last lease's calls leave for later comes due. steady:
// the report has the steady-state window, the figure to judge.
func wholeRunNote(steady bool) string {
	if steady {
		return "\n                 (the whole run undercounts the work each call leaves for later, due 8 s after it: judge the steady-state line)"
	}
	return "\n                 (undercounts the work each call leaves for later, due 8 s after it: -duration 15s or more adds a steady-state line)"
}

func durationOrEmpty(d time.Duration) string {
	if d == 0 {
		return ""
	}
	return d.String()
}

// GraphConnStats: connections callbot opened to Graph (graphsim) during the run, each a TCP and
// TLS handshake, and the most it had open at once (read once a second).
type GraphConnStats struct {
	Opened                int64   `json:"opened"`
	OpenedPer1000Requests float64 `json:"opened_per_1000_requests"`
	PeakOpen              int64   `json:"peak_open"`
}

type CallStats struct {
	Placed       int            `json:"placed"`
	PlacedPerSec float64        `json:"placed_per_sec"`
	PlaceErrors  int            `json:"place_errors"` // created notification not acknowledged
	Answered     int            `json:"answered"`
	Transferred  int            `json:"transferred"`
	Outcomes     map[string]int `json:"outcomes,omitempty"`
	LiveAtEnd    int            `json:"alive_at_end"`
}

type NotificationStats struct {
	Acked int `json:"acked"` // 2xx answers of the bot
	// PerSec counts the POSTs started while calls were being placed, over that window.
	PerSec        float64        `json:"per_sec"`
	PerSecOverall float64        `json:"per_sec_overall"` // all acknowledged, until the last
	Window        float64        `json:"window_s"`
	PerCall       float64        `json:"per_call"`
	Non2xx        map[string]int `json:"non_2xx,omitempty"`
	Retries       int            `json:"retries"`
	Errors        []string       `json:"errors,omitempty"` // transport errors, a few distinct ones
}

type LiveLatency struct {
	Live int `json:"live_calls_up_to"`
	Latency
	ToolDelayP99 float64 `json:"load_tool_delay_p99_ms"`
}

type InFlight struct {
	Peak int     `json:"peak"`
	Mean float64 `json:"mean"`
}

type RedisStats struct {
	// Executed is what Redis counted (commandstats, without the tool's INFO). Redis 7 counts the
	// commands a Lua script calls as well as the EVALSHA itself.
	Executed                int64   `json:"executed"`
	ExecutedPerNotification float64 `json:"executed_per_notification"`
	ScriptsPerNotification  float64 `json:"scripts_per_notification"`
	// Sent is what callbot sent, counted by the -redis-proxy: each command of a pipeline
	// counts, an EVALSHA counts as one.
	Sent                int64   `json:"sent,omitempty"`
	SentPerNotification float64 `json:"sent_per_notification,omitempty"`
	// RoundTripsPerNotification approximates round trips by the reads of callbot's requests
	// (a pipeline arrives in one read).
	RoundTripsPerNotification float64        `json:"round_trips_per_notification,omitempty"`
	Top                       []CommandCount `json:"top,omitempty"`
	BackgroundPerSec          float64        `json:"background_per_sec"` // with no call placed
	KeysAtEnd                 int64          `json:"keys_at_end"`
	// Steady is the same counts over a window at steady state (rate mode, -duration of 15 s or
	// more): from steadyFrom after the first call to the end of placing, divided by the
	// notifications started in it.
	Steady *SteadyRedis `json:"steady,omitempty"`
}

// SteadyRedis is Redis's work per notification at steady state. The whole-run figures miss the
// work the last calls leave for later (each call's outbox entry falls due a lease, 8 s, after
// its last save, after the run's last reading): they undercount by about 8 s over the run's
// length of that work, 20% of it in a 40 s run. From steadyFrom on, that work comes due at the
// rate calls are placed, so a window that starts there and ends with the placing counts it once
// per call.
type SteadyRedis struct {
	From                      float64 `json:"from_s"`
	To                        float64 `json:"to_s"`
	Notifications             int     `json:"notifications"`
	ExecutedPerNotification   float64 `json:"executed_per_notification"`
	SentPerNotification       float64 `json:"sent_per_notification,omitempty"`
	RoundTripsPerNotification float64 `json:"round_trips_per_notification,omitempty"`
}

type CommandCount struct {
	Name            string  `json:"name"`
	PerNotification float64 `json:"per_notification"`
}

type CPUStats struct {
	Callbot  CPUUse `json:"callbot"`
	Redis    CPUUse `json:"redis"`
	LoadTool CPUUse `json:"load_tool"` // graphsim (it signs every notification with RS256) and the callers
	// Others is the CPU other processes of the machine used meanwhile, in cores.
	Others float64 `json:"others_cores"`
	// CallbotSyscalls is callbot's read and write system calls per notification (/proc/PID/io).
	CallbotSyscalls float64 `json:"callbot_syscalls_per_notification"`
}

type CPUUse struct {
	Seconds           float64 `json:"seconds"`
	Cores             float64 `json:"cores"` // CPU seconds per wall second
	PerNotificationUS float64 `json:"per_notification_us"`
	// IdleCores is the CPU used with no call placed (timers, dispatcher, presence polls);
	// MarginalPerNotificationUS is the CPU per notification above it.
	IdleCores                 float64 `json:"idle_cores"`
	MarginalPerNotificationUS float64 `json:"marginal_per_notification_us"`
}

type Baseline struct {
	Workers     int     `json:"workers"`
	Requests    int     `json:"requests"`
	Failed      int     `json:"failed"`
	Seconds     float64 `json:"seconds"`
	PerSec      float64 `json:"per_sec"`
	Latency     Latency `json:"latency"`
	ServerCPUus float64 `json:"server_cpu_us_per_request"`
	ClientCPUus float64 `json:"client_cpu_us_per_request"`
	// ServerSyscalls is the no-op server's read and write system calls per request.
	ServerSyscalls float64 `json:"server_syscalls_per_request"`
	// ServerCores and ClientCores are the CPU the no-op server and this tool used per second:
	// the no-op is saturated only when ServerCores is about ServerCPUs (the CPUs it may use).
	// Below that its throughput is a lower bound and the throughput ratio an upper bound.
	ServerCores float64 `json:"server_cores"`
	ClientCores float64 `json:"client_cores"`
	ServerCPUs  int     `json:"server_cpus"`
	// AtRate is the same no-op server driven, open loop, at callbot's notifications/s.
	AtRate *PacedBaseline `json:"at_callbot_rate,omitempty"`
}

// notSaturated says the no-op server used less than 90% of its CPUs.
func (b *Baseline) notSaturated() bool {
	return b.ServerCPUs > 0 && b.ServerCores < 0.9*float64(b.ServerCPUs)
}

// PacedBaseline is the no-op server at a fixed rate rather than saturated.
type PacedBaseline struct {
	Rate           float64 `json:"rate"`
	Requests       int     `json:"requests"`
	Failed         int     `json:"failed"`
	PerSec         float64 `json:"per_sec"`
	Latency        Latency `json:"latency"`
	ServerCPUus    float64 `json:"server_cpu_us_per_request"`
	ServerSyscalls float64 `json:"server_syscalls_per_request"`
}

type Ratio struct {
	// Throughput is callbot's notifications/s over the no-op's: callbot's figure is the offered
	// load unless callbot is saturated.
	Throughput float64 `json:"throughput"`
	// CPU is the no-op server's CPU per request over callbot's CPU per notification: the ratio
	// their throughputs would have on equal, saturated CPUs. CPUWithRedis adds Redis's CPU.
	CPU          float64 `json:"cpu"`
	CPUWithRedis float64 `json:"cpu_with_redis"`
	// Syscalls is the no-op server's read/write system calls per request over callbot's per
	// notification. Each is a socket exchange; where those exchanges (and the wake-ups they
	// cause) are most of the no-op's CPU, as on a VM, it bounds the CPU ratio: no saving in
	// callbot's own code lifts it, only fewer round trips.
	Syscalls float64 `json:"syscalls,omitempty"`
	// CPUEqualLoad is the no-op's CPU per request at callbot's rate over callbot's CPU per
	// notification: both processes mostly idle and woken per request, as callbot was.
	CPUEqualLoad float64 `json:"cpu_equal_load,omitempty"`
}

type Memory struct {
	Held              int     `json:"held"`
	Queued            int     `json:"queued"`
	PlaceSeconds      float64 `json:"place_s"`
	RedisUsedBefore   int64   `json:"redis_used_memory_before"`
	RedisUsedAfter    int64   `json:"redis_used_memory_after"`
	RedisPerCall      int64   `json:"redis_bytes_per_call"`
	RedisRSS          int64   `json:"redis_rss"`
	KeysBefore        int64   `json:"keys_before"`
	KeysAfter         int64   `json:"keys_after"`
	KeysPerCall       float64 `json:"keys_per_call"`
	CallbotRSSBefore  int64   `json:"callbot_rss_before"`
	CallbotRSSAfter   int64   `json:"callbot_rss_after"`
	CallbotRSSPerCall int64   `json:"callbot_rss_bytes_per_call"`
	CallbotPeakRSS    int64   `json:"callbot_peak_rss"`
	// Reconcile: the reconciler's pass over the held calls (-reconcile), nil without one.
	Reconcile *ReconcilePass `json:"reconcile,omitempty"`
}

// ReconcilePass is a pass of callbot's reconciler over the held calls, from its /metrics.
type ReconcilePass struct {
	Seconds     float64 `json:"seconds"`     // callbot_reconcile_last_pass_seconds
	Checked     int64   `json:"checked"`     // calls the pass checked (callbot_reconcile_last_pass_calls)
	GraphReads  int     `json:"graph_reads"` // GETs of a call graphsim served meanwhile
	PerSecond   float64 `json:"calls_per_s"` // Checked / Seconds
	WaitSeconds float64 `json:"wait_s"`      // from the calls held to the pass's end
	TimedOut    bool    `json:"timed_out"`   // no complete pass over the held calls came in time
}

type Target struct {
	Name string `json:"name"`
	Want string `json:"want"`
	Got  string `json:"got"`
	Met  bool   `json:"met"`
	Note string `json:"note,omitempty"`
}

type LogStats struct {
	Lines int       `json:"lines"`
	Warn  int       `json:"warn"`
	Error int       `json:"error"`
	Top   []LogLine `json:"top,omitempty"`
}

type LogLine struct {
	Level string `json:"level"`
	Msg   string `json:"msg"`
	Count int    `json:"count"`
}

// targets are issue #3's goals, judged on this run.
func targets(r *Report) []Target {
	var note string
	if r.Mode == "rate" && r.Settings.Rate != 200 {
		note = fmt.Sprintf("the issue states its targets at 200 new calls/s; this run placed %.0f/s", r.Calls.PlacedPerSec)
	}
	var ts []Target
	if r.Ratio != nil {
		t := Target{Name: "notifications/s vs no-op", Want: ">= 0.5", Got: fmt.Sprintf("%.2f", r.Ratio.Throughput),
			Met: r.Ratio.Throughput >= 0.5}
		t.Note = fmt.Sprintf("CPU-normalised %.2f (with Redis %.2f)", r.Ratio.CPU, r.Ratio.CPUWithRedis)
		if r.Mode == "rate" {
			t.Note += "; at a fixed rate callbot's figure is the offered load, see docs/performance.md"
		}
		if b := r.Baseline; b != nil && b.notSaturated() {
			t.Note += fmt.Sprintf("; the no-op used %.2f of its %d CPUs, not saturated: an upper bound", b.ServerCores, b.ServerCPUs)
		}
		ts = append(ts, t)
	}
	if rt, note, ok := roundTrips(r.Redis); ok {
		ts = append(ts, Target{Name: "redis round trips/notif.", Want: "<= 1.5", Got: fmt.Sprintf("%.2f", rt), Met: rt <= 1.5, Note: note})
	}
	ts = append(ts,
		Target{Name: "webhook p99", Want: "< 10 ms", Got: fmt.Sprintf("%.2f ms", r.Webhook.P99), Met: r.Webhook.N > 0 && r.Webhook.P99 < 10, Note: note},
		Target{Name: "incoming->answer p99", Want: "< 20 ms", Got: fmt.Sprintf("%.2f ms", r.Answer.P99), Met: r.Answer.N > 0 && r.Answer.P99 < 20, Note: note},
	)
	return ts
}

// roundTrips picks the figure to judge issue #3's round-trip target on, and says where it comes
// from: the steady-state window's when the run had one (the whole run misses the work each call
// leaves for later), else the whole run's, said to undercount. Without -redis-proxy nothing
// counted round trips.
func roundTrips(rd RedisStats) (perNotification float64, note string, ok bool) {
	if rd.Sent == 0 {
		return 0, "", false
	}
	if st := rd.Steady; st != nil && st.Notifications > 0 {
		return st.RoundTripsPerNotification, fmt.Sprintf("at steady state, %d notifications; through the counting proxy", st.Notifications), true
	}
	return rd.RoundTripsPerNotification, "whole run, which undercounts the work each call leaves for later: -duration 15s or more judges the steady state", true
}

func writeJSON(w io.Writer, r *Report) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r)
}

func mb(b int64) string { return fmt.Sprintf("%.1f MB", float64(b)/(1<<20)) }

func lat(l Latency) string {
	if l.N == 0 {
		return "none"
	}
	return fmt.Sprintf("p50 %.2f  p90 %.2f  p99 %.2f  max %.1f ms  (n=%d)", l.P50, l.P90, l.P99, l.Max, l.N)
}

func sortedKV(m map[string]int) string {
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		parts = append(parts, fmt.Sprintf("%s %d", k, m[k]))
	}
	return strings.Join(parts, ", ")
}

// Text is the human-readable report.
func (r *Report) Text() string {
	var b strings.Builder
	p := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	s := r.Settings
	p("callbot-load %s  commit %s", r.When.Format(time.RFC3339), r.Commit)
	p("machine          %d CPUs (%s), %.0f GB, %s, redis %s", r.Machine.CPUs, r.Machine.CPUModel, r.Machine.MemoryGB, r.Machine.Go, r.Machine.Redis)
	switch r.Mode {
	case "hold":
		p("mode             hold %d calls, placed at %.0f/s; %d agents away", s.Hold, s.Rate, s.Agents)
	case "closed-loop":
		p("mode             closed loop, %d calls alive, for %s; %d agents (talk %s), prompt %s, hold music %s, step %s, presence %s, log %s",
			s.Concurrency, s.Duration, s.Agents, s.Talk, s.Prompt, s.HoldPrompt, s.Step, s.Presence, s.LogLevel)
	default:
		p("mode             %.0f calls/s for %s (at most %d alive); %d agents (talk %s), prompt %s, hold music %s, step %s, presence %s, log %s",
			s.Rate, s.Duration, s.Concurrency, s.Agents, s.Talk, s.Prompt, s.HoldPrompt, s.Step, s.Presence, s.LogLevel)
	}
	p("cpus             %s", s.Pinning)
	c := r.Calls
	p("calls            %d placed (%.1f/s), %d answered, %d transferred, %d alive at end, %d not acknowledged", c.Placed, c.PlacedPerSec, c.Answered, c.Transferred, c.LiveAtEnd, c.PlaceErrors)
	if len(c.Outcomes) > 0 {
		p("                 outcomes: %s", sortedKV(c.Outcomes))
	}
	n := r.Notifications
	if r.Mode == "hold" {
		p("notifications    %d acknowledged while placing", n.Acked)
	} else {
		p("notifications/s  %.0f while placing (%.1fs), %.0f overall; %d acknowledged, %.1f per call, %d retries",
			n.PerSec, n.Window, n.PerSecOverall, n.Acked, n.PerCall, n.Retries)
	}
	if len(n.Non2xx) > 0 {
		p("                 NOT acknowledged: %s", sortedKV(n.Non2xx))
	}
	for _, e := range n.Errors {
		p("                 transport error: %s", e)
	}
	p("webhook          %s; in flight peak %d, mean %.1f", lat(r.Webhook), r.InFlight.Peak, r.InFlight.Mean)
	if ws := r.WebhookServer; ws != nil {
		le := func(v float64) string {
			if v < 0 {
				return "> 5 s"
			}
			return fmt.Sprintf("<= %g", v)
		}
		p("  in callbot     p50 %s  p90 %s  p99 %s ms  (n=%d; its /metrics, from the request read to the response written: buckets, so upper bounds)",
			le(ws.P50), le(ws.P90), le(ws.P99), ws.N)
	}
	for _, l := range r.WebhookByLive {
		p("  up to %6d live: %s; load tool delay p99 %.2f ms", l.Live, lat(l.Latency), l.ToolDelayP99)
	}
	if r.Mode != "hold" {
		p("incoming->answer %s", lat(r.Answer))
		p("placed->agent    %s", lat(r.PlacedToAgent))
		p("load tool delay  %s  (lateness of a 1 ms sleep in this process: inflates the two lines above)", lat(r.ToolDelay))
	} else {
		p("load tool delay  %s  (lateness of a 1 ms sleep in this process: inflates the webhook times)", lat(r.ToolDelay))
	}
	if len(r.Graph) > 0 {
		p("graph requests   %s", sortedKV(r.Graph))
	}
	if c := r.GraphConns; c != nil {
		p("graph conns      %d opened (%.1f per 1,000 requests), at most %d open", c.Opened, c.OpenedPer1000Requests, c.PeakOpen)
	}
	if len(r.GraphErrors) > 0 {
		p("graph ERRORS     %s", sortedKV(r.GraphErrors))
	}
	rd := r.Redis
	var top []string
	for _, t := range rd.Top {
		top = append(top, fmt.Sprintf("%s %.2f", t.Name, t.PerNotification))
	}
	p("redis            %.2f commands executed/notification (scripts %.2f; top: %s); background %.0f/s idle; %d keys at end",
		rd.ExecutedPerNotification, rd.ScriptsPerNotification, strings.Join(top, ", "), rd.BackgroundPerSec, rd.KeysAtEnd)
	if rd.Sent > 0 {
		p("                 %.2f commands sent/notification by callbot (proxy count: a pipeline counts each command, EVALSHA counts one)", rd.SentPerNotification)
		p("                 %.2f round trips/notification by callbot (reads of its requests at the proxy: a pipeline is one)%s", rd.RoundTripsPerNotification, wholeRunNote(rd.Steady != nil))
	} else {
		p("                 (Redis counts commands run inside Lua scripts too; -redis-proxy counts what callbot sends: each command of a pipeline, EVALSHA as one)")
	}
	if st := rd.Steady; st != nil {
		line := fmt.Sprintf("                 at steady state (%.0f-%.0f s after the first call, %d notifications): %.2f commands executed",
			st.From, st.To, st.Notifications, st.ExecutedPerNotification)
		if rd.Sent > 0 {
			line += fmt.Sprintf(", %.2f sent, %.2f round trips", st.SentPerNotification, st.RoundTripsPerNotification)
		}
		p("%s per notification", line)
	}
	cu := r.CPU
	p("cpu              callbot %.0f us/notification (%.2f cores), redis %.0f us (%.2f), load tool+graphsim %.0f us (%.2f)",
		cu.Callbot.PerNotificationUS, cu.Callbot.Cores, cu.Redis.PerNotificationUS, cu.Redis.Cores, cu.LoadTool.PerNotificationUS, cu.LoadTool.Cores)
	if cu.CallbotSyscalls > 0 {
		p("                 callbot %.1f read/write system calls per notification", cu.CallbotSyscalls)
	}
	if r.Mode != "hold" {
		p("                 above idle: callbot %.0f us (idle %.3f cores), redis %.0f us (idle %.3f), load tool %.0f us (idle %.3f)",
			cu.Callbot.MarginalPerNotificationUS, cu.Callbot.IdleCores, cu.Redis.MarginalPerNotificationUS, cu.Redis.IdleCores,
			cu.LoadTool.MarginalPerNotificationUS, cu.LoadTool.IdleCores)
	}
	if cu.Others >= 0.05 {
		p("                 WARNING: other processes used %.2f cores meanwhile; the figures are disturbed", cu.Others)
	} else {
		p("                 other processes: %.2f cores", cu.Others)
	}
	p("callbot memory   RSS %s, peak %s", mb(r.CallbotRSS), mb(r.CallbotPeakRSS))
	if bl := r.Baseline; bl != nil {
		p("no-op baseline   %.0f notifications/s (%d workers, same bodies, %.1fs, %d failed); %s; server %.0f us CPU/request, %.1f read/write system calls/request",
			bl.PerSec, bl.Workers, bl.Seconds, bl.Failed, lat(bl.Latency), bl.ServerCPUus, bl.ServerSyscalls)
		p("                 no-op server %.2f cores of %d, load tool (client) %.2f cores", bl.ServerCores, bl.ServerCPUs, bl.ClientCores)
		if bl.notSaturated() {
			p("                 WARNING: the no-op server was not saturated: its throughput is a lower bound, the throughput ratio an upper bound")
		}
		if a := bl.AtRate; a != nil {
			p("no-op at rate    %.0f/s asked, %.0f/s done (%d failed); %s; server %.0f us CPU/request, %.1f read/write system calls/request",
				a.Rate, a.PerSec, a.Failed, lat(a.Latency), a.ServerCPUus, a.ServerSyscalls)
		}
	}
	if rt := r.Ratio; rt != nil {
		p("ratio            %.3f of no-op (throughput); CPU-normalised %.3f, with Redis %.3f", rt.Throughput, rt.CPU, rt.CPUWithRedis)
		if rt.CPUEqualLoad > 0 {
			p("                 CPU-normalised at equal load (the no-op at callbot's rate): %.3f", rt.CPUEqualLoad)
		}
		if rt.Syscalls > 0 {
			p("                 system calls: the no-op makes %.2f of callbot's per notification (the CPU ratio's ceiling where socket exchanges dominate)", rt.Syscalls)
		}
	}
	if m := r.Memory; m != nil {
		p("memory           %d calls queued of %d (placed in %.0fs)", m.Queued, m.Held, m.PlaceSeconds)
		p("  redis          used_memory %s -> %s: %d bytes/call; %.1f keys/call; redis RSS %s",
			mb(m.RedisUsedBefore), mb(m.RedisUsedAfter), m.RedisPerCall, m.KeysPerCall, mb(m.RedisRSS))
		p("  callbot        RSS %s -> %s: %d bytes/call; peak %s", mb(m.CallbotRSSBefore), mb(m.CallbotRSSAfter), m.CallbotRSSPerCall, mb(m.CallbotPeakRSS))
		if rp := m.Reconcile; rp != nil {
			if rp.TimedOut {
				p("  reconciler     no pass over the %d held calls within %.0fs (last pass checked %d)", m.Queued, rp.WaitSeconds, rp.Checked)
			} else {
				p("  reconciler     a pass over %d calls took %.2fs (%.0f calls/s; graphsim served %d reads of a call), %.0fs after the calls were held",
					rp.Checked, rp.Seconds, rp.PerSecond, rp.GraphReads, rp.WaitSeconds)
			}
		}
	}
	if r.Leaks != nil {
		b.WriteString(r.Leaks.text())
	}
	for _, t := range r.Targets {
		verdict := "met"
		if !t.Met {
			verdict = "NOT MET"
		}
		line := fmt.Sprintf("target           %-26s want %-8s got %-10s %s", t.Name, t.Want, t.Got, verdict)
		if t.Note != "" {
			line += "  (" + t.Note + ")"
		}
		p("%s", line)
	}
	p("callbot log      %d lines, %d warn, %d error", r.Log.Lines, r.Log.Warn, r.Log.Error)
	for _, l := range r.Log.Top {
		p("  %5d %-5s %s", l.Count, l.Level, l.Msg)
	}
	if len(r.Profile) > 0 {
		p("callbot cpu profile (%s; go tool pprof -top -cum):", r.ProfileFile)
		for _, l := range r.Profile {
			p("  %s", l)
		}
	}
	return b.String()
}

func numCPU() int       { return runtime.NumCPU() }
func goos() string      { return runtime.GOOS + "/" + runtime.GOARCH }
func goVersion() string { return runtime.Version() }

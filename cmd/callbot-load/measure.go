package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/graphsim"
)

// measure sets the world up, runs the load (rate or hold) and returns the report.
func measure(ctx context.Context, o options, progress io.Writer) (*Report, error) {
	root, rootErr := moduleRoot()
	rep := &Report{Tool: "callbot-load", When: time.Now().UTC().Truncate(time.Second), Commit: gitCommit(root),
		Machine: machine(), Settings: settingsOf(o)}
	dir, err := os.MkdirTemp("", "callbot-load-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if o.keep {
			fmt.Fprintf(progress, "kept %s (callbot.log, flow.yaml, redis log)\n", dir)
			return
		}
		os.RemoveAll(dir)
	}()
	bin := o.callbot
	if bin == "" {
		if rootErr != nil {
			return nil, rootErr
		}
		fmt.Fprintln(progress, "building callbot: go build ./cmd/callbot")
		if bin, err = buildCallbot(root, dir, o.cpuprofile != ""); err != nil {
			return nil, err
		}
	}
	rep.Settings.Callbot = bin
	var cpus cpuSplit
	if o.pin {
		if all := allowedCPUs(); len(all) >= 2 {
			cpus = cpuSplit{tool: all[:len(all)/2], server: all[len(all)/2:]}
			procs := runtime.GOMAXPROCS(len(cpus.tool))
			if err := pin(os.Getpid(), cpus.tool); err != nil {
				return nil, fmt.Errorf("pin to CPUs %v: %w", cpus.tool, err)
			}
			defer func() {
				_ = pin(os.Getpid(), all)
				runtime.GOMAXPROCS(procs)
			}()
			rep.Settings.Pinning = fmt.Sprintf("load tool on CPUs %v; callbot, redis-server and no-op server on %v", cpus.tool, cpus.server)
		}
	}
	if rep.Settings.Pinning == "" {
		rep.Settings.Pinning = "none"
	}
	w, err := startWorld(ctx, o, cpus, bin, dir, progress)
	if err != nil {
		return nil, err
	}
	defer w.close()
	if in, err := readInfo(w.redisAddr); err == nil {
		rep.Machine.Redis = in.version
	}
	if o.hold > 0 {
		err = w.runHold(ctx, rep, progress)
	} else {
		err = w.runRate(ctx, rep, progress)
	}
	if ctx.Err() != nil {
		return nil, fmt.Errorf("interrupted; subprocesses stopped: %w", ctx.Err())
	}
	if err != nil {
		return nil, err
	}
	return rep, nil
}

// driveResult is what placing the calls gave.
type driveResult struct {
	start, placeEnd time.Time
	placed, failed  int
	unfinished      int // calls still alive when the drain time was over
}

// drive places calls at rate (or, with rate 0, as fast as concurrency allows) for duration, or
// exactly count calls when count > 0. With wait, each call is followed until it ends, at most
// drain after the last was placed.
func (w *world) drive(ctx context.Context, rate float64, duration time.Duration, count, concurrency int, wait bool, progress io.Writer) driveResult {
	var (
		wg                   sync.WaitGroup
		live, placed, failed atomic.Int64
		stopWait             = make(chan struct{})
		sem                  = make(chan struct{}, concurrency)
	)
	limit := count
	if limit == 0 && rate > 0 {
		limit = max(1, int(rate*duration.Seconds()))
	}
	start := time.Now()
	tick := w.progress(progress, start, &placed, &live)
	defer tick()
loop:
	for i := 0; ; i++ {
		if limit > 0 && i >= limit {
			break
		}
		if limit == 0 && time.Since(start) >= duration {
			break
		}
		if rate > 0 {
			if d := time.Until(start.Add(time.Duration(float64(i) / rate * float64(time.Second)))); d > 0 {
				select {
				case <-ctx.Done():
					break loop
				case <-time.After(d):
				}
			}
		}
		select {
		case <-ctx.Done():
			break loop
		case sem <- struct{}{}:
		}
		live.Add(1)
		wg.Go(func() {
			defer func() { <-sem; live.Add(-1) }()
			c, err := w.place(ctx, i)
			placed.Add(1)
			if err != nil {
				failed.Add(1)
			}
			if c == nil || !wait {
				return
			}
			select {
			case <-c.Done():
			case <-stopWait:
			case <-ctx.Done():
			}
		})
	}
	res := driveResult{start: start, placeEnd: time.Now()}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(w.o.drain):
	case <-ctx.Done():
	}
	res.unfinished = int(live.Load())
	close(stopWait)
	<-done
	res.placed, res.failed = int(placed.Load()), int(failed.Load())
	return res
}

// progress prints a line a second until the returned function is called.
func (w *world) progress(out io.Writer, start time.Time, placed, live *atomic.Int64) func() {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(time.Second)
		defer t.Stop()
		lastN, lastPlaced := 0, int64(0)
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			n, inflight := w.rec.count()
			if open, _, ok := w.graphConns(context.Background()); ok && open > w.graphPeak.Load() {
				w.graphPeak.Store(open)
			}
			p := placed.Load()
			fmt.Fprintf(out, "  %3.0fs  calls placed %6d (+%4d)  alive %5d  notifications %7d (+%5d)  in flight %3d\n",
				time.Since(start).Seconds(), p, p-lastPlaced, live.Load(), n, n-lastN, inflight)
			lastN, lastPlaced = n, p
		}
	}()
	return func() { close(stop); <-done }
}

// usage is a reading of the counters the report compares before and after.
type usage struct {
	at               time.Time
	info             redisInfo
	bot, redis, self time.Duration
	botSyscalls      int64
	proxied          int64
	proxiedReads     int64
	botRSS, botHWM   int64
	redisRSS         int64
	system           time.Duration // all processes of the machine
}

func (w *world) read() usage {
	u := usage{at: time.Now()}
	u.info, _ = readInfo(w.redisAddr)
	u.bot, u.redis, u.self = procCPU(w.bot.pid()), procCPU(w.redis.pid()), selfCPU()
	u.botSyscalls = procSyscalls(w.bot.pid())
	u.system = systemBusy()
	u.botRSS, u.botHWM = procMem(w.bot.pid())
	u.redisRSS, _ = procMem(w.redis.pid())
	if w.proxy != nil {
		u.proxied = w.proxy.cmds.Load()
		u.proxiedReads = w.proxy.reads.Load()
	}
	return u
}

// commandsBetween is how many commands Redis executed between two readings, by command, leaving
// out the tool's own INFO.
func commandsBetween(a, b redisInfo) (total int64, by map[string]int64) {
	by = map[string]int64{}
	for k, v := range b.commands {
		if k == "info" {
			continue
		}
		if d := v - a.commands[k]; d > 0 {
			by[k] = d
			total += d
		}
	}
	return total, by
}

// runRate: warm-up, then calls at the target rate, then the no-op baseline.
func (w *world) runRate(ctx context.Context, rep *Report, progress io.Writer) error {
	o := w.o
	rep.Mode = "rate"
	if o.rate == 0 {
		rep.Mode = "closed-loop"
	}
	if o.warmup > 0 {
		fmt.Fprintf(progress, "warm-up: %d calls\n", o.warmup)
		w.drive(ctx, 20, 0, o.warmup, o.warmup, true, io.Discard)
	}
	var leaks0 LeakSnapshot
	if o.leaks > 0 { // before the counters are read: its commands are not callbot's
		var err error
		if leaks0, err = w.leakSnapshot(ctx); err != nil {
			return fmt.Errorf("-leaks: %w", err)
		}
	}
	// Background work (timers, dispatcher, presence) while no call is placed.
	idle0 := w.read()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Second):
	}
	u0 := w.read()
	bg, _ := commandsBetween(idle0.info, u0.info)
	rep.Redis.BackgroundPerSec = round(float64(bg)/u0.at.Sub(idle0.at).Seconds(), 1)

	if o.rate > 0 {
		fmt.Fprintf(progress, "placing %.0f calls/s for %s (at most %d alive)\n", o.rate, o.duration, o.concurrency)
	} else {
		fmt.Fprintf(progress, "closed loop: %d calls alive for %s\n", o.concurrency, o.duration)
	}
	_, opened0, _ := w.graphConns(ctx)
	w.graphPeak.Store(0)
	webhook0 := scrapeHistogram(ctx, w.botURL, metricWebhookDuration)
	winStart := w.rec.resetWindow()
	probe := schedProbe()
	profDone := w.startProfile(ctx, o.duration)
	steadyReads := w.readSteady(ctx, o)
	dr := w.drive(ctx, o.rate, o.duration, 0, o.concurrency, true, progress)
	rep.ToolDelay = latency(probe())
	open1, opened1, connsOK := w.graphConns(ctx)
	rep.WebhookServer = scrapeHistogram(ctx, w.botURL, metricWebhookDuration).since(webhook0).latency()
	if open1 > w.graphPeak.Load() {
		w.graphPeak.Store(open1)
	}
	if err := <-profDone; err != nil {
		fmt.Fprintf(progress, "cpu profile: %v\n", err)
	} else if o.cpuprofile != "" {
		rep.Profile = topOfProfile(rep.Settings.Callbot, o.cpuprofile)
		rep.ProfileFile = o.cpuprofile
	}
	peak, mean := w.rec.inflightStats(winStart)
	u1 := w.read()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if w.bot.exited() {
		return fmt.Errorf("callbot exited during the run: %v\n%s", w.bot.err, tail(w.botLog, 20))
	}
	if o.leaks > 0 {
		fmt.Fprintf(progress, "leaks: reading Redis and callbot %s after the calls ended\n", o.leaks)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(o.leaks):
		}
		leaks1, err := w.leakSnapshot(ctx)
		if err != nil {
			return fmt.Errorf("-leaks: %w", err)
		}
		rep.Leaks = compareLeaks(leaks0, leaks1, dr.placed, o.leaks)
	}

	// Notifications, as the bot acknowledged them.
	lat, acked, steady, lastAck, non2xx := webhookTimes(w.rec.snapshot(), dr.start, dr.placeEnd)
	window := dr.placeEnd.Sub(dr.start).Seconds()
	rep.Notifications = NotificationStats{Acked: acked, Window: round(window, 2), Non2xx: non2xx,
		PerSec: round(float64(steady)/window, 1)}
	if el := lastAck.Sub(dr.start).Seconds(); el > 0 {
		rep.Notifications.PerSecOverall = round(float64(acked)/el, 1)
	}
	rep.Webhook = latency(lat)
	rep.InFlight = InFlight{Peak: peak, Mean: round(mean, 2)}

	// Calls and what Graph saw.
	calls := w.sim.Calls()
	answerAt := map[string]time.Time{}
	rep.Graph = map[string]int{}
	rep.GraphErrors = map[string]int{}
	for _, r := range w.sim.Requests() {
		if r.Time.Before(dr.start) || r.CallID == "" {
			continue
		}
		rep.countGraph(r.Action, r.Status)
		if r.Action == "answer" {
			if _, ok := answerAt[graph.CallKey(r.CallID)]; !ok {
				answerAt[graph.CallKey(r.CallID)] = r.Time
			}
		}
	}
	cs := CallStats{Outcomes: map[string]int{}, PlaceErrors: dr.failed, LiveAtEnd: dr.unfinished}
	for _, c := range calls {
		if c.PlacedAt.Before(dr.start) {
			continue
		}
		cs.Placed++
		if c.Answered {
			cs.Answered++
		}
		outcome := c.Outcome
		if outcome == "" {
			outcome = "alive"
		}
		cs.Outcomes[outcome]++
	}
	toAnswer, toAgent := callTimes(calls, answerAt, dr.start, time.Now())
	if connsOK {
		var reqs int
		for _, n := range rep.Graph {
			reqs += n
		}
		rep.GraphConns = &GraphConnStats{Opened: opened1 - opened0, PeakOpen: w.graphPeak.Load()}
		if reqs > 0 {
			rep.GraphConns.OpenedPer1000Requests = round(1000*float64(opened1-opened0)/float64(reqs), 1)
		}
	}
	cs.PlacedPerSec = round(float64(cs.Placed)/window, 1)
	cs.Transferred = cs.Outcomes[graphsim.OutcomeTransferred]
	rep.Calls = cs
	rep.Answer = latency(toAnswer)
	rep.PlacedToAgent = latency(toAgent)
	if cs.Placed > 0 {
		rep.Notifications.PerCall = round(float64(acked)/float64(cs.Placed), 2)
	}
	var replays []replayReq
	for _, d := range w.sim.Deliveries() {
		if d.Time.Before(dr.start) {
			continue
		}
		if d.Attempt > 1 {
			rep.Notifications.Retries++
		}
		if d.Err != "" && len(rep.Notifications.Errors) < 3 {
			e := shorten(ids.ReplaceAllString(d.Err, "ID"), 160)
			if !slices.Contains(rep.Notifications.Errors, e) {
				rep.Notifications.Errors = append(rep.Notifications.Errors, e)
			}
		}
		if d.Status >= 200 && d.Status <= 299 && len(replays) < 200_000 {
			replays = append(replays, replayReq{header: d.Header, body: d.Body})
		}
	}

	// Redis and CPU.
	total, by := commandsBetween(u0.info, u1.info)
	w.redisReport(rep, total, by, u1.proxied-u0.proxied, u1.proxiedReads-u0.proxiedReads, acked, u1.info.keys)
	if a, b, ok := steadyReads(); ok {
		rep.Redis.Steady = w.steadyRedis(a, b, dr.start, w.rec.snapshot())
	}
	wall := u1.at.Sub(u0.at).Seconds()
	idle := u0.at.Sub(idle0.at).Seconds()
	rep.CPU = CPUStats{
		Callbot:  cpuOf(u1.bot-u0.bot, wall, acked).withIdle(u0.bot-idle0.bot, idle, wall, acked),
		Redis:    cpuOf(u1.redis-u0.redis, wall, acked).withIdle(u0.redis-idle0.redis, idle, wall, acked),
		LoadTool: cpuOf(u1.self-u0.self, wall, acked).withIdle(u0.self-idle0.self, idle, wall, acked),
	}
	rep.CallbotRSS = u1.botRSS
	rep.CallbotPeakRSS = u1.botHWM
	rep.CPU.Others = othersCPU(u0, u1, wall)
	if acked > 0 {
		rep.CPU.CallbotSyscalls = round(float64(u1.botSyscalls-u0.botSyscalls)/float64(acked), 2)
	}

	// callbot is stopped before the baseline runs, so the no-op server has the machine.
	w.stopBot()
	rep.Log = logStats(w.botLog)
	w.sim.Close()
	if o.baseline > 0 && len(replays) > 0 {
		// The peak of callbot's POSTs in flight follows the load offered to callbot: 2 at 50
		// calls/s left the no-op waiting on round trips, not saturated (19,400/s, 34 us of CPU
		// per request, where 16 connections gave 42,100/s and 20 us), and thousands in an
		// overloaded run spent the client's one CPU on connections (docs/performance.md).
		workers := min(max(minBaselineWorkers, peak), maxBaselineWorkers)
		fmt.Fprintf(progress, "no-op baseline: %d recorded notifications, %d workers, %s\n", len(replays), workers, o.baseline)
		srv, url, err := startNoop(w.cpus.server)
		if err != nil {
			return err
		}
		rr := replay(ctx, url, srv, replays, workers, o.baseline, 0)
		// The same server again, at callbot's rate: a process woken for each request pays
		// wake-ups that a saturated one does not (docs/performance.md, "Why 0.5 is out of reach here").
		var paced replayResult
		if rate := rep.Notifications.PerSec; rate > 0 {
			fmt.Fprintf(progress, "no-op at callbot's rate: %.0f/s, %s\n", rate, o.baseline)
			paced = replay(ctx, url, srv, replays, max(workers, 16), o.baseline, rate)
		}
		srv.stop(2 * time.Second)
		b := &Baseline{Workers: workers, Requests: rr.n, Failed: rr.failed, Seconds: round(rr.wall.Seconds(), 2),
			Latency: latency(rr.lat)}
		if rr.n > 0 {
			b.PerSec = round(float64(rr.n)/rr.wall.Seconds(), 1)
			b.ServerCPUus = round(float64(rr.serverCPU.Microseconds())/float64(rr.n), 1)
			b.ClientCPUus = round(float64(rr.clientCPU.Microseconds())/float64(rr.n), 1)
			b.ServerSyscalls = round(float64(rr.serverSyscalls)/float64(rr.n), 2)
			b.ServerCores = round(rr.serverCPU.Seconds()/rr.wall.Seconds(), 2)
			b.ClientCores = round(rr.clientCPU.Seconds()/rr.wall.Seconds(), 2)
		}
		b.ServerCPUs = len(w.cpus.server)
		if b.ServerCPUs == 0 {
			b.ServerCPUs = runtime.NumCPU()
		}
		if paced.n > 0 {
			b.AtRate = &PacedBaseline{Rate: round(rep.Notifications.PerSec, 1), Requests: paced.n, Failed: paced.failed,
				PerSec:         round(float64(paced.n)/paced.wall.Seconds(), 1),
				Latency:        latency(paced.lat),
				ServerCPUus:    round(float64(paced.serverCPU.Microseconds())/float64(paced.n), 1),
				ServerSyscalls: round(float64(paced.serverSyscalls)/float64(paced.n), 2)}
		}
		rep.Baseline = b
		if b.PerSec > 0 {
			rep.Ratio = &Ratio{Throughput: round(rep.Notifications.PerSec/b.PerSec, 3)}
			if rep.CPU.Callbot.PerNotificationUS > 0 {
				rep.Ratio.CPU = round(b.ServerCPUus/rep.CPU.Callbot.PerNotificationUS, 3)
				rep.Ratio.CPUWithRedis = round(b.ServerCPUus/(rep.CPU.Callbot.PerNotificationUS+rep.CPU.Redis.PerNotificationUS), 3)
				if b.AtRate != nil {
					rep.Ratio.CPUEqualLoad = round(b.AtRate.ServerCPUus/rep.CPU.Callbot.PerNotificationUS, 3)
				}
			}
			if rep.CPU.CallbotSyscalls > 0 {
				rep.Ratio.Syscalls = round(b.ServerSyscalls/rep.CPU.CallbotSyscalls, 3)
			}
		}
	}
	rep.Targets = targets(rep)
	return nil
}

// webhookTimes goes through the POSTs to the bot started from start: the latency of each,
// how many were acknowledged (acked) and how many of those started by placeEnd (steady), when
// the last acknowledgement came, and the others by status. Every POST is timed whatever its
// answer: a refusal is a response time too, and a timeout (a transport error after the client's
// 5 s) is the tail the p99 is about; timing only the 2xx ones hid both.
func webhookTimes(posts []post, start, placeEnd time.Time) (lat []time.Duration, acked, steady int, lastAck time.Time, non2xx map[string]int) {
	non2xx = map[string]int{}
	for _, p := range posts {
		if p.start.Before(start) {
			continue
		}
		lat = append(lat, p.dur)
		if p.status < 200 || p.status > 299 {
			non2xx[statusName(p.status)]++
			continue
		}
		acked++
		if !p.start.After(placeEnd) {
			steady++
		}
		if end := p.start.Add(p.dur); end.After(lastAck) {
			lastAck = end
		}
	}
	return lat, acked, steady, lastAck, non2xx
}

// callTimes is, for the calls placed from start, the time from placing to the answer request
// (answerAt, by call key) and to the transfer to an agent. Every caller of the load presses 1
// and should reach both: a call that did not counts with the time it waited, until it ended or
// until end (a lower bound). Leaving such calls out made the p99 of the callers served.
func callTimes(calls []graphsim.CallResult, answerAt map[string]time.Time, start, end time.Time) (toAnswer, toAgent []time.Duration) {
	for _, c := range calls {
		if c.PlacedAt.Before(start) {
			continue
		}
		waited := end.Sub(c.PlacedAt)
		if !c.EndedAt.IsZero() {
			waited = c.EndedAt.Sub(c.PlacedAt)
		}
		if t, ok := answerAt[graph.CallKey(c.ID)]; ok {
			toAnswer = append(toAnswer, t.Sub(c.PlacedAt))
		} else {
			toAnswer = append(toAnswer, waited)
		}
		if c.Outcome == graphsim.OutcomeTransferred {
			toAgent = append(toAgent, c.EndedAt.Sub(c.PlacedAt))
		} else {
			toAgent = append(toAgent, waited)
		}
	}
	return toAnswer, toAgent
}

// readSteady reads the counters steadyFrom after now and when the placing should end, for a
// rate run long enough to have a steady window of 5 s or more; the function returned waits for
// both readings.
func (w *world) readSteady(ctx context.Context, o options) func() (a, b usage, ok bool) {
	if o.rate <= 0 || o.duration < steadyFrom+5*time.Second {
		return func() (usage, usage, bool) { return usage{}, usage{}, false }
	}
	start := time.Now()
	var a, b usage
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i, at := range []time.Duration{steadyFrom, o.duration} {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Until(start.Add(at))):
			}
			if i == 0 {
				a = w.read()
			} else {
				b = w.read()
			}
		}
	}()
	return func() (usage, usage, bool) {
		<-done
		return a, b, ctx.Err() == nil && !b.at.IsZero()
	}
}

// steadyRedis is Redis's work per notification between readings a and b, over the
// notifications whose POST started between them.
func (w *world) steadyRedis(a, b usage, start time.Time, posts []post) *SteadyRedis {
	n := 0
	for _, p := range posts {
		if p.status >= 200 && p.status <= 299 && !p.start.Before(a.at) && p.start.Before(b.at) {
			n++
		}
	}
	if n == 0 {
		return nil
	}
	total, _ := commandsBetween(a.info, b.info)
	st := &SteadyRedis{From: round(a.at.Sub(start).Seconds(), 1), To: round(b.at.Sub(start).Seconds(), 1), Notifications: n,
		ExecutedPerNotification: round(float64(total)/float64(n), 2)}
	if w.proxy != nil {
		st.SentPerNotification = round(float64(b.proxied-a.proxied)/float64(n), 2)
		st.RoundTripsPerNotification = round(float64(b.proxiedReads-a.proxiedReads)/float64(n), 2)
	}
	return st
}

// The saturated no-op baseline is driven with callbot's peak of POSTs in flight, within these.
const (
	minBaselineWorkers = 16
	maxBaselineWorkers = 64
)

func statusName(s int) string {
	if s == 0 {
		return "transport error"
	}
	return strconv.Itoa(s)
}

func cpuOf(d time.Duration, wall float64, notifications int) CPUUse {
	c := CPUUse{Seconds: round(d.Seconds(), 2)}
	if wall > 0 {
		c.Cores = round(d.Seconds()/wall, 2)
	}
	if notifications > 0 {
		c.PerNotificationUS = round(float64(d.Microseconds())/float64(notifications), 1)
	}
	return c
}

// withIdle records the CPU the process used per second with no call placed, and the CPU per
// notification above that.
func (c CPUUse) withIdle(idleCPU time.Duration, idleWall, wall float64, notifications int) CPUUse {
	if idleWall <= 0 {
		return c
	}
	c.IdleCores = round(idleCPU.Seconds()/idleWall, 3)
	if notifications > 0 {
		extra := c.Seconds - c.IdleCores*wall
		c.MarginalPerNotificationUS = round(max(extra, 0)*1e6/float64(notifications), 1)
	}
	return c
}

// othersCPU is the CPU (in cores) that processes other than callbot, redis-server and this
// tool used between two readings: other work on a shared machine makes the figures noisy.
func othersCPU(a, b usage, wall float64) float64 {
	if wall <= 0 || b.system == 0 {
		return 0
	}
	ours := (b.bot - a.bot) + (b.redis - a.redis) + (b.self - a.self)
	return round(max((b.system-a.system-ours).Seconds(), 0)/wall, 2)
}

func (w *world) redisReport(rep *Report, total int64, by map[string]int64, proxied, reads int64, notifications int, keys int64) {
	r := &rep.Redis
	r.Executed = total
	r.KeysAtEnd = keys
	if notifications == 0 {
		return
	}
	n := float64(notifications)
	r.ExecutedPerNotification = round(float64(total)/n, 2)
	r.ScriptsPerNotification = round(float64(by["evalsha"]+by["eval"]+by["fcall"])/n, 2)
	if w.proxy != nil {
		r.Sent = proxied
		r.SentPerNotification = round(float64(proxied)/n, 2)
		r.RoundTripsPerNotification = round(float64(reads)/n, 2)
	}
	names := make([]string, 0, len(by))
	for k := range by {
		names = append(names, k)
	}
	sort.Slice(names, func(i, j int) bool {
		return by[names[i]] > by[names[j]] || by[names[i]] == by[names[j]] && names[i] < names[j]
	})
	for _, k := range names[:min(len(names), 8)] {
		r.Top = append(r.Top, CommandCount{Name: k, PerNotification: round(float64(by[k])/n, 2)})
	}
}

// runHold places o.hold calls that wait in the queue (agents are away), then reads Redis memory
// and callbot's RSS.
func (w *world) runHold(ctx context.Context, rep *Report, progress io.Writer) error {
	o := w.o
	rep.Mode = "hold"
	time.Sleep(time.Second) // let callbot's heap settle after start-up
	u0 := w.read()
	fmt.Fprintf(progress, "holding %d calls, placed at %.0f calls/s\n", o.hold, o.rate)
	winStart := w.rec.resetWindow()
	probe := schedProbeAt()
	dr := w.drive(ctx, o.rate, 0, o.hold, o.hold, false, progress)
	delays := probe()
	peak, mean := w.rec.inflightStats(winStart)
	// Wait until every caller hears hold music (is queued), bounded.
	deadline := time.Now().Add(time.Duration(float64(o.hold)/o.rate*float64(time.Second)) + 2*time.Minute)
	queued, alive := 0, 0
	for {
		queued, alive = 0, 0
		for _, c := range w.sim.Calls() {
			if c.Outcome != "" {
				continue
			}
			alive++
			if slices.Contains(c.Prompts, holdURI) {
				queued++
			}
		}
		fmt.Fprintf(progress, "  queued %d of %d (alive %d)\n", queued, o.hold, alive)
		if queued >= o.hold || time.Now().After(deadline) || w.bot.exited() {
			break
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Second):
		}
	}
	if w.bot.exited() {
		return fmt.Errorf("callbot exited during the run: %v\n%s", w.bot.err, tail(w.botLog, 20))
	}
	time.Sleep(3 * time.Second) // timers and Graph commands of the last calls
	u1 := w.read()

	var lat []time.Duration
	acked := 0
	// Webhook times in five slices of the placing window: does a notification cost more as
	// live calls accumulate?
	const slices5 = 5
	var bySlice [slices5][]time.Duration
	span := dr.placeEnd.Sub(dr.start)
	for _, p := range w.rec.snapshot() {
		if !p.start.Before(dr.start) { // every POST is timed, as in webhookTimes
			if p.status >= 200 && p.status <= 299 {
				acked++
			}
			lat = append(lat, p.dur)
			if span > 0 {
				i := min(int(p.start.Sub(dr.start)*slices5/span), slices5-1)
				bySlice[i] = append(bySlice[i], p.dur)
			}
		}
	}
	rep.Webhook = latency(lat)
	var delayBySlice [slices5][]time.Duration
	var all []time.Duration
	for _, d := range delays {
		all = append(all, d.late)
		if span > 0 && !d.at.Before(dr.start) {
			i := min(int(d.at.Sub(dr.start)*slices5/span), slices5-1)
			delayBySlice[i] = append(delayBySlice[i], d.late)
		}
	}
	rep.ToolDelay = latency(all)
	for i, s := range bySlice {
		rep.WebhookByLive = append(rep.WebhookByLive, LiveLatency{Live: o.hold * (i + 1) / slices5, Latency: latency(s),
			ToolDelayP99: latency(delayBySlice[i]).P99})
	}
	rep.Graph, rep.GraphErrors = map[string]int{}, map[string]int{}
	for _, r := range w.sim.Requests() {
		if r.Time.Before(dr.start) || r.Action == "" {
			continue
		}
		rep.countGraph(r.Action, r.Status)
	}
	rep.InFlight = InFlight{Peak: peak, Mean: round(mean, 2)}
	rep.Notifications = NotificationStats{Acked: acked}
	rep.Calls = CallStats{Placed: dr.placed, PlaceErrors: dr.failed, LiveAtEnd: alive,
		PlacedPerSec: round(float64(dr.placed)/dr.placeEnd.Sub(dr.start).Seconds(), 1)}
	for _, c := range w.sim.Calls() {
		if c.Answered && !c.PlacedAt.Before(dr.start) {
			rep.Calls.Answered++
		}
	}
	m := &Memory{Held: o.hold, Queued: queued, PlaceSeconds: round(dr.placeEnd.Sub(dr.start).Seconds(), 1),
		RedisUsedBefore: u0.info.usedMemory, RedisUsedAfter: u1.info.usedMemory, RedisRSS: u1.redisRSS,
		CallbotRSSBefore: u0.botRSS, CallbotRSSAfter: u1.botRSS, CallbotPeakRSS: u1.botHWM,
		KeysBefore: u0.info.keys, KeysAfter: u1.info.keys}
	if queued > 0 {
		m.RedisPerCall = (u1.info.usedMemory - u0.info.usedMemory) / int64(queued)
		m.CallbotRSSPerCall = (u1.botRSS - u0.botRSS) / int64(queued)
		m.KeysPerCall = round(float64(u1.info.keys-u0.info.keys)/float64(queued), 2)
	}
	rep.Memory = m
	if o.reconcile > 0 && queued > 0 {
		m.Reconcile = w.waitReconcile(ctx, queued, dr.placeEnd, progress)
	}
	total, by := commandsBetween(u0.info, u1.info)
	w.redisReport(rep, total, by, u1.proxied-u0.proxied, u1.proxiedReads-u0.proxiedReads, acked, u1.info.keys)
	wall := u1.at.Sub(u0.at).Seconds()
	rep.CPU = CPUStats{Callbot: cpuOf(u1.bot-u0.bot, wall, acked), Redis: cpuOf(u1.redis-u0.redis, wall, acked),
		LoadTool: cpuOf(u1.self-u0.self, wall, acked)}
	rep.CallbotRSS, rep.CallbotPeakRSS = u1.botRSS, u1.botHWM
	rep.CPU.Others = othersCPU(u0, u1, wall)
	w.stopBot()
	rep.Log = logStats(w.botLog)
	return nil
}

// waitReconcile waits for a pass of callbot's reconciler that checks at least calls live calls
// (every call placed is older than a minute a minute after placeEnd: a pass that starts after
// that checks all the held ones) and reports it, or reports that none came in time.
func (w *world) waitReconcile(ctx context.Context, calls int, placeEnd time.Time, progress io.Writer) *ReconcilePass {
	const passes, checked, last = "callbot_reconcile_passes_total", "callbot_reconcile_last_pass_calls", "callbot_reconcile_last_pass_seconds"
	held := time.Now()
	// one interval for the pass after the calls are a minute old to start, one for it to run,
	// with a Graph request of each call at least a millisecond (16 at a time)
	deadline := placeEnd.Add(time.Minute + 2*w.o.reconcile + time.Duration(calls)*max(w.o.graphLat, time.Millisecond))
	donePasses := scrapeMetrics(ctx, w.botURL, passes)[passes]
	rp := &ReconcilePass{}
	for {
		select {
		case <-ctx.Done():
			rp.TimedOut = true
			return rp
		case <-time.After(time.Second):
		}
		m := scrapeMetrics(ctx, w.botURL, passes, checked, last)
		if m[passes] > donePasses {
			// the figures of the last pass (a pass that comes and ends within the second is
			// not seen: the one after is)
			rp.Checked = int64(m[checked])
			donePasses = m[passes]
			fmt.Fprintf(progress, "  reconciler's pass checked %d calls in %.2fs\n", rp.Checked, m[last])
			if rp.Checked >= int64(calls) {
				end := time.Now()
				rp.Seconds = m[last]
				rp.PerSecond = round(float64(rp.Checked)/max(rp.Seconds, 1e-3), 0)
				rp.WaitSeconds = round(end.Sub(held).Seconds(), 1)
				from := end.Add(-time.Duration(rp.Seconds*float64(time.Second)) - 2*time.Second)
				for _, r := range w.sim.Requests() {
					if r.Action == "get" && r.Time.After(from) {
						rp.GraphReads++
					}
				}
				return rp
			}
		}
		if time.Now().After(deadline) || w.bot.exited() {
			rp.TimedOut, rp.WaitSeconds = true, round(time.Since(held).Seconds(), 1)
			return rp
		}
	}
}

// startProfile fetches a CPU profile of callbot covering d (when -cpuprofile is set) and
// writes it to the file; the channel gets the outcome.
func (w *world) startProfile(ctx context.Context, d time.Duration) <-chan error {
	done := make(chan error, 1)
	if w.o.cpuprofile == "" {
		done <- nil
		return done
	}
	go func() {
		secs := max(1, int(d.Round(time.Second).Seconds()))
		req, err := http.NewRequestWithContext(ctx, http.MethodGet,
			fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", w.pprofAddr, secs), nil)
		if err != nil {
			done <- err
			return
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			done <- err
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			done <- fmt.Errorf("pprof: status %d", resp.StatusCode)
			return
		}
		f, err := os.Create(w.o.cpuprofile)
		if err != nil {
			done <- err
			return
		}
		_, err = io.Copy(f, resp.Body)
		done <- errors.Join(err, f.Close())
	}()
	return done
}

// topOfProfile is `go tool pprof -top -cum` of the profile: where callbot spent its CPU, callers first.
func topOfProfile(bin, profile string) []string {
	out, err := exec.Command("go", "tool", "pprof", "-top", "-cum", "-nodecount=30", bin, profile).Output()
	if err != nil {
		return []string{"go tool pprof: " + err.Error()}
	}
	var lines []string
	for _, l := range strings.Split(strings.TrimRight(string(out), "\n"), "\n") {
		if strings.HasPrefix(l, "File:") || strings.HasPrefix(l, "Build ID:") || strings.HasPrefix(l, "Type:") || strings.HasPrefix(l, "Time:") {
			continue
		}
		lines = append(lines, l)
	}
	return lines
}

// countGraph counts one request callbot made to graphsim, and it apart if Graph refused it.
func (r *Report) countGraph(action string, status int) {
	r.Graph[action]++
	if status >= 400 {
		r.GraphErrors[action+" "+strconv.Itoa(status)]++
	}
}

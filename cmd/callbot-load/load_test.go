package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestMain lets the test binary play the no-op baseline server, as the real binary does.
func TestMain(m *testing.M) {
	if addr := os.Getenv(noopEnv); addr != "" {
		if err := serveNoop(context.Background(), addr, os.Stdout); err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func needRedis(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("builds callbot and runs it under load")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CALLBOT_REQUIRE_REDIS") == "1" {
			t.Fatal("CALLBOT_REQUIRE_REDIS=1 but redis-server is not on PATH")
		}
		t.Skip("redis-server not on PATH")
	}
}

// TestRateRun keeps the tool from rotting: a short run at a low rate must produce a report with
// non-zero counts. Timings are never asserted.
func TestRateRun(t *testing.T) {
	needRedis(t)
	var out, progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	err := run(ctx, []string{"-rate", "10", "-duration", "2s", "-warmup", "2", "-baseline", "500ms", "-drain", "10s", "-graph-latency", "20ms", "-leaks", "15s", "-json"}, &out, &progress)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, progress.String())
	}
	var r Report
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out.String())
	}
	for name, n := range map[string]int{
		"calls placed":            r.Calls.Placed,
		"calls answered":          r.Calls.Answered,
		"notifications acked":     r.Notifications.Acked,
		"webhook samples":         r.Webhook.N,
		"incoming->answer":        r.Answer.N,
		"redis commands executed": int(r.Redis.Executed),
		"no-op requests":          baselineRequests(r.Baseline),
		"targets":                 len(r.Targets),
	} {
		if n == 0 {
			t.Errorf("%s: 0\n%s\n%s", name, out.String(), progress.String())
		}
	}
	if r.Ratio == nil || r.Ratio.Throughput <= 0 {
		t.Errorf("no ratio to the no-op baseline: %+v", r.Ratio)
	}
	if r.Baseline == nil || r.Baseline.AtRate == nil || r.Baseline.AtRate.Requests == 0 {
		t.Errorf("no run of the no-op at callbot's rate: %+v", r.Baseline)
	} else if r.Baseline.AtRate.Rate != r.Notifications.PerSec {
		t.Errorf("the no-op was driven at %v/s, callbot's rate was %v/s", r.Baseline.AtRate.Rate, r.Notifications.PerSec)
	}
	if r.WebhookServer == nil || r.WebhookServer.N < r.Notifications.Acked {
		t.Errorf("callbot's own webhook times: %+v, want at least the %d notifications acknowledged", r.WebhookServer, r.Notifications.Acked)
	}
	if r.GraphConns == nil || r.GraphConns.PeakOpen < 1 {
		t.Errorf("callbot's connections to Graph not read: %+v", r.GraphConns)
	}
	if l := r.Leaks; l == nil || l.Calls == 0 || l.After.Keys["cb:{call:*}"] < int64(l.Calls) || len(l.Residue) > 0 || l.After.Goroutines <= 0 {
		t.Errorf("-leaks: %+v; want every call's record, with an ended TTL, and nothing else left", l)
	}
	if r.Settings.GraphLat != "20ms" {
		t.Errorf("settings: graph latency %q, want 20ms", r.Settings.GraphLat)
	}
	text := r.Text()
	for _, want := range []string{"notifications/s", "webhook", "incoming->answer", "in callbot", "redis", "graph conns", "no-op baseline", "no-op at rate", "target", "leaks", "residue: none"} {
		if !strings.Contains(text, want) {
			t.Errorf("text report lacks %q:\n%s", want, text)
		}
	}
}

// TestHoldRun: calls that wait in the queue are counted and memory is read.
func TestHoldRun(t *testing.T) {
	needRedis(t)
	var out, progress bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	err := run(ctx, []string{"-hold", "20", "-rate", "20", "-agents", "5", "-json"}, &out, &progress)
	if err != nil {
		t.Fatalf("run: %v\n%s", err, progress.String())
	}
	var r Report
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		t.Fatalf("report is not JSON: %v\n%s", err, out.String())
	}
	if r.Memory == nil || r.Memory.Queued == 0 || r.Memory.RedisUsedAfter == 0 {
		t.Errorf("memory not measured: %+v\n%s", r.Memory, progress.String())
	}
}

func baselineRequests(b *Baseline) int {
	if b == nil {
		return 0
	}
	return b.Requests
}

func TestParseFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-rate", "-1"},
		{"-duration", "0s"},
		{"-hold", "10", "-rate", "0"},
		{"-presence", "100ms"},
		{"-cpuprofile", "x", "-callbot", "y"},
		{"-leaks", "15s", "-hold", "10"},
		{"-reconcile", "1m"},                 // without -hold
		{"-reconcile", "5s", "-hold", "10"},  // callbot refuses under 10s
		{"-reconcile", "11m", "-hold", "10"}, // and over 10m
		{"extra"},
	} {
		if _, err := parseFlags(args, &bytes.Buffer{}); err == nil {
			t.Errorf("%v: no error", args)
		}
	}
	o, err := parseFlags([]string{"-rate", "400"}, &bytes.Buffer{})
	if err != nil || o.agents != 1200 {
		t.Errorf("-rate 400: agents %d, err %v; want 1200 agents by default", o.agents, err)
	}
}

func TestParseInfoAndCount(t *testing.T) {
	in := parseInfo("# Server\r\nredis_version:7.0.15\r\nused_memory:1024\r\ntotal_commands_processed:9\r\n" +
		"# Commandstats\r\ncmdstat_evalsha:calls=3,usec=10,usec_per_call=3.3\r\ncmdstat_info:calls=2,usec=1\r\n" +
		"# Keyspace\r\ndb0:keys=5,expires=4,avg_ttl=100\r\n")
	if in.version != "7.0.15" || in.usedMemory != 1024 || in.commands["evalsha"] != 3 || in.keys != 5 {
		t.Errorf("parseInfo: %+v", in)
	}
	total, by := commandsBetween(redisInfo{commands: map[string]int64{"evalsha": 1}}, in)
	if total != 2 || by["info"] != 0 {
		t.Errorf("commandsBetween: %d %v, want 2 without info", total, by)
	}
}

func TestCountCommands(t *testing.T) {
	sha := strings.Repeat("a", 40)
	in := "*2\r\n$3\r\nGET\r\n$1\r\na\r\n" + // one command
		"*3\r\n$7\r\nEVALSHA\r\n$40\r\n" + sha + "\r\n$1\r\n0\r\n" + // a script counts as one
		"*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$1\r\nx\r\n*1\r\n$4\r\nEXEC\r\n" + // each command of a pipeline
		"PING\r\n" // inline
	var n atomic.Int64
	_ = countCommands(bufio.NewReader(strings.NewReader(in)), &n)
	if n.Load() != 6 {
		t.Errorf("counted %d commands, want 6", n.Load())
	}
}

// pace lets out what is due and no more: requests counted from the start, so a late timer does
// not lower the rate, and none beyond rate × elapsed.
func TestPaceNeverAhead(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	due := make(chan struct{}, 10_000)
	start := time.Now()
	go pace(ctx, 2000, due)
	got := 0
	for got < 100 {
		<-due
		got++
		if allowed := int(time.Since(start).Seconds()*2000) + 1; got > allowed {
			t.Fatalf("%d requests let out after %v, at most %d due", got, time.Since(start), allowed)
		}
	}
	cancel()
}

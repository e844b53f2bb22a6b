package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph/graphsim"
)

func TestConfigErrorsNameTheVariable(t *testing.T) {
	env := map[string]string{
		"CALLBOT_PUBLIC_URL": "http://bot.example.com", "CALLBOT_TENANT_ID": "not-a-guid",
		"CALLBOT_CLIENT_ID": "0efc74f7-41c3-47a4-8775-7259bfef4241", "CALLBOT_GRAPH_URL": "ftp://graph",
		"CALLBOT_REDIS_URL": "nonsense", "CALLBOT_PRESENCE_INTERVAL": "1ms", "CALLBOT_LISTEN_ADDR": "8080",
	}
	err := run(context.Background(), []string{"serve"}, func(k string) string { return env[k] }, &bytes.Buffer{}, &bytes.Buffer{})
	if err == nil {
		t.Fatal("serve started with a broken configuration")
	}
	for _, want := range []string{
		"CALLBOT_PUBLIC_URL: \"http://bot.example.com\" must be https", "CALLBOT_TENANT_ID: \"not-a-guid\" is not a GUID",
		"CALLBOT_CLIENT_SECRET: is required", "CALLBOT_FLOW_FILE: is required", "CALLBOT_GRAPH_URL:",
		"CALLBOT_REDIS_URL:", "CALLBOT_PRESENCE_INTERVAL:", "CALLBOT_LISTEN_ADDR:",
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// Settings that passed the checks and broke later: a port that does not exist (refused only at
// listen, after callbot had written to Redis), a public URL ending in an empty query or
// fragment (callbot appends /api/calls/<instance> to it: a broken callbackUri), an outbox lease
// past Graph's 15 s answer deadline (a dead instance's answer re-driven too late), and a key
// prefix with a brace (Redis Cluster hashes the part in braces: a script's keys in other slots).
func TestConfigRefusesSettingsThatBreakLater(t *testing.T) {
	for _, tc := range []struct{ name, value, want string }{
		{"CALLBOT_LISTEN_ADDR", ":99999", "CALLBOT_LISTEN_ADDR: \":99999\""},
		{"CALLBOT_PUBLIC_URL", "https://bot.example.com/x?", "must not have a query or fragment"},
		{"CALLBOT_PUBLIC_URL", "https://bot.example.com/#", "must not have a query or fragment"},
		{"CALLBOT_OUTBOX_LEASE", "13s", "CALLBOT_OUTBOX_LEASE: \"13s\" is not a duration from 1s to 12s"},
		// a pass every 30 minutes sent a call's first keepAlive up to 45 minutes into it: too late
		{"CALLBOT_RECONCILE_INTERVAL", "30m", "CALLBOT_RECONCILE_INTERVAL: \"30m\" is not a duration from 10s to 10m0s"},
		{"CALLBOT_RECONCILE_INTERVAL", "1s", "CALLBOT_RECONCILE_INTERVAL: \"1s\" is not a duration from 10s"},
		{"CALLBOT_KEY_PREFIX", "cb{1}", "CALLBOT_KEY_PREFIX: \"cb{1}\" must be non-empty, without braces"},
		{"CALLBOT_KEY_PREFIX", "c{b", "without braces"},
		// one tenant per deployment: another tenant's calls were answered, then waited in a
		// queue no dispatcher served (queues, agents and presence are CALLBOT_TENANT_ID's)
		{"CALLBOT_ALLOWED_TENANTS", "0efc74f7-41c3-47a4-8775-7259bfef4242", "callbot serves one tenant per deployment"},
	} {
		env := validEnv(t)
		env[tc.name] = tc.value
		_, err := loadConfig(func(k string) string { return env[k] })
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s=%q: %v, want an error with %q", tc.name, tc.value, err, tc.want)
		}
	}
	env := validEnv(t)
	env["CALLBOT_OUTBOX_LEASE"], env["CALLBOT_KEY_PREFIX"], env["CALLBOT_RECONCILE_INTERVAL"] = "12s", "callbot-prod", "10m"
	if c, err := loadConfig(func(k string) string { return env[k] }); err != nil || c.ReconcileEvery != 10*time.Minute {
		t.Errorf("a valid configuration refused: %v (reconcile interval %v)", err, c.ReconcileEvery)
	}
}

// The files the configuration names are read at start: a CA file with no certificate, a client
// certificate that does not parse, and a certificate password with no certificate are refused
// with the rest, each naming its variable (they failed later, one at a time, unnamed).
func TestConfigChecksTheFilesItNames(t *testing.T) {
	junk := filepath.Join(t.TempDir(), "junk.pem")
	if err := os.WriteFile(junk, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	base := map[string]string{
		"CALLBOT_PUBLIC_URL": "https://bot.example.com", "CALLBOT_TENANT_ID": "1fdd12d0-4620-44ed-baec-459b611f84b2",
		"CALLBOT_CLIENT_ID": "0efc74f7-41c3-47a4-8775-7259bfef4241", "CALLBOT_REDIS_URL": "redis://127.0.0.1:1/0",
		"CALLBOT_FLOW_FILE": "testdata/flow.yaml", "CALLBOT_CA_FILE": junk,
	}
	for name, tc := range map[string]struct {
		set  map[string]string
		want []string
	}{
		"bad files":             {map[string]string{"CALLBOT_CLIENT_CERT_FILE": junk}, []string{"CALLBOT_CA_FILE: " + junk + " holds no PEM certificate", "CALLBOT_CLIENT_CERT_FILE: " + junk}},
		"password without cert": {map[string]string{"CALLBOT_CLIENT_SECRET": "s", "CALLBOT_CLIENT_CERT_PASSWORD": "pw"}, []string{"CALLBOT_CLIENT_CERT_PASSWORD: set without CALLBOT_CLIENT_CERT_FILE"}},
		"bad replicas":          {map[string]string{"CALLBOT_REDIS_REPLICAS": "-1", "CALLBOT_REDIS_REPLICA_TIMEOUT": "1h"}, []string{"CALLBOT_REDIS_REPLICAS: \"-1\" is not a number from 0 to 16", "CALLBOT_REDIS_REPLICA_TIMEOUT: \"1h\""}},
	} {
		env := maps.Clone(base)
		maps.Copy(env, tc.set)
		_, err := loadConfig(func(k string) string { return env[k] })
		for _, want := range tc.want {
			if err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %v lacks %q", name, err, want)
			}
		}
	}
}

// validEnv is the least configuration serve accepts.
func validEnv(t *testing.T) map[string]string {
	t.Helper()
	return map[string]string{
		"CALLBOT_PUBLIC_URL": "https://bot.example.com/", "CALLBOT_TENANT_ID": "7a3c1e52-0d4b-4c1a-9d8e-2f6b5a4c3d21",
		"CALLBOT_CLIENT_ID": "0efc74f7-41c3-47a4-8775-7259bfef4241", "CALLBOT_CLIENT_SECRET": "s",
		"CALLBOT_REDIS_URL": "10.0.0.1:7000,10.0.0.2:7000", "CALLBOT_FLOW_FILE": "f.yaml",
	}
}

func TestConfigDefaults(t *testing.T) {
	env := validEnv(t)
	c, err := loadConfig(func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if c.ListenAddr != ":8080" || c.PublicURL != "https://bot.example.com" || c.GraphURL != "https://graph.microsoft.com/v1.0" ||
		c.OpenIDConfigURL != "https://api.aps.skype.com/v1/.well-known/OpenIdConfiguration" ||
		len(c.AllowedTenants) != 1 || c.AllowedTenants[0] != env["CALLBOT_TENANT_ID"] {
		t.Errorf("defaults: %+v", c)
	}
	if c.RedisReplicas != 0 || c.ReplicaTimeout != 100*time.Millisecond {
		t.Errorf("replicas %d within %s, want none by default (100ms)", c.RedisReplicas, c.ReplicaTimeout)
	}
	o, _ := redisOptions(c.RedisURL)
	if !o.IsClusterMode || len(o.Addrs) != 2 {
		t.Errorf("a list of addresses must mean Redis Cluster: %+v", o)
	}
	env["CALLBOT_REDIS_REPLICAS"] = "1" // each master a change writes to waits for its replica
	if c, err := loadConfig(func(k string) string { return env[k] }); err != nil || c.RedisReplicas != 1 {
		t.Errorf("CALLBOT_REDIS_REPLICAS=1 on Redis Cluster: %d, %v; want it accepted", c.RedisReplicas, err)
	}
	o, err = redisOptions("sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/callbot?db=2")
	if err != nil || o.MasterName != "callbot" || len(o.Addrs) != 2 || o.Password != "pw" || o.DB != 2 || o.IsClusterMode {
		t.Errorf("sentinel URL: %+v %v", o, err)
	}
	o, err = redisOptions("sentinel://:pw@10.0.0.1:26379/callbot?sentinel_password=spw")
	if err != nil || o.Password != "pw" || o.SentinelPassword != "spw" {
		t.Errorf("sentinel URL with the Sentinels' password: %+v %v", o, err)
	}
	// an @ in the Sentinels' password, and an encoded one in the data nodes'
	o, err = redisOptions("sentinel://:p%40ss@10.0.0.1:26379/callbot?sentinel_password=s%40pw")
	if err != nil || o.Password != "p@ss" || o.SentinelPassword != "s@pw" || o.MasterName != "callbot" || len(o.Addrs) != 1 {
		t.Errorf("sentinel URL with @ in its passwords: %+v %v", o, err)
	}
	o, err = redisOptions("sentinel://10.0.0.1:26379/callbot?sentinel_password=s@pw")
	if err != nil || o.SentinelPassword != "s@pw" || o.Password != "" || o.MasterName != "callbot" {
		t.Errorf("sentinel URL with a bare @ in the query: %+v %v", o, err)
	}
	// Sentinels and nodes over TLS: no name fixed, each connection checks the address it dials
	o, err = redisOptions("rediss-sentinel://:pw@sentinel-0.redis:26379,sentinel-1.redis:26379/callbot?db=1")
	if err != nil || o.MasterName != "callbot" || len(o.Addrs) != 2 || o.Password != "pw" || o.DB != 1 ||
		o.TLSConfig == nil || o.TLSConfig.ServerName != "" || o.TLSConfig.MinVersion != tls.VersionTLS12 {
		t.Errorf("rediss-sentinel URL: %+v %v", o, err)
	}
	if o, err = redisOptions("sentinel://10.0.0.1:26379/callbot"); err != nil || o.TLSConfig != nil {
		t.Errorf("sentinel URL without TLS: %+v %v", o, err)
	}
	// a cluster whose nodes want a password, over TLS (a managed cluster): the name checked is
	// the first address's host, as the nodes are reported by IP address
	o, err = redisOptions("rediss-cluster://default:k%40y@cache.example.net:6380,10.0.0.2:6380")
	if err != nil || !o.IsClusterMode || o.Username != "default" || o.Password != "k@y" || len(o.Addrs) != 2 ||
		o.TLSConfig == nil || o.TLSConfig.ServerName != "cache.example.net" {
		t.Errorf("rediss-cluster URL: %+v %v", o, err)
	}
	o, err = redisOptions("redis-cluster://:pw@10.0.0.1:7000")
	if err != nil || !o.IsClusterMode || o.Password != "pw" || o.Username != "" || len(o.Addrs) != 1 || o.TLSConfig != nil {
		t.Errorf("redis-cluster URL: %+v %v", o, err)
	}
	o, err = redisOptions("redis-cluster://:a%2Fb+c=@10.0.0.1:7000") // an Azure access key: base64
	if err != nil || o.Password != "a/b+c=" {
		t.Errorf("redis-cluster URL with an encoded /: %+v %v", o, err)
	}
	o, err = redisOptions("redis-cluster://pw@10.0.0.1:7000") // the password alone, as in a redis:// URL
	if err != nil || o.Password != "pw" || o.Username != "" {
		t.Errorf("redis-cluster URL with a bare password: %+v %v", o, err)
	}
	for _, bad := range []string{"sentinel://10.0.0.1:26379", "sentinel://nohost/m", "unix:///tmp/r.sock", "redis://:bad port",
		"sentinel://10.0.0.1:26379/m?bd=2", // a misspelt parameter was ignored
		"redis-cluster://", "redis-cluster://:pw@", "redis-cluster://10.0.0.1", "redis-cluster://10.0.0.1:7000/0",
		"rediss-cluster://10.0.0.1:7000?tls=1", "redis-cluster://:p%zz@10.0.0.1:7000",
		"rediss-sentinel://10.0.0.1:26379", "rediss-sentinel://10.0.0.1:26379/m?tls=1"} {
		if _, err := redisOptions(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestValidate(t *testing.T) {
	var out bytes.Buffer
	if err := run(context.Background(), []string{"validate", "../../deployments/examples/flow.yaml"}, os.Getenv, &out, &out); err != nil {
		t.Fatalf("example flow: %v\n%s", err, out.String())
	}
	broken := filepath.Join(t.TempDir(), "broken.yaml")
	os.WriteFile(broken, []byte("name: x\nstart: nowhere\nmenus:\n  main:\n    promt: hello\n"), 0o644)
	out.Reset()
	err := run(context.Background(), []string{"validate", broken}, os.Getenv, &out, &out)
	if !errors.Is(err, errInvalidFlow) {
		t.Fatalf("broken flow: %v", err)
	}
	for _, want := range []string{"broken.yaml:2:", "broken.yaml:5:"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("validate output lacks %q:\n%s", want, out.String())
		}
	}
	if err := run(context.Background(), []string{"nope"}, os.Getenv, &out, &out); !errors.Is(err, errUsage) {
		t.Errorf("unknown command: %v", err)
	}
}

// sdkModule is the Graph SDK's root package (spelled in two parts so that a search for imports of
// it finds none here).
const sdkModule = "github.com/microsoftgraph/" + "msgraph-sdk-go"

// Only internal/graph/msgraph and cmd/callbot may depend on msgraph-sdk-go: it costs minutes and
// gigabytes to build, and the rest of callbot must stay testable without it.
func TestOnlyAdapterImportsSDK(t *testing.T) {
	pkgs, err := exec.Command("go", "list", "../../...").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range strings.Fields(string(pkgs)) {
		if strings.HasSuffix(p, "/internal/graph/msgraph") || strings.HasSuffix(p, "/cmd/callbot") {
			continue
		}
		deps, err := exec.Command("go", "list", "-deps", p).Output()
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(deps), sdkModule) {
			t.Errorf("%s depends on msgraph-sdk-go", p)
		}
	}
	deps, _ := exec.Command("go", "list", "-deps", "../../cmd/callbot").Output()
	for _, d := range strings.Fields(string(deps)) {
		if d == sdkModule {
			t.Error("cmd/callbot imports the root msgraph-sdk-go package")
		}
	}
}

func TestMetricsAfterACall(t *testing.T) {
	w := startWorld(t, standaloneRedis, available(agent1, graphsim.AgentAccept), away(agent2), away(agent3))
	waitDone(t, w.call(t, graphsim.CallerSpec{Digits: "1"}), 15*time.Second)
	time.Sleep(200 * time.Millisecond) // the call's end is applied just after the caller sees it
	resp, err := http.Get(w.botURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, want := range []string{
		`callbot_calls_ended_total{outcome="transferred"} 1`,
		`callbot_queue_waiting{queue="sales"} 0`,
		`callbot_answer_latency_seconds_count 1`,
		"callbot_graph_connections ",
		"callbot_graph_connections_opened_total ",
		"go_goroutines ",
		"go_memstats_heap_alloc_bytes ",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
	// the call reached an agent by presence: a poll read it, a moment ago
	if m := regexp.MustCompile(`(?m)^callbot_presence_age_seconds (\S+)$`).FindSubmatch(body); m == nil {
		t.Errorf("metrics lack callbot_presence_age_seconds:\n%s", body)
	} else if age, err := strconv.ParseFloat(string(m[1]), 64); err != nil || age < 0 || age > 30 {
		t.Errorf("callbot_presence_age_seconds %s, want the seconds since the last poll", m[1])
	}
	// Redis runs on this machine: its clock is this host's, give or take a round trip
	if m := regexp.MustCompile(`(?m)^callbot_clock_offset_seconds (\S+)$`).FindSubmatch(body); m == nil {
		t.Errorf("metrics lack callbot_clock_offset_seconds:\n%s", body)
	} else if off, err := strconv.ParseFloat(string(m[1]), 64); err != nil || math.Abs(off) > 0.05 {
		t.Errorf("callbot_clock_offset_seconds %s, want about 0 (Redis on this host)", m[1])
	}
	// redis-server's defaults: no maxmemory, noeviction (miniredis reports no memory: no lines)
	if _, err := exec.LookPath("redis-server"); err == nil {
		for _, want := range []string{"\ncallbot_redis_evicting_masters 0\n", "\ncallbot_redis_evicted_keys_total 0\n"} {
			if !strings.Contains(string(body), want) {
				t.Errorf("metrics lack %q:\n%s", want, body)
			}
		}
		if strings.Contains(string(body), "callbot_redis_memory_used_ratio") {
			t.Errorf("metrics give a used ratio for a Redis without maxmemory:\n%s", body)
		}
	}
	if runtime.GOOS == "linux" {
		for _, want := range []string{"process_resident_memory_bytes ", "process_open_fds "} {
			if !strings.Contains(string(body), want) {
				t.Errorf("metrics lack %q:\n%s", want, body)
			}
		}
	}
	// Every notification callbot answered was timed.
	answered := 0
	for _, d := range w.sim.Deliveries() {
		if d.Status != 0 {
			answered++
		}
	}
	if want := fmt.Sprintf("callbot_webhook_duration_seconds_count %d\n", answered); answered == 0 || !strings.Contains(string(body), want) {
		t.Errorf("metrics lack %q:\n%s", want, body)
	}
}

// Label values are escaped as the Prometheus text format allows (backslash, double quote and
// newline only): Go's %q wrote \t and \u00a0 for queue ids with a tab or a non-breaking space,
// and a scraper refuses the whole page for one such line.
func TestMetricsLabelValuesEscaped(t *testing.T) {
	for in, want := range map[string]string{
		"sales\u00a0desk": "sales\u00a0desk",
		"support\ttier":   "support\ttier",
		`back\slash`:      `back\\slash`,
		`"quoted"`:        `\"quoted\"`,
		"two\nlines":      `two\nlines`,
	} {
		if got := labelValue(in); got != want {
			t.Errorf("labelValue(%q) = %q, want %q", in, got, want)
		}
	}
}

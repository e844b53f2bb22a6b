//go:build unix

package msgraph_test

import (
	"bufio"
	"context"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/callbot/callbot/internal/graph"
	"github.com/callbot/callbot/internal/graph/msgraph"
)

// The benchmarks send real requests through a real Client (kiota pipeline, token credential,
// TLS) to a Graph stand-in that answers like Graph: 200 with a playPromptOperation for
// playPrompt, 202 for answer. The stand-in runs in a child process (this test binary again,
// started with benchServerEnv set), so the benchmark process holds only the client: besides
// ns/op, each benchmark reports client-cpu-ns/op, the user+system CPU time this process spent
// per request, which is what callbot pays per Graph command. The stand-in offers HTTP/2 and
// HTTP/1.1 over TLS, as Graph does, so the client's protocol choice decides which is used.
//
//	go test -run '^$' -bench . -benchmem -count 8 ./internal/graph/msgraph/ | tee new.txt
//	benchstat old.txt new.txt

// benchServerEnv, when set in the environment, turns the test binary into the stand-in server.
const benchServerEnv = "CALLBOT_MSGRAPH_BENCH_SERVER"

func init() {
	if os.Getenv(benchServerEnv) != "" {
		runBenchServer()
		os.Exit(0)
	}
}

// benchServerInfo is the first line the stand-in prints: where it listens and its certificate.
type benchServerInfo struct {
	URL     string `json:"url"`
	CertPEM string `json:"cert_pem"`
}

// runBenchServer serves until its standard input is closed (the benchmark process ended).
func runBenchServer() {
	playPrompt := `{"@odata.type":"#microsoft.graph.playPromptOperation",` +
		`"id":"0fe0623f-d628-42ed-b4bd-8ac290072cc5","status":"running","clientContext":"bench"}`
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 2)
		switch {
		case strings.HasPrefix(r.URL.Path, "/v1.0/"):
			io.Copy(io.Discard, r.Body)
			w.Header().Set("request-id", "bench-request-id")
			w.Header().Set("client-request-id", r.Header.Get("client-request-id"))
			if strings.HasSuffix(r.URL.Path, "/playPrompt") {
				w.Header().Set("Content-Type", "application/json")
				w.Header().Set("Location", "https://graph.microsoft.com/v1.0/communications/calls/x/operations/y")
				io.WriteString(w, playPrompt)
				return
			}
			w.WriteHeader(http.StatusAccepted)
		case len(parts) == 2 && parts[1] == "v2.0/.well-known/openid-configuration":
			base := "https://" + r.Host + "/" + parts[0]
			writeJSON(w, http.StatusOK, map[string]any{
				"issuer": base + "/v2.0", "authorization_endpoint": base + "/oauth2/v2.0/authorize",
				"token_endpoint": base + "/oauth2/v2.0/token",
			})
		case len(parts) == 2 && parts[1] == "oauth2/v2.0/token":
			writeJSON(w, http.StatusOK, map[string]any{
				"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": accessToken,
			})
		default:
			http.NotFound(w, r)
		}
	}))
	srv.EnableHTTP2 = true
	srv.StartTLS()
	cert := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	json.NewEncoder(os.Stdout).Encode(benchServerInfo{URL: srv.URL, CertPEM: string(cert)})
	io.Copy(io.Discard, os.Stdin)
	srv.Close()
}

// startBenchServer starts the stand-in and returns a Client configured for it.
func startBenchServer(b *testing.B) *msgraph.Client {
	b.Helper()
	exe, err := os.Executable()
	if err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(exe, "-test.run=^$")
	cmd.Env = append(os.Environ(), benchServerEnv+"=1")
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadBytes('\n')
	if err != nil {
		b.Fatalf("bench server: %v", err)
	}
	var info benchServerInfo
	if err := json.Unmarshal(line, &info); err != nil {
		b.Fatalf("bench server said %q: %v", line, err)
	}
	caFile := filepath.Join(b.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, []byte(info.CertPEM), 0o600); err != nil {
		b.Fatal(err)
	}
	c, err := msgraph.New(msgraph.Config{
		TenantID: tenantID, ClientID: clientID, ClientSecret: clientSecret,
		AuthorityHost: info.URL + "/", GraphURL: info.URL + "/v1.0", CAFile: caFile,
		Timeout: 10 * time.Second, Logger: zap.NewNop(),
	})
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// cpuTime is the user+system CPU time this process has used.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchAction runs do serially and with 8 concurrent requests per CPU (callbot under load sends
// many commands at once), after one warm-up request that fetches the token and a connection.
func benchAction(b *testing.B, do func(ctx context.Context, c *msgraph.Client) error) {
	c := startBenchServer(b)
	ctx := graph.WithScenarioID(context.Background(), "2f3f1d4e-1b2c-4d5e-8f90-a1b2c3d4e5f6")
	if err := do(ctx, c); err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		start := cpuTime(b)
		for b.Loop() {
			if err := do(ctx, c); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "client-cpu-ns/op")
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.SetParallelism(8)
		start := cpuTime(b)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := do(ctx, c); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(cpuTime(b)-start)/float64(b.N), "client-cpu-ns/op")
	})
}

func BenchmarkPlayPrompt(b *testing.B) {
	prompts := []graph.MediaPrompt{{URI: "https://cdn.contoso.com/prompts/welcome.wav"}}
	benchAction(b, func(ctx context.Context, c *msgraph.Client) error {
		op, err := c.PlayPrompt(ctx, callID, prompts, "menu-1")
		if err == nil && op.ID == "" {
			err = fmt.Errorf("playPrompt returned no operation id")
		}
		return err
	})
}

func BenchmarkAnswer(b *testing.B) {
	req := graph.AnswerRequest{CallbackURI: "https://bot.contoso.com/api/calls"}
	benchAction(b, func(ctx context.Context, c *msgraph.Client) error {
		return c.Answer(ctx, callID, req)
	})
}

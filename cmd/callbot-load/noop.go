package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-chi/chi/v5"
)

// noopEnv makes this program serve the no-op webhook on the address it names (see main).
const noopEnv = "CALLBOT_LOAD_NOOP_ADDR"

// serveNoop is the baseline: a chi router whose POST /api/calls reads the body and answers
// 202, with callbot's server timeouts. It prints "listening ADDR" once it accepts connections.
func serveNoop(ctx context.Context, addr string, stdout io.Writer) error {
	r := chi.NewRouter()
	r.Post("/api/calls", func(w http.ResponseWriter, r *http.Request) {
		if _, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20)); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		w.WriteHeader(http.StatusAccepted)
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: r, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 15 * time.Second}
	fmt.Fprintf(stdout, "listening %s\n", ln.Addr())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err = <-errc:
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		err = srv.Shutdown(sctx)
	}
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// startNoop runs the no-op server as a copy of this program and returns its base URL.
func startNoop(cpus []int) (*proc, string, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), noopEnv+"=127.0.0.1:0")
	if len(cpus) > 0 {
		cmd.Env = append(cmd.Env, fmt.Sprintf("GOMAXPROCS=%d", len(cpus)))
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	cmd.Stderr = os.Stderr
	p, err := startProc("no-op server", cmd)
	if err != nil {
		return nil, "", err
	}
	if err := pin(p.pid(), cpus); err != nil {
		p.stop(time.Second)
		return nil, "", fmt.Errorf("pin no-op server: %w", err)
	}
	line := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			line <- sc.Text()
		}
		close(line)
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case l, ok := <-line:
		if addr, found := strings.CutPrefix(l, "listening "); ok && found {
			if err := pin(p.pid(), cpus); err != nil {
				p.stop(time.Second)
				return nil, "", fmt.Errorf("pin no-op server: %w", err)
			}
			return p, "http://" + addr, nil
		}
	case <-time.After(10 * time.Second):
	}
	p.stop(time.Second)
	return nil, "", errors.New("the no-op server did not start")
}

// replayReq is one recorded notification: its body and the headers graphsim sent.
type replayReq struct {
	header http.Header
	body   []byte
}

type replayResult struct {
	n, failed int
	wall      time.Duration
	lat       []time.Duration
	serverCPU time.Duration
	// serverSyscalls: read and write system calls of the no-op server (procSyscalls)
	serverSyscalls int64
	clientCPU      time.Duration
}

// replay posts reqs, in order and cycling, from workers goroutines for d. With rate 0 it posts
// as fast as the server answers; with rate > 0 it posts rate requests per second, open loop
// (a request is due at its time whether or not the ones before it were answered), so that the
// no-op server can be measured at the load callbot had.
func replay(ctx context.Context, url string, srv *proc, reqs []replayReq, workers int, d time.Duration, rate float64) replayResult {
	client := &http.Client{Transport: notifyTransport(), Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	var (
		next atomic.Int64
		mu   sync.Mutex
		res  replayResult
		wg   sync.WaitGroup
	)
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	var due chan struct{}
	if rate > 0 {
		due = make(chan struct{}, workers)
		go pace(ctx, rate, due)
	}
	cpu0, self0 := procCPU(srv.pid()), selfCPU()
	sys0 := procSyscalls(srv.pid())
	start := time.Now()
	for range workers {
		wg.Go(func() {
			var lat []time.Duration
			failed := 0
			for ctx.Err() == nil {
				if due != nil {
					select {
					case <-due:
					case <-ctx.Done():
						continue
					}
				}
				rq := reqs[int(next.Add(1)-1)%len(reqs)]
				req, err := http.NewRequestWithContext(ctx, http.MethodPost, url+"/api/calls", bytes.NewReader(rq.body))
				if err != nil {
					failed++
					continue
				}
				req.Header = rq.header.Clone()
				t := time.Now()
				resp, err := client.Do(req)
				if err != nil {
					if ctx.Err() == nil {
						failed++
					}
					continue
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusAccepted {
					failed++
					continue
				}
				lat = append(lat, time.Since(t))
			}
			mu.Lock()
			res.lat = append(res.lat, lat...)
			res.failed += failed
			mu.Unlock()
		})
	}
	wg.Wait()
	res.wall = time.Since(start)
	res.n = len(res.lat)
	res.serverCPU = procCPU(srv.pid()) - cpu0
	res.serverSyscalls = procSyscalls(srv.pid()) - sys0
	res.clientCPU = selfCPU() - self0
	return res
}

// pace sends on due rate times a second until ctx ends. It counts what is due from the start
// rather than sleeping a fixed interval, so timer lateness does not lower the rate; a request
// no worker is free to take is dropped rather than sent late in a burst.
func pace(ctx context.Context, rate float64, due chan<- struct{}) {
	start := time.Now()
	sent := 0
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-tick.C:
			for want := int(now.Sub(start).Seconds() * rate); sent < want; sent++ {
				select {
				case due <- struct{}{}:
				default:
				}
			}
		}
	}
}

//go:build linux

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"
)

// BenchmarkNoopWakeup measures what one request costs the no-op server's CPU depending on how
// busy it is: one connection posting request after request leaves the server idle between
// them (it sleeps and is woken for each, as callbot is at a fixed rate), while 16 connections
// keep it busy (as in the saturated baseline). The client runs on the server's CPU or on the
// other one. On a VM, waking a sleeping process, above all across CPUs, can cost more than the
// request itself (docs/performance.md, "Why 0.5 is out of reach here").
//
//	go test -run '^$' -bench NoopWakeup -benchtime 20000x ./cmd/callbot-load
func BenchmarkNoopWakeup(b *testing.B) {
	cpus := allowedCPUs()
	if len(cpus) < 2 {
		b.Skip("needs two CPUs")
	}
	restore := cpus
	defer pin(os.Getpid(), restore)
	body := []byte(`{"value":[{"changeType":"updated","resourceUrl":"/communications/calls/57dab8b1-894c-409a-b240-bd8beae78896","resourceData":{"@odata.type":"#microsoft.graph.call","state":"established"}}]}`)
	for _, bc := range []struct {
		name   string
		client int
		conns  int
	}{
		{"same-cpu/1-conn", cpus[1], 1},
		{"other-cpu/1-conn", cpus[0], 1},
		{"same-cpu/16-conns", cpus[1], 16},
		{"other-cpu/16-conns", cpus[0], 16},
	} {
		b.Run(bc.name, func(b *testing.B) {
			srv, url, err := startNoop([]int{cpus[1]})
			if err != nil {
				b.Fatal(err)
			}
			defer srv.stop(2 * time.Second)
			if err := pin(os.Getpid(), []int{bc.client}); err != nil {
				b.Fatal(err)
			}
			client := &http.Client{Transport: notifyTransport(), Timeout: 5 * time.Second}
			defer client.CloseIdleConnections()
			post := func() error {
				resp, err := client.Post(url+"/api/calls", "application/json", bytes.NewReader(body))
				if err != nil {
					return err
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusAccepted {
					return fmt.Errorf("status %d", resp.StatusCode)
				}
				return nil
			}
			for range bc.conns { // open the connections before measuring
				if err := post(); err != nil {
					b.Fatal(err)
				}
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			work := make(chan struct{})
			var wg sync.WaitGroup
			var failed error
			var mu sync.Mutex
			for range bc.conns {
				wg.Go(func() {
					for range work {
						if err := post(); err != nil && ctx.Err() == nil {
							mu.Lock()
							failed = err
							mu.Unlock()
						}
					}
				})
			}
			srv0, self0 := procCPU(srv.pid()), selfCPU()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				work <- struct{}{}
			}
			close(work)
			wg.Wait()
			b.StopTimer()
			if failed != nil {
				b.Fatal(failed)
			}
			b.ReportMetric(float64((procCPU(srv.pid())-srv0).Nanoseconds())/1e3/float64(b.N), "server-µs/req")
			b.ReportMetric(float64((selfCPU()-self0).Nanoseconds())/1e3/float64(b.N), "client-µs/req")
		})
	}
}

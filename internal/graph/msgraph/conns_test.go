package msgraph_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/callbot/callbot/internal/graph/msgraph"
)

// silenceProxy forwards TCP connections to target until silence is called: from then on the
// connections it carried drop every byte either way without closing, as a NAT or a load
// balancer that forgot them does. Connections made after that are forwarded again.
type silenceProxy struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	muted  []*atomic.Bool
	conns  []net.Conn
}

func newSilenceProxy(t *testing.T, target string) *silenceProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &silenceProxy{ln: ln, target: target}
	done := make(chan struct{})
	t.Cleanup(func() {
		ln.Close()
		<-done // no connection is added after this
		p.mu.Lock()
		defer p.mu.Unlock()
		for _, c := range p.conns {
			c.Close()
		}
	})
	go func() { defer close(done); p.serve() }()
	return p
}

func (p *silenceProxy) serve() {
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		muted := new(atomic.Bool)
		p.mu.Lock()
		p.muted = append(p.muted, muted)
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		go forward(out, in, muted)
		go forward(in, out, muted)
	}
}

// forward copies src to dst, dropping what it reads once muted.
func forward(dst io.Writer, src io.Reader, muted *atomic.Bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 && !muted.Load() {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *silenceProxy) silence() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.muted {
		m.Store(true)
	}
}

func (p *silenceProxy) url() string { return "https://" + p.ln.Addr().String() }

// A connection to Graph that goes silent (dropped by something on the way, without a reset) is
// found dead by the HTTP/2 health check and replaced: an idempotent command sent on it is sent
// again on a new connection and succeeds, well within its deadline, instead of waiting for the
// deadline on a connection that will never answer, with every later command behind it.
func TestSilentConnectionIsReplaced(t *testing.T) {
	msgraph.SetHTTP2HealthCheck(t, 100*time.Millisecond, 200*time.Millisecond)
	f := newFakeGraph(t)
	srv, err := url.Parse(f.srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	proxy := newSilenceProxy(t, srv.Host)
	// Only Graph goes through the proxy; the token endpoint stays direct.
	c := newClientCfg(t, f, func(cfg *msgraph.Config) {
		cfg.GraphURL = proxy.url() + "/v1.0"
		cfg.Timeout = time.Minute
	})
	ctx := context.Background()
	if err := c.KeepAlive(ctx, callID); err != nil {
		t.Fatal(err)
	}
	if open, opened := c.GraphConnections(); open != 1 || opened != 1 {
		t.Fatalf("after the first request: %d open, %d opened, want 1 and 1", open, opened)
	}

	proxy.silence()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second) // a bound for a failing test, not a timing
	defer cancel()
	err = c.KeepAlive(ctx, callID)
	if errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil {
		t.Fatalf("keepAlive on a silent connection waited for its deadline: %v", err)
	}
	if err != nil {
		t.Fatalf("keepAlive on a silent connection: %v, want it sent again on a new connection", err)
	}
	if _, opened := c.GraphConnections(); opened != 2 {
		t.Errorf("%d connections opened, want 2: the silent one and its replacement", opened)
	}
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		if open, _ := c.GraphConnections(); open == 1 {
			break
		}
		if time.Now().After(deadline) {
			open, _ := c.GraphConnections()
			t.Fatalf("%d connections open, want the silent one closed", open)
		}
	}
}

// Package redistest gives tests a Redis of their own: a real redis-server started on a free
// port when one is on PATH, else an embedded miniredis. With CALLBOT_REQUIRE_REDIS=1 (set by CI)
// a missing redis-server fails the test instead of falling back. StartCluster starts a real
// 3-master Redis Cluster, StartClusterWithReplicas one with a replica per master (skipped without
// redis-server and redis-cli, unless required).
package redistest

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
)

// Server is a Redis for one test.
type Server struct {
	Addr string
	Real bool // a redis-server process, not miniredis
	node *node
	mini *miniredis.Miniredis
}

// Start starts a Redis that lives until the test ends.
func Start(t testing.TB) *Server {
	t.Helper()
	path, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CALLBOT_REQUIRE_REDIS") == "1" {
			t.Fatalf("CALLBOT_REQUIRE_REDIS=1 but redis-server is not on PATH")
		}
		m := miniredis.RunT(t)
		return &Server{Addr: m.Addr(), mini: m}
	}
	s, err := startReal(path, t.TempDir())
	if err != nil {
		t.Fatalf("start redis-server: %v", err)
	}
	t.Cleanup(s.stop)
	return s
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func startReal(path, dir string) (*Server, error) {
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		n, err := startNode(path, port, filepath.Join(dir, "redis.log"), dir)
		if err != nil {
			return nil, err
		}
		if lastErr = n.waitReady(5 * time.Second); lastErr == nil {
			return &Server{Addr: n.addr, Real: true, node: n}, nil
		}
		n.stop()
	}
	return nil, lastErr
}

func (s *Server) stop() { s.node.stop() }

// Client returns a client of the server, closed when the test ends.
func (s *Server) Client(t testing.TB) *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: s.Addr})
	t.Cleanup(func() { c.Close() })
	return c
}

func lastLines(s string, n int) string {
	sc := bufio.NewScanner(strings.NewReader(s))
	var lines []string
	for sc.Scan() {
		lines = append(lines, sc.Text())
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// Hang freezes the redis-server process (SIGSTOP): the kernel still accepts connections and
// takes what clients send, but nothing is ever answered, as with a hung server or a black-holed
// network. resume (also run when the test ends) lets it go on (SIGCONT). A test on miniredis
// (no redis-server on PATH) is skipped.
func (s *Server) Hang(t testing.TB) (resume func()) {
	t.Helper()
	if !s.Real {
		t.Skip("needs a redis-server process to freeze")
	}
	if err := s.node.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
		t.Fatalf("freeze redis-server: %v", err)
	}
	resume = func() { s.node.cmd.Process.Signal(syscall.SIGCONT) }
	t.Cleanup(resume)
	return resume
}

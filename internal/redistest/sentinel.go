package redistest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// SentinelMaster is the master name a Sentinel set-up monitors.
const SentinelMaster = "callbot"

// Sentinel is a Redis master, one replica and one Sentinel monitoring them (quorum 1, the master
// taken for down after a second), for one test: real redis-server processes on free loopback
// ports, without persistence.
type Sentinel struct {
	dir      string
	nodes    []*node // the master and the replica, in the order they were started
	sentinel *node
	link     *replLink   // the replica reaches the master through it
	links    []*replLink // every link started, the current one last
	server   string      // redis-server's path
	access   *access     // how the master and replicas are reached (password, TLS)
	sentAcc  *access     // how the Sentinel is reached: TLS as the nodes, no password
}

// StartSentinel starts a Sentinel set-up that lives until the test ends. It returns once the
// replica is in sync and the Sentinel knows it (so a failover has somewhere to go). Without
// redis-server on PATH the test is skipped, or fails with CALLBOT_REQUIRE_REDIS=1.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	return startSentinelT(t, false, ClusterOptions{})
}

// StartSentinelWith is StartSentinel with o's Password (the master's and the replica's: the
// Sentinel has none) and TLS (the nodes and the Sentinel listen and replicate over TLS only,
// the Sentinel reaching them over TLS too, with a certificate for 127.0.0.1 signed by a CA of
// the test's own: CAFile). Replicas and NodeTimeout are not used.
func StartSentinelWith(t testing.TB, o ClusterOptions) *Sentinel {
	t.Helper()
	return startSentinelT(t, false, o)
}

// StartSentinelWithLink is StartSentinel with the replica reaching the master through a proxy
// in the test's process, so that the test can stall replication (HoldReplication). The proxy's
// work is the test process's: do not benchmark through it.
func StartSentinelWithLink(t testing.TB) *Sentinel {
	t.Helper()
	return startSentinelT(t, true, ClusterOptions{})
}

func startSentinelT(t testing.TB, link bool, o ClusterOptions) *Sentinel {
	t.Helper()
	server, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CALLBOT_REQUIRE_REDIS") == "1" {
			t.Fatalf("CALLBOT_REQUIRE_REDIS=1 but Sentinel cannot be started: %v", err)
		}
		t.Skipf("redis sentinel: %v", err)
	}
	dir := t.TempDir()
	var lastErr error
	for attempt := 1; attempt <= 4; attempt++ {
		s, err := startSentinel(server, filepath.Join(dir, fmt.Sprintf("attempt-%d", attempt)), link, o)
		if err == nil {
			t.Cleanup(s.stop)
			return s
		}
		lastErr = err
		t.Logf("redis sentinel attempt %d: %v", attempt, err)
	}
	t.Fatalf("start redis sentinel: %v", lastErr)
	return nil
}

func startSentinel(server, dir string, link bool, o ClusterOptions) (s *Sentinel, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	a, err := newAccess(o, dir)
	if err != nil {
		return nil, err
	}
	ports, err := clusterPorts(3) // distinct free ports (their +10000 pairs are not needed, but free too)
	if err != nil {
		return nil, err
	}
	s = &Sentinel{dir: dir, server: server, access: a, sentAcc: &access{tls: a.tls, caFile: a.caFile, certFile: a.certFile, keyFile: a.keyFile}}
	defer func() {
		if err != nil {
			s.stop()
		}
	}()
	master, err := startNodeWith(server, ports[0], filepath.Join(dir, "master.log"), dir, a)
	if err != nil {
		return s, err
	}
	s.nodes = append(s.nodes, master)
	if err := master.waitReady(5 * time.Second); err != nil {
		return s, err
	}
	upstream := master.addr
	if link {
		if s.link, err = newReplLink(master.addr); err != nil {
			return s, err
		}
		s.links = append(s.links, s.link)
		upstream = s.link.ln.Addr().String()
	}
	uhost, uport, _ := net.SplitHostPort(upstream)
	replica, err := startNodeWith(server, ports[1], filepath.Join(dir, "replica.log"), dir, a, "--replicaof", uhost, uport)
	if err != nil {
		return s, err
	}
	s.nodes = append(s.nodes, replica)
	if err := replica.waitReady(5 * time.Second); err != nil {
		return s, err
	}
	conf := filepath.Join(dir, "sentinel.conf") // Sentinel rewrites its configuration: a file of its own
	listen := fmt.Sprintf("port %d\n", ports[2])
	if a.tls != nil { // the Sentinel's clients, and its links to the nodes, over TLS
		listen = fmt.Sprintf("port 0\ntls-port %d\ntls-cert-file %s\ntls-key-file %s\ntls-ca-cert-file %s\n"+
			"tls-auth-clients no\ntls-replication yes\n", ports[2], a.certFile, a.keyFile, a.caFile)
	}
	text := fmt.Sprintf("%sbind 127.0.0.1\ndir %s\nlogfile %s\n"+
		"sentinel monitor %s 127.0.0.1 %d 1\n"+
		"sentinel down-after-milliseconds %[4]s 1000\n"+
		"sentinel failover-timeout %[4]s 10000\n"+
		"sentinel parallel-syncs %[4]s 1\n",
		listen, dir, filepath.Join(dir, "sentinel.log"), SentinelMaster, ports[0])
	if a.password != "" {
		text += fmt.Sprintf("sentinel auth-pass %s %q\n", SentinelMaster, a.password)
	}
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return s, err
	}
	s.sentinel, err = startProc(server, fmt.Sprintf("127.0.0.1:%d", ports[2]), filepath.Join(dir, "sentinel.log"), conf, "--sentinel")
	if err != nil {
		return s, err
	}
	s.sentinel.access = s.sentAcc
	if err := s.sentinel.waitReady(5 * time.Second); err != nil {
		return s, err
	}
	if err := s.waitReplica(replica, 15*time.Second); err != nil {
		return s, err
	}
	return s, nil
}

// AddReplica starts a new replica of the current master (through a new link for a set-up from
// StartSentinelWithLink, which HoldReplication then holds) and waits until it is in sync and the
// Sentinel lists it: after a failover the promoted replica is a master without replicas (the
// old master stays dead), and a second failover needs somewhere to go. The Sentinel learns of a
// replica from the master's INFO, which it reads every 10 s: this takes up to about 10 s.
func (s *Sentinel) AddReplica(within time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	master, err := s.MasterAddr(ctx)
	cancel()
	if err != nil {
		return err
	}
	ports, err := clusterPorts(1)
	if err != nil {
		return err
	}
	upstream := master
	if s.link != nil {
		l, err := newReplLink(master)
		if err != nil {
			return err
		}
		s.link = l
		s.links = append(s.links, l)
		upstream = l.ln.Addr().String()
	}
	uhost, uport, _ := net.SplitHostPort(upstream)
	name := fmt.Sprintf("replica-%d", len(s.nodes))
	n, err := startNodeWith(s.server, ports[0], filepath.Join(s.dir, name+".log"), s.dir, s.access, "--replicaof", uhost, uport)
	if err != nil {
		return err
	}
	s.nodes = append(s.nodes, n)
	if err := n.waitReady(5 * time.Second); err != nil {
		return err
	}
	return s.waitReplica(n, within)
}

// waitReplica waits until the replica's link to the master is up and the Sentinel lists the
// replica as healthy.
func (s *Sentinel) waitReplica(replica *node, within time.Duration) error {
	deadline := time.Now().Add(within)
	rc := redis.NewClient(s.nodeOptions(replica.addr))
	defer rc.Close()
	sc := redis.NewSentinelClient(s.sentinelOptions())
	defer sc.Close()
	for {
		problem := func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			defer cancel()
			info, err := rc.Info(ctx, "replication").Result()
			if err != nil {
				return err
			}
			if bad := infoMismatch(info, map[string]string{"master_link_status": "up"}); bad != "" {
				return errors.New("replica: " + bad)
			}
			replicas, err := sc.Replicas(ctx, SentinelMaster).Result()
			if err != nil {
				return err
			}
			for _, r := range replicas {
				if r["name"] == replica.addr && !strings.Contains(r["flags"], "down") {
					return nil
				}
			}
			return fmt.Errorf("sentinel does not list the replica %s yet: %v", replica.addr, replicas)
		}()
		if problem == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return problem
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// URL is the CALLBOT_REDIS_URL of the set-up: sentinel://host:port/master, or
// rediss-sentinel:// with TLS; the password, if any, percent-encoded before the address.
func (s *Sentinel) URL() string {
	scheme := "sentinel://"
	if s.access.tls != nil {
		scheme = "rediss-sentinel://"
	}
	if s.access.password != "" {
		scheme += ":" + strings.NewReplacer("@", "%40", ":", "%3A").Replace(url.PathEscape(s.access.password)) + "@"
	}
	return scheme + s.sentinel.addr + "/" + SentinelMaster
}

// CAFile is the PEM file of the CA that signed the nodes' and the Sentinel's certificate, with
// TLS; "" without.
func (s *Sentinel) CAFile() string { return s.access.caFile }

// nodeOptions are go-redis options reaching the master or a replica at addr, without retries.
func (s *Sentinel) nodeOptions(addr string) *redis.Options {
	o := s.access.options(addr)
	o.MaxRetries = -1
	return o
}

// sentinelOptions are go-redis options reaching the Sentinel, without retries.
func (s *Sentinel) sentinelOptions() *redis.Options {
	o := s.sentAcc.options(s.sentinel.addr)
	o.MaxRetries = -1
	return o
}

// MasterAddr asks the Sentinel which node is the master now.
func (s *Sentinel) MasterAddr(ctx context.Context) (string, error) {
	sc := redis.NewSentinelClient(s.sentinelOptions())
	defer sc.Close()
	hp, err := sc.GetMasterAddrByName(ctx, SentinelMaster).Result()
	if err != nil {
		return "", err
	}
	return strings.Join(hp, ":"), nil
}

// Client returns a client of whichever node is the master (through the Sentinel), closed when
// the test ends.
func (s *Sentinel) Client(t testing.TB) *redis.Client {
	c := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: SentinelMaster, SentinelAddrs: []string{s.sentinel.addr},
		Password: s.access.password, TLSConfig: s.access.options("").TLSConfig})
	t.Cleanup(func() { c.Close() })
	return c
}

// KillMaster kills the master at once, as a crash would, and returns its address. The Sentinel
// promotes the replica a second or two later (WaitFailover).
func (s *Sentinel) KillMaster(ctx context.Context) (string, error) {
	addr, err := s.MasterAddr(ctx)
	if err != nil {
		return "", err
	}
	for _, n := range s.nodes {
		if n.addr == addr {
			n.stop()
			return addr, nil
		}
	}
	return "", fmt.Errorf("master %s is none of the set-up's nodes", addr)
}

// WaitFailover waits until the Sentinel names a master other than old, and that node answers as
// a master.
func (s *Sentinel) WaitFailover(old string, within time.Duration) (string, error) {
	deadline := time.Now().Add(within)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		addr, err := s.MasterAddr(ctx)
		if err == nil && addr != old {
			c := redis.NewClient(s.nodeOptions(addr))
			var info string
			info, err = c.Info(ctx, "replication").Result()
			c.Close()
			if err == nil && infoMismatch(info, map[string]string{"role": "master"}) == "" {
				cancel()
				return addr, nil
			}
		}
		cancel()
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no failover from %s within %s (sentinel says %q, %v); sentinel log: %s",
				old, within, addr, err, s.sentinel.logTail())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// HoldReplication stops the replication stream: from now on what the master writes does not
// reach the replica (a replica that lags, or a link that stalls), and a failover loses it. Only
// for a set-up from StartSentinelWithLink.
func (s *Sentinel) HoldReplication() {
	if s.link == nil {
		panic("redistest: HoldReplication needs StartSentinelWithLink")
	}
	s.link.hold.Store(true)
}

func (s *Sentinel) stop() {
	for _, l := range s.links {
		l.close()
	}
	s.sentinel.stop()
	for _, n := range s.nodes {
		n.stop()
	}
}

// replLink is a TCP proxy between the replica and the master that can stop passing the master's
// replication stream on.
type replLink struct {
	ln     net.Listener
	target string
	hold   atomic.Bool
	mu     sync.Mutex
	conns  []net.Conn
}

func newReplLink(target string) (*replLink, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	l := &replLink{ln: ln, target: target}
	go l.serve()
	return l, nil
}

func (l *replLink) serve() {
	for {
		c, err := l.ln.Accept()
		if err != nil {
			return
		}
		m, err := net.Dial("tcp", l.target)
		if err != nil {
			c.Close()
			continue
		}
		l.mu.Lock()
		l.conns = append(l.conns, c, m)
		l.mu.Unlock()
		go func() { io.Copy(m, c); m.Close() }() // the replica's acknowledgements and commands
		go func() {                              // the master's replication stream
			defer c.Close()
			buf := make([]byte, 32<<10)
			for {
				n, err := m.Read(buf)
				if n > 0 && !l.hold.Load() {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

func (l *replLink) close() {
	l.ln.Close()
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.conns {
		c.Close()
	}
}

// Dir is the directory of the set-up's logs (master.log, replica*.log, sentinel.log), removed
// when the test ends.
func (s *Sentinel) Dir() string { return s.dir }

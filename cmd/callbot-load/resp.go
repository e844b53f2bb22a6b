package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The tool speaks just enough RESP to read INFO from its own redis-server and to count the
// commands callbot sends; go-redis stays a dependency of the store packages only.

type respConn struct {
	c net.Conn
	r *bufio.Reader
}

func dialRESP(addr string) (*respConn, error) {
	c, err := net.DialTimeout("tcp", addr, 2*time.Second)
	if err != nil {
		return nil, err
	}
	return &respConn{c: c, r: bufio.NewReader(c)}, nil
}

func (c *respConn) close() { c.c.Close() }

// do sends one command and returns its reply: string, int64, []any or nil; a Redis error reply
// is returned as an error.
func (c *respConn) do(args ...string) (any, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	_ = c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c.c, b.String()); err != nil {
		return nil, err
	}
	return readReply(c.r)
}

func readReply(r *bufio.Reader) (any, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return nil, errors.New("resp: empty line")
	}
	switch line[0] {
	case '+':
		return line[1:], nil
	case '-':
		return nil, errors.New(line[1:])
	case ':':
		return strconv.ParseInt(line[1:], 10, 64)
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = readReply(r); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("resp: unexpected reply %q", line)
}

// redisInfo is what the tool reads from INFO.
type redisInfo struct {
	version       string
	totalCommands int64            // total_commands_processed
	usedMemory    int64            // used_memory
	keys          int64            // keys in db0
	commands      map[string]int64 // commandstats: calls per command
}

func readInfo(addr string) (redisInfo, error) {
	c, err := dialRESP(addr)
	if err != nil {
		return redisInfo{}, err
	}
	defer c.close()
	v, err := c.do("INFO", "everything")
	if err != nil {
		return redisInfo{}, fmt.Errorf("redis INFO: %w", err)
	}
	s, _ := v.(string)
	return parseInfo(s), nil
}

func parseInfo(s string) redisInfo {
	in := redisInfo{commands: map[string]int64{}}
	for _, l := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(l), ":")
		if !ok {
			continue
		}
		switch {
		case k == "redis_version":
			in.version = v
		case k == "total_commands_processed":
			in.totalCommands, _ = strconv.ParseInt(v, 10, 64)
		case k == "used_memory":
			in.usedMemory, _ = strconv.ParseInt(v, 10, 64)
		case k == "db0":
			// keys=N,expires=M,avg_ttl=T
			for _, kv := range strings.Split(v, ",") {
				if n, ok := strings.CutPrefix(kv, "keys="); ok {
					in.keys, _ = strconv.ParseInt(n, 10, 64)
				}
			}
		case strings.HasPrefix(k, "cmdstat_"):
			// calls=N,usec=...
			for _, kv := range strings.Split(v, ",") {
				if n, ok := strings.CutPrefix(kv, "calls="); ok {
					in.commands[strings.TrimPrefix(k, "cmdstat_")], _ = strconv.ParseInt(n, 10, 64)
				}
			}
		}
	}
	return in
}

// respProxy forwards connections to Redis and counts the commands clients send: a pipeline
// counts each of its commands, an EVALSHA counts as one whatever its script does. Redis's own
// counters cannot say this: Redis 7 counts the commands a script calls in commandstats and in
// total_commands_processed too.
type respProxy struct {
	ln     net.Listener
	target string
	cmds   atomic.Int64
	// reads counts the reads of requests from callbot's connections: callbot writes a request
	// or a whole pipeline at once and waits for the answer, so each read is about one round trip.
	reads atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

func startProxy(target string) (*respProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &respProxy{ln: ln, target: target, conns: map[net.Conn]struct{}{}}
	p.wg.Go(p.accept)
	return p, nil
}

func (p *respProxy) addr() string { return p.ln.Addr().String() }

func (p *respProxy) accept() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.wg.Go(func() { p.handle(c) })
	}
}

func (p *respProxy) track(c net.Conn, add bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if add {
		p.conns[c] = struct{}{}
	} else {
		delete(p.conns, c)
	}
}

func (p *respProxy) handle(c net.Conn) {
	defer c.Close()
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer s.Close()
	p.track(c, true)
	p.track(s, true)
	defer p.track(c, false)
	defer p.track(s, false)
	done := make(chan struct{})
	go func() {
		_, _ = io.Copy(c, s)
		c.Close()
		close(done)
	}()
	// Everything read from the client is written to Redis as soon as it arrives (the tee); the
	// parser only counts.
	r := bufio.NewReaderSize(io.TeeReader(countingReader{c, &p.reads}, s), 64<<10)
	_ = countCommands(r, &p.cmds) // returns when the connection ends or the stream is not RESP
	_, _ = io.Copy(io.Discard, r) // keep the tee forwarding whatever is left
	s.Close()
	<-done
}

// countCommands reads RESP requests (arrays of bulk strings, or inline commands) until r ends.
func countCommands(r *bufio.Reader, n *atomic.Int64) error {
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return err
		}
		if len(line) == 0 || line[0] != '*' {
			n.Add(1) // inline command
			continue
		}
		args, err := strconv.Atoi(strings.TrimSpace(string(line[1:])))
		if err != nil {
			return err
		}
		for i := 0; i < args; i++ {
			hdr, err := r.ReadSlice('\n')
			if err != nil {
				return err
			}
			if len(hdr) == 0 || hdr[0] != '$' {
				return fmt.Errorf("resp: argument header %q", hdr)
			}
			size, err := strconv.Atoi(strings.TrimSpace(string(hdr[1:])))
			if err != nil {
				return err
			}
			if _, err := r.Discard(size + 2); err != nil {
				return err
			}
		}
		n.Add(1)
	}
}

func (p *respProxy) close() {
	p.ln.Close()
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// countingReader counts the reads that returned data.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	if n > 0 {
		c.n.Add(1)
	}
	return n, err
}

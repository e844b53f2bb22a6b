package msgraph

import (
	"context"
	"net"
	"sync"
	"sync/atomic"
)

// connCounter counts the TCP connections of the Graph pipeline: open now, and opened since start
// (each a TCP and TLS handshake). Over HTTP/2 (see graphTransport) one carries up to the
// server's stream limit of requests at once; where only HTTP/1.1 is spoken there is one per
// request in flight. These are what NAT gateways and egress proxies must be sized for.
type connCounter struct {
	open, opened atomic.Int64
}

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// dial wraps d so that every connection it makes is counted until closed.
func (cc *connCounter) dial(d dialFunc) dialFunc {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		cc.open.Add(1)
		cc.opened.Add(1)
		return &countedConn{Conn: c, cc: cc}, nil
	}
}

type countedConn struct {
	net.Conn
	cc   *connCounter
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() { c.cc.open.Add(-1) })
	return c.Conn.Close()
}

// GraphConnections reports the connections to Graph open now and opened since the client was
// made (the token endpoint's are not counted).
func (c *Client) GraphConnections() (open, opened int64) {
	return c.conns.open.Load(), c.conns.opened.Load()
}

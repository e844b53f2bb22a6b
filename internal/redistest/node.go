package redistest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// node is one redis-server process.
type node struct {
	addr    string
	logfile string
	path    string   // the redis-server binary
	args    []string // its arguments, for restart
	access  *access  // its password and TLS; nil: neither
	cmd     *exec.Cmd
	exited  chan struct{} // closed when the process has exited
}

// startNode starts redis-server on 127.0.0.1:port without persistence; extra are more options.
func startNode(path string, port int, logfile, dir string, extra ...string) (*node, error) {
	return startNodeWith(path, port, logfile, dir, nil, extra...)
}

// startNodeWith is startNode reached as a says (a password, TLS).
func startNodeWith(path string, port int, logfile, dir string, a *access, extra ...string) (*node, error) {
	args := append(append(a.serverArgs(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", dir, "--logfile", logfile), extra...)
	n, err := startProc(path, fmt.Sprintf("127.0.0.1:%d", port), logfile, args...)
	if n != nil {
		n.access = a
	}
	return n, err
}

// startProc starts redis-server with args; it will listen on addr and log to logfile.
func startProc(path, addr, logfile string, args ...string) (*node, error) {
	n := &node{addr: addr, logfile: logfile, path: path, args: args}
	if err := n.run(); err != nil {
		return nil, err
	}
	return n, nil
}

// run starts the node's process.
func (n *node) run() error {
	cmd := exec.Command(n.path, n.args...)
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	n.cmd, n.exited = cmd, exited
	return nil
}

// restart starts a node stop killed again, with the same arguments (a cluster node, the same
// nodes.conf: it rejoins the cluster as the node it was), and waits until it answers.
func (n *node) restart(within time.Duration) error {
	select {
	case <-n.exited:
	default:
		return fmt.Errorf("redis-server on %s still runs", n.addr)
	}
	if err := n.run(); err != nil {
		return err
	}
	return n.waitReady(within)
}

// waitReady waits until the node answers PING, as this process (INFO's process_id: another
// redis-server that took the port since it was picked answers PING too). A process that exits
// (the port taken) is reported at once, with the end of its log.
func (n *node) waitReady(within time.Duration) error {
	deadline := time.Now().Add(within)
	o := n.access.options(n.addr)
	o.MaxRetries = -1
	c := redis.NewClient(o)
	defer c.Close()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		info, err := c.Info(ctx, "server").Result()
		cancel()
		if err == nil {
			if pid := infoValue(info, "process_id"); pid == strconv.Itoa(n.cmd.Process.Pid) {
				return nil
			}
			err = fmt.Errorf("another redis-server answers on %s", n.addr)
		}
		select {
		case <-n.exited:
			return fmt.Errorf("redis-server on %s exited: %s", n.addr, n.logTail())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on %s not ready: %w; log: %s", n.addr, err, n.logTail())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (n *node) logTail() string {
	b, _ := os.ReadFile(n.logfile)
	return lastLines(string(b), 3)
}

func (n *node) stop() {
	if n == nil || n.cmd.Process == nil {
		return
	}
	n.cmd.Process.Kill()
	<-n.exited
}

// infoValue is the value of field in an INFO reply, "" if absent.
func infoValue(info, field string) string {
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return ""
}

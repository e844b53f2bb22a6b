package redistest

import (
	"os/exec"
	"testing"
	"time"
)

// A node whose port another redis-server answers on (it took the port after it was picked) is
// not ready: its own process is not the one answering.
func TestNodeReadyOnlyAsItsOwnProcess(t *testing.T) {
	other := Start(t)
	if !other.Real {
		t.Skip("needs redis-server")
	}
	impostor := exec.Command("sleep", "30") // stands for a redis-server that failed to listen
	if err := impostor.Start(); err != nil {
		t.Fatal(err)
	}
	n := &node{addr: other.Addr, cmd: impostor, exited: make(chan struct{})}
	t.Cleanup(n.stop)
	go func() { impostor.Wait(); close(n.exited) }()
	if err := n.waitReady(500 * time.Millisecond); err == nil {
		t.Fatal("ready, though another process answers on its port")
	}
	if err := other.node.waitReady(time.Second); err != nil {
		t.Errorf("the server's own node: %v", err)
	}
}

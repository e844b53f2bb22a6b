//go:build chaos && linux

package chaos

import (
	"os/exec"
	"syscall"
)

// setDeathSignal makes the child die with the test process, even when the test binary is
// killed before its cleanups run (a timeout, ^C).
func setDeathSignal(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}

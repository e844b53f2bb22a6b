//go:build !linux

package main

import "syscall"

// sysProcAttr puts a subprocess in a process group of its own. (CPU and memory figures come
// from /proc and are zero off Linux.)
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}

// pin does nothing off Linux.
func pin(int, []int) error { return nil }

// allowedCPUs is unknown off Linux.
func allowedCPUs() []int { return nil }

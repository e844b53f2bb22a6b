//go:build chaos && !linux

package chaos

import "os/exec"

// setDeathSignal does nothing outside Linux: cleanups stop the children.
func setDeathSignal(*exec.Cmd) {}

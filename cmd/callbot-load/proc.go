package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// proc is a subprocess the tool started and must stop.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error // set before done is closed
}

// startProc starts cmd in a process group of its own, so that Ctrl-C reaches only this tool,
// which then stops its subprocesses in order.
func startProc(name string, cmd *exec.Cmd) (*proc, error) {
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM and waits up to grace, then kills. It may be called more than once.
func (p *proc) stop(grace time.Duration) {
	if p == nil || p.exited() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// startRedis starts a redis-server of the tool's own on a free loopback port, without
// persistence, and waits until it answers PING.
func startRedis(bin, dir string) (*proc, string, error) {
	var lastErr error
	for attempt := 0; attempt < 4; attempt++ {
		addr, err := freeAddr()
		if err != nil {
			return nil, "", err
		}
		_, port, _ := net.SplitHostPort(addr)
		logf, err := os.Create(filepath.Join(dir, "redis-"+port+".log"))
		if err != nil {
			return nil, "", err
		}
		cmd := exec.Command(bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
			"--dir", dir, "--daemonize", "no", "--loglevel", "warning", "--logfile", "")
		cmd.Stdout, cmd.Stderr = logf, logf
		p, err := startProc("redis-server", cmd)
		logf.Close()
		if err != nil {
			return nil, "", err
		}
		deadline := time.Now().Add(5 * time.Second)
		for time.Now().Before(deadline) && !p.exited() {
			if c, err := dialRESP(addr); err == nil {
				_, err = c.do("PING")
				c.close()
				if err == nil {
					return p, addr, nil
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
		p.stop(time.Second)
		lastErr = fmt.Errorf("redis-server on %s did not answer PING (see %s)", addr, logf.Name())
	}
	return nil, "", lastErr
}

// moduleRoot is the directory of the go.mod of the current directory's module.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("not inside the callbot module: run from the repository, or pass -callbot")
	}
	return filepath.Dir(mod), nil
}

// pprofEnv names the address the profiling build of callbot serves net/http/pprof on.
const pprofEnv = "CALLBOT_LOAD_PPROF_ADDR"

// pprofFile is added to callbot's main package by the profiling build, through go build
// -overlay: the repository is not touched and a normal build has no profiling endpoint.
const pprofFile = `package main

import (
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
)

// Added by callbot-load -cpuprofile at build time; not part of callbot's source.
func init() {
	addr := os.Getenv("` + pprofEnv + `")
	if addr == "" {
		return
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return
	}
	go http.Serve(ln, nil) // http.DefaultServeMux: only the pprof handlers
}
`

// buildCallbot builds ./cmd/callbot of the module into dir; withPprof adds pprofFile.
func buildCallbot(root, dir string, withPprof bool) (string, error) {
	bin := filepath.Join(dir, "callbot")
	args := []string{"build", "-o", bin}
	if withPprof {
		src := filepath.Join(dir, "callbot_load_pprof.go")
		if err := os.WriteFile(src, []byte(pprofFile), 0o644); err != nil {
			return "", err
		}
		overlay, _ := json.Marshal(map[string]map[string]string{"Replace": {
			filepath.Join(root, "cmd", "callbot", "zz_callbot_load_pprof.go"): src}})
		ov := filepath.Join(dir, "overlay.json")
		if err := os.WriteFile(ov, overlay, 0o644); err != nil {
			return "", err
		}
		args = append(args, "-overlay", ov)
	}
	cmd := exec.Command("go", append(args, "./cmd/callbot")...)
	cmd.Dir = root
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build ./cmd/callbot: %w\n%s", err, out.String())
	}
	return bin, nil
}

// gitCommit describes the checkout measured: the short commit, plus "with uncommitted changes"
// when the working tree differs from it.
func gitCommit(root string) string {
	if root == "" {
		return "unknown"
	}
	out, err := exec.Command("git", "-C", root, "rev-parse", "--short", "HEAD").Output()
	if err != nil {
		return "unknown"
	}
	commit := strings.TrimSpace(string(out))
	if st, err := exec.Command("git", "-C", root, "status", "--porcelain").Output(); err == nil && len(bytes.TrimSpace(st)) > 0 {
		commit += " with uncommitted changes"
	}
	return commit
}

// procCPU is the user+system CPU time a process used so far (Linux /proc).
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 {
		return 0
	}
	// after the command: state(0) ... utime(11) stime(12), in clock ticks (USER_HZ = 100 on Linux)
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond
}

// procSyscalls is the number of read- and write-family system calls a process made so far
// (syscr + syscw of /proc/PID/io; epoll and futex calls are not counted). 0 when unreadable.
func procSyscalls(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
	if err != nil {
		return 0
	}
	var n int64
	for _, line := range strings.Split(string(b), "\n") {
		name, v, ok := strings.Cut(line, ":")
		if ok && (name == "syscr" || name == "syscw") {
			x, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			n += x
		}
	}
	return n
}

// selfCPU is the CPU time of this process (graphsim, the callers and the measuring).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// procMem returns VmRSS and VmHWM (peak RSS) of a process in bytes.
func procMem(pid int) (rss, hwm int64) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fs[0], 10, 64)
		switch k {
		case "VmRSS":
			rss = n * 1024
		case "VmHWM":
			hwm = n * 1024
		}
	}
	return rss, hwm
}

// machine describes the computer the measurement ran on.
func machine() Machine {
	m := Machine{CPUs: numCPU(), GOOS: goos(), Go: goVersion()}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "MemTotal:") {
				fs := strings.Fields(l)
				if len(fs) >= 2 {
					kb, _ := strconv.ParseInt(fs[1], 10, 64)
					m.MemoryGB = float64(kb) / (1 << 20)
				}
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	return m
}

// systemBusy is the CPU time all processes used so far (Linux /proc/stat: everything but idle
// and iowait).
func systemBusy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 5 || f[0] != "cpu" {
		return 0
	}
	var busy int64
	for i, v := range f[1:] {
		n, _ := strconv.ParseInt(v, 10, 64)
		if i == 3 || i == 4 || i >= 8 { // idle, iowait; guest time is already in user
			continue
		}
		busy += n
	}
	return time.Duration(busy) * 10 * time.Millisecond
}

package harness

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/lazybase/lazybase/internal/eventually"
)

// process is one daemon a Stack started.
type process struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
	err  error
}

// startProcess starts bin with args, its output appended to logDir/name.log.
// The process gets SIGKILL if the test process dies first.
func startProcess(name, logDir string, env []string, bin string, args ...string) (*process, error) {
	logPath := filepath.Join(logDir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%s log: %w", name, err)
	}
	defer f.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout = f
	cmd.Stderr = f
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	p := &process{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// exited reports whether the process has already exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process (by its PID), waits up to grace, then
// sends SIGKILL.
func (p *process) stop(grace time.Duration) error {
	if p.exited() {
		return nil
	}
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(grace):
	}
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
		return fmt.Errorf("%s (pid %d) needed SIGKILL", p.name, p.cmd.Process.Pid)
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s (pid %d) survived SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// tail returns the last n lines of the process's log, without lines that
// contain any of skip.
func (p *process) tail(n int, skip ...string) string {
	return tailFile(p.log, n, skip...)
}

func tailFile(path string, n int, skip ...string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", path, err)
	}
	var lines []string
next:
	for _, l := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		for _, s := range skip {
			if strings.Contains(l, s) {
				continue next
			}
		}
		lines = append(lines, l)
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// waitFor polls check with eventually.Wait until it returns nil, the
// process p (if any) exits, or timeout passes. The error names what was
// awaited and check's last reason, or p's exit and the tail of its log.
func waitFor(ctx context.Context, p *process, timeout time.Duration, what string, check func() error) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	err := eventually.Wait(ctx, timeout, func() error {
		err := check()
		if err != nil && p != nil && p.exited() {
			cancel() // no use waiting for a daemon that is gone
		}
		return err
	})
	if err == nil {
		return nil
	}
	if p != nil && p.exited() {
		return fmt.Errorf("%s exited before %s: %v\n%s", p.name, what, p.err, p.tail(20))
	}
	return fmt.Errorf("waiting for %s: %w", what, err)
}

// runCmd runs a short-lived command and returns its stdout; stderr lines
// matching drop are filtered out of the error text.
func runCmd(ctx context.Context, env []string, bin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err != nil {
		msg := strings.TrimSpace(filterStderr(stderr.String()))
		var ee *exec.ExitError
		if errors.As(err, &ee) && msg != "" {
			err = fmt.Errorf("%w: %s", err, msg)
		}
		return stdout.String(), fmt.Errorf("%s %s: %w", filepath.Base(bin), strings.Join(args, " "), err)
	}
	return stdout.String(), nil
}

// filterStderr drops the cgroup v1 deprecation notice containerd 2.x prints
// on every call on cgroup v1 hosts.
func filterStderr(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, "DEPRECATION") && strings.Contains(l, "cgroup") {
			continue
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

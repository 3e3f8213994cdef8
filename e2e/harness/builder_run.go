package harness

import (
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"
)

// BuilderBinaries returns the programs the lazybase builder image carries,
// by the name they have in the image: lazybase (built from this checkout),
// containerd, ctr, containerd-shim-runc-v2, runc, buildkitd and buildctl
// (the harness's cached daemons).
func BuilderBinaries(ctx context.Context) (map[string]string, error) {
	bins, err := findBinaries(ctx)
	if err != nil {
		return nil, err
	}
	lazybase, err := goBuild(ctx, modulePath+"/cmd/lazybase")
	if err != nil {
		return nil, err
	}
	return map[string]string{
		"lazybase":                lazybase,
		"containerd":              bins.containerd,
		"ctr":                     bins.ctr,
		"containerd-shim-runc-v2": filepath.Join(bins.dir, "containerd-shim-runc-v2"),
		"runc":                    bins.runc,
		"buildkitd":               bins.buildkitd,
		"buildctl":                bins.buildctl,
	}, nil
}

// Background is a long-running command the Stack started, such as a
// foreground `ctr run`. The Stack stops it by its PID on teardown if the
// test has not.
type Background struct {
	p *process
}

// StartCtr runs ctr against the Stack's containerd in the default namespace
// in the background, its output in the Stack's log directory as name.log.
func (c *Containerd) StartCtr(name string, args ...string) (*Background, error) {
	full := append([]string{"--address", c.Address, "--namespace", c.Namespace}, args...)
	p, err := c.s.spawn(name, c.s.bins.ctr, full...)
	if err != nil {
		return nil, err
	}
	return &Background{p: p}, nil
}

// Pid returns the process ID.
func (b *Background) Pid() int { return b.p.cmd.Process.Pid }

// Exited reports whether the process has exited.
func (b *Background) Exited() bool { return b.p.exited() }

// Wait waits up to timeout for the process to exit and returns its exit
// code (-1 when a signal ended it).
func (b *Background) Wait(ctx context.Context, timeout time.Duration) (int, error) {
	select {
	case <-b.p.done:
	case <-time.After(timeout):
		return 0, fmt.Errorf("%s (pid %d) still running after %s", b.p.name, b.Pid(), timeout)
	case <-ctx.Done():
		return 0, ctx.Err()
	}
	if ee, ok := b.p.err.(*exec.ExitError); ok {
		return ee.ExitCode(), nil
	}
	if b.p.err != nil {
		return 0, b.p.err
	}
	return 0, nil
}

// Signal sends sig to the process by its PID.
func (b *Background) Signal(sig syscall.Signal) error {
	return syscall.Kill(b.Pid(), sig)
}

// Log returns the last n lines of the process's output.
func (b *Background) Log(n int) string { return b.p.tail(n) }

// BuildctlAt runs the harness's buildctl against the buildkitd at addr
// ("unix://...") and returns its standard output.
func (s *Stack) BuildctlAt(ctx context.Context, addr string, args ...string) (string, error) {
	return runCmd(ctx, s.env(), s.bins.buildctl, append([]string{"--addr", addr}, args...)...)
}

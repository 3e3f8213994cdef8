package harness

import (
	"context"
	"fmt"
	"syscall"
	"time"
)

// StopSnapshotter stops the lazy snapshotter daemon as SIGTERM does (by
// PID, SIGKILL after 30s).
func (s *Stack) StopSnapshotter() error {
	if s.Snapshotter == nil {
		return fmt.Errorf("stop snapshotter: the stack runs none")
	}
	return s.Snapshotter.proc.stop(30 * time.Second)
}

// KillSnapshotter kills the lazy snapshotter daemon with SIGKILL and
// waits for it to be gone; its FUSE mounts stay behind, disconnected.
func (s *Stack) KillSnapshotter() error {
	if s.Snapshotter == nil {
		return fmt.Errorf("kill snapshotter: the stack runs none")
	}
	p := s.Snapshotter.proc
	if p.exited() {
		return nil
	}
	_ = syscall.Kill(p.cmd.Process.Pid, syscall.SIGKILL)
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("%s (pid %d) survived SIGKILL", p.name, p.cmd.Process.Pid)
	}
}

// StartSnapshotter starts the stopped lazy snapshotter daemon again on the
// same root, socket and configuration and returns once its socket
// accepts connections, without waiting for containerd to reach it: what
// a user's next command meets.
func (s *Stack) StartSnapshotter(ctx context.Context) error {
	if s.Snapshotter == nil {
		return fmt.Errorf("start snapshotter: the stack runs none")
	}
	if !s.Snapshotter.proc.exited() {
		return fmt.Errorf("start snapshotter: %s is still running", s.Snapshotter.proc.name)
	}
	return s.runSnapshotter(ctx, s.Snapshotter)
}

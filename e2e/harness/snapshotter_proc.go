package harness

import "os"

// Pid returns the PID of the lazy snapshotter daemon now running.
func (sn *Snapshotter) Pid() int { return sn.proc.cmd.Process.Pid }

// Running reports whether the daemon process is still running.
func (sn *Snapshotter) Running() bool { return !sn.proc.exited() }

// Log returns the daemon's log so far.
func (sn *Snapshotter) Log() (string, error) {
	b, err := os.ReadFile(sn.proc.log)
	return string(b), err
}

package harness

import (
	"fmt"
	"os"
	"strings"
)

// Pid returns the PID of the lazy snapshotter daemon now running.
func (sn *Snapshotter) Pid() int { return sn.proc.cmd.Process.Pid }

// Running reports whether the daemon process is still running.
func (sn *Snapshotter) Running() bool { return !sn.proc.exited() }

// Log returns the daemon's log so far.
func (sn *Snapshotter) Log() (string, error) {
	b, err := os.ReadFile(sn.proc.log)
	return string(b), err
}

// LogLines returns the lines of the daemon's log that contain any of
// substrs, for a failing test to show what the daemon said about one
// thing (its export guard, its local unpacks) beyond the last lines.
func (sn *Snapshotter) LogLines(substrs ...string) string {
	text, err := sn.Log()
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", sn.proc.log, err)
	}
	var out []string
	for _, l := range strings.Split(text, "\n") {
		for _, s := range substrs {
			if strings.Contains(l, s) {
				out = append(out, l)
				break
			}
		}
	}
	return strings.Join(out, "\n")
}

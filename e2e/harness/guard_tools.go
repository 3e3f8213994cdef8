package harness

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Lazybase runs the lazybase binary built from this checkout (the one the
// Stack's daemon runs) with args, and returns its standard output and
// standard error; a non-zero exit is an error that quotes standard error.
func (s *Stack) Lazybase(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	bin, err := goBuild(ctx, modulePath+"/cmd/lazybase")
	if err != nil {
		return "", "", err
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = s.env()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), errb.String(), fmt.Errorf("lazybase %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), errb.String(), nil
}

// BuildkitLog returns buildkitd's log so far (every run of it).
func (s *Stack) BuildkitLog() (string, error) {
	b, err := os.ReadFile(filepath.Join(s.logDir(), "buildkitd.log"))
	return string(b), err
}

// StatusSocket returns the lazy snapshotter's status socket (lazybase
// daemon only).
func (sn *Snapshotter) StatusSocket() string { return sn.Address + ".status" }

// Restart stops buildkitd (SIGTERM to its PID, SIGKILL after 20s) and
// starts it again with the same configuration, root and socket, as a
// builder host's restart does: its build cache metadata survives on disk.
// args go to the new buildkitd before --config ("--debug", say).
func (b *Buildkit) Restart(ctx context.Context, args ...string) error {
	if err := b.proc.stop(20 * time.Second); err != nil {
		return err
	}
	p, err := b.s.spawn("buildkitd", b.s.bins.buildkitd, append(args, "--config", b.s.path("buildkitd.toml"))...)
	if err != nil {
		return err
	}
	b.proc = p
	sock := strings.TrimPrefix(b.Address, "unix://")
	return waitFor(ctx, p, 60*time.Second, "buildkitd socket after restart", func() error {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return err
		}
		conn.Close()
		_, err = b.Buildctl(ctx, "debug", "workers")
		return err
	})
}

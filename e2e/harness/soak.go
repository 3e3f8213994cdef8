package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// This file holds what the soak benchmark (e2e/soak_test.go) reads off a
// long-lived Stack: disk usage of the daemons' roots, their resident
// memory, the lazy snapshotter's metrics, and an orderly shutdown that
// leaves the directory in place, so that a test can check what a clean stop
// leaves behind.

// ContentRoot returns containerd's content store directory (blobs of every
// namespace).
func (c *Containerd) ContentRoot() string {
	return c.s.path("containerd", "root", "io.containerd.content.v1.content")
}

// Pid returns the PID of the containerd daemon now running.
func (c *Containerd) Pid() int { return c.proc.cmd.Process.Pid }

// Pid returns the PID of the buildkitd daemon now running (it changes with
// Restart).
func (b *Buildkit) Pid() int { return b.proc.cmd.Process.Pid }

// Root returns buildkitd's root directory (its containerd worker keeps only
// metadata there; snapshots and blobs are containerd's).
func (b *Buildkit) Root() string { return b.s.path("buildkit") }

// DiskUsage returns the bytes allocated to the files at and below path, as
// `du -sx --block-size=1` counts them: allocated blocks, each inode once,
// not crossing into other filesystems (so a FUSE or overlay mount below
// path is not read). A path that does not exist uses 0 bytes. Files that
// disappear during the walk are skipped.
func DiskUsage(path string) (int64, error) {
	var root syscall.Stat_t
	if err := syscall.Lstat(path, &root); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil
		}
		return 0, fmt.Errorf("disk usage of %s: %w", path, err)
	}
	type inode struct{ dev, ino uint64 }
	seen := map[inode]bool{}
	var total int64
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			// A directory that cannot be read (a dead FUSE mount's
			// ENOTCONN, say) counts as empty rather than ending the walk.
			if d != nil && d.IsDir() && p != path {
				return fs.SkipDir
			}
			return err
		}
		var st syscall.Stat_t
		if err := syscall.Lstat(p, &st); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			if d.IsDir() && p != path {
				return fs.SkipDir
			}
			return nil
		}
		if uint64(st.Dev) != uint64(root.Dev) {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		k := inode{uint64(st.Dev), uint64(st.Ino)}
		if seen[k] {
			return nil
		}
		seen[k] = true
		total += int64(st.Blocks) * 512
		return nil
	})
	if err != nil {
		return total, fmt.Errorf("disk usage of %s: %w", path, err)
	}
	return total, nil
}

// ProcessRSS returns the resident set size of process pid in bytes, from
// VmRSS in /proc/PID/status.
func ProcessRSS(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("rss of pid %d: unexpected VmRSS line %q", pid, sc.Text())
		}
		kb, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, fmt.Errorf("rss of pid %d: %w", pid, err)
	}
	return 0, fmt.Errorf("rss of pid %d: no VmRSS line", pid)
}

// MetricsText returns the lazybase daemon's Prometheus metrics, in the text
// exposition format, from GET /metrics on its status socket.
func (sn *Snapshotter) MetricsText(ctx context.Context) (string, error) {
	socket := sn.StatusSocket()
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr, Timeout: 30 * time.Second}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lazybase/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", fmt.Errorf("metrics on %s: %w", socket, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("metrics on %s: %s", socket, resp.Status)
	}
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", fmt.Errorf("metrics on %s: %w", socket, err)
	}
	return string(b), nil
}

// MetricValue returns the value of the unlabelled sample name in a
// Prometheus text exposition, and whether it is there.
func MetricValue(text, name string) (float64, bool) {
	for _, l := range strings.Split(text, "\n") {
		rest, ok := strings.CutPrefix(l, name+" ")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0, false
		}
		v, err := strconv.ParseFloat(f[0], 64)
		if err != nil {
			return 0, false
		}
		return v, true
	}
	return 0, false
}

// Shutdown stops the Stack's daemons in teardown order, as an operator
// stopping the node would: buildkitd; containerd's containers, images,
// leases and snapshots in every namespace (synchronous garbage collection);
// containerd; then the lazy snapshotter, each by SIGTERM to its PID. Unlike
// the teardown it neither unmounts leftovers nor removes the directory, so
// the caller can look at what a clean stop leaves (Snapshotter.FUSEMounts).
// The teardown registered by Start still runs and finds them stopped.
func (s *Stack) Shutdown(ctx context.Context) error {
	var errs []error
	if s.Buildkit != nil {
		if err := s.Buildkit.proc.stop(20 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if s.Containerd != nil && !s.Containerd.proc.exited() {
		if err := s.Containerd.clean(ctx); err != nil {
			errs = append(errs, err)
		}
		if err := s.Containerd.proc.stop(20 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	if s.Snapshotter != nil {
		if err := s.Snapshotter.proc.stop(30 * time.Second); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

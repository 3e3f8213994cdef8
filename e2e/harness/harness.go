package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Stack is one running set of daemons for one test.
type Stack struct {
	// Dir is the temporary directory everything lives under.
	Dir string

	Registry *Registry
	// Registry2 is a second registry process with its own storage and
	// shaping proxy (WithSecondRegistry), a push target apart from
	// Registry; nil without that option.
	Registry2   *Registry
	Containerd  *Containerd
	Snapshotter *Snapshotter // nil without WithLazySnapshotter
	Buildkit    *Buildkit    // nil without WithBuildkit

	t     testing.TB
	opts  *options
	bins  *binaries
	procs []*process
}

// dirPrefix names the per-run directories under os.TempDir; it is short so
// unix socket paths below it stay under the 108-byte limit.
const dirPrefix = "lzb-e2e-"

// Start brings up a registry (behind the shaping proxy) and containerd, plus
// the lazy snapshotter and buildkitd when asked. It fails the test on error,
// and registers the teardown with t.Cleanup.
func Start(ctx context.Context, t testing.TB, opts ...Option) *Stack {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("e2e: needs root (containerd, runc, mounts)")
	}
	o, err := makeOptions(opts...)
	if err != nil {
		t.Fatal(err)
	}
	if o.lazy != NoLazySnapshotter {
		if _, err := os.Stat("/dev/fuse"); err != nil {
			t.Skipf("e2e: lazy snapshotter needs /dev/fuse: %v", err)
		}
	}
	bins, err := findBinaries(ctx)
	if err != nil {
		t.Fatalf("e2e binaries: %v", err)
	}
	sweepStale(t)
	dir, err := os.MkdirTemp("", dirPrefix)
	if err != nil {
		t.Fatal(err)
	}
	s := &Stack{Dir: dir, t: t, opts: o, bins: bins}
	t.Cleanup(s.teardown)
	if err := os.WriteFile(filepath.Join(dir, "owner.pid"), []byte(strconv.Itoa(os.Getpid())), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(s.logDir(), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := s.start(ctx); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *Stack) start(ctx context.Context) error {
	begin := time.Now()
	var err error
	if s.Registry, err = s.startRegistry(ctx, "registry"); err != nil {
		return fmt.Errorf("registry: %w", err)
	}
	if s.opts.secondRegistry {
		if s.Registry2, err = s.startRegistry(ctx, "registry2"); err != nil {
			return fmt.Errorf("second registry: %w", err)
		}
	}
	if err := s.writeHostsDir(); err != nil {
		return fmt.Errorf("registry mirror: %w", err)
	}
	if s.opts.lazy != NoLazySnapshotter {
		if s.Snapshotter, err = s.startSnapshotter(ctx); err != nil {
			return fmt.Errorf("lazy snapshotter: %w", err)
		}
	}
	if s.Containerd, err = s.startContainerd(ctx); err != nil {
		return fmt.Errorf("containerd: %w", err)
	}
	if s.opts.buildkit {
		if s.Buildkit, err = s.startBuildkit(ctx); err != nil {
			return fmt.Errorf("buildkitd: %w", err)
		}
	}
	s.t.Logf("e2e stack up in %s under %s", time.Since(begin).Round(time.Millisecond), s.Dir)
	return nil
}

func (s *Stack) logDir() string { return filepath.Join(s.Dir, "logs") }

// path returns a path under the Stack's directory.
func (s *Stack) path(elem ...string) string {
	return filepath.Join(append([]string{s.Dir}, elem...)...)
}

// env is the environment of every daemon and tool the Stack runs: containerd's
// cache dir first on PATH so the v2 shim is found before any packaged one.
func (s *Stack) env() []string {
	var env []string
	for _, kv := range os.Environ() {
		if strings.HasPrefix(kv, "PATH=") {
			continue
		}
		env = append(env, kv)
	}
	return s.withExtraEnv(append(env, "PATH="+s.bins.dir+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"))
}

func (s *Stack) spawn(name, bin string, args ...string) (*process, error) {
	p, err := startProcess(name, s.logDir(), s.env(), bin, args...)
	if err != nil {
		return nil, err
	}
	s.procs = append(s.procs, p)
	return p, nil
}

// noise are log lines left out of Logs: the registry's errors for the
// existence checks every push makes.
var noise = []string{`err.code="blob unknown"`, `err.code="manifest unknown"`}

// Logs returns the tail of every daemon log, for a failing test.
func (s *Stack) Logs(lines int) string {
	var b strings.Builder
	for _, p := range s.procs {
		fmt.Fprintf(&b, "==== %s (pid %d) %s ====\n%s\n", p.name, p.cmd.Process.Pid, p.log, p.tail(lines, noise...))
	}
	return b.String()
}

// teardown stops everything in order: buildkitd, then containerd's
// containers, images and leases with synchronous garbage collection,
// containerd, the lazy snapshotter (which unmounts its FUSE mounts), the
// registry and proxy; then it unmounts leftovers, stops stray shims of this
// Stack, and removes the directory.
func (s *Stack) teardown() {
	t := s.t
	if t.Failed() {
		t.Logf("daemon logs:\n%s", s.Logs(40))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var errs []error
	stop := func(p *process, grace time.Duration) {
		if p == nil {
			return
		}
		if err := p.stop(grace); err != nil {
			errs = append(errs, err)
		}
	}
	if s.Buildkit != nil {
		stop(s.Buildkit.proc, 20*time.Second)
	}
	if s.Containerd != nil && !s.Containerd.proc.exited() {
		if err := s.Containerd.clean(ctx); err != nil {
			errs = append(errs, err)
		}
		stop(s.Containerd.proc, 20*time.Second)
	}
	if s.Snapshotter != nil {
		stop(s.Snapshotter.proc, 30*time.Second)
	}
	for _, r := range []*Registry{s.Registry, s.Registry2} {
		if r == nil {
			continue
		}
		stop(r.proc, 10*time.Second)
		if err := r.Proxy.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, p := range s.procs {
		stop(p, 5*time.Second)
	}
	if n, err := unmountUnder(s.Dir); err != nil {
		errs = append(errs, err)
	} else if n > 0 {
		t.Logf("teardown: unmounted %d leftover mounts under %s", n, s.Dir)
	}
	if n := killStrays(s.Dir); n > 0 {
		t.Logf("teardown: stopped %d stray processes referring to %s", n, s.Dir)
	}
	if err := os.RemoveAll(s.Dir); err != nil {
		errs = append(errs, fmt.Errorf("removing %s: %w", s.Dir, err))
	}
	if err := errors.Join(errs...); err != nil {
		t.Errorf("teardown: %v", err)
	}
}

// sweepStale cleans up after runs whose test process died without teardown:
// directories whose owner.pid no longer exists.
func sweepStale(t testing.TB) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPrefix+"*"))
	for _, d := range dirs {
		b, err := os.ReadFile(filepath.Join(d, "owner.pid"))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid == os.Getpid() || syscall.Kill(pid, 0) == nil {
			continue
		}
		killStrays(d)
		if _, err := unmountUnder(d); err != nil {
			t.Logf("stale %s: %v", d, err)
			continue
		}
		if err := os.RemoveAll(d); err == nil {
			t.Logf("removed stale e2e directory %s (owner pid %d gone)", d, pid)
		}
	}
}

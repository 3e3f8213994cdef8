package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/lazybase/lazybase/internal/eventually"
)

// Containerd is the Stack's containerd daemon.
type Containerd struct {
	// Address is containerd's gRPC unix socket.
	Address string
	// Namespace is the namespace tests use by default.
	Namespace string

	s    *Stack
	proc *process
}

// disabledPlugins are containerd plugins the e2e stack has no use for: CRI
// (and its networking), NRI (a socket under /var/run), and the snapshotters
// that cannot work here.
var disabledPlugins = []string{
	"io.containerd.grpc.v1.cri",
	"io.containerd.cri.v1.images",
	"io.containerd.cri.v1.runtime",
	"io.containerd.podsandbox.controller.v1.podsandbox",
	"io.containerd.sandbox.controller.v1.shim",
	"io.containerd.nri.v1.nri",
	"io.containerd.snapshotter.v1.btrfs",
	"io.containerd.snapshotter.v1.zfs",
	"io.containerd.snapshotter.v1.devmapper",
	"io.containerd.snapshotter.v1.blockfile",
	"io.containerd.snapshotter.v1.erofs",
	"io.containerd.differ.v1.erofs",
	"io.containerd.tracing.processor.v1.otlp",
	"io.containerd.internal.v1.tracing",
}

func (s *Stack) containerdConfig() string {
	q := func(p string) string { return fmt.Sprintf("%q", p) }
	var b strings.Builder
	fmt.Fprintf(&b, "version = 3\nroot = %s\nstate = %s\ntemp = %s\n",
		q(s.path("containerd", "root")), q(s.path("containerd", "state")), q(s.path("containerd", "tmp")))
	b.WriteString("disabled_plugins = [")
	for i, p := range disabledPlugins {
		if i > 0 {
			b.WriteString(", ")
		}
		b.WriteString(q(p))
	}
	b.WriteString("]\n\n")
	fmt.Fprintf(&b, "[grpc]\n  address = %s\n\n[ttrpc]\n  address = %s\n\n[debug]\n  level = \"info\"\n\n[metrics]\n  address = \"\"\n\n",
		q(s.path("containerd.sock")), q(s.path("containerd.sock.ttrpc")))
	fmt.Fprintf(&b, "[plugins.\"io.containerd.internal.v1.opt\"]\n  path = %s\n\n", q(s.path("containerd", "opt")))
	b.WriteString(s.containerdMirrorTOML())
	platform := "linux/" + runtime.GOARCH
	fmt.Fprintf(&b, "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = %q\n  snapshotter = \"overlayfs\"\n\n", platform)
	if s.Snapshotter != nil {
		fmt.Fprintf(&b, "[[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = %q\n  snapshotter = %q\n\n", platform, LazySnapshotterName)
		fmt.Fprintf(&b, "[proxy_plugins.%s]\n  type = \"snapshot\"\n  address = %s\n  [proxy_plugins.%s.exports]\n    root = %s\n    enable_remote_snapshot_annotations = \"true\"\n",
			LazySnapshotterName, q(s.Snapshotter.Address), LazySnapshotterName, q(s.Snapshotter.Root))
	}
	return b.String()
}

func (s *Stack) startContainerd(ctx context.Context) (*Containerd, error) {
	for _, d := range []string{"root", "state", "tmp", "opt", "fifo", "runc"} {
		if err := os.MkdirAll(s.path("containerd", d), 0o700); err != nil {
			return nil, err
		}
	}
	cfgPath := s.path("containerd.toml")
	if err := os.WriteFile(cfgPath, []byte(s.containerdConfig()), 0o600); err != nil {
		return nil, err
	}
	p, err := s.spawn("containerd", s.bins.containerd, "--config", cfgPath)
	if err != nil {
		return nil, err
	}
	c := &Containerd{Address: s.path("containerd.sock"), Namespace: s.opts.namespace, s: s, proc: p}
	err = waitFor(ctx, p, 60*time.Second, "containerd socket", func() error {
		conn, err := net.Dial("unix", c.Address)
		if err != nil {
			return err
		}
		conn.Close()
		_, err = c.Ctr(ctx, "version")
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(c.Address, 0o600); err != nil {
		return nil, err
	}
	return c, nil
}

// Ctr runs ctr against this containerd in its default namespace and returns
// its standard output.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (string, error) {
	return c.CtrNS(ctx, c.Namespace, args...)
}

// CtrNS runs ctr in namespace ns.
func (c *Containerd) CtrNS(ctx context.Context, ns string, args ...string) (string, error) {
	full := append([]string{"--address", c.Address, "--namespace", ns}, args...)
	return runCmd(ctx, c.s.env(), c.s.bins.ctr, full...)
}

// RunArgs returns the ctr flags that keep a `ctr run` under the Stack's
// directory: the runc state root and the FIFO directory.
func (c *Containerd) RunArgs() []string {
	return []string{"--runc-root", c.s.path("containerd", "runc"), "--fifo-dir", c.s.path("containerd", "fifo")}
}

// Pull pulls ref (plain HTTP, as the registry is on loopback) into the
// default namespace, unpacking it with snapshotter ("" for overlayfs).
func (c *Containerd) Pull(ctx context.Context, ref, snapshotter string) error {
	args := []string{"images", "pull", "--plain-http"}
	if snapshotter != "" {
		args = append(args, "--snapshotter", snapshotter)
	}
	_, err := c.Ctr(ctx, append(args, ref)...)
	return err
}

// Run runs a container from ref with the given command, removes it, and
// returns its standard output.
func (c *Containerd) Run(ctx context.Context, ref, snapshotter, id string, cmd ...string) (string, error) {
	args := append([]string{"run", "--rm"}, c.RunArgs()...)
	if snapshotter != "" {
		args = append(args, "--snapshotter", snapshotter)
	}
	args = append(args, ref, id)
	return c.Ctr(ctx, append(args, cmd...)...)
}

// ContentDigests returns the digests in containerd's content store, as seen
// from the default namespace.
func (c *Containerd) ContentDigests(ctx context.Context) (map[string]bool, error) {
	out, err := c.Ctr(ctx, "content", "ls", "-q")
	if err != nil {
		return nil, err
	}
	m := map[string]bool{}
	for _, l := range strings.Fields(out) {
		m[l] = true
	}
	return m, nil
}

func lines(s string) []string { return strings.Fields(s) }

// clean removes, in every namespace: tasks, containers, images, leases and
// snapshots, with synchronous garbage collection, so that no snapshot of the
// lazy snapshotter stays mounted.
func (c *Containerd) clean(ctx context.Context) error {
	out, err := c.CtrNS(ctx, "default", "namespaces", "ls", "-q")
	if err != nil {
		return err
	}
	var errs []error
	for _, ns := range lines(out) {
		if out, err := c.CtrNS(ctx, ns, "tasks", "ls", "-q"); err == nil {
			for _, id := range lines(out) {
				c.CtrNS(ctx, ns, "tasks", "kill", "-s", "SIGKILL", id)
				// Best effort: a task that cannot be deleted makes the
				// containers delete below fail, naming the container.
				_ = eventually.Wait(ctx, 10*time.Second, func() error {
					_, err := c.CtrNS(ctx, ns, "tasks", "delete", id)
					return err
				})
			}
		}
		if out, err := c.CtrNS(ctx, ns, "containers", "ls", "-q"); err == nil && len(lines(out)) > 0 {
			if _, err := c.CtrNS(ctx, ns, append([]string{"containers", "delete"}, lines(out)...)...); err != nil {
				errs = append(errs, fmt.Errorf("namespace %s: %w", ns, err))
			}
		}
		if out, err := c.CtrNS(ctx, ns, "images", "ls", "-q"); err == nil && len(lines(out)) > 0 {
			if _, err := c.CtrNS(ctx, ns, append([]string{"images", "rm", "--sync"}, lines(out)...)...); err != nil {
				errs = append(errs, fmt.Errorf("namespace %s: %w", ns, err))
			}
		}
		if out, err := c.CtrNS(ctx, ns, "leases", "ls", "-q"); err == nil && len(lines(out)) > 0 {
			if _, err := c.CtrNS(ctx, ns, append([]string{"leases", "rm", "--sync"}, lines(out)...)...); err != nil {
				errs = append(errs, fmt.Errorf("namespace %s: %w", ns, err))
			}
		}
		snapshotters := []string{"overlayfs"}
		if c.s.Snapshotter != nil {
			snapshotters = append(snapshotters, LazySnapshotterName)
		}
		for _, sn := range snapshotters {
			c.removeSnapshots(ctx, ns, sn)
		}
	}
	return errors.Join(errs...)
}

// removeSnapshots removes what garbage collection left, children first.
func (c *Containerd) removeSnapshots(ctx context.Context, ns, sn string) {
	for range 20 {
		out, err := c.CtrNS(ctx, ns, "snapshots", "--snapshotter", sn, "ls")
		if err != nil {
			return
		}
		ls := strings.Split(strings.TrimSpace(out), "\n")
		if len(ls) <= 1 {
			return
		}
		parents := map[string]bool{}
		var keys []string
		for _, l := range ls[1:] {
			f := strings.Fields(l)
			if len(f) < 2 {
				continue
			}
			keys = append(keys, f[0])
			if len(f) >= 3 {
				parents[f[1]] = true
			}
		}
		removed := 0
		for _, k := range keys {
			if parents[k] {
				continue
			}
			if _, err := c.CtrNS(ctx, ns, "snapshots", "--snapshotter", sn, "rm", k); err == nil {
				removed++
			}
		}
		if removed == 0 {
			return
		}
	}
}

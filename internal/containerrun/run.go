package containerrun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/log"
)

// ExitError is the error of a command that ran and exited non-zero.
type ExitError struct {
	// Status is the command's exit status.
	Status uint32
}

func (e *ExitError) Error() string {
	return "the command exited with status " + strconv.FormatUint(uint64(e.Status), 10)
}

// Option configures Run.
type Option func(*options) error

type options struct {
	address, namespace, snapshotter string
	plainHTTP                       bool
	hosts                           docker.RegistryHosts
	timeout                         time.Duration
	stdout, stderr                  io.Writer
	spec                            Spec
}

// WithAddress sets containerd's gRPC address (default
// /run/containerd/containerd.sock).
func WithAddress(a string) Option {
	return func(o *options) error {
		if a == "" {
			return errors.New("empty containerd address")
		}
		o.address = a
		return nil
	}
}

// WithNamespace sets the containerd namespace (default "default").
func WithNamespace(ns string) Option {
	return func(o *options) error {
		if ns == "" {
			return errors.New("empty containerd namespace")
		}
		o.namespace = ns
		return nil
	}
}

// WithSnapshotter sets the snapshotter that pulls and mounts the image
// (default "stargz", the name the lazy snapshotter has in containerd).
func WithSnapshotter(s string) Option {
	return func(o *options) error {
		if s == "" {
			return errors.New("empty snapshotter name")
		}
		o.snapshotter = s
		return nil
	}
}

// WithPlainHTTP lets the pull use plain HTTP to every registry; by default
// only registries on loopback addresses are reached over plain HTTP.
func WithPlainHTTP(b bool) Option {
	return func(o *options) error { o.plainHTTP = b; return nil }
}

// WithHosts makes the pull reach registries through hosts (mirrors,
// hosts.toml settings, credentials), as the lazy snapshotter does, instead
// of each image's own registry; WithPlainHTTP has no effect then.
func WithHosts(hosts docker.RegistryHosts) Option {
	return func(o *options) error { o.hosts = hosts; return nil }
}

// WithTimeout bounds the command's run (default 10 minutes); the command
// is killed when it runs longer.
func WithTimeout(d time.Duration) Option {
	return func(o *options) error {
		if d <= 0 {
			return fmt.Errorf("timeout %s: must be positive", d)
		}
		o.timeout = d
		return nil
	}
}

// WithOutput sends the command's stdout and stderr to these writers
// (default: discarded).
func WithOutput(stdout, stderr io.Writer) Option {
	return func(o *options) error { o.stdout, o.stderr = stdout, stderr; return nil }
}

// WithSpec applies the bind mounts, environment and working directory of s.
func WithSpec(s Spec) Option {
	return func(o *options) error { o.spec = s; return nil }
}

// Run pulls image through the snapshotter, runs args in a container on it
// and removes the container, its task and snapshot after. A command that
// exits non-zero returns an *ExitError; one that outlives the timeout is
// killed and returns an error naming the limit.
func Run(ctx context.Context, image string, args []string, opts ...Option) error {
	o := options{
		address:     "/run/containerd/containerd.sock",
		namespace:   "default",
		snapshotter: "stargz",
		timeout:     10 * time.Minute,
		stdout:      io.Discard,
		stderr:      io.Discard,
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return err
		}
	}
	if len(args) == 0 {
		return errors.New("no command to run")
	}
	c, err := containerd.New(o.address, containerd.WithDefaultNamespace(o.namespace))
	if err != nil {
		return fmt.Errorf("containerd %s: %w", o.address, err)
	}
	defer c.Close()
	ctx = namespaces.WithNamespace(ctx, o.namespace)
	ctx, done, err := c.WithLease(ctx)
	if err != nil {
		return fmt.Errorf("containerd lease: %w", err)
	}
	defer done(context.WithoutCancel(ctx))
	img, err := pull(ctx, c, image, o)
	if err != nil {
		return err
	}
	return runContainer(ctx, c, img, image, args, o)
}

// pull pulls and unpacks image with o's snapshotter.
func pull(ctx context.Context, c *containerd.Client, image string, o options) (containerd.Image, error) {
	plain := docker.MatchLocalhost
	if o.plainHTTP {
		plain = docker.MatchAllHosts
	}
	hosts := o.hosts
	if hosts == nil {
		hosts = docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(plain))
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: hosts})
	img, err := c.Pull(ctx, image,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.snapshotter),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(image)))
	if err != nil {
		return nil, fmt.Errorf("pull %s: %w", image, err)
	}
	return img, nil
}

// runContainer makes the container and its task, runs args and removes
// both.
func runContainer(ctx context.Context, c *containerd.Client, img containerd.Image, image string, args []string, o options) error {
	id := "lazybase-record-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	ctr, err := c.NewContainer(ctx, id,
		containerd.WithSnapshotter(o.snapshotter),
		containerd.WithNewSnapshot(id, img),
		containerd.WithNewSpec(o.spec.specOpts(img, args)...))
	if err != nil {
		return fmt.Errorf("container on %s: %w", image, err)
	}
	defer func() {
		if err := ctr.Delete(context.WithoutCancel(ctx), containerd.WithSnapshotCleanup); err != nil {
			log.G(ctx).WithError(err).WithField("container", id).Warn("removing the container")
		}
	}()
	fifo, err := os.MkdirTemp("", "lazybase-record-fifo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(fifo)
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, o.stdout, o.stderr), cio.WithFIFODir(filepath.Clean(fifo))))
	if err != nil {
		return fmt.Errorf("task on %s: %w", image, err)
	}
	defer func() {
		if _, err := task.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill); err != nil {
			log.G(ctx).WithError(err).WithField("container", id).Warn("removing the task")
		}
	}()
	// The deferred task.Delete waits for the output copies to finish, so
	// all of the command's output is written before this returns.
	return runTask(ctx, task, image, args, o.timeout)
}

// runTask starts task and waits for it, killing it after timeout.
func runTask(ctx context.Context, task containerd.Task, image string, args []string, timeout time.Duration) error {
	wait, err := task.Wait(ctx)
	if err != nil {
		return fmt.Errorf("task on %s: %w", image, err)
	}
	if err := task.Start(ctx); err != nil {
		return fmt.Errorf("start %q on %s: %w", args[0], image, err)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var st containerd.ExitStatus
	select {
	case st = <-wait:
	case <-timer.C:
		_ = task.Kill(ctx, syscall.SIGKILL)
		<-wait
		return fmt.Errorf("%q on %s: still running after %s", args[0], image, timeout)
	}
	if err := st.Error(); err != nil {
		return fmt.Errorf("wait %q: %w", args[0], err)
	}
	if code := st.ExitCode(); code != 0 {
		return &ExitError{Status: code}
	}
	return nil
}

// specOpts are the container's spec options: the image's config, then the
// spec's environment, working directory and mounts, then the command.
func (s Spec) specOpts(img containerd.Image, args []string) []oci.SpecOpts {
	opts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(s.Env) > 0 {
		opts = append(opts, oci.WithEnv(s.Env))
	}
	if s.Workdir != "" {
		opts = append(opts, oci.WithProcessCwd(s.Workdir))
	}
	if len(s.Mounts) > 0 {
		opts = append(opts, oci.WithMounts(s.Mounts))
	}
	return append(opts, oci.WithProcessArgs(args...))
}

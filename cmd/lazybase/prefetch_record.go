package main

import (
	"context"
	"errors"
	"fmt"
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
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/prefetch"
)

type recordOptions struct {
	image, address, namespace, snapshotter string
	accessDir, out, merge                  string
	timeout                                time.Duration
	resolve, plainHTTP, insecure           bool
	args                                   []string
}

func newPrefetchRecordCmd() *cobra.Command {
	var o recordOptions
	cmd := &cobra.Command{
		Use:   "record --image REF --access-dir DIR -o PROFILE -- CMD [ARG...]",
		Short: "Run a command in a container on a lazily pulled image and record the files it reads",
		Long: `Pull REF lazily through containerd with the lazy snapshotter, run CMD in a
container on it, and turn the files the snapshotter recorded as read during
the run into a prefetch profile.

The lazy snapshotter must record accesses: its configuration sets
access_record_dir, and --access-dir names that directory. The image must be
lazily mounted (eStargz); otherwise nothing is recorded and record fails.

The command's output goes to this command's stdout and stderr. When the
command exits non-zero, the profile is still written (the files it read are
what it needed so far) and record exits with an error naming the status.
--merge folds the run into an existing profile (it may be the output file).
The profile is resolved against the image's manifest (source layers and
sizes, see prefetch collect --resolve) unless --resolve=false.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 0 || len(args) == 0 {
				return errors.New("the command to run follows --: record --image REF -o PROFILE -- CMD [ARG...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			o.args = args
			return runPrefetchRecord(cmd, o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.image, "image", "", "image reference to pull lazily and run (required)")
	f.StringVar(&o.address, "containerd", "/run/containerd/containerd.sock", "containerd's gRPC address")
	f.StringVar(&o.namespace, "namespace", "default", "containerd namespace")
	f.StringVar(&o.snapshotter, "snapshotter", "stargz", "containerd's name of the lazy snapshotter")
	f.StringVar(&o.accessDir, "access-dir", "", "the lazy snapshotter's access_record_dir (required)")
	f.StringVarP(&o.out, "output", "o", "", "profile file to write (required)")
	f.StringVar(&o.merge, "merge", "", "existing profile to merge the run into")
	f.DurationVar(&o.timeout, "timeout", 10*time.Minute, "stop the command after this long")
	f.BoolVar(&o.resolve, "resolve", true, "read the image's manifest to learn the source layers and layer sizes")
	f.BoolVar(&o.plainHTTP, "plain-http", false, "allow plain HTTP to registries that are not on a loopback address")
	f.BoolVar(&o.insecure, "insecure", false, "with --resolve: skip TLS certificate verification")
	_ = cmd.MarkFlagRequired("image")
	_ = cmd.MarkFlagRequired("access-dir")
	_ = cmd.MarkFlagRequired("output")
	return cmd
}

func runPrefetchRecord(cmd *cobra.Command, o recordOptions) error {
	ctx := cmd.Context()
	if st, err := os.Stat(o.accessDir); err != nil || !st.IsDir() {
		return fmt.Errorf("--access-dir %s: not a directory; does the lazy snapshotter set access_record_dir?", o.accessDir)
	}
	var base *prefetch.Profile
	if o.merge != "" {
		p, err := prefetch.LoadProfile(o.merge)
		if err != nil {
			return fmt.Errorf("--merge: %w", err)
		}
		base = p
	}
	// Records carry their time; a second back covers the daemon's clock
	// granularity without reaching a run that ended before this one.
	start := time.Now().Add(-time.Second)
	runErr := runInContainer(ctx, cmd, o)
	var exitErr *exitStatusError
	if runErr != nil && !errors.As(runErr, &exitErr) {
		return runErr
	}
	got, err := prefetch.CollectDir(ctx, o.accessDir, o.image, start)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("no access records of %s in %s: is the image lazily mounted (eStargz) and does the snapshotter record into that directory?", o.image, o.accessDir)
	}
	if err != nil {
		return err
	}
	if len(got.Layers) == 0 {
		return fmt.Errorf("no access records of %s in %s since the run started: is the image lazily mounted (eStargz)?", o.image, o.accessDir)
	}
	profiles := []*prefetch.Profile{got}
	if base != nil {
		profiles = []*prefetch.Profile{base, got}
	}
	p, err := prefetch.Merge(profiles...)
	if err != nil {
		return err
	}
	if o.resolve {
		if err := resolveProfile(ctx, p, collectOptions{plainHTTP: o.plainHTTP, insecure: o.insecure}); err != nil {
			return err
		}
	}
	b, err := p.Marshal()
	if err != nil {
		return err
	}
	if err := writeFileAtomic(o.out, b); err != nil {
		return err
	}
	return runErr
}

type exitStatusError struct{ status uint32 }

func (e *exitStatusError) Error() string {
	return "the command exited with status " + strconv.FormatUint(uint64(e.status), 10)
}

// runInContainer pulls o.image with the lazy snapshotter and runs o.args in
// a container on it, removing the container, its task and snapshot after.
func runInContainer(ctx context.Context, cmd *cobra.Command, o recordOptions) error {
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

	plain := docker.MatchLocalhost
	if o.plainHTTP {
		plain = docker.MatchAllHosts
	}
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(plain))})
	img, err := c.Pull(ctx, o.image,
		containerd.WithResolver(resolver),
		containerd.WithPullUnpack,
		containerd.WithPullSnapshotter(o.snapshotter),
		containerd.WithImageHandlerWrapper(snapshotters.AppendInfoHandlerWrapper(o.image)))
	if err != nil {
		return fmt.Errorf("pull %s: %w", o.image, err)
	}
	id := "lazybase-record-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	ctr, err := c.NewContainer(ctx, id,
		containerd.WithSnapshotter(o.snapshotter),
		containerd.WithNewSnapshot(id, img),
		containerd.WithNewSpec(oci.WithImageConfig(img), oci.WithProcessArgs(o.args...)))
	if err != nil {
		return fmt.Errorf("container on %s: %w", o.image, err)
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
	task, err := ctr.NewTask(ctx, cio.NewCreator(cio.WithStreams(nil, cmd.OutOrStdout(), cmd.ErrOrStderr()), cio.WithFIFODir(filepath.Clean(fifo))))
	if err != nil {
		return fmt.Errorf("task on %s: %w", o.image, err)
	}
	defer func() {
		if _, err := task.Delete(context.WithoutCancel(ctx), containerd.WithProcessKill); err != nil {
			log.G(ctx).WithError(err).WithField("container", id).Warn("removing the task")
		}
	}()
	wait, err := task.Wait(ctx)
	if err != nil {
		return fmt.Errorf("task on %s: %w", o.image, err)
	}
	if err := task.Start(ctx); err != nil {
		return fmt.Errorf("start %q on %s: %w", o.args[0], o.image, err)
	}
	timer := time.NewTimer(o.timeout)
	defer timer.Stop()
	var st containerd.ExitStatus
	select {
	case st = <-wait:
	case <-timer.C:
		_ = task.Kill(ctx, syscall.SIGKILL)
		<-wait
		return fmt.Errorf("%q on %s: still running after %s", o.args[0], o.image, o.timeout)
	}
	if err := st.Error(); err != nil {
		return fmt.Errorf("wait %q: %w", o.args[0], err)
	}
	// The deferred task.Delete waits for the output copies to finish, so
	// all of the command's output is written before this returns.
	if code := st.ExitCode(); code != 0 {
		return &exitStatusError{status: code}
	}
	return nil
}

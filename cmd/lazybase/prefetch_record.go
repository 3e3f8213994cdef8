package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	containerd "github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/cio"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/oci"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/prefetch"
)

type recordOptions struct {
	image, address, namespace, snapshotter string
	accessDir, out, merge                  string
	timeout                                time.Duration
	resolve, plainHTTP, insecure           bool
	args                                   []string

	// volumes (-v SRC:DST[:ro|rw]) and mounts (--mount type=bind,...)
	// as given; workdir and env for the command.
	volumes, mounts, env []string
	workdir              string
}

// runSpec is what the flags that shape the container resolve to.
type runSpec struct {
	mounts  []specs.Mount
	env     []string
	workdir string
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
sizes, see prefetch collect --resolve) unless --resolve=false.

Host directories and files can be bind-mounted into the container, as with
docker: -v /host/src:/src:ro or --mount type=bind,src=/host/src,dst=/src,ro.
Both paths must be absolute and the source must exist. Files read through a
bind mount are not in the image and never enter the profile. --workdir sets
the command's working directory, --env KEY=VALUE its environment (KEY alone
passes this process's value of KEY).`,
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
	f.StringArrayVarP(&o.volumes, "volume", "v", nil, "bind-mount a host path: SRC:DST[:ro|rw] (repeatable)")
	f.StringArrayVar(&o.mounts, "mount", nil, "bind-mount a host path: type=bind,src=SRC,dst=DST[,ro|readonly] (repeatable)")
	f.StringVarP(&o.workdir, "workdir", "w", "", "working directory of the command inside the container (absolute)")
	f.StringArrayVarP(&o.env, "env", "e", nil, "set an environment variable of the command: KEY=VALUE, or KEY to pass this process's value (repeatable)")
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
	spec, err := parseRunSpec(o)
	if err != nil {
		return err
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
	runErr := runInContainer(ctx, cmd, o, spec)
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
func runInContainer(ctx context.Context, cmd *cobra.Command, o recordOptions, rs runSpec) error {
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
		containerd.WithNewSpec(rs.specOpts(img, o.args)...))
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

// specOpts are the container's spec options: the image's config, then the
// flags' environment, working directory and mounts, then the command.
func (rs runSpec) specOpts(img containerd.Image, args []string) []oci.SpecOpts {
	opts := []oci.SpecOpts{oci.WithImageConfig(img)}
	if len(rs.env) > 0 {
		opts = append(opts, oci.WithEnv(rs.env))
	}
	if rs.workdir != "" {
		opts = append(opts, oci.WithProcessCwd(rs.workdir))
	}
	if len(rs.mounts) > 0 {
		opts = append(opts, oci.WithMounts(rs.mounts))
	}
	return append(opts, oci.WithProcessArgs(args...))
}

// parseRunSpec checks and resolves the flags that shape the container.
func parseRunSpec(o recordOptions) (runSpec, error) {
	var rs runSpec
	for _, v := range o.volumes {
		m, err := parseVolume(v)
		if err != nil {
			return runSpec{}, fmt.Errorf("--volume %q: %w", v, err)
		}
		rs.mounts = append(rs.mounts, m)
	}
	for _, v := range o.mounts {
		m, err := parseMount(v)
		if err != nil {
			return runSpec{}, fmt.Errorf("--mount %q: %w", v, err)
		}
		rs.mounts = append(rs.mounts, m)
	}
	seen := map[string]bool{}
	for _, m := range rs.mounts {
		if seen[m.Destination] {
			return runSpec{}, fmt.Errorf("two bind mounts on %s", m.Destination)
		}
		seen[m.Destination] = true
	}
	if o.workdir != "" {
		if !filepath.IsAbs(o.workdir) {
			return runSpec{}, fmt.Errorf("--workdir %q: not an absolute path", o.workdir)
		}
		rs.workdir = filepath.Clean(o.workdir)
	}
	for _, e := range o.env {
		kv, err := parseEnv(e)
		if err != nil {
			return runSpec{}, fmt.Errorf("--env %q: %w", e, err)
		}
		rs.env = append(rs.env, kv)
	}
	return rs, nil
}

// parseVolume parses docker's short form SRC:DST[:ro|rw].
func parseVolume(v string) (specs.Mount, error) {
	parts := strings.Split(v, ":")
	if len(parts) < 2 || len(parts) > 3 {
		return specs.Mount{}, errors.New("want SRC:DST or SRC:DST:ro|rw")
	}
	ro := false
	if len(parts) == 3 {
		switch parts[2] {
		case "ro":
			ro = true
		case "rw":
		default:
			return specs.Mount{}, fmt.Errorf("unknown option %q: want ro or rw", parts[2])
		}
	}
	return bindMount(parts[0], parts[1], ro)
}

// parseMount parses docker's long form type=bind,src=SRC,dst=DST[,ro].
func parseMount(v string) (specs.Mount, error) {
	var typ, src, dst string
	ro := false
	for _, field := range strings.Split(v, ",") {
		key, val, hasVal := strings.Cut(field, "=")
		switch key {
		case "type":
			typ = val
		case "src", "source":
			src = val
		case "dst", "destination", "target":
			dst = val
		case "ro", "readonly":
			if !hasVal {
				ro = true
				break
			}
			b, err := strconv.ParseBool(val)
			if err != nil {
				return specs.Mount{}, fmt.Errorf("%s=%s: want true or false", key, val)
			}
			ro = b
		case "rw":
			if hasVal {
				return specs.Mount{}, fmt.Errorf("rw takes no value")
			}
			ro = false
		default:
			return specs.Mount{}, fmt.Errorf("unknown field %q: want type, src, dst, ro", key)
		}
		if hasVal && val == "" {
			return specs.Mount{}, fmt.Errorf("%s: empty value", key)
		}
	}
	if typ != "bind" {
		return specs.Mount{}, fmt.Errorf("type %q: only type=bind is supported", typ)
	}
	if src == "" || dst == "" {
		return specs.Mount{}, errors.New("want src=SRC and dst=DST")
	}
	return bindMount(src, dst, ro)
}

// bindMount checks a bind mount's paths: both absolute, the source
// present on this host.
func bindMount(src, dst string, ro bool) (specs.Mount, error) {
	if !filepath.IsAbs(src) {
		return specs.Mount{}, fmt.Errorf("source %q: not an absolute path", src)
	}
	if !filepath.IsAbs(dst) {
		return specs.Mount{}, fmt.Errorf("destination %q: not an absolute path", dst)
	}
	if filepath.Clean(dst) == "/" {
		return specs.Mount{}, errors.New("destination /: cannot replace the container's root")
	}
	if _, err := os.Stat(src); err != nil {
		return specs.Mount{}, fmt.Errorf("source %s: %w", src, err)
	}
	opt := "rw"
	if ro {
		opt = "ro"
	}
	return specs.Mount{
		Type:        "bind",
		Source:      filepath.Clean(src),
		Destination: filepath.Clean(dst),
		Options:     []string{"rbind", opt},
	}, nil
}

// parseEnv parses KEY=VALUE, or KEY alone for this process's value.
func parseEnv(e string) (string, error) {
	key, _, hasVal := strings.Cut(e, "=")
	if key == "" {
		return "", errors.New("empty variable name")
	}
	if strings.ContainsAny(key, " \t\n\x00") {
		return "", fmt.Errorf("variable name %q has white space", key)
	}
	if hasVal {
		return e, nil
	}
	val, ok := os.LookupEnv(key)
	if !ok {
		return "", fmt.Errorf("%s is not set here: give KEY=VALUE", key)
	}
	return key + "=" + val, nil
}

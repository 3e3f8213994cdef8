package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/internal/containerrun"
	"github.com/lazybase/lazybase/lazypull"
	"github.com/lazybase/lazybase/prefetch"
)

type recordOptions struct {
	image, address, namespace, snapshotter string
	accessDir, out, merge                  string
	registryConfig                         string
	timeout                                time.Duration
	resolve, plainHTTP, insecure           bool
	args                                   []string

	// flags are the bind mounts, environment and working directory of
	// the container, as given.
	flags containerrun.Flags
}

// prefetchRecordLong is the help text of prefetch record.
const prefetchRecordLong = `Pull REF lazily through containerd with the lazy snapshotter, run CMD in a
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
passes this process's value of KEY).

--registry-config names the lazy snapshotter's configuration file: the pull
then reaches registries through its [registry] section (mirrors, or
config_path hosts.toml directories) and [auth] credentials, as the
snapshotter does, so an image named by a host that only a mirror serves is
pulled from the mirror, and --resolve reads its manifest there too.`

func newPrefetchRecordCmd() *cobra.Command {
	var o recordOptions
	cmd := &cobra.Command{
		Use:   "record --image REF --access-dir DIR -o PROFILE -- CMD [ARG...]",
		Short: "Run a command in a container on a lazily pulled image and record the files it reads",
		Long:  prefetchRecordLong,
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
	f.StringVar(&o.registryConfig, "registry-config", "", "the lazy snapshotter's configuration file, whose [registry] and [auth] the pull and --resolve use")
	f.BoolVar(&o.insecure, "insecure", false, "with --resolve, without --registry-config: skip TLS certificate verification")
	f.StringArrayVarP(&o.flags.Volumes, "volume", "v", nil, "bind-mount a host path: SRC:DST[:ro|rw] (repeatable)")
	f.StringArrayVar(&o.flags.Mounts, "mount", nil, "bind-mount a host path: type=bind,src=SRC,dst=DST[,ro|readonly] (repeatable)")
	f.StringVarP(&o.flags.Workdir, "workdir", "w", "", "working directory of the command inside the container (absolute)")
	f.StringArrayVarP(&o.flags.Env, "env", "e", nil, "set an environment variable of the command: KEY=VALUE, or KEY to pass this process's value (repeatable)")
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
	spec, err := containerrun.ParseFlags(o.flags)
	if err != nil {
		return err
	}
	var base *prefetch.Profile
	if o.merge != "" {
		if base, err = prefetch.LoadProfile(o.merge); err != nil {
			return fmt.Errorf("--merge: %w", err)
		}
	}
	// Records carry their time; a second back covers the daemon's clock
	// granularity without reaching a run that ended before this one.
	start := time.Now().Add(-time.Second)
	runOpts := []containerrun.Option{
		containerrun.WithAddress(o.address),
		containerrun.WithNamespace(o.namespace),
		containerrun.WithSnapshotter(o.snapshotter),
		containerrun.WithPlainHTTP(o.plainHTTP),
		containerrun.WithTimeout(o.timeout),
		containerrun.WithOutput(cmd.OutOrStdout(), cmd.ErrOrStderr()),
		containerrun.WithSpec(spec),
	}
	if o.registryConfig != "" {
		cfg, err := lazypull.LoadConfig(o.registryConfig)
		if err != nil {
			return fmt.Errorf("--registry-config: %w", err)
		}
		runOpts = append(runOpts, containerrun.WithHosts(cfg.RegistryHosts(ctx)))
	}
	runErr := containerrun.Run(ctx, o.image, o.args, runOpts...)
	var exitErr *containerrun.ExitError
	if runErr != nil && !errors.As(runErr, &exitErr) {
		return runErr
	}
	// A command that exited non-zero still read what it needed so far:
	// the profile is written, then its status returned.
	if err := writeRecordedProfile(ctx, o, base, start); err != nil {
		return err
	}
	return runErr
}

// writeRecordedProfile collects the run's access records since start,
// merges them into base, resolves the profile against the image and writes
// it to o.out.
func writeRecordedProfile(ctx context.Context, o recordOptions, base *prefetch.Profile, start time.Time) error {
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
		if err := resolveProfile(ctx, p, collectOptions{plainHTTP: o.plainHTTP, insecure: o.insecure, registryConfig: o.registryConfig}); err != nil {
			return err
		}
	}
	b, err := p.Marshal()
	if err != nil {
		return err
	}
	return writeFileAtomic(o.out, b)
}

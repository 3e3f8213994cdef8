package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/internal/dockerfile"
	"github.com/lazybase/lazybase/lazypull"
)

func newGuardCmd() *cobra.Command {
	var (
		configPath, socket, statusSocket string
		namespace, dfPath, target        string
		platform                         string
		buildArgs                        []string
		timeout                          time.Duration
	)
	cmd := &cobra.Command{
		Use:   "guard [REF...]",
		Short: "Wait until the lazily mounted layers of images are verified in the builder's content store",
		Long: `Block until every layer of the given images that the lazybase snapshotter
mounted lazily is materialized, verified by digest and size, in the content
store of the builder's containerd namespace, so that an export reads no byte
from the registry. Layers still waiting for guard.delay start at once; a layer
whose transfer failed is tried again.

--dockerfile works out the image the exported stage (the last one, or
--target) is built on with BuildKit's Dockerfile parser: FROM is followed
through stage names, ARGs before the first FROM are expanded with
--build-arg overrides, and a stage FROM scratch has nothing to guard.

It fails, naming the image and layer, when the guard cannot verify a blob,
when an image was not mounted by this daemon in --namespace, when policy
marks an image lazy-only, or when --timeout passes.

The daemon is found like "lazybase snapshotter status" finds it.`,
		Example: `  lazybase guard registry.example/base/debian:bookworm
  lazybase guard --dockerfile Dockerfile --target release --build-arg TAG=12`,
		RunE: func(cmd *cobra.Command, args []string) error {
			refs := append([]string(nil), args...)
			stderr := cmd.ErrOrStderr()
			if dfPath != "" {
				base, err := dockerfileBase(dfPath, target, platform, buildArgs)
				if err != nil {
					return err
				}
				if base.Image == "" {
					fmt.Fprintf(stderr, "%s: stage %s is FROM scratch: no base image to guard\n", dfPath, base.Target)
				} else {
					fmt.Fprintf(stderr, "%s: stage %s is built on %s (line %d)\n", dfPath, base.Target, base.Image, base.Line)
					refs = append(refs, base.Image)
				}
			} else if cmd.Flags().Changed("target") || len(buildArgs) > 0 || platform != "" {
				return errors.New("--target, --build-arg and --platform need --dockerfile")
			}
			if len(refs) == 0 {
				if dfPath != "" {
					return nil
				}
				return errors.New("no image: give image references or --dockerfile")
			}
			path, err := statusSocketPath(configPath, socket, statusSocket)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			if timeout > 0 {
				var cancel context.CancelFunc
				// The daemon gives up first and says on what; this
				// deadline is for a daemon that does not answer.
				ctx, cancel = context.WithTimeout(ctx, timeout+10*time.Second)
				defer cancel()
			}
			start := time.Now()
			p := &guardProgress{w: stderr, start: start}
			layers, err := lazypull.GuardBarrier(ctx, path, lazypull.BarrierRequest{
				Namespace: namespace, Images: refs, Timeout: lazypull.Duration(timeout),
			}, p.layer)
			if err != nil {
				if errors.Is(err, context.DeadlineExceeded) && timeout > 0 {
					return fmt.Errorf("no answer from the daemon on %s within --timeout %s", path, timeout)
				}
				return err
			}
			var total int64
			for _, l := range layers {
				if l.Size > 0 {
					total += l.Size
				}
			}
			fmt.Fprintf(stderr, "guarded %d layers (%s) of %s in namespace %s in %s\n",
				len(layers), sizeOrUnknown(total), strings.Join(refs, ", "), namespace, time.Since(start).Round(time.Millisecond))
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "the daemon's configuration file (default $"+configEnv+")")
	f.StringVar(&socket, "socket", "", "the daemon's snapshots socket")
	f.StringVar(&statusSocket, "status-socket", "", "the daemon's status socket")
	f.StringVar(&namespace, "namespace", "buildkit", "containerd namespace of the builder")
	f.DurationVar(&timeout, "timeout", 10*time.Minute, "give up after this long (0: no limit)")
	f.StringVar(&dfPath, "dockerfile", "", "guard the base image of this Dockerfile's exported stage")
	f.StringVar(&target, "target", "", "the exported stage of --dockerfile (default: the last)")
	f.StringArrayVar(&buildArgs, "build-arg", nil, "build argument KEY=VALUE for --dockerfile (repeatable)")
	f.StringVar(&platform, "platform", "", "build and target platform --dockerfile's platform arguments expand to (default linux on this architecture)")
	return cmd
}

// dockerfileBase parses the Dockerfile at path and returns its exported
// stage's base image.
func dockerfileBase(path, target, platform string, buildArgs []string) (*dockerfile.Base, error) {
	args := map[string]string{}
	for _, kv := range buildArgs {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			// As docker build does: KEY alone takes the environment's value.
			var set bool
			if v, set = os.LookupEnv(k); !set {
				continue
			}
		}
		if k == "" {
			return nil, fmt.Errorf("--build-arg %q: empty name", kv)
		}
		args[k] = v
	}
	opts := []dockerfile.Option{dockerfile.WithTarget(target), dockerfile.WithBuildArgs(args)}
	if platform != "" {
		opts = append(opts, dockerfile.WithPlatform(platform))
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return dockerfile.ExportBase(f, path, opts...)
}

// statusSocketPath finds the daemon's status socket as the snapshotter
// status verb does: --status-socket, else the config's status_socket, else
// the snapshots socket (--socket, or the config's) with ".status".
func statusSocketPath(configPath, socket, statusSocket string) (string, error) {
	if statusSocket != "" {
		return statusSocket, nil
	}
	cfg, err := loadDaemonConfig(configPath)
	if err != nil {
		return "", err
	}
	if socket != "" {
		cfg.Socket = absPath(socket)
	}
	if cfg.StatusSocket != "" {
		return cfg.StatusSocket, nil
	}
	return cfg.Socket + ".status", nil
}

// guardProgress prints each layer's state changes.
type guardProgress struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
}

func (p *guardProgress) layer(l lazypull.GuardLayerStatus) {
	p.mu.Lock()
	defer p.mu.Unlock()
	size := ""
	if l.Size >= 0 {
		size = " (" + sizeOrUnknown(l.Size) + ")"
	}
	msg := ""
	if l.Error != "" {
		msg = ": " + l.Error
	}
	fmt.Fprintf(p.w, "%6.1fs %s %s%s %s%s\n", time.Since(p.start).Seconds(), l.Image, layerShort(l.Layer), size, l.State, msg)
}

package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/dockerfile"
)

// guardFlags are the flags of lazybase guard.
type guardFlags struct {
	configPath, socket, statusSocket string
	namespace, dfPath, target        string
	platform                         string
	buildArgs                        []string
	timeout                          time.Duration
}

func newGuardCmd() *cobra.Command {
	var g guardFlags
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
			refs, err := g.images(cmd, args)
			if err != nil || len(refs) == 0 {
				return err
			}
			path, err := statusSocketPath(g.configPath, g.socket, g.statusSocket)
			if err != nil {
				return err
			}
			return waitGuard(cmd.Context(), cmd.ErrOrStderr(), path,
				exportguard.BarrierRequest{Namespace: g.namespace, Images: refs, Timeout: g.timeout})
		},
	}
	f := cmd.Flags()
	f.StringVar(&g.configPath, "config", "", "the daemon's configuration file (default $"+configEnv+")")
	f.StringVar(&g.socket, "socket", "", "the daemon's snapshots socket")
	f.StringVar(&g.statusSocket, "status-socket", "", "the daemon's status socket")
	f.StringVar(&g.namespace, "namespace", "buildkit", "containerd namespace of the builder")
	f.DurationVar(&g.timeout, "timeout", 10*time.Minute, "give up after this long (0: no limit)")
	f.StringVar(&g.dfPath, "dockerfile", "", "guard the base image of this Dockerfile's exported stage")
	f.StringVar(&g.target, "target", "", "the exported stage of --dockerfile (default: the last)")
	f.StringArrayVar(&g.buildArgs, "build-arg", nil, "build argument KEY=VALUE for --dockerfile (repeatable)")
	f.StringVar(&g.platform, "platform", "", "build and target platform --dockerfile's platform arguments expand to (default linux on this architecture)")
	return cmd
}

// images returns the images to guard: args, and the base image of
// --dockerfile's exported stage. Nothing to guard is an error only without
// --dockerfile (a stage FROM scratch has no base).
func (g *guardFlags) images(cmd *cobra.Command, args []string) ([]string, error) {
	refs := append([]string(nil), args...)
	if g.dfPath == "" {
		if cmd.Flags().Changed("target") || len(g.buildArgs) > 0 || g.platform != "" {
			return nil, errors.New("--target, --build-arg and --platform need --dockerfile")
		}
		if len(refs) == 0 {
			return nil, errors.New("no image: give image references or --dockerfile")
		}
		return refs, nil
	}
	opts := []dockerfile.Option{dockerfile.WithTarget(g.target), dockerfile.WithBuildArgList(g.buildArgs, os.LookupEnv)}
	if g.platform != "" {
		opts = append(opts, dockerfile.WithPlatform(g.platform))
	}
	base, err := dockerfile.ExportBaseFile(g.dfPath, opts...)
	if err != nil {
		return nil, err
	}
	printBase(cmd.ErrOrStderr(), g.dfPath, base)
	if base.Image != "" {
		refs = append(refs, base.Image)
	}
	return refs, nil
}

// printBase says which image the Dockerfile at path is built on.
func printBase(w io.Writer, path string, base *dockerfile.Base) {
	if base.Image == "" {
		fmt.Fprintf(w, "%s: stage %s is FROM scratch: no base image to guard\n", path, base.Target)
		return
	}
	fmt.Fprintf(w, "%s: stage %s is built on %s (line %d)\n", path, base.Target, base.Image, base.Line)
}

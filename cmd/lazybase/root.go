package main

import (
	"fmt"
	"os"

	"github.com/containerd/log"
	"github.com/spf13/cobra"
)

func newRootCmd() *cobra.Command {
	var level string
	root := &cobra.Command{
		Use:           "lazybase",
		Short:         "Make container builds stop paying for base images they barely read",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, args []string) error {
			if err := log.SetLevel(level); err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			log.L.Logger.SetOutput(cmd.ErrOrStderr())
			return nil
		},
	}
	root.PersistentFlags().StringVar(&level, "log-level", "info", "log level: trace, debug, info, warn or error (trace also logs every FUSE request of the snapshotter daemon)")
	root.AddCommand(
		newVersionCmd(),
		newConvertCmd(),
		newDemoCmd(),
		newSnapshotterCmd(),
		newMirrorCmd(),
		newPrefetchCmd(),
		newGuardCmd(),
	)
	// Errors go to stderr once, prefixed like other container tools.
	root.SetErr(os.Stderr)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return fmt.Errorf("%w\nRun '%s --help' for usage", err, c.CommandPath())
	})
	return root
}

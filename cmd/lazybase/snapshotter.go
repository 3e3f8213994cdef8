package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/internal/cpuacct"
	"github.com/lazybase/lazybase/lazypull"
)

// configEnv names the configuration file when --config is not given.
const configEnv = "LAZYBASE_SNAPSHOTTER_CONFIG"

func newSnapshotterCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshotter",
		Short: "Serve lazily mounted eStargz base images to containerd (proxy snapshotter \"stargz\")",
		Long: `Serve containerd's snapshots gRPC API on a unix socket as a proxy
snapshotter. eStargz layers are mounted lazily over FUSE; layers that are not
eStargz, and images that policy marks eager, are pulled normally.

The configuration file is TOML (deploy/containerd/lazybase.defaults.toml
documents every key with its default, deploy/containerd/lazybase.toml is an
example): --config, else $LAZYBASE_SNAPSHOTTER_CONFIG; without either the
defaults apply. --root, --address and --metrics-address override the file's
root, socket and metrics_address, and --log-level overrides its log_level
when given (trace also logs every FUSE request). SIGTERM or SIGINT stops
the daemon and unmounts every lazy mount.

One daemon owns a root and a socket: a second daemon on either fails to
start, naming it; a socket left by a daemon that died is replaced. The TCP
--metrics-address serves /metrics only; status, export guard and barrier are
served on the status unix socket alone.

Register it in containerd as proxy_plugins.stargz (deploy/containerd/).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := snapshotterConfig(cmd)
			if err != nil {
				return err
			}
			if err := log.SetLevel(cfg.LogLevel); err != nil {
				return fmt.Errorf("log_level: %w", err)
			}
			ctx := cmd.Context()
			d, err := lazypull.NewDaemon(ctx, cfg)
			if err != nil {
				return err
			}
			return d.Serve(ctx)
		},
	}
	f := cmd.Flags()
	f.String("config", "", "configuration file (TOML; default $"+configEnv+")")
	f.String("root", "", "root directory (overrides root)")
	f.String("address", "", "unix socket of the snapshots API (overrides socket)")
	f.String("metrics-address", "", "host:port serving /metrics only (overrides metrics_address)")
	cmd.AddCommand(newSnapshotterStatusCmd())
	return cmd
}

// snapshotterConfig returns the daemon's configuration from the parsed
// flags of the snapshotter verb: the file (--config, else $configEnv, else
// the defaults) with --root, --address, --metrics-address and the root's
// --log-level applied over it, validated. --log-level trace thereby also
// turns on the FUSE request tracing that log_level = "trace" turns on.
func snapshotterConfig(cmd *cobra.Command) (lazypull.Config, error) {
	f := cmd.Flags()
	flag := func(name string) string { return f.Lookup(name).Value.String() }
	cfg, err := loadDaemonConfig(flag("config"))
	if err != nil {
		return lazypull.Config{}, err
	}
	if f.Changed("root") {
		cfg.Root = absPath(flag("root"))
	}
	if f.Changed("address") {
		cfg.Socket = absPath(flag("address"))
	}
	if f.Changed("metrics-address") {
		cfg.MetricsAddress = flag("metrics-address")
	}
	if f.Changed("log-level") {
		cfg.LogLevel = flag("log-level")
	}
	if err := cfg.Validate(); err != nil {
		return lazypull.Config{}, err
	}
	return cfg, nil
}

// loadDaemonConfig loads the daemon's configuration file: path, else
// $configEnv; without either it returns the defaults.
func loadDaemonConfig(path string) (lazypull.Config, error) {
	if path == "" {
		path = os.Getenv(configEnv)
	}
	if path == "" {
		return lazypull.DefaultConfig(), nil
	}
	return lazypull.LoadConfig(path)
}

// absPath makes a flag's path absolute; an empty path stays empty so that
// validation names it.
func absPath(p string) string {
	if p == "" {
		return p
	}
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

func newSnapshotterStatusCmd() *cobra.Command {
	var configPath, socket, statusSocket string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "List the layers the snapshotter has mounted lazily, with fetched percentages",
		Long: `List the layers a running lazybase snapshotter has mounted lazily: image,
layer digest, policy mode, bytes fetched so far (on demand, prefetch and
background) against the layer's size, whether it is unpacked locally, and
when it was mounted. Then the daemon's CPU and I/O account since it
started: CPU seconds by activity (guard, hashing, local_unpack,
background_fetch, on_demand, toc, and fuse_and_other, the rest of the
process's CPU time), registry bytes by activity and bytes written. While a
restarted daemon restores the lazy mounts of the previous one, a last line
says how many are left and which failed.

The daemon is found through its status socket: --status-socket, else the
status_socket of --config, else the snapshots socket (--socket, or the
config's socket) with ".status" appended.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			path, err := statusSocketPath(configPath, socket, statusSocket)
			if err != nil {
				return err
			}
			st, err := lazypull.FetchStatus(cmd.Context(), path)
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "IMAGE\tLAYER\tMODE\tFETCHED\tSIZE\tPERCENT\tLOCAL\tMOUNTED")
			for _, l := range st.Layers {
				pct := "unknown"
				if l.FetchedPercent >= 0 {
					pct = fmt.Sprintf("%.1f%%", l.FetchedPercent)
				}
				local := "no"
				if l.LocalDir != "" {
					local = "yes"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", l.Image, layerShort(l.Layer), l.Mode,
					sizeOrUnknown(l.FetchedBytes), sizeOrUnknown(l.Size), pct, local, l.MountedAt.Format(time.RFC3339))
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if a := st.Account; a != nil {
				printAccount(out, a)
			}
			printProfiles(out, st.Profiles)
			if r := st.Restore; r != nil {
				fmt.Fprintf(out, "restoring the previous daemon's lazy mounts: %d left, %d failed\n", r.Pending, len(r.Failed))
				for _, f := range r.Failed {
					fmt.Fprintf(out, "  %s %s: %s\n", f.Image, layerShort(f.Layer), f.Error)
				}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&configPath, "config", "", "the daemon's configuration file")
	f.StringVar(&socket, "socket", "", "the daemon's snapshots socket")
	f.StringVar(&statusSocket, "status-socket", "", "the daemon's status socket")
	f.BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// printAccount prints the daemon's CPU and I/O account: one line of CPU
// seconds, one of registry bytes, one of bytes written, by activity.
func printAccount(out io.Writer, a *lazypull.Account) {
	acts := cpuacct.Activities()
	var cpu, fetched, written []string
	for _, act := range acts {
		n := act.String()
		cpu = append(cpu, fmt.Sprintf("%s %.2f", n, a.CPUSeconds[n]))
		if b, ok := a.RegistryBytes[n]; ok {
			fetched = append(fetched, fmt.Sprintf("%s %s", n, sizeOrUnknown(b)))
		}
		if b, ok := a.DiskWrittenBytes[n]; ok {
			written = append(written, fmt.Sprintf("%s %s", n, sizeOrUnknown(b)))
		}
	}
	cpu = append(cpu, fmt.Sprintf("%s %.2f", cpuacct.Other, a.CPUSeconds[cpuacct.Other]))
	fetched = append(fetched, fmt.Sprintf("%s %s", cpuacct.OtherBytes, sizeOrUnknown(a.RegistryBytes[cpuacct.OtherBytes])))
	fmt.Fprintf(out, "cpu seconds (process %.2f, of which Go GC %.2f): %s\n", a.ProcessCPUSeconds, a.GoGCCPUSeconds, strings.Join(cpu, ", "))
	fmt.Fprintf(out, "registry bytes: %s\n", strings.Join(fetched, ", "))
	fmt.Fprintf(out, "disk bytes written: %s\n", strings.Join(written, ", "))
}

func sizeOrUnknown(n int64) string {
	if n < 0 {
		return "unknown"
	}
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// layerShort shortens a layer digest for the table ("sha256:" and 12 hex).
func layerShort(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

// printProfiles prints a line per image whose prefetch profile the daemon
// publishes: records pending and the last publish.
func printProfiles(out io.Writer, profiles []lazypull.ProfileStatus) {
	for _, p := range profiles {
		line := fmt.Sprintf("prefetch profile of %s: %d records pending, %d snapshots in use", p.Image, p.PendingRecords, p.InUse)
		switch p.LastResult {
		case "ok":
			line += fmt.Sprintf("; published %s (%d files) to %s at %s", layerShort(p.Artifact), p.Files, p.Host, p.LastAttempt.Format(time.RFC3339))
		case "failed":
			line += fmt.Sprintf("; publish to %s failed at %s: %s", p.Host, p.LastAttempt.Format(time.RFC3339), p.LastError)
		}
		fmt.Fprintln(out, line)
	}
}

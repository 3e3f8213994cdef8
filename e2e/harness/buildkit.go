package harness

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Buildkit is the Stack's buildkitd, with its containerd worker on the
// Stack's containerd in namespace "buildkit", or with its OCI worker
// (WithBuildkitOCI).
type Buildkit struct {
	// Address is buildkitd's gRPC address ("unix://...").
	Address string
	// Snapshotter is the containerd snapshotter the worker uses.
	Snapshotter string

	s    *Stack
	proc *process
}

// BuildkitNamespace is the containerd namespace of buildkitd's worker.
const BuildkitNamespace = "buildkit"

func (s *Stack) startBuildkit(ctx context.Context) (*Buildkit, error) {
	root := s.path("buildkit")
	if err := os.MkdirAll(root, 0o700); err != nil {
		return nil, err
	}
	sock := s.path("buildkitd.sock")
	cfg, snapshotter := s.buildkitConfig(root, sock)
	cfgPath := s.path("buildkitd.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return nil, err
	}
	p, err := s.spawn("buildkitd", s.bins.buildkitd, "--config", cfgPath)
	if err != nil {
		return nil, err
	}
	b := &Buildkit{Address: "unix://" + sock, Snapshotter: snapshotter, s: s, proc: p}
	err = waitFor(ctx, p, 60*time.Second, "buildkitd socket", func() error {
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return err
		}
		conn.Close()
		_, err = b.Buildctl(ctx, "debug", "workers")
		return err
	})
	if err != nil {
		return nil, err
	}
	return b, nil
}

// buildkitConfig returns buildkitd's configuration with its root and
// socket, and the snapshotter its worker uses.
func (s *Stack) buildkitConfig(root, sock string) (string, string) {
	snapshotter := "overlayfs"
	if s.opts.buildkitLazy {
		snapshotter = LazySnapshotterName
	}
	workers := fmt.Sprintf(`[worker.oci]
  enabled = false

[worker.containerd]
  enabled = true
  address = %q
  namespace = %q
  snapshotter = %q
  gc = false
  [worker.containerd.runtime]
    name = "io.containerd.runc.v2"
    options = { Root = %q }
`, s.Containerd.Address, BuildkitNamespace, snapshotter, s.path("containerd", "runc"))
	if s.opts.buildkitOCI != "" {
		// The OCI worker keeps its snapshots, content and runc state
		// under root.
		snapshotter = s.opts.buildkitOCI
		workers = fmt.Sprintf(`[worker.oci]
  enabled = true
  snapshotter = %q
  binary = %q
  networkMode = "host"
  gc = false

[worker.containerd]
  enabled = false
`, snapshotter, s.bins.runc)
	}
	cfg := fmt.Sprintf(`root = %q

[grpc]
  address = ["unix://%s"]

[otel]
  socketPath = %q

%s
[registry.%q]
  http = true
[registry.%q]
  http = true
%s%s`, root, sock, s.path("buildkit-otel.sock"), workers, s.Registry.Host(), s.Registry.Direct, s.buildkitRegistry2TOML(), s.buildkitMirrorTOML())
	return cfg, snapshotter
}

// Buildctl runs buildctl against this buildkitd and returns its standard
// output.
func (b *Buildkit) Buildctl(ctx context.Context, args ...string) (string, error) {
	return runCmd(ctx, b.s.env(), b.s.bins.buildctl, append([]string{"--addr", b.Address}, args...)...)
}

// BuildctlProgress runs buildctl against this buildkitd and returns its
// standard output and standard error, where `--progress=rawjson` writes
// the solve status.
func (b *Buildkit) BuildctlProgress(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, b.s.bins.buildctl, append([]string{"--addr", b.Address}, args...)...)
	cmd.Env = b.s.env()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		tail := errb.String()
		if len(tail) > 4000 {
			tail = tail[len(tail)-4000:]
		}
		return out.String(), errb.String(), fmt.Errorf("buildctl %s: %w: %s", strings.Join(args, " "), err, tail)
	}
	return out.String(), errb.String(), nil
}

// buildkitRegistry2TOML is buildkitd's [registry."host"] tables for the
// second registry (WithSecondRegistry): plain HTTP, at its proxy and
// directly; empty without it.
func (s *Stack) buildkitRegistry2TOML() string {
	if s.Registry2 == nil {
		return ""
	}
	return fmt.Sprintf("[registry.%q]\n  http = true\n[registry.%q]\n  http = true\n", s.Registry2.Host(), s.Registry2.Direct)
}

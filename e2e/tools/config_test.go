package tools

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/moby/buildkit/cmd/buildkitd/config"
	"github.com/pelletier/go-toml/v2"
)

// deployDir is the repository's deploy/ directory, seen from e2e/tools.
const deployDir = "../../deploy"

// The lazybase snapshotter's default socket (lazypull.DefaultConfig), which
// the OCI worker config names as its proxy snapshotter.
const snapshotterSocket = "/run/lazybase/snapshotter.sock"

// loadBuildkitd loads a buildkitd config with BuildKit's own loader, the one
// buildkitd runs at start, after checking that the file exists (LoadFile
// returns an empty config for a missing one) and that every key in it is
// one buildkitd knows (its loader ignores unknown keys, so a misspelt key
// would silently not apply).
func loadBuildkitd(t *testing.T, name string) config.Config {
	t.Helper()
	path := filepath.Join(deployDir, "buildkitd", name)
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.LoadFile(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	var strict config.Config
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&strict); err != nil {
		t.Errorf("%s: a key buildkitd does not know: %v", path, err)
	}
	return cfg
}

func enabled(b *bool) bool { return b != nil && *b }

func disabled(b *bool) bool { return b != nil && !*b }

// TestBuildkitdContainerdWorker: buildkitd.toml, the config the builder image
// and `docker buildx create --buildkitd-config` use, enables only the
// containerd worker, on the snapshotter "stargz" (the only name BuildKit
// passes lazy-pull labels to), at containerd's default socket.
func TestBuildkitdContainerdWorker(t *testing.T) {
	cfg := loadBuildkitd(t, "buildkitd.toml")
	w := cfg.Workers.Containerd
	if !enabled(w.Enabled) {
		t.Errorf("containerd worker enabled = %v, want true", w.Enabled)
	}
	if w.Snapshotter != "stargz" {
		t.Errorf("containerd worker snapshotter = %q, want stargz", w.Snapshotter)
	}
	if w.Address != "/run/containerd/containerd.sock" {
		t.Errorf("containerd worker address = %q", w.Address)
	}
	if w.Namespace == "" {
		t.Error("containerd worker namespace unset")
	}
	if len(w.Platforms) == 0 {
		t.Error("containerd worker platforms unset")
	}
	if !disabled(cfg.Workers.OCI.Enabled) {
		t.Errorf("OCI worker enabled = %v, want false", cfg.Workers.OCI.Enabled)
	}
}

// TestBuildkitdOCIWorker: buildkitd-oci.toml enables only the OCI worker, on
// the snapshotter "stargz" served by the lazybase daemon's socket through
// proxySnapshotterPath.
func TestBuildkitdOCIWorker(t *testing.T) {
	cfg := loadBuildkitd(t, "buildkitd-oci.toml")
	w := cfg.Workers.OCI
	if !enabled(w.Enabled) {
		t.Errorf("OCI worker enabled = %v, want true", w.Enabled)
	}
	if w.Snapshotter != "stargz" {
		t.Errorf("OCI worker snapshotter = %q, want stargz", w.Snapshotter)
	}
	if w.ProxySnapshotterPath != snapshotterSocket {
		t.Errorf("OCI worker proxySnapshotterPath = %q, want %s", w.ProxySnapshotterPath, snapshotterSocket)
	}
	if !disabled(cfg.Workers.Containerd.Enabled) {
		t.Errorf("containerd worker enabled = %v, want false", cfg.Workers.Containerd.Enabled)
	}
}

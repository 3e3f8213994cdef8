package prefetch

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoRegistryClientDependencies keeps the package a library of
// profiles: no FUSE, gRPC or ttrpc server, no CLI, no daemon and no
// registry host plumbing of its own (ResolveImage reads manifests through
// the ManifestSource its caller passes: the daemon's registry
// configuration lives in lazypull, which depends on prefetch, never the
// other way).
func TestNoRegistryClientDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	prefixes := []string{
		"google.golang.org/grpc",
		"github.com/hanwen/go-fuse/",
		"github.com/containerd/ttrpc",
		"github.com/containerd/containerd/",
		"github.com/containerd/stargz-snapshotter/",
		"github.com/spf13/cobra",
		"github.com/lazybase/lazybase/lazypull",
		"github.com/lazybase/lazybase/exportguard",
		"github.com/google/go-containerregistry/pkg/v1/remote",
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, p := range prefixes {
			if strings.HasPrefix(dep, p) {
				t.Errorf("prefetch depends on %s", dep)
			}
		}
	}
}

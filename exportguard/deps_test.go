package exportguard

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoServerDependencies keeps the package free of FUSE, gRPC and ttrpc
// servers, of the lazy filesystem, of the CLI and of the daemon (lazypull
// depends on exportguard, never the other way): the daemon wires the
// guard, the library does not.
func TestNoServerDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	// exact: packages that hold a server; prefix: whole module trees.
	exact := map[string]bool{"google.golang.org/grpc": true}
	prefixes := []string{
		"github.com/hanwen/go-fuse/",
		"github.com/containerd/ttrpc",
		"github.com/spf13/cobra",
		"github.com/lazybase/lazybase/lazypull",
	}
	for _, dep := range strings.Fields(string(out)) {
		if exact[dep] {
			t.Errorf("exportguard depends on %s", dep)
		}
		// The eStargz format module is fine (the Unpacker skips its
		// entries); the lazy filesystem and the snapshotter are not.
		if strings.HasPrefix(dep, "github.com/containerd/stargz-snapshotter/") &&
			!strings.HasPrefix(dep, "github.com/containerd/stargz-snapshotter/estargz") {
			t.Errorf("exportguard depends on %s", dep)
		}
		for _, p := range prefixes {
			if strings.HasPrefix(dep, p) {
				t.Errorf("exportguard depends on %s", dep)
			}
		}
	}
}

// TestDocsNameNoInternalPackage keeps the package's documentation usable
// from outside the module: no doc comment tells users to call or name
// something in an internal package. The two type aliases that export
// internal types under this package's name are the only lines allowed to
// spell one.
func TestDocsNameNoInternalPackage(t *testing.T) {
	out, err := exec.Command("go", "doc", "-all", ".").Output()
	if err != nil {
		t.Fatalf("go doc: %v", err)
	}
	allowed := map[string]bool{
		"type Timeouts = imageio.Timeouts":         true,
		"type TimeoutError = imageio.TimeoutError": true,
	}
	for _, line := range strings.Split(string(out), "\n") {
		l := strings.TrimSpace(line)
		if (strings.Contains(l, "imageio") || strings.Contains(l, "internal/")) && !allowed[l] {
			t.Errorf("go doc names an internal package: %q", l)
		}
	}
}

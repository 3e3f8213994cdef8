package exportguard

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoServerDependencies keeps the package free of FUSE, gRPC and ttrpc
// servers and of the CLI: the daemon wires the guard, the library does not.
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
		for _, p := range prefixes {
			if strings.HasPrefix(dep, p) {
				t.Errorf("exportguard depends on %s", dep)
			}
		}
	}
}

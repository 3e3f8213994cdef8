package toccheck_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestNoServerDependencies keeps the validator free of FUSE, gRPC, ttrpc,
// containerd and the daemon: it decodes and checks bytes, nothing more.
func TestNoServerDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, p := range []string{
			"google.golang.org/grpc",
			"github.com/hanwen/go-fuse/",
			"github.com/containerd/ttrpc",
			"github.com/containerd/containerd",
			"github.com/containerd/stargz-snapshotter/fs",
			"github.com/lazybase/lazybase/lazypull",
		} {
			if strings.HasPrefix(dep, p) {
				t.Errorf("toccheck depends on %s", dep)
			}
		}
	}
}

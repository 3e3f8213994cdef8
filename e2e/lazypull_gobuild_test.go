//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
)

// goBuildScript compiles a program with an empty build cache, so the
// compiler reads much of the toolchain: the local-read cost of a build
// step, as in the benchmark.
const goBuildScript = `set -e
mkdir -p /tmp/w && cd /tmp/w
cat > main.go <<'EOF'
package main

import (
	"fmt"
	"strconv"
)

func main() { fmt.Println("built", strconv.Itoa(200)) }
EOF
GOCACHE=/tmp/gocache GOTOOLCHAIN=local GOFLAGS=-buildvcs=false CGO_ENABLED=0 go build -o /tmp/hello main.go
/tmp/hello`

// TestLazypullGoBuildLocalReads measures a `go build` step on a lazily
// mounted golang-like base against the same step on the overlayfs full
// pull, in the same run. Each side runs the step once to warm every cache
// (for lazybase: to fetch what the build reads), then the measured run
// starts with the kernel's page cache dropped, so both read their base
// from local disk: overlayfs directly, lazybase through FUSE from its
// cache. FUSE passthrough is not measured here: with it on, the restarted
// daemon once stopped answering on its socket (see the lazypull issue).
func TestLazypullGoBuildLocalReads(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	cfgDir := t.TempDir()
	writeCfg := func(name, body string) string {
		p := filepath.Join(cfgDir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	plain := writeCfg("plain.toml", "[background_fetch]\nenable = false\n")
	t.Setenv("LAZYBASE_SNAPSHOTTER_CONFIG", plain)
	s := harness.Start(ctx, t, harness.WithLazySnapshotter(harness.Lazybase))
	publishAll(ctx, t, s)
	gzipRef, lazyRef := s.Registry.Ref(repoGolang, tagGzip), s.Registry.Ref(repoGolang, tagEStargz)
	if err := s.Containerd.Pull(ctx, gzipRef, ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Containerd.Pull(ctx, lazyRef, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}

	n := 0
	step := func(name, ref, snapshotter string, dropCaches bool) time.Duration {
		t.Helper()
		if dropCaches {
			if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
				t.Fatalf("dropping the page cache: %v", err)
			}
		}
		n++
		start := time.Now()
		out, err := s.Containerd.Run(ctx, ref, snapshotter, fmt.Sprintf("gobuild-%d", n), "sh", "-c", goBuildScript)
		took := time.Since(start)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !strings.Contains(out, "built 200") {
			t.Fatalf("%s: program printed %q", name, out)
		}
		t.Logf("%s: %s", name, took.Round(time.Millisecond))
		return took
	}

	step("overlayfs warm-up", gzipRef, "", false)
	overlay := step("overlayfs", gzipRef, "", true)
	lazyFirst := step("lazybase first (fetches)", lazyRef, harness.LazySnapshotterName, false)
	lazy := step("lazybase", lazyRef, harness.LazySnapshotterName, true)

	record(t, "gobuild-overlayfs", overlay)
	record(t, "gobuild-lazybase-first", lazyFirst)
	record(t, "gobuild-lazybase", lazy)
	t.Logf("BENCH go build step, page cache dropped: overlayfs %s, lazybase %s (%.2fx); first lazy run with fetches %s (target: within 1.10x of overlayfs: %s)",
		overlay.Round(time.Millisecond), lazy.Round(time.Millisecond), float64(lazy)/float64(overlay),
		lazyFirst.Round(time.Millisecond), verdict(float64(lazy) <= 1.10*float64(overlay)))
}

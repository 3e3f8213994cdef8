//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/lazypull"
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
// pull, in the same run and on the same daemon, two ways:
//
//   - "fuse": the eStargz image under the lazy-only policy, so every read
//     crosses FUSE for the whole run;
//   - "local": the same image (another repository and containerd
//     namespace, so it gets its own snapshots) under export-base: the
//     guard materializes its blobs at once and the daemon unpacks them
//     locally, so the measured container reads them through overlayfs.
//
// Each side runs the step once to warm every cache (for FUSE: to fetch
// what the build reads); then three interleaved rounds of measured runs,
// each with the kernel's page cache dropped, so all read their base from
// local disk; the figures are medians.
func TestLazypullGoBuildLocalReads(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	cfgDir := t.TempDir()
	const repoLocal, localNS = "ref/golang-local", "lzlocal"
	const repoShared, sharedNS = "ref/golang-shared", "lzshared"
	cfg := filepath.Join(cfgDir, "lazybase.toml")
	body := fmt.Sprintf(`[background_fetch]
enable = false
[local]
enable = true
[[policy]]
match = "*/%s:*"
mode = "lazy-only"
[[policy]]
match = "*/%s:*"
mode = "export-base"
[[policy]]
match = "*/%s:*"
mode = "export-base"
`, repoGolang, repoLocal, repoShared)
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_SNAPSHOTTER_CONFIG", cfg)
	s := harness.Start(ctx, t, harness.WithLazySnapshotter(harness.Lazybase))
	_, golang := publishAll(ctx, t, s)
	// The local variant has layers of its own (another gzip level: every
	// layer's bytes differ): with a layer in common, containerd would hand
	// its namespace the lazy-only image's snapshot of that layer (one per
	// chain for every namespace), and the daemon would unpack that one
	// too, as the shared-chain part below proves.
	localImg := convertedWith(ctx, t, golang.gzip, convert.WithCompressionLevel(convert.DefaultGzipLevel-1))
	if shared := sharedLayers(layerDigests(t, localImg), layerDigests(t, golang.estargz)); len(shared) > 0 {
		t.Fatalf("the local variant shares layers %v with %s", shared, repoGolang)
	}
	publish(ctx, t, s, repoLocal, tagEStargz, localImg)
	publish(ctx, t, s, repoShared, tagEStargz, golang.estargz)
	gzipRef, lazyRef := s.Registry.Ref(repoGolang, tagGzip), s.Registry.Ref(repoGolang, tagEStargz)
	localRef := s.Registry.Ref(repoLocal, tagEStargz)
	if err := s.Containerd.Pull(ctx, gzipRef, ""); err != nil {
		t.Fatal(err)
	}
	if err := s.Containerd.Pull(ctx, lazyRef, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}

	n := 0
	step := func(name, ns, ref, snapshotter string, dropCaches bool) time.Duration {
		t.Helper()
		if dropCaches {
			// Dirty pages (a fresh local unpack) are not dropped: write
			// them back first.
			unix.Sync()
			if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
				t.Fatalf("dropping the page cache: %v", err)
			}
		}
		n++
		args := append([]string{"run", "--rm"}, s.Containerd.RunArgs()...)
		if snapshotter != "" {
			args = append(args, "--snapshotter", snapshotter)
		}
		args = append(args, ref, fmt.Sprintf("gobuild-%d", n), "sh", "-c", goBuildScript)
		start := time.Now()
		out, err := s.Containerd.CtrNS(ctx, ns, args...)
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
	ns := s.Containerd.Namespace

	step("overlayfs warm-up", ns, gzipRef, "", false)
	fuseFirst := step("lazybase fuse first (fetches)", ns, lazyRef, harness.LazySnapshotterName, false)

	// The export-base image: guarded at once, then unpacked locally.
	pullStart := time.Now()
	if _, err := s.Containerd.CtrNS(ctx, localNS, "images", "pull", "--plain-http", "--snapshotter", harness.LazySnapshotterName, localRef); err != nil {
		t.Fatal(err)
	}
	statusPath := s.Snapshotter.Address + ".status"
	wantLayers := len(layerDigests(t, localImg))
	err := eventually.Wait(ctx, 5*time.Minute, func() error {
		st, err := lazypull.FetchStatus(ctx, statusPath)
		if err != nil {
			t.Fatal(err)
		}
		local := 0
		for _, l := range st.Layers {
			if strings.HasPrefix(l.Image, localRef) && l.LocalDir != "" {
				local++
			}
			if strings.HasPrefix(l.Image, lazyRef) && l.LocalDir != "" {
				t.Fatalf("lazy-only layer %s was unpacked locally", l.Layer)
			}
		}
		if local != wantLayers {
			return fmt.Errorf("%d of %d layers unpacked locally", local, wantLayers)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("local unpack of every layer of %s: %v\nstatus:\n%s\nthe snapshotter on its guard and unpacks:\n%s",
			localRef, err, statusLines(ctx, statusPath), s.Snapshotter.LogLines("export guard", "unpack", "lazybase-local", "layer mounted lazily", "unmount"))
	}
	unpacked := time.Since(pullStart)
	t.Logf("lazy pull, guard and local unpack of %s: %s", localRef, unpacked.Round(time.Millisecond))
	step("lazybase local warm-up", localNS, localRef, harness.LazySnapshotterName, false)

	// The measured runs, page cache dropped before each, interleaved so
	// that the machine's drift hits every side alike; medians of the rounds.
	const rounds = 3
	var overlays, fuses, locals []time.Duration
	for r := 1; r <= rounds; r++ {
		overlays = append(overlays, step(fmt.Sprintf("overlayfs #%d", r), ns, gzipRef, "", true))
		fuses = append(fuses, step(fmt.Sprintf("lazybase fuse #%d", r), ns, lazyRef, harness.LazySnapshotterName, true))
		locals = append(locals, step(fmt.Sprintf("lazybase local #%d", r), localNS, localRef, harness.LazySnapshotterName, true))
	}
	overlay, fuse, local := median(overlays), median(fuses), median(locals)

	record(t, "gobuild-overlayfs", overlay)
	record(t, "gobuild-lazybase-fuse-first", fuseFirst)
	record(t, "gobuild-lazybase-fuse", fuse)
	record(t, "gobuild-lazybase-local", local)
	record(t, "gobuild-local-unpack", unpacked)
	t.Logf("BENCH go build step, page cache dropped, medians of %d interleaved rounds: overlayfs %s; lazybase through FUSE (passthrough where supported) %s (%.2fx, target within 1.10x: %s); after local unpack %s (%.2fx: %s); first FUSE run with fetches %s; pull to unpacked %s",
		rounds, overlay.Round(time.Millisecond),
		fuse.Round(time.Millisecond), float64(fuse)/float64(overlay), verdict(float64(fuse) <= 1.10*float64(overlay)),
		local.Round(time.Millisecond), float64(local)/float64(overlay), verdict(float64(local) <= 1.10*float64(overlay)),
		fuseFirst.Round(time.Millisecond), unpacked.Round(time.Millisecond))

	sharedChain(ctx, t, s, s.Registry.Ref(repoShared, tagEStargz), lazyRef, sharedNS, layerDigests(t, golang.estargz), step)
}

// sharedChain pulls ref, an export-base image with the same layers as the
// lazy-only image lazyRef already mounted in another namespace, into
// namespace ns. containerd keeps one snapshot per chain for every
// namespace, so ns uses lazyRef's mounts: the daemon drops the duplicate
// mounts the pull made, guards the blobs in ns, and unpacks the shared
// mounts locally because an image that is not lazy-only uses them.
func sharedChain(ctx context.Context, t *testing.T, s *harness.Stack, ref, lazyRef, ns string, layers []string,
	step func(name, ns, ref, snapshotter string, dropCaches bool) time.Duration) {
	t.Helper()
	statusPath := s.Snapshotter.StatusSocket()
	before, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Containerd.CtrNS(ctx, ns, "images", "pull", "--plain-http", "--snapshotter", harness.LazySnapshotterName, ref); err != nil {
		t.Fatal(err)
	}
	after, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) {
		t.Errorf("FUSE mounts: %d before pulling %s into namespace %s, %d after; want no duplicate of the shared chain's mounts", len(before), ref, ns, len(after))
	}
	err = eventually.Wait(ctx, 3*time.Minute, func() error {
		gst, err := exportguard.FetchStatus(ctx, statusPath)
		if err != nil {
			t.Fatal(err)
		}
		materialized := 0
		for _, l := range gst.Layers {
			if l.Namespace == ns && l.State == exportguard.StateMaterialized {
				materialized++
			}
		}
		st, err := lazypull.FetchStatus(ctx, statusPath)
		if err != nil {
			t.Fatal(err)
		}
		local := 0
		for _, l := range st.Layers {
			if strings.HasPrefix(l.Image, lazyRef) && slices.Contains(layers, l.Layer) && l.LocalDir != "" {
				local++
			}
		}
		if materialized != len(layers) || local != len(layers) {
			return fmt.Errorf("%d of %d blobs materialized in %s, %d of %d shared mounts unpacked locally", materialized, len(layers), ns, local, len(layers))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("shared chain: %v\nstatus:\n%s\nthe snapshotter on its guard and unpacks:\n%s",
			err, statusLines(ctx, statusPath), s.Snapshotter.LogLines("export guard", "unpack", "duplicate", "layer mounted lazily"))
	}
	step("lazybase shared chain", ns, ref, harness.LazySnapshotterName, false)
}

// median returns the median of ds (the upper one of an even count).
func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// statusLines prints the daemon's status of every layer, a line each.
func statusLines(ctx context.Context, statusPath string) string {
	st, err := lazypull.FetchStatus(ctx, statusPath)
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, l := range st.Layers {
		fmt.Fprintf(&b, "  %s %s mode=%s mountpoint=%s local=%q\n", l.Image, l.Layer, l.Mode, l.Mountpoint, l.LocalDir)
	}
	gst, err := exportguard.FetchStatus(ctx, statusPath)
	if err != nil {
		return b.String() + err.Error()
	}
	for _, l := range gst.Layers {
		fmt.Fprintf(&b, "  guard %s %s %s state=%s err=%q\n", l.Namespace, l.Image, l.Layer, l.State, l.Error)
	}
	return b.String()
}

// sharedLayers returns the digests in both a and b.
func sharedLayers(a, b []string) []string {
	var out []string
	for _, d := range a {
		if slices.Contains(b, d) {
			out = append(out, d)
		}
	}
	return out
}

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
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
)

// diskConfig: the final stage's base is an export base, so the guard
// materializes its blobs at mount; the builder base stays lazy-only.
// guard.max_bytes keeps its default, 0.
var diskConfig = fmt.Sprintf(`[background_fetch]
enable = false
[guard]
enable = true
[[policy]]
match = "*/%s:*"
mode = "export-base"
[[policy]]
match = "*/%s:*"
mode = "lazy-only"
`, repoDebian, repoGolang)

// diskBuilds is how many build-and-push rounds TestDiskBounded runs.
const diskBuilds = 3

// TestDiskBounded is #15's bounded-disk proof on one stack: a few builds
// of the multi-stage Dockerfile on lazily mounted bases, with a different
// source each time, each pushed; while a build's snapshots exist its
// export fetches 0 bytes of the final base's blobs (the guard's copies
// serve it). Then the clean-up a user does, `buildctl prune --all` and
// removing the images: the guard's blobs go with the snapshots that
// referenced them (no lease of the daemon's is left), the snapshotter
// reclaims the directories of the removed snapshots, and the content
// store and the snapshotter root are each back within 10 % (or 16 MiB)
// of their size before the first build.
func TestDiskBounded(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(diskConfig),
	)
	debian, _ := publishAll(ctx, t, s)
	debianLayers := layerDigests(t, debian.estargz)
	p := s.Registry.Proxy

	root := s.Snapshotter.Root
	du := func(path string) int64 {
		n, err := harness.DiskUsage(path)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	startContent, startRoot := du(s.Containerd.ContentRoot()), du(root)
	t.Logf("start: content store %s, snapshotter root %s", mib(startContent), mib(startRoot))

	for round := 1; round <= diskBuilds; round++ {
		work := multiStageContext(t, s, tagEStargz)
		main := strings.Replace(helloMain, "lazybase e2e build", fmt.Sprintf("disk round %d", round), 1)
		if err := os.WriteFile(filepath.Join(work, "main.go"), []byte(main), 0o644); err != nil {
			t.Fatal(err)
		}
		common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
		p.SetPhase(fmt.Sprintf("build-%d", round))
		if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
			t.Fatalf("round %d build: %v\n%s", round, err, s.Logs(40))
		}
		waitMaterialized(ctx, t, s, debianLayers)
		phase := fmt.Sprintf("export-%d", round)
		p.SetPhase(phase)
		out := s.Registry.DirectRef("e2e/disk", fmt.Sprintf("round-%d", round))
		if _, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...); err != nil {
			t.Fatalf("round %d export: %v\n%s", round, err, s.Logs(40))
		}
		p.SetPhase("")
		export := p.StatsFor(phase)
		for _, d := range debianLayers {
			if n := export.Blob(d).Bytes; n != 0 {
				t.Errorf("round %d: the export fetched %d bytes of final base layer %s", round, n, d)
			}
		}
		t.Logf("round %d: content store %s, snapshotter root %s", round, mib(du(s.Containerd.ContentRoot())), mib(du(root)))
	}
	if leases := ctrLines(ctx, t, s, "leases", "ls", "-q"); contains(leases, exportguard.LeaseID) {
		t.Errorf("lease %s exists with guard.max_bytes = 0: %v", exportguard.LeaseID, leases)
	}

	// The clean-up.
	if _, err := s.Buildkit.Buildctl(ctx, "prune", "--all"); err != nil {
		t.Fatalf("buildctl prune --all: %v", err)
	}
	if refs := ctrLines(ctx, t, s, "images", "ls", "-q"); len(refs) > 0 {
		if _, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, append([]string{"images", "rm", "--sync"}, refs...)...); err != nil {
			t.Fatalf("removing buildkit's images: %v", err)
		}
	}
	// containerd collects the snapshots, then the blobs they referenced,
	// and calls the snapshotter's Cleanup, after the commands return.
	limit := func(start int64) int64 { return max(start+start/10, start+16<<20) }
	err := eventually.Wait(ctx, 2*time.Minute, func() error {
		c, r := du(s.Containerd.ContentRoot()), du(root)
		if c > limit(startContent) || r > limit(startRoot) {
			return fmt.Errorf("content store %s (start %s), snapshotter root %s (start %s)", mib(c), mib(startContent), mib(r), mib(startRoot))
		}
		return nil
	})
	endContent, endRoot := du(s.Containerd.ContentRoot()), du(root)
	t.Logf("after prune and images rm: content store %s (start %s), snapshotter root %s (start %s)",
		mib(endContent), mib(startContent), mib(endRoot), mib(startRoot))
	if err != nil {
		t.Errorf("disk not back near its start after the clean-up: %v\ncontent left:\n%s\nsnapshots left:\n%s",
			err, strings.Join(ctrLines(ctx, t, s, "content", "ls"), "\n"),
			strings.Join(ctrLines(ctx, t, s, "snapshots", "--snapshotter", harness.LazySnapshotterName, "ls"), "\n"))
	}
	content := strings.Join(ctrLines(ctx, t, s, "content", "ls", "-q"), " ")
	for _, d := range debianLayers {
		if strings.Contains(content, d) {
			t.Errorf("the guard's blob %s is still in the content store after the clean-up", d)
		}
	}
}

// waitMaterialized waits until the guard's status says every layer of
// layers is in the buildkit namespace's content store.
func waitMaterialized(ctx context.Context, t *testing.T, s *harness.Stack, layers []string) {
	t.Helper()
	statusSocket := s.Snapshotter.Address + ".status"
	err := eventually.Wait(ctx, 2*time.Minute, func() error {
		st, err := exportguard.FetchStatus(ctx, statusSocket)
		if err != nil {
			return err
		}
		done := map[string]bool{}
		for _, l := range st.Layers {
			if l.Namespace == harness.BuildkitNamespace && l.Materialized {
				done[l.Layer] = true
			}
		}
		for _, d := range layers {
			if !done[d] {
				return fmt.Errorf("layer %s not materialized", d)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("final base layers materialized: %v\n%s", err, s.Logs(40))
	}
}

// ctrLines runs ctr in buildkit's namespace and returns its non-empty
// output lines.
func ctrLines(ctx context.Context, t *testing.T, s *harness.Stack, args ...string) []string {
	t.Helper()
	out, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, args...)
	if err != nil {
		t.Fatalf("ctr %s: %v", strings.Join(args, " "), err)
	}
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.TrimSpace(l) != "" {
			lines = append(lines, l)
		}
	}
	return lines
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if strings.TrimSpace(x) == s {
			return true
		}
	}
	return false
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

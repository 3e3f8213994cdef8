//go:build e2e

package e2e

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/e2e/shaper"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
)

// concBuilds is how many builds TestConcurrentBuilds runs at once.
const concBuilds = 3

// Bounds of TestConcurrentBuilds' phases: a phase that does not end
// within its bound is a lock-up, and fails the test with the daemon logs.
const (
	concBuildBound  = 6 * time.Minute
	concGuardBound  = 2 * time.Minute
	concExportBound = 3 * time.Minute
)

// concBandwidth is the shaping proxy's bandwidth in the build phase.
const concBandwidth = 8 << 20

// concMessage is what the program of concurrent build i prints.
func concMessage(i int) string { return fmt.Sprintf("hello from concurrent build %d", i) }

// TestConcurrentBuilds is #15's concurrency proof on one stack: buildkitd
// on the lazybase snapshotter with its export guard, both eStargz bases
// export bases. concBuilds builds of the multi-stage Dockerfile, each with
// its own source, start at the same time, and with them a lazy `ctr images
// pull` and `ctr run` of the final base in a second containerd namespace
// (the stack's default one, "e2e"; the harness runs one buildkitd, whose
// worker has the namespace "buildkit"), over a slow link until the
// guard's status shows the final base's layers pending in both namespaces
// at once, so that the namespaces meet on the same blobs. Then the guard
// must hold every base layer in both namespaces, and the builds push,
// again all at once.
//
// It asserts: every phase ends within its bound (no lock-up); each base
// blob crossed the network whole once (one guard transfer, counted as
// full GETs at the shaping proxy, whatever the number of builds and
// namespaces; the lazy filesystem's ranged reads are counted apart); the
// pushes fetch no blob byte; the content store holds each base blob once,
// listed in both namespaces, with no ingest left; the guard's status says
// every layer is materialized in both namespaces; no lease of a guard
// transfer is left; each pushed image has the final base's layers and its
// own, and runs its own program.
func TestConcurrentBuilds(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(guardConfig("export-base", "export-base")),
	)
	debian, golang := publishAll(ctx, t, s)
	debianLayers := layerDigests(t, debian.estargz)
	sizes := layerSizes(t, golang.estargz)
	for d, n := range layerSizes(t, debian.estargz) {
		sizes[d] = n
	}
	bases := make([]string, 0, len(sizes))
	for d := range sizes {
		bases = append(bases, d)
	}
	sort.Strings(bases)
	otherNS := s.Containerd.Namespace
	baseRef := s.Registry.Ref(repoDebian, tagEStargz)
	p := s.Registry.Proxy

	commons := make([][]string, concBuilds)
	for i := range commons {
		work := multiStageContext(t, s, tagEStargz)
		// buildctl gives every session the same shared key, so BuildKit
		// syncs each build's "context" into one cached copy and skips
		// files whose size and mtime match what it holds: sources
		// written in the same instant need different sizes, or a build
		// may compile another one's main.go.
		main := strings.Replace(helloMain, "hello from the lazybase e2e build", concMessage(i), 1) +
			"// " + strings.Repeat("x", i) + "\n"
		if err := os.WriteFile(filepath.Join(work, "main.go"), []byte(main), 0o644); err != nil {
			t.Fatal(err)
		}
		commons[i] = []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	}

	// Build phase: the builds and the second namespace's pull and run, at
	// once; then the guard's transfers end.
	p.SetPhase("build")
	jobs := map[string]func(context.Context) error{
		"pull-and-run-" + otherNS: func(ctx context.Context) error {
			if err := s.Containerd.Pull(ctx, baseRef, harness.LazySnapshotterName); err != nil {
				return fmt.Errorf("lazy pull of %s in namespace %s: %w", baseRef, otherNS, err)
			}
			out, err := s.Containerd.Run(ctx, baseRef, harness.LazySnapshotterName, "conc-base", "cat", "/etc/debian_version")
			if err != nil {
				return fmt.Errorf("running %s in namespace %s: %w", baseRef, otherNS, err)
			}
			if strings.TrimSpace(out) == "" {
				return fmt.Errorf("running %s in namespace %s: /etc/debian_version is empty", baseRef, otherNS)
			}
			return nil
		},
	}
	for i, common := range commons {
		jobs[fmt.Sprintf("build-%d", i)] = func(ctx context.Context) error {
			_, err := s.Buildkit.Buildctl(ctx, common...)
			return err
		}
	}
	// A slow link keeps the guard's first transfer of each final base
	// layer running while the other namespace mounts it: the namespaces
	// meet on the same blob, which the status sampler shows; once they
	// have met on every layer, the link is fast again.
	p.SetBandwidth(concBandwidth)
	stopSampling := sampleOverlap(ctx, s, harness.BuildkitNamespace, otherNS, debianLayers, func() { p.SetBandwidth(0) })
	start := time.Now()
	concurrently(ctx, t, s, "build", concBuildBound, jobs)
	record(t, "concurrent-builds", time.Since(start))
	p.SetBandwidth(0)
	overlap := stopSampling()
	t.Logf("final base layers both namespaces waited for at once: %d of %d", len(overlap), len(debianLayers))
	if len(overlap) == 0 {
		t.Errorf("no final base layer was pending in both namespaces at once: the test did not make them meet")
	}
	start = time.Now()
	want := map[string][]string{harness.BuildkitNamespace: bases, otherNS: debianLayers}
	var states map[string]map[string]exportguard.LayerStatus
	err := eventually.Wait(ctx, concGuardBound, func() error {
		var err error
		states, err = guardStatesByNS(ctx, s)
		if err != nil {
			return err
		}
		for ns, layers := range want {
			for _, d := range layers {
				l := states[ns][d]
				if l.State == exportguard.StateFailed {
					return fmt.Errorf("namespace %s layer %s: guard failed: %s", ns, d, l.Error)
				}
				if !l.Materialized {
					return fmt.Errorf("namespace %s layer %s not materialized (state %q)", ns, d, l.State)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("guard after the concurrent builds (bound %s): %v\nstatus: %+v\n%s", concGuardBound, err, states, s.Logs(60))
	}
	record(t, "concurrent-guard-wait", time.Since(start))

	// Export phase: the same builds push, at once.
	p.SetPhase("export")
	jobs = map[string]func(context.Context) error{}
	outs := make([]string, concBuilds)
	for i, common := range commons {
		outs[i] = s.Registry.DirectRef("e2e/concurrent", fmt.Sprintf("build-%d", i))
		args := append(append([]string(nil), common...), "--output", "type=image,name="+outs[i]+",push=true,registry.insecure=true")
		jobs[fmt.Sprintf("push-%d", i)] = func(ctx context.Context) error {
			_, err := s.Buildkit.Buildctl(ctx, args...)
			return err
		}
	}
	start = time.Now()
	concurrently(ctx, t, s, "export", concExportBound, jobs)
	record(t, "concurrent-pushes", time.Since(start))
	p.SetPhase("")

	// One transfer per blob: the guard's are the only whole-blob GETs.
	build, export := p.StatsFor("build"), p.StatsFor("export")
	full := fullGETBytes(p.Events(), "build")
	for _, d := range bases {
		b := build.Blob(d)
		t.Logf("base layer %s (%d bytes): build phase %d full GETs (%d bytes), %d ranged GETs (%d bytes, %d distinct); export phase %d bytes",
			d, sizes[d], b.FullGETs, full[d], b.RangeGETs, b.Bytes-full[d], rangedCovered(p.Events(), "build", d), export.Blob(d).Bytes)
		if b.FullGETs != 1 || full[d] != sizes[d] {
			t.Errorf("base layer %s: %d whole-blob GETs, %d bytes, in the build phase; want one transfer of %d bytes for %d builds and 2 namespaces",
				d, b.FullGETs, full[d], sizes[d], concBuilds)
		}
		if n := export.Blob(d).Bytes; n != 0 {
			t.Errorf("base layer %s: the concurrent pushes fetched %d bytes", d, n)
		}
	}
	if n := export.BlobBytes(); n != 0 {
		t.Errorf("the concurrent pushes fetched %d blob bytes from the registry: %v", n, export.Fetched())
	}

	// One copy in the content store, seen from both namespaces; no ingest
	// left behind.
	for ns, layers := range want {
		out, err := s.Containerd.CtrNS(ctx, ns, "content", "ls", "-q")
		if err != nil {
			t.Fatal(err)
		}
		have := map[string]bool{}
		for _, l := range strings.Fields(out) {
			have[l] = true
		}
		for _, d := range layers {
			if !have[d] {
				t.Errorf("namespace %s: base layer %s is not in its content store", ns, d)
			}
		}
		active, err := s.Containerd.CtrNS(ctx, ns, "content", "active")
		if err != nil {
			t.Fatal(err)
		}
		if lines := nonEmptyLines(active); len(lines) > 1 { // a header line
			t.Errorf("namespace %s: ingests left in the content store:\n%s", ns, active)
		}
	}
	for _, d := range bases {
		blob := filepath.Join(s.Containerd.ContentRoot(), "blobs", "sha256", strings.TrimPrefix(d, "sha256:"))
		if fi, err := os.Stat(blob); err != nil || fi.Size() != sizes[d] {
			t.Errorf("content store blob %s: %v (want %d bytes)", blob, err, sizes[d])
		}
	}
	if ingests, err := os.ReadDir(filepath.Join(s.Containerd.ContentRoot(), "ingest")); err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	} else if len(ingests) > 0 {
		t.Errorf("%d ingest directories left under the content store", len(ingests))
	}

	// Leases: the guard's transfers leave none behind.
	for _, ns := range []string{harness.BuildkitNamespace, otherNS} {
		out, err := s.Containerd.CtrNS(ctx, ns, "leases", "ls", "-q")
		if err != nil {
			t.Fatal(err)
		}
		ids := strings.Fields(out)
		t.Logf("namespace %s: %d leases", ns, len(ids))
		for _, id := range ids {
			if strings.HasPrefix(id, "exportguard-") {
				t.Errorf("namespace %s: guard transfer lease %s left", ns, id)
			}
			if ns == otherNS && id != exportguard.LeaseID {
				t.Errorf("namespace %s: lease %s left after the pull and run", ns, id)
			}
		}
	}

	// The pushed images: the final base's layers and one of their own,
	// each running its own program; pulled into the second namespace, whose
	// content store has the base blobs already.
	m := p.Mark()
	for i, ref := range outs {
		img, err := remote.Image(mustRef(t, ref), remote.WithContext(ctx))
		if err != nil {
			t.Errorf("pushed image %s: %v", ref, err)
			continue
		}
		pushed := layerDigests(t, img)
		if len(pushed) != len(debianLayers)+1 {
			t.Errorf("pushed image %s has %d layers, want the final base's %d and one more", ref, len(pushed), len(debianLayers))
			continue
		}
		for j, d := range debianLayers {
			if pushed[j] != d {
				t.Errorf("pushed image %s: layer %d is %s, want the base's %s", ref, j, pushed[j], d)
			}
		}
		if err := s.Containerd.Pull(ctx, ref, ""); err != nil {
			t.Errorf("pulling %s: %v", ref, err)
			continue
		}
		out, err := s.Containerd.Run(ctx, ref, "", fmt.Sprintf("conc-push-%d", i))
		if err != nil {
			t.Errorf("running %s: %v", ref, err)
		} else if got := strings.TrimSpace(out); got != concMessage(i) {
			t.Errorf("running %s printed %q, want %q", ref, got, concMessage(i))
		}
	}
	if n := p.Since(m).BlobBytes(); n != 0 {
		t.Errorf("checking the pushed images fetched %d blob bytes through the proxy", n)
	}
}

// concurrently runs jobs at once and waits for all of them, at most bound:
// a job that fails fails the test; one still running when bound ends is a
// lock-up, and fails the test with the daemon logs.
func concurrently(ctx context.Context, t *testing.T, s *harness.Stack, phase string, bound time.Duration, jobs map[string]func(context.Context) error) {
	t.Helper()
	jctx, cancel := context.WithTimeout(ctx, bound)
	defer cancel()
	var (
		mu    sync.Mutex
		errs  []error
		times = map[string]time.Duration{}
		wg    sync.WaitGroup
	)
	start := time.Now()
	for name, job := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := job(jctx)
			mu.Lock()
			defer mu.Unlock()
			times[name] = time.Since(start)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
			}
		}()
	}
	wg.Wait()
	names := make([]string, 0, len(times))
	for n := range times {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		t.Logf("%s phase: %s done after %s", phase, n, times[n].Round(time.Millisecond))
	}
	if jctx.Err() != nil && ctx.Err() == nil {
		t.Fatalf("%s phase: not done within %s (lock-up): %v\n%s", phase, bound, errors.Join(errs...), s.Logs(80))
	}
	if len(errs) > 0 {
		t.Fatalf("%s phase: %v\n%s", phase, errors.Join(errs...), s.Logs(60))
	}
}

// sampleOverlap polls the guard's status until the returned function is
// called, which returns the layers that were pending (scheduled or
// materializing) in namespaces a and b at the same time. It calls met
// once every layer of want was.
func sampleOverlap(ctx context.Context, s *harness.Stack, a, b string, want []string, met func()) func() map[string]bool {
	stop, done := make(chan struct{}), make(chan struct{})
	overlap := map[string]bool{}
	pending := func(l exportguard.LayerStatus) bool {
		return l.State == exportguard.StateScheduled || l.State == exportguard.StateMaterializing
	}
	go func() {
		defer close(done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			if states, err := guardStatesByNS(ctx, s); err == nil {
				for d, l := range states[a] {
					if pending(l) && pending(states[b][d]) && !overlap[d] {
						overlap[d] = true
						if all(want, overlap) {
							met()
						}
					}
				}
			}
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return func() map[string]bool {
		close(stop)
		<-done
		return overlap
	}
}

// guardStatesByNS returns the guard's state of each layer by namespace.
func guardStatesByNS(ctx context.Context, s *harness.Stack) (map[string]map[string]exportguard.LayerStatus, error) {
	st, err := exportguard.FetchStatus(ctx, s.Snapshotter.StatusSocket())
	if err != nil {
		return nil, err
	}
	out := map[string]map[string]exportguard.LayerStatus{}
	for _, l := range st.Layers {
		if out[l.Namespace] == nil {
			out[l.Namespace] = map[string]exportguard.LayerStatus{}
		}
		out[l.Namespace][l.Layer] = l
	}
	return out, nil
}

// fullGETBytes returns, per blob digest, the body bytes of the GETs
// without a Range header (whole-blob transfers) recorded in phase.
func fullGETBytes(events []shaper.Event, phase string) map[string]int64 {
	out := map[string]int64{}
	for _, e := range events {
		if e.Phase == phase && e.Kind == shaper.KindBlob && e.Method == "GET" && e.Range == "" {
			out[e.Ref] += e.Bytes
		}
	}
	return out
}

// rangedCovered returns how many distinct bytes of blob dgst the ranged
// GETs of phase sent: what the lazy filesystem read on demand.
func rangedCovered(events []shaper.Event, phase, dgst string) int64 {
	var ranged []shaper.Event
	for _, e := range events {
		if e.Phase == phase && e.Ref == dgst && e.Method == "GET" && e.Range != "" {
			ranged = append(ranged, e)
		}
	}
	b := shaper.Summarize(ranged).Blob(dgst)
	return b.Covered()
}

// all reports whether every element of list is in set.
func all(list []string, set map[string]bool) bool {
	for _, x := range list {
		if !set[x] {
			return false
		}
	}
	return true
}

func nonEmptyLines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.TrimSpace(l) != "" {
			out = append(out, l)
		}
	}
	return out
}

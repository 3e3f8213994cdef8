//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
)

// TestLazyPullSmoke pulls the eStargz golang-like image through the lazy
// snapshotter: no layer blob lands in the content store, each layer is a
// FUSE mount, `go version` runs, and only part of the Go layer is fetched.
func TestLazyPullSmoke(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(""),
		// Without background fetch the snapshotter reads only what is used,
		// so the fetched share of the layer is a real measure.
		harness.WithStargzConfig("no_background_fetch = true"),
	)
	t.Logf("lazy snapshotter: %s", s.Snapshotter.Kind)
	_, golang := publishAll(ctx, t, s)
	ref := s.Registry.Ref(repoGolang, tagEStargz)
	layers := layerDigests(t, golang.estargz)
	sizes := layerSizes(t, golang.estargz)

	mark := s.Registry.Proxy.Mark()
	start := time.Now()
	if err := s.Containerd.Pull(ctx, ref, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}
	record(t, "lazy-pull", time.Since(start))

	content, err := s.Containerd.ContentDigests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range layers {
		if content[d] {
			t.Errorf("layer %s is in the content store: the pull was not lazy", d)
		}
	}
	mounts, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) < len(layers) {
		t.Errorf("%d FUSE mounts under %s, want at least %d (one per layer)", len(mounts), s.Snapshotter.Root, len(layers))
	}

	start = time.Now()
	out, err := s.Containerd.Run(ctx, ref, harness.LazySnapshotterName, "lazygo", "go", "version")
	if err != nil {
		t.Fatal(err)
	}
	record(t, "lazy-first-go-version", time.Since(start))
	if !strings.HasPrefix(strings.TrimSpace(out), "go version go1.") {
		t.Errorf("go version printed %q", out)
	}

	st := s.Registry.Proxy.Since(mark)
	var total, fetched int64
	for _, d := range layers {
		b := st.Blob(d)
		total += sizes[d]
		fetched += b.Covered()
		t.Logf("layer %s: %d of %d bytes fetched (%.1f%%) in %d range GETs, %d bytes repeated",
			d, b.Covered(), sizes[d], 100*st.Coverage(d, sizes[d]), b.RangeGETs, b.Repeated())
		if b.FullGETs != 0 {
			t.Errorf("layer %s fetched whole %d times", d, b.FullGETs)
		}
	}
	if fetched >= total {
		t.Errorf("fetched %d of %d layer bytes: everything, not lazily", fetched, total)
	}
}

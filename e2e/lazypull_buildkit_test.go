//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/lazypull"
)

// TestLazypullBuildkitMultiStage builds a multi-stage Dockerfile on
// buildkitd's containerd worker with the lazybase snapshotter: the builder
// stage is FROM the eStargz golang-like image. The build succeeds, the
// builder base is mounted lazily (FUSE mounts listed by the daemon's status
// under the image BuildKit named), and its layers are read by ranges only,
// never whole.
func TestLazypullBuildkitMultiStage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	// Both bases under lazy-only (the builder base's first layer is the
	// final base's): the export guard never copies their blobs, so every
	// byte fetched is one the build read. The guard has tests of its own.
	cfg := filepath.Join(t.TempDir(), "lazybase.toml")
	body := "[background_fetch]\nenable = false\n[[policy]]\nmatch = \"*/ref/*\"\nmode = \"lazy-only\"\n"
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_SNAPSHOTTER_CONFIG", cfg)
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
	)
	debian, golang := publishAll(ctx, t, s)
	golangRef := s.Registry.Ref(repoGolang, tagEStargz)
	debianRef := s.Registry.Ref(repoDebian, tagEStargz)
	debianLayers := layerDigests(t, debian.estargz)

	dir := multiStageContext(t, s, tagEStargz)
	p := s.Registry.Proxy
	p.SetPhase("build")
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, "build", "--frontend", "dockerfile.v0", "--local", "context="+dir, "--local", "dockerfile="+dir); err != nil {
		t.Fatal(err)
	}
	record(t, "lazybase-buildkit-build", time.Since(start))
	p.SetPhase("")

	status, err := lazypull.FetchStatus(ctx, s.Snapshotter.Address+".status")
	if err != nil {
		t.Fatal(err)
	}
	mounted := map[string]lazypull.LayerStatus{}
	for _, l := range status.Layers {
		mounted[l.Layer] = l
	}
	st := p.StatsFor("build")
	sizes := layerSizes(t, golang.estargz)
	for _, d := range layerDigests(t, golang.estargz) {
		l, ok := mounted[d]
		if !ok {
			t.Errorf("builder base layer %s is not mounted lazily; status: %+v", d, status.Layers)
			continue
		}
		// BuildKit names the image by tag and digest. A layer both bases
		// have is mounted once, for whichever stage prepared it first.
		want := []string{golangRef}
		if slices.Contains(debianLayers, d) {
			want = append(want, debianRef)
		}
		if !slices.ContainsFunc(want, func(ref string) bool { return l.Image == ref || strings.HasPrefix(l.Image, ref+"@sha256:") }) {
			t.Errorf("layer %s mounted for image %q, want one of %q", d, l.Image, want)
		}
		b := st.Blob(d)
		t.Logf("builder base layer %s: %d of %d bytes fetched during the build (%.1f%%) in %d GETs",
			d, b.Covered(), sizes[d], 100*st.Coverage(d, sizes[d]), b.GETs)
		if b.FullGETs != 0 {
			t.Errorf("builder base layer %s fetched whole %d times", d, b.FullGETs)
		}
	}
	mounts, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) < len(sizes) {
		t.Errorf("%d FUSE mounts, want at least %d", len(mounts), len(sizes))
	}
}

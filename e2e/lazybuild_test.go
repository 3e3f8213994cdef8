//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
)

// TestBuildkitLazyMultiStage runs the multi-stage build on buildkitd whose
// containerd worker uses the lazy snapshotter, FROM the eStargz images. The
// build runs twice: first without output (the build phase), then with an
// image push (the export phase, every step cached), so the proxy's phase
// marks tell what each fetched. The build phase must read the base layers
// by ranges only; what the export phase fetches is logged, since that is
// what the export guard exists to remove.
func TestBuildkitLazyMultiStage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(""),
		harness.WithStargzConfig("no_background_fetch = true"),
		harness.WithBuildkitLazy(),
	)
	debian, golang := publishAll(ctx, t, s)

	dir := multiStageContext(t, s, tagEStargz)
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + dir, "--local", "dockerfile=" + dir}
	p := s.Registry.Proxy

	p.SetPhase("build")
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
		t.Fatal(err)
	}
	record(t, "buildkit-lazy-build", time.Since(start))

	p.SetPhase("export")
	out := s.Registry.DirectRef("e2e/hello-lazy", "latest")
	start = time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...); err != nil {
		t.Fatal(err)
	}
	record(t, "buildkit-lazy-export-push", time.Since(start))
	p.SetPhase("")

	sizes := layerSizes(t, golang.estargz)
	for d, n := range layerSizes(t, debian.estargz) {
		sizes[d] = n
	}
	build, export := p.StatsFor("build"), p.StatsFor("export")
	for d, size := range sizes {
		b, e := build.Blob(d), export.Blob(d)
		t.Logf("base layer %s (%d bytes): build fetched %d (%.1f%%) in %d GETs; export fetched %d in %d GETs",
			d, size, b.Covered(), 100*build.Coverage(d, size), b.GETs, e.Bytes, e.GETs)
		if b.FullGETs != 0 {
			t.Errorf("base layer %s fetched whole %d times during the lazy build", d, b.FullGETs)
		}
	}
	t.Logf("export phase fetched %d blob bytes from the source registry", export.BlobBytes())

	ref := s.Registry.Ref("e2e/hello-lazy", "latest")
	if err := s.Containerd.Pull(ctx, ref, ""); err != nil {
		t.Fatal(err)
	}
	res, err := s.Containerd.Run(ctx, ref, "", "hello-lazy")
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(res) != "hello from the lazybase e2e build" {
		t.Errorf("built program printed %q", res)
	}
}

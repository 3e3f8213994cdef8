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

// unresolvableHost names the base images of the mirror scenario: it does
// not resolve, so every byte of them has to come from the mirror.
const unresolvableHost = "unresolvable.invalid"

// TestRegistryMirrorGuardExport is the whole-registry mirror set-up of
// docs/builder.md: the multi-stage build's bases are named by a host that
// does not resolve and mirrored to the harness registry, told to the
// lazybase daemon as [registry.mirrors] or as a hosts.toml directory
// (registry.config_path), and to buildkitd and containerd alike. The
// build mounts the bases lazily (the builder base stays mostly
// unfetched), the export guard materializes the final base through the
// mirror, and the export pushes the image with 0 base bytes fetched from
// the registry.
func TestRegistryMirrorGuardExport(t *testing.T) {
	for _, form := range []harness.MirrorForm{harness.MirrorsTable, harness.HostsToml} {
		t.Run(string(form), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
			defer cancel()
			mirrorGuardExport(ctx, t, form)
		})
	}
}

// mirrorGuardExport builds and exports on a stack whose lazybase daemon
// knows the mirror in the given form.
func mirrorGuardExport(ctx context.Context, t *testing.T, form harness.MirrorForm) {
	toml := fmt.Sprintf(`[background_fetch]
enable = false
[[policy]]
match = "%s/%s:*"
mode = "export-base"
[[policy]]
match = "%s/%s:*"
mode = "lazy-only"
`, unresolvableHost, repoDebian, unresolvableHost, repoGolang)
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(toml),
		harness.WithRegistryMirror(unresolvableHost, form),
	)
	debian, golang := publishAll(ctx, t, s)

	// The Dockerfile names the bases by the unresolvable host.
	work := multiStageContext(t, s, tagEStargz)
	df := filepath.Join(work, "Dockerfile")
	b, err := os.ReadFile(df)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(b), s.Registry.Host()+"/", unresolvableHost+"/")
	if strings.Contains(text, s.Registry.Host()) || !strings.Contains(text, "FROM "+unresolvableHost+"/") {
		t.Fatalf("Dockerfile does not name the bases by %s:\n%s", unresolvableHost, text)
	}
	if err := os.WriteFile(df, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	p := s.Registry.Proxy

	p.SetPhase("build")
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(60))
	}
	record(t, "mirror-"+string(form)+"-build", time.Since(start))

	debianLayers := layerDigests(t, debian.estargz)
	shared := map[string]bool{}
	for _, d := range debianLayers {
		shared[d] = true
	}
	builderOnly := map[string]int64{}
	for d, size := range layerSizes(t, golang.estargz) {
		if !shared[d] {
			builderOnly[d] = size
		}
	}
	if len(builderOnly) == 0 {
		t.Fatal("the golang-like image has no layer of its own")
	}

	// The guard materializes the final base's layers, which it can only
	// read through the mirror.
	statusSocket := s.Snapshotter.Address + ".status"
	var last []exportguard.LayerStatus
	err = eventually.Wait(ctx, 2*time.Minute, func() error {
		st, err := exportguard.FetchStatus(ctx, statusSocket)
		if err != nil {
			return err
		}
		last = st.Layers
		state := map[string]exportguard.LayerStatus{}
		for _, l := range st.Layers {
			if l.Namespace == harness.BuildkitNamespace {
				state[l.Layer] = l
			}
		}
		pending := 0
		for _, d := range debianLayers {
			l := state[d]
			if l.State == exportguard.StateFailed {
				return fmt.Errorf("guard failed on final base layer %s: %s", d, l.Error)
			}
			if !l.Materialized {
				pending++
			}
		}
		if pending > 0 {
			return fmt.Errorf("%d of %d final base layers not materialized", pending, len(debianLayers))
		}
		return nil
	})
	if err != nil {
		t.Fatalf("final base layers materialized: %v\n%+v\n%s", err, last, s.Logs(60))
	}
	for _, l := range last {
		if shared[l.Layer] && !strings.HasPrefix(l.Image, unresolvableHost+"/") {
			t.Errorf("guard layer %s is of image %q, want one named by %s", l.Layer, l.Image, unresolvableHost)
		}
	}

	build := p.StatsFor("build")
	for _, d := range debianLayers {
		if n := build.Blob(d).Bytes; n == 0 {
			t.Errorf("final base layer %s: nothing fetched from the mirror during the build", d)
		}
	}
	for d, size := range builderOnly {
		bs := build.Blob(d)
		t.Logf("builder base layer %s (%d bytes): build fetched %d (%.1f%%)", d, size, bs.Covered(), 100*build.Coverage(d, size))
		if bs.FullGETs != 0 || bs.Covered()*2 >= size {
			t.Errorf("lazy-only layer %s: %d of %d bytes fetched (%d whole GETs), want it mounted lazily", d, bs.Covered(), size, bs.FullGETs)
		}
	}

	p.SetPhase("export")
	out := s.Registry.DirectRef("e2e/hello-mirror", string(form))
	start = time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(60))
	}
	record(t, "mirror-"+string(form)+"-export", time.Since(start))
	p.SetPhase("")
	export := p.StatsFor("export")
	t.Logf("export phase: %d blob bytes fetched from the registry", export.BlobBytes())
	for d, size := range layerSizes(t, debian.estargz) {
		if e := export.Blob(d); e.Bytes != 0 {
			t.Errorf("final base layer %s (%d bytes): %d bytes fetched during the export", d, size, e.Bytes)
		}
	}

	requirePushedOnBase(ctx, t, out, debianLayers)
}

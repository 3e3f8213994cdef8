//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/exportguard"
)

// guardConfig is the lazybase daemon's configuration for the guard tests:
// no background fetch, so that only the guard fetches whole blobs; the
// debian-like image (the final stage's base) in mode debianMode, the
// golang-like one (the builder stage's) in golangMode; lazy images wait
// an hour, so that only the barrier can start them.
func guardConfig(debianMode, golangMode string) string {
	return fmt.Sprintf(`[background_fetch]
enable = false
[guard]
delay = "1h"
[[policy]]
match = "*/%s:*"
mode = %q
[[policy]]
match = "*/%s:*"
mode = %q
`, repoDebian, debianMode, repoGolang, golangMode)
}

// guardStates returns the guard's state of each layer in the buildkit
// namespace.
func guardStates(ctx context.Context, t *testing.T, s *harness.Stack) map[string]exportguard.LayerStatus {
	t.Helper()
	st, err := exportguard.FetchStatus(ctx, s.Snapshotter.StatusSocket())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]exportguard.LayerStatus{}
	for _, l := range st.Layers {
		if l.Namespace == harness.BuildkitNamespace {
			out[l.Layer] = l
		}
	}
	return out
}

// buildkitContent returns the digests in the buildkit namespace's content
// store.
func buildkitContent(ctx context.Context, t *testing.T, s *harness.Stack) map[string]bool {
	t.Helper()
	out, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "content", "ls", "-q")
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]bool{}
	for _, l := range strings.Fields(out) {
		m[l] = true
	}
	return m
}

// TestGuardBarrier: after a build on lazily mounted bases whose guard
// delay has not ended, `lazybase guard REF` starts the final base's
// layers at once and returns when their verified blobs are in the builder's
// content store; then the push fetches none of their bytes. Through the
// Dockerfile it finds the same base; a lazy-only base and an image the
// daemon never mounted fail clearly.
func TestGuardBarrier(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(guardConfig("lazy", "lazy-only")),
	)
	debian, _ := publishAll(ctx, t, s)
	work := multiStageContext(t, s, tagEStargz)
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	p := s.Registry.Proxy

	p.SetPhase("build")
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	record(t, "guard-barrier-build", time.Since(start))

	debianLayers := layerDigests(t, debian.estargz)
	sizes := layerSizes(t, debian.estargz)
	before := guardStates(ctx, t, s)
	for _, d := range debianLayers {
		t.Logf("after the build: final base layer %s (%d bytes): guard %s", d, sizes[d], before[d].State)
	}
	have := buildkitContent(ctx, t, s)
	waiting := 0
	for _, d := range debianLayers {
		if !have[d] {
			waiting++
		}
	}
	if waiting == 0 {
		t.Log("every final base blob was already in the content store (the lazy filesystem promoted them); the barrier has nothing to start")
	}

	sock := "--status-socket=" + s.Snapshotter.StatusSocket()
	debianRef := s.Registry.Ref(repoDebian, tagEStargz)
	p.SetPhase("barrier")
	start = time.Now()
	_, stderr, err := s.Lazybase(ctx, "guard", sock, "--timeout", "5m", debianRef)
	barrier := time.Since(start)
	if err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	record(t, "guard-barrier-wait", barrier)
	t.Logf("lazybase guard %s (%d of %d blobs not yet in the content store):\n%s", debianRef, waiting, len(debianLayers), stderr)
	have = buildkitContent(ctx, t, s)
	after := guardStates(ctx, t, s)
	for _, d := range debianLayers {
		if !have[d] {
			t.Errorf("final base layer %s not in the buildkit namespace's content store after the barrier", d)
		}
		if !after[d].Materialized {
			t.Errorf("final base layer %s: guard state %+v after the barrier", d, after[d])
		}
	}
	// The committed blob is the registry's, byte for byte.
	largest := debianLayers[0]
	for _, d := range debianLayers {
		if sizes[d] > sizes[largest] {
			largest = d
		}
	}
	blob, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "content", "get", largest)
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256([]byte(blob))
	if got := "sha256:" + hex.EncodeToString(sum[:]); got != largest || int64(len(blob)) != sizes[largest] {
		t.Errorf("content store blob %s: %d bytes with digest %s", largest, len(blob), got)
	}
	if st := p.StatsFor("barrier"); st.BlobBytes() > 0 {
		t.Logf("the barrier fetched %d blob bytes from the registry", st.BlobBytes())
	}

	// The Dockerfile leads to the same base; nothing left to fetch.
	df := filepath.Join(work, "Dockerfile")
	_, stderr, err = s.Lazybase(ctx, "guard", sock, "--dockerfile", df)
	if err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	if !strings.Contains(stderr, "is built on "+debianRef) {
		t.Errorf("lazybase guard --dockerfile did not find %s:\n%s", debianRef, stderr)
	}
	// The builder stage's base is lazy-only.
	_, _, err = s.Lazybase(ctx, "guard", sock, "--dockerfile", df, "--target", "build")
	if err == nil || !strings.Contains(err.Error(), "lazy-only policy") || !strings.Contains(err.Error(), "lazybase: image "+s.Registry.Ref(repoGolang, tagEStargz)) {
		t.Errorf("guard of the lazy-only builder base: %v", err)
	}
	// An image this daemon never mounted.
	gz := s.Registry.Ref(repoDebian, tagGzip)
	_, _, err = s.Lazybase(ctx, "guard", sock, gz)
	if err == nil || !strings.Contains(err.Error(), "lazybase: image "+gz+": not mounted by this daemon in namespace buildkit") {
		t.Errorf("guard of an image never mounted: %v", err)
	}

	// The push reads the final base's blobs from the content store.
	p.SetPhase("export")
	out := s.Registry.DirectRef("e2e/hello-barrier", "latest")
	start = time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	record(t, "guard-barrier-export-push", time.Since(start))
	p.SetPhase("")
	export := p.StatsFor("export")
	for _, d := range debianLayers {
		if e := export.Blob(d); e.Bytes != 0 {
			t.Errorf("final base layer %s: %d bytes fetched during the export", d, e.Bytes)
		}
	}
	ref, err := name.ParseReference(out)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	pushed := layerDigests(t, img)
	for i, d := range debianLayers {
		if i >= len(pushed) || pushed[i] != d {
			t.Errorf("pushed layers %v do not start with the lazy base's %v", pushed, debianLayers)
			break
		}
	}
}

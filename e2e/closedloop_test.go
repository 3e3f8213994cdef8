//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/lazypull"
	"github.com/lazybase/lazybase/mirror"
	"github.com/lazybase/lazybase/prefetch"
)

// closedLoopDockerfile builds the prefetch proof's program FROM base with
// BuildKit, as the proof's container does (proofBuild, proofEnv).
func closedLoopDockerfile(base string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "FROM %s\nWORKDIR /src\nCOPY go.mod main.go ./\n", base)
	for _, e := range proofEnv {
		fmt.Fprintf(&b, "ENV %s\n", e)
	}
	fmt.Fprintf(&b, "RUN %s\n", strings.Join(proofBuild[2:], " "))
	return b.String()
}

// closedLoopConfig is builder A's lazybase configuration: the proof's
// (no background fetch, no guard: what the build reads is what the lazy
// mounts serve) with publishing as by default but without waiting: a
// second after the build, no interval.
const closedLoopConfig = `[prefetch]
enable = true
[background_fetch]
enable = false
[guard]
enable = false
[profile]
publish = true
delay = "1s"
idle = "30s"
min_interval = "0s"
timeout = "30s"
`

// TestClosedLoopPrefetch is the closed prefetch loop of issue #16, end to
// end, with nobody running `lazybase prefetch record`:
//
//  1. `lazybase mirror` converts the gzip golang-like image into the
//     mirror (the same registry, another repository): no profile is
//     published yet, so the conversion has no prefetch landmark;
//  2. builder A (lazybase snapshotter, buildkitd on it) builds the
//     prefetch proof's program FROM the mirrored image, lazily; once the
//     build is over its daemon publishes what the lazy mounts served, as
//     a prefetch profile artifact referring to the mirrored manifest
//     (asserted: in the daemon's status, and as a referrer in the
//     registry, its profile naming the image's layers);
//  3. the mirror job runs again: it merges the published profile and
//     converts the base again, now with prefetch landmarks;
//  4. a new builder (fresh stack: registry, containerd, daemon, nothing
//     cached) runs the same build on the re-converted image, measured as
//     the prefetch proof measures it: at least 90% of the bytes the build
//     reads arrive through the prefetch, in a handful of requests.
func TestClosedLoopPrefetch(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for n, body := range map[string]string{"go.mod": "module proof\n\ngo 1.22\n", "main.go": proofProgram} {
		if err := os.WriteFile(filepath.Join(src, n), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, golang := referenceImages(t)

	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(closedLoopConfig),
	)
	const upstream = "upstream/golang"
	publish(ctx, t, s, upstream, "1.22", golang.gzip)
	mcfg := mirrorConfig(t, s, dir, "mirror", "", upstream)

	// 1. The first conversion: nothing published, no landmark.
	mirrored := func(run string) (ref string, img v1.Image, d v1.Hash) {
		t.Helper()
		rep, code := runMirror(ctx, t, s, dir, mcfg)
		t.Logf("mirror run %s: exit %d, %s", run, code, rep.Summary())
		if code != 0 || len(rep.Images) != 1 {
			t.Fatalf("mirror run %s: exit %d, %d images: %s", run, code, len(rep.Images), rep.Summary())
		}
		ir := rep.Images[0]
		if ir.Status != mirror.StatusConverted && ir.Status != mirror.StatusSkipped {
			t.Fatalf("mirror run %s: %s", run, ir.Summary())
		}
		direct, err := name.ParseReference(ir.Destination)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = remote.Image(direct, remote.WithContext(ctx)); err != nil {
			t.Fatalf("mirror run %s: reading %s: %v", run, direct, err)
		}
		if d, err = img.Digest(); err != nil {
			t.Fatal(err)
		}
		// The builders pull through the counting proxy.
		return strings.Replace(ir.Destination, s.Registry.Direct, s.Registry.Host(), 1), img, d
	}
	ref, first, firstDigest := mirrored("1")
	for d, l := range proofLayers(t, dir, first) {
		if l.landmark != 0 {
			t.Fatalf("first conversion: layer %s has a prefetch landmark, but no profile was published yet", d)
		}
	}

	// 2. Builder A builds on it lazily; its daemon publishes.
	bctx := filepath.Join(dir, "build")
	if err := os.MkdirAll(bctx, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"go.mod", "main.go"} {
		b, err := os.ReadFile(filepath.Join(src, n))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(bctx, n), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(bctx, "Dockerfile"), []byte(closedLoopDockerfile(ref)), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, "build", "--frontend", "dockerfile.v0", "--local", "context="+bctx, "--local", "dockerfile="+bctx); err != nil {
		t.Fatalf("build on builder A: %v\n%s", err, s.Logs(40))
	}
	t.Logf("build 1 (unprofiled, builder A): %s", time.Since(start).Round(time.Millisecond))

	built := time.Now()
	var pub lazypull.ProfileStatus
	eventually.Require(t, 3*time.Minute, "builder A publishes all it read of "+ref, func() error {
		st, err := lazypull.FetchStatus(ctx, s.Snapshotter.Address+".status")
		if err != nil {
			return err
		}
		for _, p := range st.Profiles {
			switch {
			case p.LastResult == "failed":
				return fmt.Errorf("profile of %s: publish failed: %s", p.Image, p.LastError)
			// Pending records go out profile.idle after the build's
			// last read at the latest.
			case p.LastResult == "ok" && p.PendingRecords == 0 && (p.LastAttempt.After(built) || time.Since(built) > 45*time.Second):
				pub = p
				return nil
			}
		}
		return fmt.Errorf("not all published yet: %+v", st.Profiles)
	})
	t.Logf("published: %+v", pub)
	if pub.Subject != firstDigest.String() {
		t.Fatalf("published against %s, want the mirrored manifest %s", pub.Subject, firstDigest)
	}
	repo, err := name.NewRepository(s.Registry.Direct + "/" + strings.SplitN(strings.TrimPrefix(ref, s.Registry.Host()+"/"), ":", 2)[0])
	if err != nil {
		t.Fatal(err)
	}
	idx, err := remote.Referrers(repo.Digest(firstDigest.String()), remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("referrers of %s: %v", firstDigest, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	firstLayers := map[string]bool{}
	for _, d := range layerDigests(t, first) {
		firstLayers[d] = true
	}
	// The build's records may have gone out in more than one artifact
	// (a pause longer than profile.idle): every one refers to the
	// mirrored manifest, and together they name what the build read.
	var found bool
	var arts, files int
	var bytes int64
	for _, art := range im.Manifests {
		if art.ArtifactType != prefetch.ArtifactType {
			continue
		}
		arts++
		found = found || art.Digest.String() == pub.Artifact
		if art.Annotations[prefetch.AnnotationCreated] == "" {
			t.Errorf("referrer %s: no %s annotation: %v", art.Digest, prefetch.AnnotationCreated, art.Annotations)
		}
		prof := publishedProfile(ctx, t, repo.Digest(art.Digest.String()))
		for _, l := range prof.Layers {
			if !firstLayers[l.Digest] || l.SourceDigest == "" {
				t.Errorf("artifact %s: layer %s (source %q) is not a layer of the mirrored image resolved to its source", art.Digest, l.Digest, l.SourceDigest)
			}
			for _, f := range l.Files {
				files++
				bytes += f.Size
			}
		}
	}
	if !found {
		t.Fatalf("artifact %s is not a referrer of %s: %+v", pub.Artifact, firstDigest, im.Manifests)
	}
	if files < 50 {
		t.Fatalf("the published profiles name %d files: the go build reads hundreds", files)
	}
	t.Logf("published: %d artifacts referring to %s, %d files, %.1f MB", arts, firstDigest, files, mb(bytes))

	// 3. The mirror job again: it merges the published profile and
	// converts the base with it.
	_, second, secondDigest := mirrored("2")
	if secondDigest == firstDigest {
		t.Fatalf("the mirror did not convert %s again with the published profile", ref)
	}
	var region int64
	for _, l := range proofLayers(t, dir, second) {
		region += l.landmark
	}
	if region == 0 {
		t.Fatalf("the second conversion (%s) has no prefetch landmark", secondDigest)
	}

	// 4. A new builder, nothing cached, builds on the re-converted image.
	shaped := []harness.Option{
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBandwidth(125_000_000),
		harness.WithRTT(20 * time.Millisecond),
	}
	var m *proofRun
	t.Run("new-builder", func(t *testing.T) {
		m = measureProofBuild(ctx, t, dir, src, "closed-loop", second, shaped)
	})
	if m == nil || t.Failed() {
		t.FailNow()
	}
	const handful = 10
	t.Logf("BENCH closed prefetch loop, new builder, 1 Gbit/s 20 ms: read %d files %.1f MB: via prefetch %.1f MB (%.1f%%, target >= 90%%: %s), on demand %.1f MB, other %.1f MB | blob bytes: prefetch %.1f MB in %d requests (target <= %d: %s), on demand %.1f MB in %d requests | pull %s, container start to build end %s",
		m.readFiles, mb(m.readBytes), mb(m.prefetchedRead), 100*m.prefetchedShare(), verdict(m.prefetchedShare() >= 0.9),
		mb(m.onDemandRead), mb(m.otherRead), mb(m.netPrefetch), m.reqPrefetch, handful, verdict(m.reqPrefetch <= handful),
		mb(m.netOnDemand), m.reqOnDemand, m.pull.Round(time.Millisecond), m.build.Round(time.Millisecond))
	if m.readBytes == 0 {
		t.Fatal("the new builder's access records name no file the build read")
	}
	if m.prefetchedShare() < 0.9 {
		t.Errorf("%.1f%% of the %d bytes the new builder's build read arrived through the prefetch, want at least 90%%", 100*m.prefetchedShare(), m.readBytes)
	}
	if m.reqPrefetch == 0 || m.reqPrefetch > handful {
		t.Errorf("the prefetch took %d requests, want 1 to %d", m.reqPrefetch, handful)
	}
	if !m.prefetchCovered {
		t.Error("the prefetch requests did not cover every layer's prefetch region")
	}
}

// publishedProfile reads the profile a published artifact carries.
func publishedProfile(ctx context.Context, t *testing.T, ref name.Digest) *prefetch.Profile {
	t.Helper()
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("reading the artifact %s: %v", ref, err)
	}
	ls, err := img.Layers()
	if err != nil || len(ls) != 1 {
		t.Fatalf("artifact %s: %d layers, %v", ref, len(ls), err)
	}
	rc, err := ls[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, prefetch.MaxArtifactBytes+1))
	if err != nil {
		t.Fatal(err)
	}
	p, err := prefetch.ParseProfile(b)
	if err != nil {
		t.Fatalf("artifact %s: %v", ref, err)
	}
	return p
}

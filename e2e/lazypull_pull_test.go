//go:build e2e

package e2e

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/lazypull"
)

// verifiedFiles are the files the container reads and hashes; they are
// compared with the same files of the gzip source image.
var verifiedFiles = []string{
	"usr/local/go/bin/go",
	"usr/local/go/bin/gofmt",
	"usr/local/go/VERSION",
	"usr/local/go/src/fmt/print.go",
	"usr/local/go/src/runtime/proc.go",
	"usr/lib/os-release",
	"usr/bin/dash",
}

// sourceDigests returns the sha256 of each named regular file in the
// flattened img.
func sourceDigests(t *testing.T, img v1.Image, names []string) map[string]string {
	t.Helper()
	want := map[string]bool{}
	for _, n := range names {
		want[n] = true
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	out := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		name := strings.TrimPrefix(filepath.Clean("/"+h.Name), "/")
		if !want[name] {
			continue
		}
		if h.Typeflag != tar.TypeReg {
			t.Fatalf("%s is not a regular file in the source image (type %c)", name, h.Typeflag)
		}
		sum := sha256.New()
		if _, err := io.Copy(sum, tr); err != nil {
			t.Fatal(err)
		}
		out[name] = hex.EncodeToString(sum.Sum(nil))
	}
	for _, n := range names {
		if out[n] == "" {
			t.Fatalf("%s is not in the source image", n)
		}
	}
	return out
}

// TestLazypullPullRunVerify pulls the eStargz golang-like image through the
// lazybase snapshotter: no layer blob lands in the content store, every
// layer is a FUSE mount listed by the daemon's status, `go version` runs,
// the files the container reads match the gzip source image byte for byte,
// only part of the image is fetched, and after a restart of the daemon the
// mounts are restored and containers still run.
func TestLazypullPullRunVerify(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	// The harness starts `lazybase snapshotter --address … --root …`; the
	// rest of the configuration comes through the environment. Without
	// background fetch the daemon reads only what is used, so the fetched
	// share is a real measure; without the export guard (which copies
	// whole blobs into the content store by design, tested on its own) no
	// layer blob may reach the content store.
	cfg := filepath.Join(t.TempDir(), "lazybase.toml")
	if err := os.WriteFile(cfg, []byte("log_level = \"debug\"\n[background_fetch]\nenable = false\n[guard]\nenable = false\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_SNAPSHOTTER_CONFIG", cfg)
	s := harness.Start(ctx, t, harness.WithLazySnapshotter(harness.Lazybase))
	_, golang := publishAll(ctx, t, s)
	ref := s.Registry.Ref(repoGolang, tagEStargz)
	layers := layerDigests(t, golang.estargz)
	sizes := layerSizes(t, golang.estargz)
	wantSums := sourceDigests(t, golang.gzip, verifiedFiles)

	mark := s.Registry.Proxy.Mark()
	start := time.Now()
	if err := s.Containerd.Pull(ctx, ref, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}
	record(t, "lazybase-lazy-pull", time.Since(start))
	checkLazy(ctx, t, s, ref, layers)

	start = time.Now()
	script := "go version && cd / && sha256sum " + strings.Join(verifiedFiles, " ")
	out, err := s.Containerd.Run(ctx, ref, harness.LazySnapshotterName, "lazybase-verify", "sh", "-c", script)
	if err != nil {
		t.Fatal(err)
	}
	record(t, "lazybase-first-run", time.Since(start))
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "go version go1.") {
		t.Fatalf("container printed %q", out)
	}
	got := map[string]string{}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if len(f) == 2 {
			got[f[1]] = f[0]
		}
	}
	for _, n := range verifiedFiles {
		if got[n] != wantSums[n] {
			t.Errorf("%s: sha256 %q in the container, %q in the source image", n, got[n], wantSums[n])
		}
	}

	st := s.Registry.Proxy.Since(mark)
	var total, fetched int64
	for _, d := range layers {
		b := st.Blob(d)
		total += sizes[d]
		fetched += b.Covered()
		if b.FullGETs != 0 {
			t.Errorf("layer %s fetched whole %d times", d, b.FullGETs)
		}
	}
	t.Logf("fetched %d of %d layer bytes (%.1f%%)", fetched, total, 100*float64(fetched)/float64(total))
	if fetched >= total/2 {
		t.Errorf("fetched %d of %d layer bytes: not lazy", fetched, total)
	}

	// A restarted daemon restores its mounts; containers keep running.
	if err := s.RestartSnapshotter(ctx); err != nil {
		t.Fatal(err)
	}
	checkLazy(ctx, t, s, ref, layers)
	out, err = s.Containerd.Run(ctx, ref, harness.LazySnapshotterName, "lazybase-after-restart", "go", "version")
	if err != nil {
		t.Fatalf("after restart: %v", err)
	}
	if !strings.HasPrefix(strings.TrimSpace(out), "go version go1.") {
		t.Errorf("after restart go version printed %q", out)
	}
}

// checkLazy checks that the image's layers are not in the content store
// and are mounted lazily, one FUSE mount each, as the daemon's status says.
func checkLazy(ctx context.Context, t *testing.T, s *harness.Stack, ref string, layers []string) {
	t.Helper()
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
	if len(mounts) != len(layers) {
		t.Errorf("%d FUSE mounts under %s, want %d", len(mounts), s.Snapshotter.Root, len(layers))
	}
	status, err := lazypull.FetchStatus(ctx, s.Snapshotter.Address+".status")
	if err != nil {
		t.Fatal(err)
	}
	byLayer := map[string]lazypull.LayerStatus{}
	for _, l := range status.Layers {
		byLayer[l.Layer] = l
	}
	for _, d := range layers {
		l, ok := byLayer[d]
		if !ok {
			t.Errorf("status does not list layer %s: %+v", d, status.Layers)
			continue
		}
		if l.Image != ref || l.FetchedPercent < 0 || l.FetchedPercent > 100 {
			t.Errorf("status of layer %s: %+v (want image %s)", d, l, ref)
		}
		t.Logf("status: layer %s %.1f%% fetched (%d of %d bytes)", d, l.FetchedPercent, l.FetchedBytes, l.Size)
	}
}

package lazypull

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/testimage"
)

// stallProxy forwards to a registry; while stalled, blob GETs hang until
// the client gives up.
type stallProxy struct {
	srv     *httptest.Server
	host    string
	stalled atomic.Bool
	stalls  atomic.Int64
}

func newStallProxy(t *testing.T, upstream string) *stallProxy {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	p := &stallProxy{}
	release := make(chan struct{})
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.stalled.Load() && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:") {
			p.stalls.Add(1)
			select {
			case <-r.Context().Done():
			case <-release:
			}
			return
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		close(release)
		p.srv.Close()
	})
	p.host = strings.TrimPrefix(p.srv.URL, "http://")
	return p
}

// lazyView mounts layer 0 of img lazily through td and returns the
// directory its files are visible in.
func lazyView(t *testing.T, td *testDaemon, img testImage) string {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "test")
	_, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0")))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want a remote snapshot", err)
	}
	mounts, err := td.sn.View(ctx, "view-0", "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Error(err)
		}
	})
	return target
}

// noFetchAhead keeps the daemon from fetching anything it is not asked to
// read, so that a fault hits the read under test.
func noFetchAhead(timeout time.Duration) func(*Config) {
	return func(c *Config) {
		c.Prefetch.Enable = false
		c.BackgroundFetch.Enable = false
		c.Fetch.Timeout = Duration(timeout)
		c.Fetch.MaxRetries = 1
	}
}

// TestStalledRegistryReadFailsWithEIO stalls the registry after the mount:
// reading a file that is not cached fails with EIO within a bound derived
// from fetch.timeout, the daemon keeps serving, and the same read succeeds
// once the registry answers again.
func TestStalledRegistryReadFailsWithEIO(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	proxy := newStallProxy(t, reg.Server.URL)
	img.ref = strings.Replace(img.ref, reg.Host, proxy.host, 1)

	const timeout = 2 * time.Second
	td := startDaemon(t, "", noFetchAhead(timeout))
	dir := lazyView(t, td, img)

	proxy.stalled.Store(true)
	start := time.Now()
	_, err := os.ReadFile(filepath.Join(dir, "usr/bin/tool"))
	elapsed := time.Since(start)
	t.Logf("stalled read failed after %s with %v (%d stalled GETs)", elapsed, err, proxy.stalls.Load())
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read from a stalled registry = %v, want EIO", err)
	}
	// Upstream retries a failed chunk fetch a few times, each bounded by
	// the timeout; a hang would run into the test's own timeout.
	if bound := 8 * timeout; elapsed > bound {
		t.Errorf("stalled read took %s, want at most %s", elapsed, bound)
	}
	if proxy.stalls.Load() == 0 {
		t.Error("the read never reached the registry")
	}

	proxy.stalled.Store(false)
	got, err := os.ReadFile(filepath.Join(dir, "usr/bin/tool"))
	if err != nil {
		t.Fatalf("read after the registry recovered: %v", err)
	}
	if !bytes.Equal(got, img.files["usr/bin/tool"]) {
		t.Fatal("read after recovery returned wrong bytes")
	}
	st, err := FetchStatus(context.Background(), td.cfg.statusSocket())
	if err != nil || len(st.Layers) != 1 {
		t.Fatalf("daemon status after the fault: %+v, %v", st, err)
	}
}

// TestTamperedBlobNeverServesWrongBytes flips a byte in every blob response
// after the mount: a read either fails or returns the image's bytes, never
// other bytes.
func TestTamperedBlobNeverServesWrongBytes(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	td := startDaemon(t, "", noFetchAhead(2*time.Second))
	dir := lazyView(t, td, img)

	reg.Corrupt(img.layers[0].Digest)
	got, err := os.ReadFile(filepath.Join(dir, "usr/bin/tool"))
	if err == nil {
		if !bytes.Equal(got, img.files["usr/bin/tool"]) {
			t.Fatal("tampered blob: read returned bytes that differ from the image")
		}
		t.Fatal("tampered blob: read succeeded; the corrupted chunk was not fetched")
	}
	if !errors.Is(err, syscall.EIO) {
		t.Errorf("tampered read = %v, want EIO", err)
	}

	// Upstream keeps what it fetched in its chunk cache; whether the file
	// reads once the registry is honest again depends on whether the bad
	// bytes were cached. Either way it must never read wrong.
	reg.Corrupt(v1.Hash{})
	got, err = os.ReadFile(filepath.Join(dir, "usr/bin/tool"))
	switch {
	case err == nil && !bytes.Equal(got, img.files["usr/bin/tool"]):
		t.Fatal("read after the tampering stopped returned wrong bytes")
	case err != nil && !errors.Is(err, syscall.EIO):
		t.Errorf("read after the tampering stopped = %v, want EIO or the right bytes", err)
	case err != nil:
		t.Logf("the layer stays unreadable after the tampering stopped: %v", err)
	}
}

// TestTamperedTOCFallsBack offers a layer whose TOC does not match the TOC
// digest its descriptor carries: verification fails, the layer is not
// mounted lazily, and containerd is told to pull it normally.
func TestTamperedTOCFallsBack(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	td := startDaemon(t, "", noFetchAhead(2*time.Second))
	ctx := namespaces.WithNamespace(context.Background(), "test")
	labels := img.unpackLabels(0, "chain-0")
	labels[tocDigestLabel] = "sha256:" + strings.Repeat("0", 64)
	ms, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(labels))
	if err != nil || len(ms) == 0 {
		t.Fatalf("Prepare with a wrong TOC digest = %v, %v; want mounts for a normal pull", ms, err)
	}
	if got := counterValue(t, td.d.m.fallbacks.WithLabelValues(ReasonMountFailed)); got != 1 {
		t.Errorf("mount_failed fallbacks = %v, want 1", got)
	}
	if n := fuseMountsUnder(t, td.cfg.Root); n != 0 {
		t.Errorf("%d FUSE mounts for a layer that failed verification", n)
	}
}

// TestAccessRecording reads files of a lazily mounted layer and finds them
// in the image's access record, in first-access order, with their sizes;
// a restarted daemon, which restores the mount inside NewDaemon, records
// the reads through the restored mount too.
func TestAccessRecording(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	recDir := t.TempDir()
	withRecords := func(c *Config) {
		noFetchAhead(5 * time.Second)(c)
		c.AccessRecordDir = recDir
	}
	td := startDaemon(t, "", withRecords)
	dir := lazyView(t, td, img)
	for _, name := range []string{"usr/bin/tool", "etc/hello.txt", "usr/bin/tool"} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil || !bytes.Equal(got, img.files[name]) {
			t.Fatalf("reading %s: %v", name, err)
		}
	}
	td.stop(t) // flushes and closes the records
	checkAccessRecords(t, recDir, img, "/usr/bin/tool", "/etc/hello.txt")

	td2 := startDaemon(t, td.cfg.Root, withRecords)
	ctx := namespaces.WithNamespace(context.Background(), "test")
	mounts, err := td2.sn.View(ctx, "view-restored", "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(target, "etc/hello.txt"))
	if uerr := mount.UnmountAll(target, 0); uerr != nil {
		t.Error(uerr)
	}
	if err != nil || !bytes.Equal(got, img.files["etc/hello.txt"]) {
		t.Fatalf("reading etc/hello.txt through the restored mount: %v", err)
	}
	td2.stop(t)
	checkAccessRecords(t, recDir, img, "/usr/bin/tool", "/etc/hello.txt", "/etc/hello.txt")
}

// checkAccessRecords checks that the access record of img in recDir lists
// want, in order, each with img's first layer and the file's size.
func checkAccessRecords(t *testing.T, recDir string, img testImage, want ...string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(recDir, AccessRecordFile(img.ref)))
	if err != nil {
		t.Fatal(err)
	}
	var recs []AccessRecord
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var r AccessRecord
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("record %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	if len(recs) != len(want) {
		t.Fatalf("records %+v, want %v", recs, want)
	}
	for i, r := range recs {
		if r.Path != want[i] || r.Image != img.ref || r.Layer != img.layers[0].Digest.String() ||
			r.Size != int64(len(img.files[strings.TrimPrefix(r.Path, "/")])) {
			t.Errorf("record %d: %+v, want path %s", i, r, want[i])
		}
	}
}

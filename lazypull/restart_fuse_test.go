package lazypull

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// restartProxy forwards to a registry and counts the blob GETs it
// forwards, per digest. While held, blob GETs wait until released; while
// down, every connection is closed unanswered, as by a registry that is
// gone.
type restartProxy struct {
	host string
	down atomic.Bool
	held atomic.Int64

	mu   sync.Mutex
	hold chan struct{}
	gets map[string]int
}

func newRestartProxy(t *testing.T, upstream string) *restartProxy {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	p := &restartProxy{gets: map[string]int{}}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if p.down.Load() {
			if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
				c.Close()
			}
			return
		}
		_, blob, isBlob := strings.Cut(r.URL.Path, "/blobs/")
		if isBlob && r.Method == http.MethodGet {
			p.mu.Lock()
			p.gets[blob]++
			hold := p.hold
			p.mu.Unlock()
			if hold != nil {
				p.held.Add(1)
				select {
				case <-hold:
				case <-r.Context().Done():
					return
				}
			}
		}
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() {
		p.release()
		srv.Close()
	})
	p.host = strings.TrimPrefix(srv.URL, "http://")
	return p
}

// holdBlobs makes blob GETs wait until release.
func (p *restartProxy) holdBlobs() {
	p.mu.Lock()
	p.hold = make(chan struct{})
	p.mu.Unlock()
}

func (p *restartProxy) release() {
	p.mu.Lock()
	if p.hold != nil {
		close(p.hold)
		p.hold = nil
	}
	p.mu.Unlock()
}

func (p *restartProxy) blobGETs(d digest.Digest) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.gets[d.String()]
}

// pushSmallImage pushes an image of one eStargz layer holding one file.
func pushSmallImage(t *testing.T, reg *testimage.Registry, repoTag, path, data string) testImage {
	t.Helper()
	tarball, err := testimage.Tar(testimage.Files(path, data))
	if err != nil {
		t.Fatal(err)
	}
	esgz, err := testimage.EStargz(tarball)
	if err != nil {
		t.Fatal(err)
	}
	img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, esgz)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Push(t, repoTag, img)
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return testImage{ref: ref.String(), layers: m.Layers, files: map[string][]byte{path: []byte(data)}}
}

// readThrough mounts mounts on a temporary directory, reads path there and
// unmounts.
func readThrough(t *testing.T, mounts []mount.Mount, path string) ([]byte, error) {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		return nil, err
	}
	defer func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Error(err)
		}
	}()
	return os.ReadFile(filepath.Join(target, path))
}

// TestServesWhileRestoring restarts the daemon over a lazy snapshot while
// the registry holds every blob read: the new daemon listens at once and
// answers Stat and Walk while the restore of the lazy mount waits for the
// registry; a View that needs the layer waits for the restore instead of
// failing, and its mounts serve the layer's files once the registry
// answers. (Before, the daemon restored inside NewDaemon and did not
// listen until the registry answered.)
func TestServesWhileRestoring(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	proxy := newRestartProxy(t, reg.Server.URL)
	img.ref = strings.Replace(img.ref, reg.Host, proxy.host, 1)
	root := t.TempDir()
	noGuard := func(c *Config) { c.Guard.Enable = false }
	ctx := namespaces.WithNamespace(context.Background(), "builder")
	// Keys as containerd's metadata store names them; a remote snapshot is
	// named by its chain ID alone.
	const chain = "sha256:chain-0"

	td := startDaemon(t, root, noGuard)
	if _, err := td.sn.Prepare(ctx, "builder/1/extract-0", "", snapshots.WithLabels(img.unpackLabels(0, chain))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want a remote snapshot", err)
	}
	td.stop(t)

	proxy.holdBlobs()
	start := time.Now()
	td2 := startDaemon(t, root, noGuard)
	t.Logf("daemon listening %v after start", time.Since(start))
	eventually.Require(t, 10*time.Second, "the restore waiting on the registry", func() error {
		if proxy.held.Load() == 0 {
			return fmt.Errorf("no blob GET held yet")
		}
		return nil
	})
	info, err := td2.sn.Stat(ctx, chain)
	if err != nil || info.Kind != snapshots.KindCommitted {
		t.Fatalf("Stat during the restore = %+v, %v", info, err)
	}
	var names []string
	if err := td2.sn.Walk(ctx, func(_ context.Context, i snapshots.Info) error {
		names = append(names, i.Name)
		return nil
	}); err != nil {
		t.Fatalf("Walk during the restore: %v", err)
	}
	if len(names) != 1 || names[0] != chain {
		t.Errorf("Walk during the restore: %v", names)
	}
	st, err := td2.d.Status(ctx)
	if err != nil || st.Restore == nil || st.Restore.Pending != 1 || len(st.Layers) != 0 {
		t.Fatalf("status during the restore: %+v, %v (restore %+v)", st, err, st.Restore)
	}

	type viewResult struct {
		mounts []mount.Mount
		err    error
	}
	viewed := make(chan viewResult, 1)
	go func() {
		m, err := td2.sn.View(ctx, "builder/3/view-0", chain)
		viewed <- viewResult{m, err}
	}()
	select {
	case r := <-viewed:
		t.Fatalf("View returned before the layer was restored: %v", r.err)
	case <-time.After(500 * time.Millisecond):
	}
	proxy.release()
	var r viewResult
	select {
	case r = <-viewed:
	case <-time.After(30 * time.Second):
		t.Fatal("View did not return after the registry answered")
	}
	if r.err != nil {
		t.Fatalf("View after the restore: %v", r.err)
	}
	got, err := readThrough(t, r.mounts, "usr/bin/tool")
	if err != nil || !bytes.Equal(got, img.files["usr/bin/tool"]) {
		t.Fatalf("read after the restore: %v (equal %v)", err, bytes.Equal(got, img.files["usr/bin/tool"]))
	}
	st, err = td2.d.Status(ctx)
	if err != nil || st.Restore != nil || len(st.Layers) != 1 {
		t.Errorf("status after the restore: %+v, %v", st, err)
	}
}

// TestRestartWithoutRegistry stops the daemon (as SIGTERM does) after the
// guard committed the blob of an export-base layer and the layer was
// unpacked locally, and starts it again over the same root and content
// store with the registry gone. The daemon starts and restores the
// layer: the guard reports it materialized at once, the lazy mount reads
// its blob from the content store, its unpacked directory is the one kept
// from before (no new unpack), and its files read back; the registry gets
// no GET for it. A lazy-only layer, whose blob is not local, fails its
// restore (status says so, a View over it names the layer), and a
// request after the registry is back restores it.
func TestRestartWithoutRegistry(t *testing.T) {
	requireFUSE(t)
	defer func(d time.Duration) { restoreRetryAfter = d }(restoreRetryAfter)
	restoreRetryAfter = 100 * time.Millisecond
	reg := testimage.NewRegistry(t)
	base := pushTestImage(t, reg, "base:estargz")
	other := pushSmallImage(t, reg, "other:estargz", "etc/other.txt", "only on the network\n")
	proxy := newRestartProxy(t, reg.Server.URL)
	base.ref = strings.Replace(base.ref, reg.Host, proxy.host, 1)
	other.ref = strings.Replace(other.ref, reg.Host, proxy.host, 1)
	layer := digest.Digest(base.layers[0].Digest.String())
	otherLayer := other.layers[0].Digest.String()
	root := t.TempDir()
	cfg := func(c *Config) {
		c.Policy = []PolicyRule{
			{Match: "*/base:estargz", Mode: ModeExportBase},
			{Match: "*/other:estargz", Mode: ModeLazyOnly},
		}
		c.Guard.Delay = Duration(time.Hour)
		c.Local.Enable = true
		c.BackgroundFetch.Enable = false
		c.Fetch.MaxRetries = 1
	}
	// containerd's content store, in process, in place of the daemon's
	// connection to a containerd socket; it outlives both daemons.
	store, lm := newContentStore(t)
	useStore := func(d *Daemon) {
		d.stores.open = func(context.Context) (content.Store, leases.Manager, error) { return store, lm, nil }
	}
	ctx := namespaces.WithNamespace(context.Background(), "builder")
	// Keys as containerd's metadata store names them; a remote snapshot is
	// named by its chain ID alone, which says nothing of the namespace.
	const chain, otherChain = "sha256:chain-0", "sha256:chain-1"

	td := startDaemonWith(t, root, cfg, useStore)
	if _, err := td.sn.Prepare(ctx, "builder/1/extract-0", "", snapshots.WithLabels(base.unpackLabels(0, chain))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want a remote snapshot", err)
	}
	if _, err := td.sn.Prepare(ctx, "builder/3/extract-1", "", snapshots.WithLabels(other.unpackLabels(0, otherChain))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want a remote snapshot", err)
	}
	waitState(t, td.d.GuardStatus, "builder", layer, exportguard.StateMaterialized)
	localDir := func(d *Daemon) error {
		st, err := d.Status(ctx)
		if err != nil {
			return err
		}
		for _, l := range st.Layers {
			if l.Layer == layer.String() && l.LocalDir != "" {
				return nil
			}
		}
		return fmt.Errorf("layer %s not unpacked locally: %+v", layer, st.Layers)
	}
	eventually.Require(t, 30*time.Second, "the layer unpacked locally", func() error { return localDir(td.d) })
	td.stop(t)
	kept, err := os.ReadDir(filepath.Join(root, "snapshotter", keptLocalDir))
	if err != nil || len(kept) != 1 {
		t.Fatalf("kept unpacked layers after a clean stop: %v, %v", kept, err)
	}

	gets := proxy.blobGETs(layer)
	proxy.down.Store(true)
	td2 := startDaemonWith(t, root, cfg, useStore)
	st := waitState(t, td2.d.GuardStatus, "builder", layer, exportguard.StateMaterialized)
	if !st.Materialized {
		t.Errorf("guard status after restart %+v", st)
	}
	eventually.Require(t, 30*time.Second, "the layer restored and local", func() error { return localDir(td2.d) })
	if n := unpacksOK(t, td2.d); n != 0 {
		t.Errorf("%v local unpacks after the restart, want 0: the kept directory is used", n)
	}
	mounts, err := td2.sn.View(ctx, "builder/5/view-0", chain)
	if err != nil {
		t.Fatalf("View of the committed layer with the registry down: %v", err)
	}
	got, err := readThrough(t, mounts, "usr/bin/tool")
	if err != nil || !bytes.Equal(got, base.files["usr/bin/tool"]) {
		t.Fatalf("read with the registry down: %v (equal %v)", err, bytes.Equal(got, base.files["usr/bin/tool"]))
	}

	// The lazy-only layer needs the network.
	eventually.Require(t, 30*time.Second, "the lazy-only layer's restore failing", func() error {
		st, err := td2.d.Status(ctx)
		if err != nil {
			return err
		}
		if st.Restore == nil || len(st.Restore.Failed) != 1 || st.Restore.Failed[0].Layer != otherLayer {
			return fmt.Errorf("restore status %+v", st.Restore)
		}
		return nil
	})
	if _, err := td2.sn.View(ctx, "builder/6/view-1", otherChain); !errdefs.IsUnavailable(err) {
		t.Errorf("View of an unrestored layer with the registry down = %v, want unavailable", err)
	}
	proxy.down.Store(false)
	var otherMounts []mount.Mount
	attempt := 0
	eventually.Require(t, 30*time.Second, "the lazy-only layer restored once the registry is back", func() error {
		var err error
		attempt++
		otherMounts, err = td2.sn.View(ctx, fmt.Sprintf("builder/%d/view-again", 100+attempt), otherChain)
		return err
	})
	got, err = readThrough(t, otherMounts, "etc/other.txt")
	if err != nil || string(got) != "only on the network\n" {
		t.Errorf("read after the registry came back: %q, %v", got, err)
	}
	if n := proxy.blobGETs(layer) - gets; n != 0 {
		t.Errorf("%d blob GETs of the committed layer after the restart, want 0", n)
	}
}

// unpacksOK returns lazybase_snapshotter_local_unpacks_total{result="ok"}.
func unpacksOK(t *testing.T, d *Daemon) float64 {
	t.Helper()
	mfs, err := d.m.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "lazybase_snapshotter_local_unpacks_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			if labelValue(m, "result") == "ok" {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

// TestNamespaceOfKey: the namespace of a snapshot key as containerd's
// metadata store names them, and nothing for other keys.
func TestNamespaceOfKey(t *testing.T) {
	for _, tc := range []struct {
		key, ns string
		ok      bool
	}{
		{"buildkit/12/sha256:abc", "buildkit", true},
		{"k8s.io/3/extract-1 sha256:x", "k8s.io", true},
		{"default/1/a/b", "default", true},
		{"chain-0", "", false},
		{"ns/x/key", "", false},
		{"ns/1/", "", false},
		{"/1/key", "", false},
		{"-bad/1/key", "", false},
		{"ns/-1/key", "", false},
	} {
		ns, ok := namespaceOfKey(tc.key)
		if ns != tc.ns || ok != tc.ok {
			t.Errorf("namespaceOfKey(%q) = %q, %v; want %q, %v", tc.key, ns, ok, tc.ns, tc.ok)
		}
	}
}

package lazypull

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	stdlog "log"
	"mime"
	"mime/multipart"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/stargz-snapshotter/cache"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/remote"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	ggcrremote "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"

	"github.com/lazybase/lazybase/exportguard"
)

// countingProxy is a loopback reverse proxy in front of a registry that
// counts the blob bytes it sends, per digest.
type countingProxy struct {
	srv  *httptest.Server
	host string

	mu    sync.Mutex
	bytes map[string]int64
}

func newCountingProxy(t *testing.T, upstream string) *countingProxy {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	rp := httputil.NewSingleHostReverseProxy(u)
	p := &countingProxy{bytes: map[string]int64{}}
	p.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		d, ok := blobDigest(r.URL.Path)
		if !ok || r.Method != http.MethodGet {
			rp.ServeHTTP(w, r)
			return
		}
		rp.ServeHTTP(&countingWriter{ResponseWriter: w, count: func(n int) {
			p.mu.Lock()
			p.bytes[d.String()] += int64(n)
			p.mu.Unlock()
		}}, r)
	}))
	t.Cleanup(p.srv.Close)
	p.host = strings.TrimPrefix(p.srv.URL, "http://")
	return p
}

// blobBytes returns the bytes of blob d sent so far.
func (p *countingProxy) blobBytes(d digest.Digest) int64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.bytes[d.String()]
}

type countingWriter struct {
	http.ResponseWriter
	count func(int)
}

func (w *countingWriter) Write(b []byte) (int, error) {
	n, err := w.ResponseWriter.Write(b)
	w.count(n)
	return n, err
}

func (w *countingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// sourceEnv is a registry (behind a counting proxy) holding one random
// layer blob, and containerd's metadata content store and lease manager
// over its local store.
type sourceEnv struct {
	proxy  *countingProxy
	ref    string
	data   []byte
	layer  digest.Digest
	store  content.Store
	leases leases.Manager
}

func newSourceEnv(t *testing.T, size int) *sourceEnv {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	p := newCountingProxy(t, srv.URL)
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	repo, err := name.NewRepository(p.host + "/lazybase/source-test")
	if err != nil {
		t.Fatal(err)
	}
	l := static.NewLayer(data, types.OCILayer)
	if err := ggcrremote.WriteLayer(repo, l); err != nil {
		t.Fatal(err)
	}
	dgst, _ := l.Digest()
	store, lm := newContentStore(t)
	return &sourceEnv{proxy: p, ref: repo.Name() + ":v1", data: data, layer: digest.Digest(dgst.String()),
		store: store, leases: lm}
}

// newContentStore returns containerd's namespaced metadata content store
// and lease manager over its local store, as the containerd daemon builds
// them.
func newContentStore(t *testing.T) (content.Store, leases.Manager) {
	t.Helper()
	dir := t.TempDir()
	cs, err := local.NewStore(filepath.Join(dir, "content"))
	if err != nil {
		t.Fatal(err)
	}
	bdb, err := bolt.Open(filepath.Join(dir, "meta.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bdb.Close() })
	db := metadata.NewDB(bdb, cs, nil)
	if err := db.Init(context.Background()); err != nil {
		t.Fatal(err)
	}
	return db.ContentStore(), metadata.NewLeaseManager(db)
}

// trigger returns a guard trigger over the env's content store, attached to
// a new blob source whose metrics go to reg.
func (e *sourceEnv) trigger(t *testing.T, delay time.Duration, reg *prometheus.Registry) (*guardTrigger, *blobSource) {
	t.Helper()
	stores := func(context.Context) (content.Store, leases.Manager, error) { return e.store, e.leases, nil }
	g, err := newGuardTrigger(guardCfg(delay), stores, remoteBlobSize(authn.DefaultKeychain, DefaultConfig().Guard.Timeouts()), &exportguard.Remote{}, reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.close() })
	src := newBlobSource()
	if err := src.attach(g.localBlob, g.promote, reg); err != nil {
		t.Fatal(err)
	}
	return g, src
}

// hosts returns the registry hosts of the env's image as the daemon
// builds them (no mirrors), reading blobs through src.
func (e *sourceEnv) hosts(t *testing.T, src *blobSource) (reference.Spec, []docker.RegistryHost) {
	t.Helper()
	spec, err := reference.Parse(e.ref)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := hostsFromMirrors(nil, 10*time.Second, anonymous, src)(spec)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 {
		t.Fatalf("%d hosts for %s, want the registry alone", len(hs), e.ref)
	}
	return spec, hs
}

// hostClient returns the HTTP client of the registry host of the env's
// image, as the daemon builds it, reading blobs through src.
func (e *sourceEnv) hostClient(t *testing.T, src *blobSource) *http.Client {
	t.Helper()
	_, hs := e.hosts(t, src)
	return hs[0].Client
}

// anonymous is a resolver.Credential with no credentials.
func anonymous(string, reference.Spec) (string, string, error) { return "", "", nil }

func (e *sourceEnv) blobURL() string {
	return "http://" + e.proxy.host + "/v2/lazybase/source-test/blobs/" + e.layer.String()
}

func get(t *testing.T, c *http.Client, method, u, rng string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func readAll(t *testing.T, r io.Reader) []byte {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBlobTransportServesCommittedBlob: once the guard committed a blob,
// GET (whole, one range, a suffix, several ranges) and HEAD are answered
// from the content store, byte for byte as the registry would, and the
// registry sends nothing more; before, they go to the registry.
func TestBlobTransportServesCommittedBlob(t *testing.T) {
	e := newSourceEnv(t, 600_000)
	reg := prometheus.NewRegistry()
	g, src := e.trigger(t, time.Hour, reg)
	c := e.hostClient(t, src)

	// Not materialized: the registry answers.
	resp := get(t, c, http.MethodGet, e.blobURL(), "bytes=0-999")
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(readAll(t, resp.Body), e.data[:1000]) {
		t.Fatalf("remote range: %s", resp.Status)
	}
	if got := e.proxy.blobBytes(e.layer); got != 1000 {
		t.Fatalf("registry sent %d bytes, want 1000", got)
	}
	if got := counterValue(t, src.bytes.WithLabelValues(sourceRemote)); got != 1000 {
		t.Errorf("remote bytes metric %v, want 1000", got)
	}

	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.mounted(ctx, mountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: ModeExportBase})
	waitState(t, g, "builder", e.layer, GuardMaterialized)
	before := e.proxy.blobBytes(e.layer)
	if before != 1000+int64(len(e.data)) {
		t.Errorf("registry sent %d bytes after the guard's transfer, want 1000 + %d", before, len(e.data))
	}

	size := int64(len(e.data))
	resp = get(t, c, http.MethodGet, e.blobURL(), "")
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size || !bytes.Equal(readAll(t, resp.Body), e.data) {
		t.Errorf("local whole blob: %s, length %d", resp.Status, resp.ContentLength)
	}
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=100-199")
	if resp.StatusCode != http.StatusPartialContent || resp.Header.Get("Content-Range") != "bytes 100-199/600000" ||
		!bytes.Equal(readAll(t, resp.Body), e.data[100:200]) {
		t.Errorf("local range: %s %q", resp.Status, resp.Header.Get("Content-Range"))
	}
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=-10")
	if !bytes.Equal(readAll(t, resp.Body), e.data[size-10:]) || resp.Header.Get("Content-Range") != "bytes 599990-599999/600000" {
		t.Errorf("local suffix range: %s %q", resp.Status, resp.Header.Get("Content-Range"))
	}
	resp = get(t, c, http.MethodHead, e.blobURL(), "")
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size || resp.Header.Get("Docker-Content-Digest") != e.layer.String() {
		t.Errorf("local HEAD: %s, length %d", resp.Status, resp.ContentLength)
	}

	// Several ranges: multipart/byteranges, one part per range.
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=0-9,5000-5999,599000-599999")
	mt, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/byteranges" {
		t.Fatalf("multi-range: %s %q %v", resp.Status, resp.Header.Get("Content-Type"), err)
	}
	mr := multipart.NewReader(resp.Body, params["boundary"])
	for _, want := range []struct {
		cr         string
		first, end int
	}{{"bytes 0-9/600000", 0, 10}, {"bytes 5000-5999/600000", 5000, 6000}, {"bytes 599000-599999/600000", 599000, 600000}} {
		part, err := mr.NextPart()
		if err != nil {
			t.Fatal(err)
		}
		if cr := part.Header.Get("Content-Range"); cr != want.cr || !bytes.Equal(readAll(t, part), e.data[want.first:want.end]) {
			t.Errorf("part %q, want %q with its bytes", cr, want.cr)
		}
	}
	if _, err := mr.NextPart(); err != io.EOF {
		t.Errorf("after the last part: %v", err)
	}

	if got := e.proxy.blobBytes(e.layer); got != before {
		t.Errorf("registry sent %d more blob bytes after the commit", got-before)
	}
	wantLocal := float64(size + 100 + 10 + 10 + 1000 + 1000)
	if got := counterValue(t, src.bytes.WithLabelValues(sourceLocal)); got != wantLocal {
		t.Errorf("local bytes metric %v, want %v", got, wantLocal)
	}

	// A range the blob cannot satisfy goes to the registry, which says so.
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=700000-700010")
	if resp.StatusCode == http.StatusPartialContent || resp.StatusCode == http.StatusOK {
		t.Errorf("unsatisfiable range answered %s", resp.Status)
	}

	// Without the guard, the registry answers again.
	before = e.proxy.blobBytes(e.layer)
	src.detach()
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=0-99")
	readAll(t, resp.Body)
	if got := e.proxy.blobBytes(e.layer); got != before+100 {
		t.Errorf("after detach the registry sent %d bytes, want 100", got-before)
	}
}

// TestUpstreamFetcherReadsCommittedBlob drives the upstream stargz blob
// fetcher (its resolver, retrying client, redirect probe, size check and
// multi-range reads) over the registry hosts the daemon builds: after the
// guard's commit it reads the whole blob without a byte from the registry.
func TestUpstreamFetcherReadsCommittedBlob(t *testing.T) {
	e := newSourceEnv(t, 2_000_000)
	reg := prometheus.NewRegistry()
	g, src := e.trigger(t, time.Hour, reg)
	hosts := hostsFromMirrors(nil, 10*time.Second, anonymous, src)
	spec, _ := e.hosts(t, src)

	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.mounted(ctx, mountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: ModeExportBase})
	waitState(t, g, "builder", e.layer, GuardMaterialized)
	before := e.proxy.blobBytes(e.layer)

	r := remote.NewResolver(config.BlobConfig{ChunkSize: 50000, FetchTimeoutSec: 10}, nil)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: e.layer, Size: int64(len(e.data))}
	blob, err := r.Resolve(context.Background(), hosts, spec, desc, cache.NewMemoryCache())
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	got := make([]byte, len(e.data))
	// Uneven reads, as the filesystem makes them.
	for off := 0; off < len(got); {
		n := min(123_457, len(got)-off)
		m, err := blob.ReadAt(got[off:off+n], int64(off))
		if err != nil && err != io.EOF {
			t.Fatalf("ReadAt %d: %v", off, err)
		}
		off += m
		if m == 0 {
			t.Fatalf("ReadAt %d read nothing", off)
		}
	}
	if !bytes.Equal(got, e.data) {
		t.Fatal("bytes read through the upstream fetcher differ from the blob")
	}
	if n := e.proxy.blobBytes(e.layer) - before; n != 0 {
		t.Errorf("the upstream fetcher took %d blob bytes from the registry after the commit", n)
	}
	if local := counterValue(t, src.bytes.WithLabelValues(sourceLocal)); local < float64(len(e.data)) {
		t.Errorf("local bytes metric %v, want at least %d", local, len(e.data))
	}
}

// TestBlobSourcePromotesLazyLayer: a lazy image's layer waits for
// guard.delay, unless the filesystem fetches PromoteAfterBytes of its blob
// from the registry first; then the guard materializes it at once.
func TestBlobSourcePromotesLazyLayer(t *testing.T) {
	e := newSourceEnv(t, PromoteAfterBytes+2<<20)
	reg := prometheus.NewRegistry()
	g, src := e.trigger(t, time.Hour, reg)
	c := e.hostClient(t, src)
	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.mounted(ctx, mountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: ModeLazy})
	waitState(t, g, "builder", e.layer, GuardScheduled)

	// A small on-demand read does not promote it.
	readAll(t, get(t, c, http.MethodGet, e.blobURL(), "bytes=0-65535").Body)
	time.Sleep(100 * time.Millisecond)
	waitState(t, g, "builder", e.layer, GuardScheduled)

	// A background fill does.
	fill := PromoteAfterBytes + 1<<20
	readAll(t, get(t, c, http.MethodGet, e.blobURL(), fmt.Sprintf("bytes=65536-%d", fill)).Body)
	waitState(t, g, "builder", e.layer, GuardMaterialized)
	if got := counterValue(t, g.promotions); got != 1 {
		t.Errorf("promotions %v, want 1", got)
	}
	before := e.proxy.blobBytes(e.layer)
	resp := get(t, c, http.MethodGet, e.blobURL(), fmt.Sprintf("bytes=%d-%d", fill+1, len(e.data)-1))
	if !bytes.Equal(readAll(t, resp.Body), e.data[fill+1:]) {
		t.Error("rest of the blob differs")
	}
	if n := e.proxy.blobBytes(e.layer) - before; n != 0 {
		t.Errorf("registry sent %d bytes after the promoted commit", n)
	}
}

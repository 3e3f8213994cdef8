package lazypull

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	stdlog "log"
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
		_, blob, ok := strings.Cut(r.URL.Path, "/blobs/")
		d, err := digest.Parse(blob)
		if !ok || err != nil || r.Method != http.MethodGet {
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
func (e *sourceEnv) trigger(t *testing.T, delay time.Duration, reg *prometheus.Registry) (*exportguard.Trigger, *exportguard.BlobSource) {
	t.Helper()
	genv := &guardEnv{store: e.store, leases: e.leases}
	g, err := exportguard.NewTrigger(genv.stores(), &exportguard.Remote{}, exportguard.WithDelay(delay), exportguard.WithTriggerRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	src := exportguard.NewBlobSource()
	if err := src.Attach(g.LocalBlob, g.Promote, reg); err != nil {
		t.Fatal(err)
	}
	return g, src
}

// hosts returns the registry hosts of the env's image as the daemon
// builds them (no mirrors), reading blobs through src.
func (e *sourceEnv) hosts(t *testing.T, src *exportguard.BlobSource) (reference.Spec, []docker.RegistryHost) {
	t.Helper()
	spec, err := reference.Parse(e.ref)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := hostsFromMirrors(nil, anonymous, lazyClients(10*time.Second, src))(spec)
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
func (e *sourceEnv) hostClient(t *testing.T, src *exportguard.BlobSource) *http.Client {
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

// TestUpstreamFetcherReadsCommittedBlob drives the upstream stargz blob
// fetcher (its resolver, retrying client, redirect probe, size check and
// multi-range reads) over the registry hosts the daemon builds: after the
// guard's commit it reads the whole blob without a byte from the registry.
func TestUpstreamFetcherReadsCommittedBlob(t *testing.T) {
	e := newSourceEnv(t, 2_000_000)
	reg := prometheus.NewRegistry()
	g, src := e.trigger(t, time.Hour, reg)
	hosts := hostsFromMirrors(nil, anonymous, lazyClients(10*time.Second, src))
	spec, _ := e.hosts(t, src)

	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.Mounted(ctx, exportguard.MountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: string(ModeExportBase), When: exportguard.WhenNow})
	waitState(t, g.Status, "builder", e.layer, exportguard.StateMaterialized)
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
	if local := blobSourceBytes(t, reg, "local"); local < float64(len(e.data)) {
		t.Errorf("local bytes metric %v, want at least %d", local, len(e.data))
	}
}

// blobSourceBytes returns lazybase_blobsource_bytes_total{source} in reg.
func blobSourceBytes(t *testing.T, reg prometheus.Gatherer, source string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "lazybase_blobsource_bytes_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "source" && l.GetValue() == source {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

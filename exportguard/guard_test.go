package exportguard

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	bolt "go.etcd.io/bbolt"
)

// fastRetry keeps the tests' backoff short.
var fastRetry = WithRetry(4, 10*time.Millisecond, 40*time.Millisecond)

// testRegistry is go-containerregistry's in-process registry behind a
// handler that records blob GETs and lets a test change how they are served.
type testRegistry struct {
	t   testing.TB
	srv *httptest.Server
	ref string

	mu          sync.Mutex
	ranges      []string // Range header of each blob GET, in order
	served      int64    // body bytes written to blob GETs
	inflight    int
	maxInflight int
	// serve, when set, serves the n-th blob GET (from 0) instead of the
	// registry; next is the registry.
	serve func(n int, w http.ResponseWriter, r *http.Request, next http.Handler)
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	tr := &testRegistry{t: t}
	next := registry.New(registry.Logger(nopLogger()))
	tr.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || !strings.Contains(r.URL.Path, "/blobs/sha256:") {
			next.ServeHTTP(w, r)
			return
		}
		tr.mu.Lock()
		n := len(tr.ranges)
		tr.ranges = append(tr.ranges, r.Header.Get("Range"))
		tr.inflight++
		tr.maxInflight = max(tr.maxInflight, tr.inflight)
		serve := tr.serve
		tr.mu.Unlock()
		defer func() {
			tr.mu.Lock()
			tr.inflight--
			tr.mu.Unlock()
		}()
		cw := &countingWriter{ResponseWriter: w, tr: tr}
		if serve != nil {
			serve(n, cw, r, next)
			return
		}
		next.ServeHTTP(cw, r)
	}))
	t.Cleanup(tr.srv.Close)
	tr.ref = strings.TrimPrefix(tr.srv.URL, "http://") + "/test/img:latest"
	return tr
}

func (tr *testRegistry) setServe(fn func(n int, w http.ResponseWriter, r *http.Request, next http.Handler)) {
	tr.mu.Lock()
	tr.serve = fn
	tr.mu.Unlock()
}

// gets returns the Range headers of the blob GETs so far.
func (tr *testRegistry) gets() []string {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return append([]string(nil), tr.ranges...)
}

func (tr *testRegistry) servedBytes() int64 {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.served
}

// push uploads a blob of size random bytes and returns it with its descriptor.
func (tr *testRegistry) push(size int) ([]byte, ocispec.Descriptor) {
	tr.t.Helper()
	data := make([]byte, size)
	if _, err := rand.Read(data); err != nil {
		tr.t.Fatal(err)
	}
	repo, err := name.NewRepository(strings.TrimSuffix(tr.ref, ":latest"))
	if err != nil {
		tr.t.Fatal(err)
	}
	if err := remote.WriteLayer(repo, static.NewLayer(data, types.OCILayer)); err != nil {
		tr.t.Fatalf("pushing blob: %v", err)
	}
	return data, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromBytes(data), Size: int64(size)}
}

type countingWriter struct {
	http.ResponseWriter
	tr *testRegistry
}

func (w *countingWriter) Write(p []byte) (int, error) {
	n, err := w.ResponseWriter.Write(p)
	w.tr.mu.Lock()
	w.tr.served += int64(n)
	w.tr.mu.Unlock()
	return n, err
}

func (w *countingWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// cutWriter passes limit bytes, then drops the connection.
type cutWriter struct {
	http.ResponseWriter
	limit int
}

func (w *cutWriter) Write(p []byte) (int, error) {
	if len(p) < w.limit {
		w.limit -= len(p)
		return w.ResponseWriter.Write(p)
	}
	w.ResponseWriter.Write(p[:w.limit])
	w.ResponseWriter.(http.Flusher).Flush()
	panic(http.ErrAbortHandler)
}

// tamperWriter flips one bit of the body's first byte.
type tamperWriter struct {
	http.ResponseWriter
	done bool
}

func (w *tamperWriter) Write(p []byte) (int, error) {
	if !w.done && len(p) > 0 {
		q := append([]byte(nil), p...)
		q[0] ^= 1
		w.done = true
		return w.ResponseWriter.Write(q)
	}
	return w.ResponseWriter.Write(p)
}

// extraWriter drops Content-Length and appends bytes after the body.
type extraWriter struct {
	http.ResponseWriter
}

func (w *extraWriter) WriteHeader(code int) {
	w.Header().Del("Content-Length")
	w.ResponseWriter.WriteHeader(code)
}

type stores struct {
	ctx    context.Context
	store  content.Store
	leases leases.Manager // nil for a bare local store
	db     *metadata.DB   // nil for a bare local store
}

// localStore is containerd's local content store, bare.
func localStore(t testing.TB) stores {
	t.Helper()
	cs, err := local.NewStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return stores{ctx: context.Background(), store: cs}
}

// metadataStore is containerd's namespaced, garbage-collected content store
// over the local store, as the containerd daemon builds it.
func metadataStore(t testing.TB) stores {
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
	// A real snapshotter under the name lazybase serves as, so that tests
	// can make snapshots that reference blobs, as containerd does.
	sn, err := native.NewSnapshotter(filepath.Join(dir, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sn.Close() })
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{"stargz": sn})
	ctx := namespaces.WithNamespace(context.Background(), "exportguard-test")
	if err := db.Init(ctx); err != nil {
		t.Fatal(err)
	}
	return stores{ctx: ctx, store: db.ContentStore(), leases: metadata.NewLeaseManager(db), db: db}
}

func newGuard(t testing.TB, s stores, opts ...Option) *Guard {
	t.Helper()
	g, err := New(s.store, &Remote{}, append([]Option{fastRetry}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// assertNothingLeft checks that dgst is not committed and no ingest is left.
func assertNothingLeft(t testing.TB, s stores, dgst digest.Digest) {
	t.Helper()
	if _, err := s.store.Info(s.ctx, dgst); !errdefs.IsNotFound(err) {
		t.Errorf("blob %s: Info returned %v, want not found", dgst, err)
	}
	st, err := s.store.ListStatuses(s.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 0 {
		t.Errorf("ingests left behind: %+v", st)
	}
}

func assertBlob(t testing.TB, s stores, desc ocispec.Descriptor, want []byte) {
	t.Helper()
	got, err := content.ReadBlob(s.ctx, s.store, desc)
	if err != nil {
		t.Fatalf("reading committed blob: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("committed blob %s differs from the registry's", desc.Digest)
	}
}

func TestEnsureMaterializes(t *testing.T) {
	for _, tc := range []struct {
		name   string
		stores func(testing.TB) stores
	}{{"local", localStore}, {"metadata", metadataStore}} {
		t.Run(tc.name, func(t *testing.T) {
			tr := newTestRegistry(t)
			a, da := tr.push(3<<20 + 17)
			b, db := tr.push(1 << 10)
			s := tc.stores(t)
			var (
				mu   sync.Mutex
				last = map[digest.Digest]Progress{}
				seen = map[digest.Digest]int{}
			)
			g := newGuard(t, s, WithProgress(func(p Progress) {
				mu.Lock()
				last[p.Digest] = p
				seen[p.Digest]++
				mu.Unlock()
			}))
			if err := g.Ensure(s.ctx, tr.ref, da, db, da); err != nil {
				t.Fatal(err)
			}
			assertBlob(t, s, da, a)
			assertBlob(t, s, db, b)
			if n := len(tr.gets()); n != 2 {
				t.Errorf("%d blob GETs, want 2", n)
			}
			if got := tr.servedBytes(); got != da.Size+db.Size {
				t.Errorf("registry served %d bytes, want %d", got, da.Size+db.Size)
			}
			for _, d := range []ocispec.Descriptor{da, db} {
				p := last[d.Digest]
				if p.Phase != PhaseCommitted || p.Done != d.Size || p.Total != d.Size || p.Ref != tr.ref {
					t.Errorf("last progress of %s: %+v", d.Digest, p)
				}
			}
			if seen[da.Digest] < 4 { // start, at least two MiB marks, commit
				t.Errorf("%d progress reports for a 3 MiB blob", seen[da.Digest])
			}
			if s.db == nil {
				return
			}
			info, err := s.store.Info(s.ctx, da.Digest)
			if err != nil {
				t.Fatal(err)
			}
			host := strings.Split(tr.ref, "/")[0]
			for k, v := range map[string]string{
				LabelRef: tr.ref,
				"containerd.io/distribution.source." + host: "test/img",
			} {
				if info.Labels[k] != v {
					t.Errorf("label %s = %q, want %q (labels %v)", k, info.Labels[k], v, info.Labels)
				}
			}
			if _, err := time.Parse(time.RFC3339, info.Labels[LabelVerified]); err != nil {
				t.Errorf("label %s: %v", LabelVerified, err)
			}
		})
	}
}

func TestTamperedBlobIsNeverCommitted(t *testing.T) {
	tr := newTestRegistry(t)
	_, d := tr.push(1 << 20)
	tr.setServe(func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		next.ServeHTTP(&tamperWriter{ResponseWriter: w}, r)
	})
	s := metadataStore(t)
	reg := prometheus.NewRegistry()
	g := newGuard(t, s, WithRegisterer(reg))
	for i := 0; i < 2; i++ {
		err := g.Ensure(s.ctx, tr.ref, d)
		if !errors.Is(err, ErrDigestMismatch) || !errors.Is(err, ErrVerify) {
			t.Fatalf("Ensure: %v, want a digest mismatch", err)
		}
		if msg := err.Error(); !strings.Contains(msg, tr.ref) || !strings.Contains(msg, d.Digest.String()) {
			t.Errorf("error %q does not name the image and the layer", msg)
		}
		assertNothingLeft(t, s, d.Digest)
	}
	if n := len(tr.gets()); n != 2 {
		t.Errorf("%d blob GETs for two calls, want 2 (a verification failure is not retried)", n)
	}
	if v := gathered(t, reg, "lazybase_exportguard_verify_failures_total"); v != 2 {
		t.Errorf("verify failures = %v, want 2", v)
	}
}

func TestSizeMismatch(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(256 << 10)
	for _, tc := range []struct {
		name  string
		desc  ocispec.Descriptor
		serve func(int, http.ResponseWriter, *http.Request, http.Handler)
	}{
		{name: "descriptor larger", desc: ocispec.Descriptor{Digest: d.Digest, Size: d.Size + 5}},
		{name: "descriptor smaller", desc: ocispec.Descriptor{Digest: d.Digest, Size: d.Size - 5}},
		{name: "registry sends more", desc: d, serve: func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
			next.ServeHTTP(&extraWriter{ResponseWriter: w}, r)
			w.Write([]byte("trailing garbage"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr.setServe(tc.serve)
			s := localStore(t)
			g := newGuard(t, s)
			err := g.Ensure(s.ctx, tr.ref, tc.desc)
			if !errors.Is(err, ErrSizeMismatch) {
				t.Fatalf("Ensure: %v, want a size mismatch", err)
			}
			if !strings.Contains(err.Error(), d.Digest.String()) {
				t.Errorf("error %q does not name the layer", err)
			}
			assertNothingLeft(t, s, d.Digest)
		})
	}
	_ = data
}

func TestResumesCutTransfer(t *testing.T) {
	tr := newTestRegistry(t)
	const cut = 700 << 10
	data, d := tr.push(2 << 20)
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if n == 0 {
			next.ServeHTTP(&cutWriter{ResponseWriter: w, limit: cut}, r)
			return
		}
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	reg := prometheus.NewRegistry()
	g := newGuard(t, s, WithRegisterer(reg))
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	gets := tr.gets()
	want := []string{"", fmt.Sprintf("bytes=%d-%d", cut, d.Size-1)}
	if fmt.Sprint(gets) != fmt.Sprint(want) {
		t.Errorf("Range headers %q, want %q", gets, want)
	}
	if got := tr.servedBytes(); got != d.Size {
		t.Errorf("registry served %d bytes for a %d-byte blob", got, d.Size)
	}
	if v := gathered(t, reg, "lazybase_exportguard_retries_total"); v != 1 {
		t.Errorf("retries = %v, want 1", v)
	}
	if v := gathered(t, reg, "lazybase_exportguard_fetched_bytes_total"); v != float64(d.Size) {
		t.Errorf("fetched bytes = %v, want %d", v, d.Size)
	}
}

func TestRetriesServerError(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(64 << 10)
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if n < 2 {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	g := newGuard(t, s)
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	if gets := tr.gets(); len(gets) != 3 || gets[2] != "" {
		t.Errorf("Range headers %q, want three plain GETs", gets)
	}
}

func TestGivesUpOnMissingBlob(t *testing.T) {
	tr := newTestRegistry(t)
	d := ocispec.Descriptor{Digest: digest.FromString("not pushed"), Size: 10}
	s := localStore(t)
	g := newGuard(t, s)
	err := g.Ensure(s.ctx, tr.ref, d)
	if err == nil || !strings.Contains(err.Error(), d.Digest.String()) {
		t.Fatalf("Ensure: %v, want an error naming the layer", err)
	}
	if n := len(tr.gets()); n != 1 {
		t.Errorf("%d GETs for a blob the registry does not have, want 1 (not retried)", n)
	}
	assertNothingLeft(t, s, d.Digest)
}

func TestSingleFlight(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(512 << 10)
	tr.setServe(func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		time.Sleep(200 * time.Millisecond)
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	g := newGuard(t, s)
	var wg sync.WaitGroup
	errs := make([]error, 8)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = g.Ensure(s.ctx, tr.ref, d)
		}()
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	assertBlob(t, s, d, data)
	if n := len(tr.gets()); n != 1 {
		t.Errorf("%d blob GETs for 8 concurrent calls, want 1", n)
	}
}

func TestParallelismBound(t *testing.T) {
	tr := newTestRegistry(t)
	var descs []ocispec.Descriptor
	for i := 0; i < 6; i++ {
		_, d := tr.push(8 << 10)
		descs = append(descs, d)
	}
	tr.setServe(func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		time.Sleep(100 * time.Millisecond)
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	g := newGuard(t, s, WithParallelism(2))
	if err := g.Ensure(s.ctx, tr.ref, descs...); err != nil {
		t.Fatal(err)
	}
	tr.mu.Lock()
	peak := tr.maxInflight
	tr.mu.Unlock()
	if peak != 2 {
		t.Errorf("at most %d transfers at once, want 2", peak)
	}
}

func TestPresentBlobsAreNotFetched(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(32 << 10)
	s := metadataStore(t)
	if err := content.WriteBlob(s.ctx, s.store, "pre", bytes.NewReader(data), d); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	var phases []Phase
	g := newGuard(t, s, WithRegisterer(reg), WithGCRoot(), WithProgress(func(p Progress) { phases = append(phases, p.Phase) }))
	for i := 0; i < 2; i++ {
		if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(tr.gets()); n != 0 {
		t.Errorf("%d blob GETs for a present blob, want 0", n)
	}
	if fmt.Sprint(phases) != "[present present]" {
		t.Errorf("progress phases %v", phases)
	}
	if v := gathered(t, reg, "lazybase_exportguard_blobs_present_total"); v != 2 {
		t.Errorf("present = %v, want 2", v)
	}
	info, err := s.store.Info(s.ctx, d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if info.Labels[labelGCRoot] == "" {
		t.Errorf("present blob not labelled as GC root: %v", info.Labels)
	}
}

func TestCancelReturnsPromptly(t *testing.T) {
	tr := newTestRegistry(t)
	_, d := tr.push(256 << 10)
	started := make(chan struct{})
	tr.setServe(func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		w.Header().Set("Content-Length", fmt.Sprint(d.Size))
		w.WriteHeader(http.StatusOK)
		w.Write(make([]byte, 1000))
		w.(http.Flusher).Flush()
		close(started)
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	})
	s := localStore(t)
	g := newGuard(t, s)
	ctx, cancel := context.WithCancel(s.ctx)
	go func() {
		<-started
		cancel()
	}()
	begin := time.Now()
	err := g.Ensure(ctx, tr.ref, d)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Ensure: %v, want context.Canceled", err)
	}
	if el := time.Since(begin); el > 2*time.Second {
		t.Errorf("Ensure returned %s after its context ended", el)
	}
	g.Close()
	if _, err := s.store.Info(s.ctx, d.Digest); !errdefs.IsNotFound(err) {
		t.Errorf("Info after cancel: %v, want not found", err)
	}
	if err := g.Ensure(s.ctx, tr.ref, d); !errors.Is(err, ErrClosed) {
		t.Errorf("Ensure on a closed guard: %v", err)
	}
}

// TestLeaseHoldsAgainstGC runs containerd's garbage collection after Ensure:
// a blob held by the guard's lease or the caller's survives it, and goes
// when the leases go.
func TestLeaseHoldsAgainstGC(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(64 << 10)
	_, free := tr.push(1 << 10)

	s := metadataStore(t)
	caller, err := s.leases.Create(s.ctx, leases.WithID("build-1"))
	if err != nil {
		t.Fatal(err)
	}
	g := newGuard(t, s, WithLease(s.leases, "exportguard", leases.WithLabel("dev.lazybase.owner", "test")))
	if err := g.Ensure(leases.WithLease(s.ctx, caller.ID), tr.ref, d); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"exportguard", caller.ID} {
		res, err := s.leases.ListResources(s.ctx, leases.Lease{ID: id})
		if err != nil {
			t.Fatal(err)
		}
		if !containsContent(res, d.Digest) {
			t.Errorf("lease %s holds %v, not %s", id, res, d.Digest)
		}
	}

	// A guard without a lease leaves its blob to the collector.
	bare := newGuard(t, s)
	if err := bare.Ensure(s.ctx, tr.ref, free); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.GarbageCollect(s.ctx); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	if _, err := s.store.Info(s.ctx, free.Digest); !errdefs.IsNotFound(err) {
		t.Errorf("unheld blob after GC: %v, want not found", err)
	}

	for _, id := range []string{"exportguard", caller.ID} {
		if err := s.leases.Delete(s.ctx, leases.Lease{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := s.db.GarbageCollect(s.ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := s.store.Info(s.ctx, d.Digest); !errdefs.IsNotFound(err) {
		t.Errorf("blob after its leases went and GC ran: %v, want not found", err)
	}
}

func TestGCRootLabel(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(16 << 10)
	s := metadataStore(t)
	g := newGuard(t, s, WithGCRoot(), WithLabels(map[string]string{"dev.lazybase.exportguard.mount": "m1"}))
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	if _, err := s.db.GarbageCollect(s.ctx); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	info, err := s.store.Info(s.ctx, d.Digest)
	if err != nil {
		t.Fatal(err)
	}
	if info.Labels[labelGCRoot] == "" || info.Labels["dev.lazybase.exportguard.mount"] != "m1" {
		t.Errorf("labels %v", info.Labels)
	}
}

func TestMetrics(t *testing.T) {
	tr := newTestRegistry(t)
	_, good := tr.push(100 << 10)
	_, bad := tr.push(10 << 10)
	tr.setServe(func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if strings.HasSuffix(r.URL.Path, bad.Digest.String()) {
			next.ServeHTTP(&tamperWriter{ResponseWriter: w}, r)
			return
		}
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	reg := prometheus.NewRegistry()
	g := newGuard(t, s, WithRegisterer(reg))
	if err := g.Ensure(s.ctx, tr.ref, good, bad); !errors.Is(err, ErrVerify) {
		t.Fatalf("Ensure: %v", err)
	}
	if err := g.Ensure(s.ctx, tr.ref, good); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]float64{
		"lazybase_exportguard_blobs_materialized_total":     1,
		"lazybase_exportguard_blobs_present_total":          1,
		"lazybase_exportguard_blobs_failed_total":           1,
		"lazybase_exportguard_verify_failures_total":        1,
		"lazybase_exportguard_retries_total":                0,
		"lazybase_exportguard_fetched_bytes_total":          float64(good.Size + bad.Size),
		"lazybase_exportguard_transfers_in_flight":          0,
		"lazybase_exportguard_materialize_duration_seconds": 1, // sample count
	} {
		if got := gathered(t, reg, name); got != want {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	if _, err := New(s.store, &Remote{}, WithRegisterer(reg)); err == nil {
		t.Error("a second guard registered the same metrics on one registerer")
	}
}

func TestOptionsRejectNonsense(t *testing.T) {
	s := localStore(t)
	for _, o := range []Option{WithParallelism(0), WithRetry(0, 0, 0), WithRetry(3, time.Second, time.Millisecond), WithLease(nil, "x")} {
		if _, err := New(s.store, &Remote{}, o); err == nil {
			t.Errorf("New accepted a bad option")
		}
	}
}

// gathered returns the value of a counter or gauge, or the sample count of a
// histogram, as reg exposes it.
func gathered(t testing.TB, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		m := mf.GetMetric()[0]
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue()
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount())
		}
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func containsContent(res []leases.Resource, dgst digest.Digest) bool {
	for _, r := range res {
		if r.Type == "content" && r.ID == dgst.String() {
			return true
		}
	}
	return false
}

func nopLogger() *stdlog.Logger { return stdlog.New(io.Discard, "", 0) }

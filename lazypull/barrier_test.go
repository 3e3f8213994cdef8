package lazypull

import (
	"context"
	"crypto/rand"
	"errors"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// barrierEnv is an in-process registry holding a two-layer image, behind a
// handler that can flip a byte of one blob on its way out, and containerd's
// metadata content store and lease manager.
type barrierEnv struct {
	*guardEnv
	layers []digest.Digest
	tamper atomic.Value // digest.Digest whose GETs are corrupted
	gets   sync.Map     // digest -> *atomic.Int32 blob GETs
}

func newBarrierEnv(t *testing.T) *barrierEnv {
	t.Helper()
	e := &barrierEnv{}
	e.tamper.Store(digest.Digest(""))
	reg := registry.New(registry.Logger(stdlog.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, blob, isBlob := strings.Cut(r.URL.Path, "/blobs/")
		if !isBlob || r.Method != http.MethodGet {
			reg.ServeHTTP(w, r)
			return
		}
		n, _ := e.gets.LoadOrStore(blob, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		if blob != e.tamper.Load().(digest.Digest).String() {
			reg.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		reg.ServeHTTP(rec, r)
		body := rec.Body.Bytes()
		if len(body) > 0 {
			body[len(body)/2] ^= 0xff
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.WriteHeader(rec.Code)
		_, _ = w.Write(body)
	}))
	t.Cleanup(srv.Close)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	img := empty.Image
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	var ls []v1.Layer
	for range 2 {
		data := make([]byte, 200_000)
		if _, err := rand.Read(data); err != nil {
			t.Fatal(err)
		}
		l := static.NewLayer(data, types.OCILayer)
		ls = append(ls, l)
		d, _ := l.Digest()
		e.layers = append(e.layers, digest.Digest(d.String()))
	}
	if img, err = mutate.AppendLayers(img, ls...); err != nil {
		t.Fatal(err)
	}
	ref := u.Host + "/lazybase/barrier-test:v1"
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}

	store, lm := newContentStore(t)
	e.guardEnv = &guardEnv{ref: ref, layer: e.layers[0], size: 200_000, store: store, leases: lm}
	return e
}

func (e *barrierEnv) blobGETs(d digest.Digest) int32 {
	n, ok := e.gets.Load(d.String())
	if !ok {
		return 0
	}
	return n.(*atomic.Int32).Load()
}

// serve serves the barrier for g on a unix socket, as the daemon's status
// API does, and returns the socket's path.
func serveBarrierSocket(t *testing.T, g *guardTrigger) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.status")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	layersOf := remoteImageLayers(authn.DefaultKeychain, DefaultConfig().Guard.Timeouts())
	mux := http.NewServeMux()
	mux.Handle("POST "+BarrierPath, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		serveBarrier(w, r, g, layersOf)
	}))
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

func (e *barrierEnv) mountAll(g *guardTrigger, ns string, mode Mode) {
	for _, d := range e.layers {
		// BuildKit names the image by tag and digest.
		g.mounted(context.Background(), mountEvent{Namespace: ns, Ref: e.ref + "@sha256:" + strings.Repeat("1", 64), Layer: d, Mode: mode})
	}
}

// TestBarrierTriggersDelayedLayers: layers of a lazy image wait for an hour
// long delay; the barrier starts them at once and returns when both blobs
// are in the namespace's content store.
func TestBarrierTriggersDelayedLayers(t *testing.T) {
	e := newBarrierEnv(t)
	g := e.trigger(t, guardCfg(time.Hour), 0, nil)
	e.mountAll(g, "buildkit", ModeLazy)
	waitState(t, g, "buildkit", e.layers[1], GuardScheduled)
	sock := serveBarrierSocket(t, g)

	var mu sync.Mutex
	var seen []string
	start := time.Now()
	layers, err := GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}, Timeout: Duration(30 * time.Second)},
		func(l GuardLayerStatus) {
			mu.Lock()
			seen = append(seen, l.Layer+" "+l.State)
			mu.Unlock()
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("barrier returned after %s; progress %v", time.Since(start), seen)
	if len(layers) != 2 {
		t.Fatalf("barrier reported %d layers, want 2: %+v", len(layers), layers)
	}
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	for _, d := range e.layers {
		info, err := e.store.Info(ctx, d)
		if err != nil {
			t.Fatalf("layer %s not in the content store after the barrier: %v", d, err)
		}
		if info.Size != 200_000 {
			t.Errorf("layer %s: size %d", d, info.Size)
		}
		if !strings.Contains(strings.Join(seen, "\n"), d.String()+" "+GuardMaterialized) {
			t.Errorf("progress never reported %s materialized: %v", d, seen)
		}
	}
	// Again: nothing left to do, nothing fetched again.
	before := e.blobGETs(e.layers[0])
	if _, err := GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}}, nil); err != nil {
		t.Fatal(err)
	}
	if after := e.blobGETs(e.layers[0]); after != before {
		t.Errorf("second barrier fetched the blob again (%d GETs, was %d)", after, before)
	}
}

// TestBarrierRefetchesDroppedBlob: a materialized blob deleted from the
// content store is fetched again by the next barrier.
func TestBarrierRefetchesDroppedBlob(t *testing.T) {
	e := newBarrierEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	e.mountAll(g, "buildkit", ModeExportBase)
	waitState(t, g, "buildkit", e.layers[0], GuardMaterialized)
	waitState(t, g, "buildkit", e.layers[1], GuardMaterialized)
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	if err := e.store.Delete(ctx, e.layers[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := g.barrier(t.Context(), "buildkit", []string{e.ref}, remoteImageLayers(authn.DefaultKeychain, DefaultConfig().Guard.Timeouts()), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Info(ctx, e.layers[0]); err != nil {
		t.Fatalf("dropped blob not fetched again: %v", err)
	}
}

func TestBarrierNotMounted(t *testing.T) {
	e := newBarrierEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	sock := serveBarrierSocket(t, g)
	_, err := GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}}, nil)
	if err == nil || !strings.Contains(err.Error(), "image "+e.ref+": not mounted by this daemon in namespace buildkit") {
		t.Fatalf("got %v, want not mounted by this daemon", err)
	}
	// Mounted in another namespace: the error says where.
	e.mountAll(g, "other", ModeExportBase)
	_, err = GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}}, nil)
	if err == nil || !strings.Contains(err.Error(), "mounted in namespace other") {
		t.Fatalf("got %v, want the other namespace named", err)
	}
	// An image the registry does not have.
	missing := strings.Replace(e.ref, "barrier-test", "nope", 1)
	_, err = GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "other", Images: []string{missing}}, nil)
	if err == nil || !strings.Contains(err.Error(), "image "+missing+": reading manifest") {
		t.Fatalf("got %v, want a manifest error naming the image", err)
	}
}

func TestBarrierLazyOnly(t *testing.T) {
	e := newBarrierEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	e.mountAll(g, "buildkit", ModeLazyOnly)
	_, err := g.barrier(t.Context(), "buildkit", []string{e.ref}, remoteImageLayers(authn.DefaultKeychain, DefaultConfig().Guard.Timeouts()), nil)
	if err == nil || !strings.Contains(err.Error(), "lazy-only policy") || !strings.Contains(err.Error(), e.layers[0].String()) {
		t.Fatalf("got %v, want lazy-only policy naming the layer", err)
	}
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "buildkit"), e.layers[0]); !errdefs.IsNotFound(err) {
		t.Errorf("lazy-only blob in the content store: %v", err)
	}
}

// TestBarrierTamperedBlob: the registry serves a blob with one byte
// flipped. The barrier fails with a verification error naming the image and
// the layer, tries the failed layer once more, and nothing unverified is
// committed.
func TestBarrierTamperedBlob(t *testing.T) {
	e := newBarrierEnv(t)
	bad := e.layers[1]
	e.tamper.Store(bad)
	g := e.trigger(t, guardCfg(0), 0, nil)
	e.mountAll(g, "buildkit", ModeExportBase)
	waitState(t, g, "buildkit", e.layers[0], GuardMaterialized)
	deadline := time.Now().Add(20 * time.Second)
	for st := ""; st != GuardFailed; {
		for _, l := range g.status().Layers {
			if l.Layer == bad.String() {
				st = l.State
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("tampered layer: state %q, want failed", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	gets := e.blobGETs(bad)
	sock := serveBarrierSocket(t, g)
	_, err := GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}, Timeout: Duration(30 * time.Second)}, nil)
	if err == nil {
		t.Fatal("barrier succeeded over a tampered blob")
	}
	msg := err.Error()
	for _, want := range []string{"image " + e.ref, "layer " + bad.String(), "verification"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	if strings.Contains(msg, e.layers[0].String()) {
		t.Errorf("error %q names the good layer", msg)
	}
	if n := e.blobGETs(bad); n <= gets {
		t.Errorf("the barrier did not try the failed layer again (%d GETs before, %d after)", gets, n)
	}
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	if _, err := e.store.Info(ctx, bad); !errdefs.IsNotFound(err) {
		t.Errorf("tampered blob committed: %v", err)
	}
	// Once the registry serves the right bytes, the barrier succeeds.
	e.tamper.Store(digest.Digest(""))
	if _, err := g.barrier(t.Context(), "buildkit", []string{e.ref}, remoteImageLayers(authn.DefaultKeychain, DefaultConfig().Guard.Timeouts()), nil); err != nil {
		t.Fatal(err)
	}
	ra, err := e.store.ReaderAt(ctx, ocispec.Descriptor{Digest: bad, Size: 200_000})
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	b := make([]byte, ra.Size())
	if _, err := ra.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if digest.FromBytes(b) != bad {
		t.Errorf("committed blob has digest %s, want %s", digest.FromBytes(b), bad)
	}
}

// TestBarrierTimeout: a barrier on a layer whose transfer cannot finish
// (the registry hangs) gives up after its timeout, naming the layer and its
// state.
func TestBarrierTimeout(t *testing.T) {
	e := newBarrierEnv(t)
	g := e.trigger(t, guardCfg(time.Hour), 0, nil)
	e.mountAll(g, "buildkit", ModeLazy)
	// containerd "goes away": the store is replaced by one that blocks.
	release := make(chan struct{})
	defer close(release)
	inner := g.stores
	g.stores = func(ctx context.Context) (content.Store, leases.Manager, error) {
		select {
		case <-release:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
		return inner(ctx)
	}
	sock := serveBarrierSocket(t, g)
	start := time.Now()
	_, err := GuardBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}, Timeout: Duration(700 * time.Millisecond)}, nil)
	if err == nil || !strings.Contains(err.Error(), "timed out after 700ms") || !strings.Contains(err.Error(), e.layers[0].String()) {
		t.Fatalf("got %v, want a timeout naming the layer", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("barrier returned after %s", d)
	}
}

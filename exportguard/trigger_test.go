package exportguard

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/lazybase/lazybase/internal/eventually"
)

// testStores is containerd's namespaced metadata content store and lease
// manager, as the containerd daemon builds them, behind the Stores
// interface. open, when set, replaces Open (containerd "not up", or
// hanging).
type testStores struct {
	store  content.Store
	leases leases.Manager
	db     *metadata.DB
	open   func(ctx context.Context) (content.Store, leases.Manager, error)
}

func newTestStores(t *testing.T) *testStores {
	s := metadataStore(t)
	return &testStores{store: s.store, leases: s.leases, db: s.db}
}

func (s *testStores) Open(ctx context.Context) (content.Store, leases.Manager, error) {
	if s.open != nil {
		return s.open(ctx)
	}
	return s.store, s.leases, nil
}

func (s *testStores) WithNamespace(ctx context.Context, ns string) context.Context {
	return namespaces.WithNamespace(ctx, ns)
}

// triggerEnv is an in-process registry holding a two-layer image, behind a
// handler that counts blob GETs, can flip a byte of one blob on its way
// out and can hold blob GETs until released, and a content store.
type triggerEnv struct {
	ref    string
	layers []digest.Digest
	size   int64
	stores *testStores

	tamper atomic.Value // digest.Digest whose GETs are corrupted
	hold   atomic.Value // chan struct{} blob GETs wait on, when set
	gets   sync.Map     // digest -> *atomic.Int32 blob GETs
}

const testLayerSize = 200_000

func newTriggerEnv(t *testing.T) *triggerEnv {
	t.Helper()
	e := &triggerEnv{size: testLayerSize, stores: newTestStores(t)}
	e.tamper.Store(digest.Digest(""))
	e.hold.Store((chan struct{})(nil))
	reg := registry.New(registry.Logger(nopLogger()))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, blob, isBlob := strings.Cut(r.URL.Path, "/blobs/")
		if !isBlob || r.Method != http.MethodGet {
			reg.ServeHTTP(w, r)
			return
		}
		n, _ := e.gets.LoadOrStore(blob, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		if hold := e.hold.Load().(chan struct{}); hold != nil {
			select {
			case <-hold:
			case <-r.Context().Done():
				return
			}
		}
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
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	var ls []v1.Layer
	for range 2 {
		data := make([]byte, testLayerSize)
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
	e.ref = u.Host + "/lazybase/trigger-test:v1"
	r, err := name.ParseReference(e.ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *triggerEnv) blobGETs(d digest.Digest) int32 {
	n, ok := e.gets.Load(d.String())
	if !ok {
		return 0
	}
	return n.(*atomic.Int32).Load()
}

// trigger returns a Trigger over the env's stores and the registry.
func (e *triggerEnv) trigger(t *testing.T, delay time.Duration, opts ...TriggerOption) *Trigger {
	t.Helper()
	opts = append([]TriggerOption{WithDelay(delay), WithGuardOptions(fastRetry), WithStoreName("test")}, opts...)
	g, err := NewTrigger(e.stores, &Remote{}, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// mountAll tells g that both layers were mounted in ns; BuildKit names the
// image by tag and digest.
func (e *triggerEnv) mountAll(g *Trigger, ns string, when When) {
	for _, d := range e.layers {
		g.Mounted(context.Background(), MountEvent{Namespace: ns, Ref: e.ref + "@sha256:" + strings.Repeat("1", 64), Layer: d, Mode: "test", When: when})
	}
}

// layerStatus returns the status of layer in ns, ok false when g does not
// know it.
func layerStatus(g *Trigger, ns string, layer digest.Digest) (LayerStatus, bool) {
	for _, l := range g.Status().Layers {
		if l.Namespace == ns && l.Layer == layer.String() {
			return l, true
		}
	}
	return LayerStatus{}, false
}

// waitState waits until the layer of namespace ns reaches state; it fails
// at once when the layer fails instead.
func waitState(t *testing.T, g *Trigger, ns string, layer digest.Digest, state State) LayerStatus {
	t.Helper()
	var last LayerStatus
	eventually.Require(t, 20*time.Second, fmt.Sprintf("layer %s in %s reaching %s", layer, ns, state), func() error {
		last, _ = layerStatus(g, ns, layer)
		if last.State == StateFailed && state != StateFailed {
			t.Fatalf("layer %s in %s failed (%s), want %s", layer, ns, last.Error, state)
		}
		if last.State != state {
			return fmt.Errorf("state %q (%s)", last.State, last.Error)
		}
		return nil
	})
	return last
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func TestTriggerMaterializesWhenNowAtOnce(t *testing.T) {
	e := newTriggerEnv(t)
	var calls atomic.Int32
	// containerd is "not up" for the first two connection attempts.
	e.stores.open = func(context.Context) (content.Store, leases.Manager, error) {
		if calls.Add(1) <= 2 {
			return nil, nil, errors.New("containerd is not up yet")
		}
		return e.stores.store, e.stores.leases, nil
	}
	// A long delay: WhenNow must not wait for it.
	g := e.trigger(t, time.Hour, WithTriggerRegisterer(prometheus.NewRegistry()))
	layer := e.layers[0]
	ref := e.ref + "@sha256:" + strings.Repeat("0", 64)
	ev := MountEvent{Namespace: "buildkit", Ref: ref, Layer: layer, Mode: "export-base", When: WhenNow}
	g.Mounted(context.Background(), ev)
	st := waitState(t, g, "buildkit", layer, StateMaterialized)
	if !st.Materialized || st.Size != e.size || st.Image != ref || st.Mode != "export-base" {
		t.Errorf("status %+v", st)
	}

	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	info, err := e.stores.store.Info(ctx, layer)
	if err != nil {
		t.Fatalf("blob not in the buildkit namespace's content store: %v", err)
	}
	// Nothing holds the blob for ever: no GC root label, and with the
	// default budget (0) no lease, not even the transfer's.
	if _, rooted := info.Labels["containerd.io/gc.root"]; info.Size != e.size || rooted {
		t.Errorf("blob info %+v: want size %d and no gc.root label", info, e.size)
	}
	if ls, err := e.stores.leases.List(ctx); err != nil || len(ls) != 0 {
		t.Errorf("leases left in namespace buildkit: %+v (%v)", ls, err)
	}
	// Another namespace's store does not see it.
	if _, err := e.stores.store.Info(namespaces.WithNamespace(context.Background(), "other"), layer); !errdefs.IsNotFound(err) {
		t.Errorf("blob visible in another namespace: %v", err)
	}
	if n := counterValue(t, g.triggers.WithLabelValues("export-base", "now")); n != 1 {
		t.Errorf("triggers{export-base,now} = %v", n)
	}
	// A second mount of the same layer does not start another transfer.
	g.Mounted(context.Background(), ev)
	if n := counterValue(t, g.triggers.WithLabelValues("export-base", "now")); n != 1 {
		t.Errorf("triggers{export-base,now} after a second mount = %v", n)
	}
}

// TestTriggerOneTransferAcrossNamespaces: the same layers mounted in two
// namespaces at once cross the network once. The second namespace waits
// for the first one's transfers and then commits each blob from
// containerd's content store, which the namespaces share, with its own
// labels; no ingest and no lease is left in either.
func TestTriggerOneTransferAcrossNamespaces(t *testing.T) {
	e := newTriggerEnv(t)
	hold := make(chan struct{})
	e.hold.Store(hold)
	g := e.trigger(t, 0)
	e.mountAll(g, "buildkit", WhenNow)
	eventually.Require(t, 20*time.Second, "the first namespace's transfers at the registry", func() error {
		for _, d := range e.layers {
			if n := e.blobGETs(d); n != 1 {
				return fmt.Errorf("layer %s: %d GETs", d, n)
			}
		}
		return nil
	})
	e.mountAll(g, "other", WhenNow)
	for _, d := range e.layers {
		waitState(t, g, "other", d, StateMaterializing)
	}
	// A second transfer would reach the registry within milliseconds.
	err := eventually.Wait(context.Background(), 500*time.Millisecond, func() error {
		for _, d := range e.layers {
			if n := e.blobGETs(d); n > 1 {
				return nil
			}
		}
		return errors.New("one GET per layer")
	})
	if err == nil {
		t.Errorf("the second namespace fetched a blob while the first one's transfer ran")
	}
	close(hold)
	for _, ns := range []string{"buildkit", "other"} {
		ctx := namespaces.WithNamespace(context.Background(), ns)
		for _, d := range e.layers {
			if st := waitState(t, g, ns, d, StateMaterialized); !st.Materialized || st.Size != e.size {
				t.Errorf("namespace %s layer %s: status %+v", ns, d, st)
			}
			info, err := e.stores.store.Info(ctx, d)
			if err != nil {
				t.Fatalf("namespace %s: blob %s not in its content store: %v", ns, d, err)
			}
			if info.Labels[LabelRef] != e.ref {
				t.Errorf("namespace %s: blob %s labels %v, want %s=%s", ns, d, info.Labels, LabelRef, e.ref)
			}
		}
		if sts, err := e.stores.store.ListStatuses(ctx); err != nil || len(sts) != 0 {
			t.Errorf("namespace %s: ingests left: %+v (%v)", ns, sts, err)
		}
		if ls, err := e.stores.leases.List(ctx); err != nil || len(ls) != 0 {
			t.Errorf("namespace %s: leases left: %+v (%v)", ns, ls, err)
		}
	}
	for _, d := range e.layers {
		if n := e.blobGETs(d); n != 1 {
			t.Errorf("layer %s: %d blob GETs for two namespaces, want 1", d, n)
		}
	}
}

// TestTriggerWhenNeverSkips: a layer mounted WhenNever is recorded as
// skipped at once and never fetched; Close waits for every transfer the
// Trigger started, so none can land after the check.
func TestTriggerWhenNeverSkips(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	layer := e.layers[0]
	g.Mounted(context.Background(), MountEvent{Namespace: "buildkit", Ref: e.ref, Layer: layer, Mode: "lazy-only", When: WhenNever})
	st, ok := layerStatus(g, "buildkit", layer)
	if !ok || st.State != StateSkipped || st.Materialized {
		t.Fatalf("status %+v (known %v), want skipped", st, ok)
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := e.stores.store.Info(namespaces.WithNamespace(context.Background(), "buildkit"), layer); !errdefs.IsNotFound(err) {
		t.Errorf("skipped blob in the content store: %v", err)
	}
	if n := e.blobGETs(layer); n != 0 {
		t.Errorf("skipped blob fetched %d times", n)
	}
}

func TestTriggerWhenDelayedWaitsForDelay(t *testing.T) {
	e := newTriggerEnv(t)
	const delay = 700 * time.Millisecond
	g := e.trigger(t, delay)
	start := time.Now()
	layer := e.layers[0]
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: layer, Mode: "lazy", When: WhenDelayed})
	if st, _ := layerStatus(g, "default", layer); st.State != StateScheduled {
		t.Fatalf("state right after the mount %q, want scheduled", st.State)
	}
	waitState(t, g, "default", layer, StateMaterialized)
	if d := time.Since(start); d < delay {
		t.Errorf("delayed layer materialized after %s, before its delay", d)
	}
	if _, err := e.stores.store.Info(namespaces.WithNamespace(context.Background(), "default"), layer); err != nil {
		t.Error(err)
	}
}

// TestTriggerPromoteEndsDelay: Promote starts a layer waiting for an hour
// long delay at once.
func TestTriggerPromoteEndsDelay(t *testing.T) {
	e := newTriggerEnv(t)
	reg := prometheus.NewRegistry()
	g := e.trigger(t, time.Hour, WithTriggerRegisterer(reg))
	layer := e.layers[0]
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: layer, Mode: "lazy", When: WhenDelayed})
	g.Promote(layer)
	waitState(t, g, "default", layer, StateMaterialized)
	if n := counterValue(t, g.promotions); n != 1 {
		t.Errorf("promotions = %v, want 1", n)
	}
	// Promoting again, or a blob nobody waits for, changes nothing.
	g.Promote(layer)
	g.Promote(e.layers[1])
	if n := counterValue(t, g.promotions); n != 1 {
		t.Errorf("promotions after more calls = %v, want 1", n)
	}
}

func TestTriggerCloseCancelsPending(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, time.Hour)
	layer := e.layers[0]
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: layer, Mode: "lazy", When: WhenDelayed})
	done := make(chan error, 1)
	go func() { done <- g.Close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a pending delay")
	}
	if _, err := e.stores.store.Info(namespaces.WithNamespace(context.Background(), "default"), layer); !errdefs.IsNotFound(err) {
		t.Errorf("blob materialized after Close: %v", err)
	}
	// A mount after Close is ignored.
	g.Mounted(context.Background(), MountEvent{Namespace: "x", Ref: e.ref, Layer: layer, When: WhenNow})
	if _, ok := layerStatus(g, "x", layer); ok {
		t.Error("a mount after Close was recorded")
	}
}

func TestTriggerMissingBlobFails(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	missing := digest.FromString("not in the registry")
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: missing, Mode: "export-base", When: WhenNow})
	st := waitState(t, g, "default", missing, StateFailed)
	if !strings.Contains(st.Error, missing.String()) {
		t.Errorf("error %q does not name the layer", st.Error)
	}
}

func TestNewTriggerRejectsNonsense(t *testing.T) {
	e := newTriggerEnv(t)
	for name, c := range map[string]struct {
		stores Stores
		reg    Registry
		opts   []TriggerOption
	}{
		"no stores":        {nil, &Remote{}, nil},
		"no registry":      {e.stores, nil, nil},
		"negative delay":   {e.stores, &Remote{}, []TriggerOption{WithDelay(-time.Second)}},
		"bad guard option": {e.stores, &Remote{}, []TriggerOption{WithGuardOptions(WithParallelism(0))}},
	} {
		t.Run(name, func(t *testing.T) {
			g, err := NewTrigger(c.stores, c.reg, c.opts...)
			if err == nil {
				g.Close()
				t.Fatal("NewTrigger accepted it")
			}
		})
	}
}

func TestStripDigest(t *testing.T) {
	for in, want := range map[string]string{
		"r.example/a/b:1@sha256:abc": "r.example/a/b:1",
		"r.example/a/b@sha256:abc":   "r.example/a/b@sha256:abc",
		"127.0.0.1:5000/a:tag":       "127.0.0.1:5000/a:tag",
	} {
		if got := stripDigest(in); got != want {
			t.Errorf("stripDigest(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestStateTerminal(t *testing.T) {
	for s, want := range map[State]bool{
		StateScheduled: false, StateMaterializing: false,
		StateMaterialized: true, StateFailed: true, StateSkipped: true,
	} {
		if got := s.Terminal(); got != want {
			t.Errorf("%s.Terminal() = %v, want %v", s, got, want)
		}
	}
}

// TestTriggerHolds: Holds tells a blob the Trigger holds or will hold
// (scheduled, materializing, materialized) from one it skips, gave up on,
// or never heard of, whichever namespace mounted it.
func TestTriggerHolds(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, time.Hour)
	delayed, skipped, other := e.layers[0], e.layers[1], digest.FromString("never mounted")
	missing := digest.FromString("not in the registry")
	check := func(what string, dgst digest.Digest, wantHeld, wantKnown bool) {
		t.Helper()
		if held, known := g.Holds(dgst); held != wantHeld || known != wantKnown {
			t.Errorf("%s: Holds = (%v, %v), want (%v, %v)", what, held, known, wantHeld, wantKnown)
		}
	}
	check("before any mount", delayed, false, false)

	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: delayed, Mode: "lazy", When: WhenDelayed})
	check("scheduled", delayed, true, true)
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: skipped, Mode: "lazy-only", When: WhenNever})
	check("skipped", skipped, false, true)
	check("never mounted", other, false, false)

	// The same blob mounted for a guarded image in another namespace is
	// held.
	g.Mounted(context.Background(), MountEvent{Namespace: "buildkit", Ref: e.ref, Layer: skipped, Mode: "export-base", When: WhenNow})
	check("skipped in one namespace, materializing in another", skipped, true, true)
	waitState(t, g, "buildkit", skipped, StateMaterialized)
	check("materialized", skipped, true, true)

	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: missing, Mode: "export-base", When: WhenNow})
	waitState(t, g, "default", missing, StateFailed)
	check("failed", missing, false, true)
}

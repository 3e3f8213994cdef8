package lazypull

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"net/http/httptest"
	"net/url"
	"strings"
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
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
)

// guardEnv is an in-process registry holding one layer blob and
// containerd's namespaced metadata content store and lease manager over its
// local store, as the containerd daemon builds them.
type guardEnv struct {
	ref    string
	layer  digest.Digest
	size   int64
	store  content.Store
	leases leases.Manager
}

func newGuardEnv(t *testing.T) *guardEnv {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	u, err := url.Parse(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 300_000)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	ref := u.Host + "/lazybase/guard-test:v1"
	repo, err := name.NewRepository(u.Host + "/lazybase/guard-test")
	if err != nil {
		t.Fatal(err)
	}
	l := static.NewLayer(data, types.OCILayer)
	if err := remote.WriteLayer(repo, l); err != nil {
		t.Fatal(err)
	}
	dgst, _ := l.Digest()

	store, lm := newContentStore(t)
	return &guardEnv{ref: ref, layer: digest.Digest(dgst.String()), size: int64(len(data)), store: store, leases: lm}
}

func (e *guardEnv) trigger(t *testing.T, cfg GuardConfig, failFirst int32, reg prometheus.Registerer) *guardTrigger {
	t.Helper()
	var calls atomic.Int32
	stores := func(context.Context) (content.Store, leases.Manager, error) {
		if calls.Add(1) <= failFirst {
			return nil, nil, errors.New("containerd is not up yet")
		}
		return e.store, e.leases, nil
	}
	g, err := newGuardTrigger(cfg, stores, remoteBlobSize(authn.DefaultKeychain, DefaultConfig().Guard.Timeouts()), &exportguard.Remote{}, reg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.close() })
	return g
}

func guardCfg(delay time.Duration) GuardConfig {
	c := DefaultConfig().Guard
	c.Delay = Duration(delay)
	return c
}

// waitState polls the trigger's status until the layer of namespace ns
// reaches state.
func waitState(t *testing.T, g *guardTrigger, ns string, layer digest.Digest, state string) GuardLayerStatus {
	t.Helper()
	var last GuardLayerStatus
	eventually.Require(t, 20*time.Second, fmt.Sprintf("layer %s in %s in state %q", layer, ns, state), func() error {
		last = GuardLayerStatus{}
		for _, l := range g.status().Layers {
			if l.Namespace == ns && l.Layer == layer.String() {
				last = l
			}
		}
		if last.State == state {
			return nil
		}
		if last.State == GuardFailed {
			t.Fatalf("layer %s in %s: failed (%s), want %q", layer, ns, last.Error, state)
		}
		return fmt.Errorf("state %q", last.State)
	})
	return last
}

func TestGuardExportBaseMaterializesAtOnce(t *testing.T) {
	e := newGuardEnv(t)
	reg := prometheus.NewRegistry()
	// A long delay: export-base must not wait for it. containerd is "not
	// up" for the first two connection attempts.
	g := e.trigger(t, guardCfg(time.Hour), 2, reg)
	// BuildKit names the image by tag and digest.
	ref := e.ref + "@sha256:" + strings.Repeat("0", 64)
	g.mounted(context.Background(), mountEvent{Namespace: "buildkit", Ref: ref, Layer: e.layer, Mode: ModeExportBase})
	st := waitState(t, g, "buildkit", e.layer, GuardMaterialized)
	if !st.Materialized || st.Size != e.size || st.Image != ref {
		t.Errorf("status %+v", st)
	}

	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	info, err := e.store.Info(ctx, e.layer)
	if err != nil {
		t.Fatalf("blob not in the buildkit namespace's content store: %v", err)
	}
	if info.Size != e.size || info.Labels["containerd.io/gc.root"] == "" {
		t.Errorf("blob info %+v: want size %d and a gc.root label", info, e.size)
	}
	rs, err := e.leases.ListResources(ctx, leases.Lease{ID: GuardLeaseID})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].ID != e.layer.String() {
		t.Errorf("lease %s holds %+v, want the blob", GuardLeaseID, rs)
	}
	// Another namespace's store does not see it.
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "other"), e.layer); !errdefs.IsNotFound(err) {
		t.Errorf("blob visible in another namespace: %v", err)
	}
	if n := counterValue(t, g.triggers.WithLabelValues("export-base", "now")); n != 1 {
		t.Errorf("triggers{export-base,now} = %v", n)
	}
	// A second mount of the same layer does not start another transfer.
	g.mounted(context.Background(), mountEvent{Namespace: "buildkit", Ref: ref, Layer: e.layer, Mode: ModeExportBase})
	if n := counterValue(t, g.triggers.WithLabelValues("export-base", "now")); n != 1 {
		t.Errorf("triggers{export-base,now} after a second mount = %v", n)
	}
}

func TestGuardLazyOnlyNeverMaterializes(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	g.mounted(context.Background(), mountEvent{Namespace: "buildkit", Ref: e.ref, Layer: e.layer, Mode: ModeLazyOnly})
	g.mounted(context.Background(), mountEvent{Namespace: "buildkit", Ref: e.ref, Layer: e.layer, Mode: ModeEager})
	time.Sleep(300 * time.Millisecond)
	st := waitState(t, g, "buildkit", e.layer, GuardSkipped)
	if st.Materialized {
		t.Errorf("status %+v", st)
	}
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "buildkit"), e.layer); !errdefs.IsNotFound(err) {
		t.Errorf("lazy-only blob in the content store: %v", err)
	}
}

func TestGuardLazyWaitsForDelay(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(700*time.Millisecond), 0, nil)
	start := time.Now()
	g.mounted(context.Background(), mountEvent{Namespace: "default", Ref: e.ref, Layer: e.layer, Mode: ModeLazy})
	waitState(t, g, "default", e.layer, GuardScheduled)
	waitState(t, g, "default", e.layer, GuardMaterialized)
	if d := time.Since(start); d < 700*time.Millisecond {
		t.Errorf("lazy layer materialized after %s, before its delay", d)
	}
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "default"), e.layer); err != nil {
		t.Error(err)
	}
}

func TestGuardCloseCancelsPending(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(time.Hour), 0, nil)
	g.mounted(context.Background(), mountEvent{Namespace: "default", Ref: e.ref, Layer: e.layer, Mode: ModeLazy})
	done := make(chan error, 1)
	go func() { done <- g.close() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("close waited for a pending delay")
	}
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "default"), e.layer); !errdefs.IsNotFound(err) {
		t.Errorf("blob materialized after close: %v", err)
	}
}

func TestGuardMissingBlobFails(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	missing := digest.FromString("not in the registry")
	g.mounted(context.Background(), mountEvent{Namespace: "default", Ref: e.ref, Layer: missing, Mode: ModeExportBase})
	var st []GuardLayerStatus
	eventually.Require(t, 20*time.Second, "the missing layer failed", func() error {
		if st = g.status().Layers; len(st) != 1 || st[0].State != GuardFailed {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	if !strings.Contains(st[0].Error, missing.String()) {
		t.Errorf("error %q does not name the layer", st[0].Error)
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

// TestDaemonGuardMountedNamespace: the daemon's hook hands a lazily mounted
// layer to the guard under the namespace of the Prepare's context, and the
// blob lands in that namespace's content store.
func TestDaemonGuardMountedNamespace(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	d := &Daemon{guard: g}
	plan := preparePlan{Candidate: true, Remote: true, Ref: e.ref, Layer: e.layer.String(), Decision: Decision{Mode: ModeExportBase, Rule: 0}}
	d.guardMounted(namespaces.WithNamespace(context.Background(), "builder-ns"), plan)
	waitState(t, g, "builder-ns", e.layer, GuardMaterialized)
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "builder-ns"), e.layer); err != nil {
		t.Fatal(err)
	}
	// Without a namespace the layer goes to containerd's default one.
	d.guardMounted(context.Background(), plan)
	waitState(t, g, namespaces.Default, e.layer, GuardMaterialized)
	if got := d.GuardStatus(); len(got.Layers) != 2 {
		t.Errorf("guard status %+v, want the layer in two namespaces", got.Layers)
	}
}

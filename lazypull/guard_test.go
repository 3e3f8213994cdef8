package lazypull

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	stdlog "log"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"

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

// stores returns the daemon's containerd stores with the env's in-process
// store in place of a connection to containerd.
func (e *guardEnv) stores() *containerdStores {
	s := newContainerdStores("/nonexistent/containerd.sock")
	s.open = func(context.Context) (content.Store, leases.Manager, error) { return e.store, e.leases, nil }
	return s
}

// trigger returns the export guard the daemon builds from cfg, over the
// env's store.
func (e *guardEnv) trigger(t *testing.T, cfg GuardConfig) *exportguard.Trigger {
	t.Helper()
	g, err := newGuardTrigger(cfg, e.stores(), &exportguard.Remote{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

func guardCfg(delay time.Duration) GuardConfig {
	c := DefaultConfig().Guard
	c.Delay = Duration(delay)
	return c
}

// waitState waits until the layer of namespace ns reaches state.
func waitState(t *testing.T, st func() *exportguard.Status, ns string, layer digest.Digest, state exportguard.State) exportguard.LayerStatus {
	t.Helper()
	var last exportguard.LayerStatus
	eventually.Require(t, 30*time.Second, fmt.Sprintf("layer %s in %s reaching %s", layer, ns, state), func() error {
		for _, l := range st().Layers {
			if l.Namespace == ns && l.Layer == layer.String() {
				last = l
			}
		}
		if last.State == exportguard.StateFailed && state != exportguard.StateFailed {
			t.Fatalf("layer %s in %s failed: %s", layer, ns, last.Error)
		}
		if last.State != state {
			return fmt.Errorf("state %q", last.State)
		}
		return nil
	})
	return last
}

// TestWhenOfMode: each policy mode maps onto when the guard materializes
// the blob; eager mounts nothing lazily and is not handed over.
func TestWhenOfMode(t *testing.T) {
	for m, want := range map[Mode]struct {
		when exportguard.When
		ok   bool
	}{
		ModeExportBase: {exportguard.WhenNow, true},
		ModeLazy:       {exportguard.WhenDelayed, true},
		"":             {exportguard.WhenDelayed, true},
		ModeLazyOnly:   {exportguard.WhenNever, true},
		ModeEager:      {0, false},
		"bogus":        {0, false},
	} {
		w, ok := whenOf(m)
		if w != want.when || ok != want.ok {
			t.Errorf("whenOf(%q) = %v, %v; want %v, %v", m, w, ok, want.when, want.ok)
		}
	}
}

// TestDaemonGuardMountedNamespace: the daemon's hook hands a lazily mounted
// layer to the guard under the namespace of the Prepare's context, and the
// blob lands in that namespace's content store; an eager layer is not
// handed over.
func TestDaemonGuardMountedNamespace(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(0))
	d := &Daemon{guard: g}
	plan := preparePlan{Candidate: true, Remote: true, Ref: e.ref, Layer: e.layer.String(), Decision: Decision{Mode: ModeExportBase, Rule: 0}}
	d.guardMounted(namespaces.WithNamespace(context.Background(), "builder-ns"), plan)
	st := waitState(t, d.GuardStatus, "builder-ns", e.layer, exportguard.StateMaterialized)
	if st.Mode != string(ModeExportBase) || st.Size != e.size {
		t.Errorf("status %+v", st)
	}
	if _, err := e.store.Info(namespaces.WithNamespace(context.Background(), "builder-ns"), e.layer); err != nil {
		t.Fatal(err)
	}
	// Without a namespace the layer goes to containerd's default one.
	d.guardMounted(context.Background(), plan)
	waitState(t, d.GuardStatus, namespaces.Default, e.layer, exportguard.StateMaterialized)
	eager := plan
	eager.Decision.Mode = ModeEager
	d.guardMounted(namespaces.WithNamespace(context.Background(), "eager-ns"), eager)
	if got := d.GuardStatus(); len(got.Layers) != 2 {
		t.Errorf("guard status %+v, want the layer in two namespaces", got.Layers)
	}
}

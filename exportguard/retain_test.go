package exportguard

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/internal/eventually"
)

// The tests below run containerd's own metadata store and garbage
// collector (metadata.DB.GarbageCollect) over a local content store and a
// native snapshotter: what they assert is what a containerd daemon does
// with the blobs the guard commits.

const gcNS = "buildkit"

func gcCtx() context.Context { return namespaces.WithNamespace(context.Background(), gcNS) }

// collect runs containerd's garbage collection once.
func (e *triggerEnv) collect(t *testing.T) {
	t.Helper()
	if _, err := e.stores.db.GarbageCollect(context.Background()); err != nil {
		t.Fatalf("garbage collection: %v", err)
	}
}

// present reports whether dgst is in the namespace's content store.
func (e *triggerEnv) present(t *testing.T, dgst digest.Digest) bool {
	t.Helper()
	_, err := e.stores.store.Info(gcCtx(), dgst)
	if err != nil && !errdefs.IsNotFound(err) {
		t.Fatal(err)
	}
	return err == nil
}

// snapshotOf makes a committed snapshot of layer in containerd's metadata,
// labelled as lazybase labels the snapshots of lazy layers, held by a
// lease named holder as BuildKit holds the snapshots of its records. It
// returns a function that deletes the lease.
func (e *triggerEnv) snapshotOf(t *testing.T, holder string, layer digest.Digest) func() {
	t.Helper()
	ctx := gcCtx()
	l, err := e.stores.leases.Create(ctx, leases.WithID(holder))
	if err != nil {
		t.Fatal(err)
	}
	lctx := leases.WithLease(ctx, l.ID)
	sn := e.stores.db.Snapshotter("stargz")
	key := holder + "-active"
	if _, err := sn.Prepare(lctx, key, ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(lctx, holder+"-"+layer.Encoded()[:12], key,
		snapshots.WithLabels(map[string]string{LabelSnapshotRef: layer.String()})); err != nil {
		t.Fatal(err)
	}
	return func() {
		if err := e.stores.leases.Delete(ctx, l); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *triggerEnv) materialize(t *testing.T, g *Trigger, layer digest.Digest) {
	t.Helper()
	g.Mounted(context.Background(), MountEvent{Namespace: gcNS, Ref: e.ref, Layer: layer, Mode: "export-base", When: WhenNow})
	waitState(t, g, gcNS, layer, StateMaterialized)
}

// TestBlobLivesWhileItsSnapshotDoes: with the default budget a committed
// blob is kept by containerd's GC exactly as long as a snapshot of its
// layer references it; a blob no snapshot references is collected.
func TestBlobLivesWhileItsSnapshotDoes(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	used, unused := e.layers[0], e.layers[1]
	release := e.snapshotOf(t, "buildkit-record", used)
	e.materialize(t, g, used)
	e.materialize(t, g, unused)
	if !e.present(t, used) || !e.present(t, unused) {
		t.Fatal("blobs not committed")
	}
	e.collect(t)
	if !e.present(t, used) {
		t.Error("blob referenced by a snapshot was collected")
	}
	if e.present(t, unused) {
		t.Error("blob no snapshot references survived garbage collection")
	}
	ls, err := e.stores.leases.List(gcCtx())
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		if l.ID != "buildkit-record" {
			t.Errorf("lease %s left behind", l.ID)
		}
	}
	// The record goes (buildctl prune): its snapshot, then the blob.
	release()
	e.collect(t)
	if e.present(t, used) {
		t.Error("blob survived the removal of the last snapshot of its layer")
	}
}

// TestRetentionBudgetKeepsMostRecentlyUsed: guard.max_bytes keeps the
// most recently used blobs nothing else references, within the budget.
func TestRetentionBudgetKeepsMostRecentlyUsed(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0, WithMaxBytes(e.size)) // room for one blob
	older, newer := e.layers[0], e.layers[1]
	e.materialize(t, g, older)
	e.collect(t)
	if !e.present(t, older) {
		t.Fatal("blob within the budget was collected")
	}
	e.materialize(t, g, newer)
	e.collect(t)
	if e.present(t, older) {
		t.Error("least recently used blob beyond the budget survived")
	}
	if !e.present(t, newer) {
		t.Error("most recently used blob within the budget was collected")
	}
	rs, err := e.stores.leases.ListResources(gcCtx(), leases.Lease{ID: LeaseID})
	if err != nil {
		t.Fatal(err)
	}
	if len(rs) != 1 || rs[0].ID != newer.String() {
		t.Errorf("lease %s holds %+v, want only %s", LeaseID, rs, newer)
	}
}

// TestRetentionReleasesBlobsOfEarlierVersions: blobs an earlier lazybase
// held for ever (the lease, a gc.root label) follow the same rule once
// the guard runs in their namespace.
func TestRetentionReleasesBlobsOfEarlierVersions(t *testing.T) {
	e := newTriggerEnv(t)
	ctx := gcCtx()
	s := stores{ctx: ctx, store: e.stores.store}
	old := map[string]string{LabelRef: e.ref, "lazybase.io/exportguard": "true", labelGCRoot: time.Now().UTC().Format(time.RFC3339)}
	stillMounted := writeBlob(t, s, "layer of a snapshot that still exists", old)
	gone := writeBlob(t, s, "layer of a removed snapshot", old)
	pulled := writeBlob(t, s, "pulled by someone else", map[string]string{labelGCRoot: "x"})
	l, err := e.stores.leases.Create(ctx, leases.WithID(LeaseID))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range []digest.Digest{stillMounted, gone} {
		if err := e.stores.leases.AddResource(ctx, l, leases.Resource{ID: d.String(), Type: "content"}); err != nil {
			t.Fatal(err)
		}
	}
	e.snapshotOf(t, "buildkit-record", stillMounted)
	e.collect(t)
	if !e.present(t, gone) {
		t.Fatal("test set-up: the old lease did not hold the blob")
	}

	g := e.trigger(t, 0)
	e.materialize(t, g, e.layers[0])
	e.collect(t)
	if e.present(t, gone) {
		t.Error("blob of an earlier version that nothing uses survived")
	}
	if !e.present(t, stillMounted) {
		t.Error("blob of an earlier version whose snapshot exists was collected")
	}
	if !e.present(t, pulled) {
		t.Error("a GC root the guard did not commit lost its label")
	}
	if _, err := e.stores.leases.ListResources(ctx, leases.Lease{ID: LeaseID}); !errdefs.IsNotFound(err) {
		t.Errorf("lease %s of earlier versions: %v, want it deleted", LeaseID, err)
	}
	info, err := e.stores.store.Info(ctx, stillMounted)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := info.Labels[labelGCRoot]; ok {
		t.Errorf("blob %s keeps its gc.root label", stillMounted)
	}
}

// TestRemountAfterReleaseMaterializesAgain: a layer whose blob was
// released (prune) and that is mounted again gets its blob back.
func TestRemountAfterReleaseMaterializesAgain(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	layer := e.layers[0]
	e.materialize(t, g, layer)
	e.collect(t)
	if e.present(t, layer) {
		t.Fatal("unreferenced blob survived garbage collection")
	}
	gets := e.blobGETs(layer)
	e.snapshotOf(t, "second-build", layer)
	g.Mounted(context.Background(), MountEvent{Namespace: gcNS, Ref: e.ref, Layer: layer, Mode: "export-base", When: WhenNow})
	eventually.Require(t, 20*time.Second, "blob materialized again", func() error {
		if !e.present(t, layer) {
			return errors.New("not in the content store")
		}
		return nil
	})
	if got := e.blobGETs(layer); got <= gets {
		t.Errorf("blob GETs %d after the remount, want more than %d", got, gets)
	}
	// Mounted again while present: no transfer.
	gets = e.blobGETs(layer)
	g.Mounted(context.Background(), MountEvent{Namespace: gcNS, Ref: e.ref, Layer: layer, Mode: "export-base", When: WhenNow})
	g.Close() // waits for the check the mount started
	if got := e.blobGETs(layer); got != gets {
		t.Errorf("blob GETs went from %d to %d for a present blob", gets, got)
	}
}

func TestWithRetentionRejects(t *testing.T) {
	s := metadataStore(t)
	for _, tc := range []struct {
		name string
		opts []Option
		want string
	}{
		{"nil manager", []Option{WithRetention(nil, "x", 0)}, "lease manager is nil"},
		{"empty id", []Option{WithRetention(s.leases, "", 0)}, "lease id is empty"},
		{"negative budget", []Option{WithRetention(s.leases, "x", -1)}, "must not be negative"},
		{"with lease", []Option{WithRetention(s.leases, "x", 0), WithLease(s.leases, "y")}, "conflicts"},
		{"with gc root", []Option{WithGCRoot(), WithRetention(s.leases, "x", 0)}, "conflicts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(s.store, &Remote{}, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New: %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if _, err := NewTrigger(&testStores{store: s.store, leases: s.leases}, &Remote{}, WithMaxBytes(-1)); err == nil {
		t.Error("NewTrigger accepted a negative budget")
	}
}

// labellingStores is testStores that labels the namespace's snapshots as
// lazypull's containerd stores do, recording when it was asked.
type labellingStores struct {
	*testStores
	layer  digest.Digest
	called []string
}

func (s *labellingStores) LabelSnapshots(ctx context.Context) error {
	ns, _ := namespaces.Namespace(ctx)
	s.called = append(s.called, ns)
	sn := s.db.Snapshotter("stargz")
	_, err := sn.Update(ctx, snapshots.Info{Name: "old-snapshot", Labels: map[string]string{LabelSnapshotRef: s.layer.String()}}, "labels."+LabelSnapshotRef)
	return err
}

// TestTriggerLabelsSnapshotsBeforeReleasing: a snapshot an earlier
// version recorded without the blob reference gets it from the Stores
// before the Guard releases the old lease, so its blob survives.
func TestTriggerLabelsSnapshotsBeforeReleasing(t *testing.T) {
	e := newTriggerEnv(t)
	ctx := gcCtx()
	s := stores{ctx: ctx, store: e.stores.store}
	old := writeBlob(t, s, "blob of an old lazy snapshot", map[string]string{LabelRef: e.ref})
	l, err := e.stores.leases.Create(ctx, leases.WithID(LeaseID))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.stores.leases.AddResource(ctx, l, leases.Resource{ID: old.String(), Type: "content"}); err != nil {
		t.Fatal(err)
	}
	hl, err := e.stores.leases.Create(ctx, leases.WithID("buildkit-record"))
	if err != nil {
		t.Fatal(err)
	}
	lctx := leases.WithLease(ctx, hl.ID)
	sn := e.stores.db.Snapshotter("stargz")
	if _, err := sn.Prepare(lctx, "old-active", ""); err != nil {
		t.Fatal(err)
	}
	if err := sn.Commit(lctx, "old-snapshot", "old-active"); err != nil {
		t.Fatal(err)
	}
	ls := &labellingStores{testStores: e.stores, layer: old}
	g, err := NewTrigger(ls, &Remote{}, WithGuardOptions(fastRetry))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	e.materialize(t, g, e.layers[0])
	e.collect(t)
	if len(ls.called) != 1 || ls.called[0] != gcNS {
		t.Errorf("LabelSnapshots called for %v, want once for %s", ls.called, gcNS)
	}
	if !e.present(t, old) {
		t.Error("blob of a snapshot an earlier version recorded was released")
	}
}

// TestRetentionResumesAcrossGC: a transfer whose only caller gives up
// keeps its partial ingest under its own lease through a garbage
// collection, and the next call fetches only the rest; once committed, no
// transfer lease is left.
func TestRetentionResumesAcrossGC(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(512 << 10)
	const first = 100 << 10
	started := make(chan struct{})
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if n > 0 {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(d.Size))
		w.WriteHeader(http.StatusOK)
		w.Write(data[:first])
		w.(http.Flusher).Flush()
		close(started)
		<-r.Context().Done()
	})
	s := metadataStore(t)
	g := newGuard(t, s, WithRetention(s.leases, LeaseID, 1<<30))
	ctx, cancel := context.WithCancel(s.ctx)
	go func() {
		<-started
		// Let the client write what it received before it is cut off.
		time.Sleep(100 * time.Millisecond)
		cancel()
	}()
	if err := g.Ensure(ctx, tr.ref, d); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ensure: %v, want context.Canceled", err)
	}
	if _, err := s.db.GarbageCollect(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	gets := tr.gets()
	if want := fmt.Sprintf("bytes=%d-%d", first, d.Size-1); len(gets) != 2 || gets[1] != want {
		t.Errorf("Range headers %q, want the second to be %q", gets, want)
	}
	ls, err := s.leases.List(s.ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		rs, err := s.leases.ListResources(s.ctx, l)
		if err != nil {
			t.Fatal(err)
		}
		if l.ID != LeaseID && len(rs) > 0 {
			t.Errorf("lease %s still holds %+v after the blob was committed", l.ID, rs)
		}
	}
}

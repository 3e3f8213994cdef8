package lazypull

import (
	"bytes"
	"context"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/metadata"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/containerd/v2/plugins/snapshots/native"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	bolt "go.etcd.io/bbolt"

	"github.com/lazybase/lazybase/exportguard"
)

// TestLabelLazySnapshotsOfEarlierVersions runs containerd's metadata
// store and garbage collector over a native snapshotter: a lazy snapshot
// recorded by an earlier lazybase (mode label, no blob reference) gets
// the reference, so its layer's blob survives GC while it exists; pulled
// layers and snapshots already labelled are left alone.
func TestLabelLazySnapshotsOfEarlierVersions(t *testing.T) {
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
	nsn, err := native.NewSnapshotter(filepath.Join(dir, "snapshots"))
	if err != nil {
		t.Fatal(err)
	}
	db := metadata.NewDB(bdb, cs, map[string]snapshots.Snapshotter{snapshotterName: nsn})
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	if err := db.Init(ctx); err != nil {
		t.Fatal(err)
	}
	store, lm := db.ContentStore(), metadata.NewLeaseManager(db)
	sn := db.Snapshotter(snapshotterName)
	l, err := lm.Create(ctx, leases.WithID("buildkit-record"))
	if err != nil {
		t.Fatal(err)
	}
	lctx := leases.WithLease(ctx, l.ID)

	blob := func(data string) digest.Digest {
		d := digest.FromString(data)
		desc := ocispec.Descriptor{Digest: d, Size: int64(len(data))}
		if err := content.WriteBlob(ctx, store, "t-"+d.Encoded(), bytes.NewReader([]byte(data)), desc); err != nil {
			t.Fatal(err)
		}
		return d
	}
	snap := func(name string, labels map[string]string) {
		key := name + "-active"
		if _, err := sn.Prepare(lctx, key, ""); err != nil {
			t.Fatal(err)
		}
		if err := sn.Commit(lctx, name, key, snapshots.WithLabels(labels)); err != nil {
			t.Fatal(err)
		}
	}
	oldLazy, legacy, pulled := blob("old lazy layer"), blob("legacy mode label"), blob("pulled layer")
	snap("old-lazy", map[string]string{ModeLabel: "lazy", stargzDigestLabel: oldLazy.String()})
	snap("legacy", map[string]string{legacyModeLabel: "export-base", snapshotters.TargetLayerDigestLabel: legacy.String()})
	snap("pulled", map[string]string{ModeLabel: "eager", FallbackLabel: ReasonPolicy, stargzDigestLabel: pulled.String()})
	snap("new", map[string]string{ModeLabel: "lazy", stargzDigestLabel: oldLazy.String(), exportguard.LabelSnapshotRef: oldLazy.String()})

	if err := labelLazySnapshots(ctx, sn); err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{"old-lazy": oldLazy.String(), "legacy": legacy.String(), "pulled": "", "new": oldLazy.String()} {
		info, err := sn.Stat(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		if got := info.Labels[exportguard.LabelSnapshotRef]; got != want {
			t.Errorf("snapshot %s: %s = %q, want %q", name, exportguard.LabelSnapshotRef, got, want)
		}
	}
	if _, err := db.GarbageCollect(ctx); err != nil {
		t.Fatal(err)
	}
	for d, want := range map[digest.Digest]bool{oldLazy: true, legacy: true, pulled: false} {
		_, err := store.Info(ctx, d)
		if got := err == nil; got != want || (err != nil && !errdefs.IsNotFound(err)) {
			t.Errorf("blob %s present after GC = %v (%v), want %v", d, got, err, want)
		}
	}
}

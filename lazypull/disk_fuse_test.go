package lazypull

import (
	"context"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/testimage"
)

// duBytes is the size of the regular files under dir.
func duBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			n += fi.Size()
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func entries(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}

// TestRemovedLayersReclaimDisk: the directories of removed snapshots (a
// lazy layer, a build's layer on top of it, a view) go when containerd
// calls Cleanup after its garbage collection, as it does through the
// proxy API, and the lazy filesystem's caches of a previous run go when
// the daemon starts again. Lazy snapshots carry the label that makes them
// reference their layer's blob in containerd's metadata.
func TestRemovedLayersReclaimDisk(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	root := t.TempDir()

	// What a daemon that died left in the lazy filesystem's caches.
	for _, d := range cacheDirs {
		stale := filepath.Join(root, d, "123456789")
		if err := os.MkdirAll(stale, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(stale, "chunk"), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	noGuard := func(c *Config) {
		c.Guard.Enable = false
		c.BackgroundFetch.Enable = false
	}
	td := startDaemon(t, root, noGuard)
	for _, d := range cacheDirs {
		if got := entries(t, filepath.Join(root, d)); len(got) != 0 {
			t.Errorf("%s holds %v after start, want the stale caches gone", d, got)
		}
	}
	ctx := namespaces.WithNamespace(context.Background(), "test")
	snDir := filepath.Join(root, "snapshotter", "snapshots")
	startBytes := duBytes(t, snDir)

	if _, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of the eStargz layer = %v, want a remote snapshot", err)
	}
	info, err := td.sn.Stat(ctx, "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := info.Labels[exportguard.LabelSnapshotRef], img.layers[0].Digest.String(); got != want {
		t.Errorf("lazy snapshot label %s = %q, want %s", exportguard.LabelSnapshotRef, got, want)
	}
	// A view reads the layer (filling the lazy filesystem's caches), a
	// build step writes 4 MiB on top of it.
	view, err := td.sn.View(ctx, "view-0", "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(view, target); err != nil {
		t.Fatal(err)
	}
	if _, err := os.ReadFile(filepath.Join(target, "usr/bin/tool")); err != nil {
		t.Fatal(err)
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}
	work, err := td.sn.Prepare(ctx, "work", "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	upper := ""
	for _, o := range work[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			upper = v
		}
	}
	if upper == "" {
		t.Fatalf("no upperdir in %+v", work)
	}
	if err := os.WriteFile(filepath.Join(upper, "build-output"), make([]byte, 4<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if grown := duBytes(t, snDir) - startBytes; grown < 4<<20 {
		t.Fatalf("snapshot directories grew by %d bytes, want at least 4 MiB", grown)
	}

	// containerd's garbage collection removes them, then calls Cleanup.
	for _, k := range []string{"work", "view-0", "chain-0", "extract-0"} {
		if err := td.sn.Remove(ctx, k); err != nil && !errdefs.IsNotFound(err) {
			t.Fatalf("Remove %s: %v", k, err)
		}
	}
	cleaner, ok := td.sn.(snapshots.Cleaner)
	if !ok {
		t.Fatal("containerd's proxy snapshotter has no Cleanup")
	}
	if err := cleaner.Cleanup(ctx); err != nil {
		t.Fatalf("Cleanup through the proxy API: %v", err)
	}
	if got := entries(t, snDir); len(got) != 0 {
		t.Errorf("snapshot directories left after Remove and Cleanup: %v", got)
	}
	if n := fuseMountsUnder(t, root); n != 0 {
		t.Errorf("%d FUSE mounts left after the lazy snapshot was removed", n)
	}

	// A restart finds nothing of the removed layer's caches.
	td.stop(t)
	startDaemon(t, root, noGuard)
	for _, d := range cacheDirs {
		if n := duBytes(t, filepath.Join(root, d)); n != 0 {
			t.Errorf("%s holds %d bytes after a restart, want 0", d, n)
		}
	}
}

package lazypull

import (
	"context"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// fsCacheBytes is the size of the lazy filesystem's cache of decompressed
// file contents under the daemon root.
func fsCacheBytes(root string) (int64, error) {
	var n int64
	err := filepath.WalkDir(filepath.Join(root, "stargz"), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if os.IsNotExist(err) {
				return nil
			}
			return err
		}
		if d.Type().IsRegular() && inDir(p, "fscache") {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n, err
}

func inDir(p, name string) bool {
	for d := filepath.Dir(p); d != "/" && d != "."; d = filepath.Dir(d) {
		if filepath.Base(d) == name {
			return true
		}
	}
	return false
}

// TestBackgroundFetchSkipsGuardedLayers mounts the same eStargz layer
// through two daemons with background fetch on, at the same time: one for
// an export-base image (the guard materializes its blob), one for a
// lazy-only image (the guard skips it). Nothing reads either mount. The
// lazy-only layer is decompressed whole into the cache in the background;
// the guarded one is not: its reads would be served from the guard's blob
// on demand.
func TestBackgroundFetchSkipsGuardedLayers(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	layer := digest.Digest(img.layers[0].Digest.String())
	var files int64
	for _, b := range img.files {
		files += int64(len(b))
	}

	start := func(mode Mode) (string, *testDaemon) {
		root := t.TempDir()
		td := startDaemon(t, root, func(c *Config) {
			c.Policy = []PolicyRule{{Match: "*/base:estargz", Mode: mode}}
			c.BackgroundFetch.Enable = true
		})
		store, lm := newContentStore(t)
		td.d.stores.open = func(context.Context) (content.Store, leases.Manager, error) { return store, lm, nil }
		ctx := namespaces.WithNamespace(context.Background(), "builder")
		if _, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("%s: Prepare = %v, want a remote snapshot", mode, err)
		}
		return root, td
	}
	guardedRoot, guarded := start(ModeExportBase)
	lazyOnlyRoot, _ := start(ModeLazyOnly)

	waitState(t, guarded.d.GuardStatus, "builder", layer, exportguard.StateMaterialized)
	// stargz starts a background fetch 5s after the mount at the
	// earliest; the lazy-only layer's shows that it ran.
	eventually.Require(t, 60*time.Second, "the lazy-only layer cached whole in the background", func() error {
		n, err := fsCacheBytes(lazyOnlyRoot)
		if err != nil {
			return err
		}
		if n < files {
			return fmt.Errorf("%d bytes in the cache, want the layer's %d", n, files)
		}
		return nil
	})
	// A little longer, for the guarded daemon's background fetch to have
	// had the same chance.
	time.Sleep(2 * time.Second)
	n, err := fsCacheBytes(guardedRoot)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("cache of the guarded layer: %d bytes; layer files: %d bytes", n, files)
	if n >= files/2 {
		t.Errorf("the guarded layer's cache holds %d bytes of its %d: its background fetch ran", n, files)
	}
}

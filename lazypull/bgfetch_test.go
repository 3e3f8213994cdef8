package lazypull

import (
	"bytes"
	"io"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/stargz-snapshotter/cache"
	"github.com/containerd/stargz-snapshotter/fs/reader"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/internal/testimage"
)

// guardSays is what an export guard's Trigger.Holds answers, by layer.
type guardSays map[digest.Digest]struct{ held, known bool }

func (g guardSays) holds(d digest.Digest) (bool, bool) { s := g[d]; return s.held, s.known }

func TestDeclineBackgroundFetch(t *testing.T) {
	a, b := digest.FromString("layer a"), digest.FromString("layer b")
	held := struct{ held, known bool }{true, true}
	skipped := struct{ held, known bool }{false, true} // lazy-only, or failed
	for _, tc := range []struct {
		name      string
		mounts    []bgMount
		guard     guardSays // nil: guard.enable = false
		want      bool
		wantLayer digest.Digest
	}{
		{name: "no guard, guarded mode", mounts: []bgMount{{layer: a, guarded: true}}},
		{name: "no mount of the TOC", guard: guardSays{}},
		{name: "guard holds the blob", mounts: []bgMount{{layer: a, guarded: true}}, guard: guardSays{a: held}, want: true, wantLayer: a},
		{name: "guard not told yet, guarded mode", mounts: []bgMount{{layer: a, guarded: true}}, guard: guardSays{}, want: true, wantLayer: a},
		{name: "guard not told yet, lazy-only", mounts: []bgMount{{layer: a}}, guard: guardSays{}},
		{name: "guard skips the blob (lazy-only)", mounts: []bgMount{{layer: a}}, guard: guardSays{a: skipped}},
		{name: "guard gave up on the blob", mounts: []bgMount{{layer: a, guarded: true}}, guard: guardSays{a: skipped}},
		{name: "lazy-only mount, blob held for another image", mounts: []bgMount{{layer: a}}, guard: guardSays{a: held}, want: true, wantLayer: a},
		{name: "one of two layers of the TOC held", mounts: []bgMount{{layer: a}, {layer: b}}, guard: guardSays{a: skipped, b: held}, want: true, wantLayer: b},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var holds func(digest.Digest) (bool, bool)
			if tc.guard != nil {
				holds = tc.guard.holds
			}
			layer, got := declineBackgroundFetch(tc.mounts, holds)
			if got != tc.want || layer != tc.wantLayer {
				t.Errorf("decline = (%s, %v), want (%s, %v)", layer, got, tc.wantLayer, tc.want)
			}
		})
	}
}

// TestBackgroundFetchMounts: the mounts' labels say which layer and mode a
// TOC digest stands for, until the mount goes; a mount without a TOC or
// layer digest is not recorded.
func TestBackgroundFetchMounts(t *testing.T) {
	toc, layer := digest.FromString("toc"), digest.FromString("layer")
	labels := func(mode Mode) map[string]string {
		return map[string]string{tocDigestLabel: toc.String(), snapshotters.TargetLayerDigestLabel: layer.String(), ModeLabel: string(mode)}
	}
	bg := newBackgroundFetch()
	bg.attach(guardSays{}.holds) // the guard has been told nothing yet
	if _, ok := bg.decline(toc); ok {
		t.Error("declined a TOC nothing mounted")
	}
	bg.mounted("/mnt/lazy-only", labels(ModeLazyOnly))
	if _, ok := bg.decline(toc); ok {
		t.Error("declined a lazy-only mount")
	}
	for _, mode := range []Mode{ModeLazy, ModeExportBase, ""} {
		bg.mounted("/mnt/guarded", labels(mode))
		if got, ok := bg.decline(toc); !ok || got != layer {
			t.Errorf("mode %q: decline = (%s, %v), want (%s, true)", mode, got, ok, layer)
		}
	}
	bg.unmounted("/mnt/guarded")
	if _, ok := bg.decline(toc); ok {
		t.Error("declined after the guarded mount went")
	}
	bg.attach(nil) // guard.enable = false, or the guard closed
	bg.mounted("/mnt/guarded", labels(ModeLazy))
	if _, ok := bg.decline(toc); ok {
		t.Error("declined without a guard")
	}
	bg.attach(guardSays{}.holds)
	for name, l := range map[string]map[string]string{
		"no TOC digest":   {snapshotters.TargetLayerDigestLabel: layer.String()},
		"no layer digest": {tocDigestLabel: toc.String()},
	} {
		bg := newBackgroundFetch()
		bg.attach(guardSays{}.holds)
		bg.mounted("/mnt/x", l)
		if _, ok := bg.decline(toc); ok {
			t.Errorf("%s: declined", name)
		}
	}
}

// TestBackgroundReaderStopsStargzWalk drives stargz's own background
// caching (reader.Cache over a reader of the blob, which walks a clone of
// the layer's metadata reader) through the checking store: a declined
// layer caches nothing, a layer the guard skips caches every file, and a
// layer handed to the guard during the walk stops early.
func TestBackgroundReaderStopsStargzWalk(t *testing.T) {
	tb, err := testimage.Tar(testimage.Entries(3, testimage.WithoutLargeFiles()))
	if err != nil {
		t.Fatal(err)
	}
	l, err := testimage.EStargz(tb)
	if err != nil {
		t.Fatal(err)
	}
	toc, err := digest.Parse(l.Annotations[testimage.AnnotationTOCDigest])
	if err != nil {
		t.Fatal(err)
	}
	layer := digest.FromBytes(l.Blob)
	labels := func(mode Mode) map[string]string {
		return map[string]string{tocDigestLabel: toc.String(), snapshotters.TargetLayerDigestLabel: layer.String(), ModeLabel: string(mode)}
	}
	// cached runs the background caching of the layer mounted with mode
	// and returns the number of cache entries it wrote.
	cached := func(t *testing.T, mode Mode, holds func(digest.Digest) (bool, bool)) int {
		t.Helper()
		bg := newBackgroundFetch()
		bg.attach(holds)
		bg.mounted("/mnt/layer", labels(mode))
		store := tocCheckingStore(memorymetadata.NewReader, tocCheck{background: bg})
		r, err := store(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))), storeOpts...)
		if err != nil {
			t.Fatal(err)
		}
		mc := cache.NewMemoryCache().(*cache.MemoryCache)
		vr, err := reader.NewReader(r, mc, layer)
		if err != nil {
			t.Fatal(err)
		}
		defer vr.Close()
		if err := vr.Cache(reader.WithReader(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))))); err != nil {
			t.Fatal(err)
		}
		return len(mc.Membuf)
	}
	// The layer's own reader counts its reads as the build's; the clone
	// of its background fetch yields to them.
	t.Run("file readers", func(t *testing.T) {
		bg := newBackgroundFetch()
		store := tocCheckingStore(memorymetadata.NewReader, tocCheck{background: bg})
		r, err := store(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))), storeOpts...)
		if err != nil {
			t.Fatal(err)
		}
		c, err := r.Clone(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))))
		if err != nil {
			t.Fatal(err)
		}
		etc, _, err := r.GetChild(r.RootID(), "etc")
		if err != nil {
			t.Fatal(err)
		}
		id, _, err := r.GetChild(etc, "os-release")
		if err != nil {
			t.Fatal(err)
		}
		if f, err := r.OpenFile(id); err != nil {
			t.Fatal(err)
		} else if _, ok := f.(*demandFile); !ok {
			t.Errorf("the layer's reader opened a %T, want a *demandFile", f)
		}
		if f, err := c.OpenFileWithPreReader(id, nil); err != nil {
			t.Fatal(err)
		} else if _, ok := f.(*backgroundFile); !ok {
			t.Errorf("the background fetch's clone opened a %T, want a *backgroundFile", f)
		}
	})
	all := cached(t, ModeLazy, nil) // no guard
	if all < 3 {
		t.Fatalf("background caching without a guard wrote %d entries, want every file", all)
	}
	if n := cached(t, ModeLazy, guardSays{layer: {true, true}}.holds); n != 0 {
		t.Errorf("layer the guard holds: %d cache entries, want 0", n)
	}
	if n := cached(t, ModeExportBase, guardSays{}.holds); n != 0 {
		t.Errorf("export-base layer the guard was not told about yet: %d cache entries, want 0", n)
	}
	if n := cached(t, ModeLazyOnly, guardSays{layer: {false, true}}.holds); n != all {
		t.Errorf("lazy-only layer: %d cache entries, want %d", n, all)
	}
	// The guard takes the layer after the walk began (the same chain
	// mounted for a lazy-only image first): the walk stops.
	var asked atomic.Int64
	late := func(digest.Digest) (bool, bool) { return asked.Add(1) > 2, true }
	if n := cached(t, ModeLazyOnly, late); n >= all {
		t.Errorf("layer handed to the guard during the walk: %d cache entries, want fewer than %d", n, all)
	}
}

// TestBackgroundFetchYieldsToDemand: a background fetch's reads wait while
// a read of the build is pending, and go on demandQuiet after it.
func TestBackgroundFetchYieldsToDemand(t *testing.T) {
	tb, err := testimage.Tar(testimage.Entries(3, testimage.WithoutLargeFiles()))
	if err != nil {
		t.Fatal(err)
	}
	l, err := testimage.EStargz(tb)
	if err != nil {
		t.Fatal(err)
	}
	bg := newBackgroundFetch() // no guard: nothing declined
	store := tocCheckingStore(memorymetadata.NewReader, tocCheck{background: bg})
	r, err := store(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))), storeOpts...)
	if err != nil {
		t.Fatal(err)
	}
	vr, err := reader.NewReader(r, cache.NewMemoryCache(), digest.FromBytes(l.Blob))
	if err != nil {
		t.Fatal(err)
	}
	defer vr.Close()

	bg.demand.Add(1) // a read of the build is pending
	done := make(chan error, 1)
	go func() {
		done <- vr.Cache(reader.WithReader(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob)))))
	}()
	select {
	case err := <-done:
		t.Fatalf("background caching ended (%v) while a read of the build was pending", err)
	case <-time.After(500 * time.Millisecond):
	}
	ended := time.Now()
	bg.lastDemand.Store(ended.UnixNano())
	bg.demand.Add(-1)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
		if d := time.Since(ended); d < demandQuiet {
			t.Errorf("background caching went on %s after the read, before demandQuiet (%s)", d, demandQuiet)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("background caching still paused 10s after the read ended")
	}
}

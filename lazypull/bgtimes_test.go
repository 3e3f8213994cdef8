package lazypull

import (
	"bytes"
	"io"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/stargz-snapshotter/cache"
	"github.com/containerd/stargz-snapshotter/fs/reader"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestBackgroundFetchTimes runs stargz's background caching of a layer
// through the checking store and reads back when it ran: nothing before,
// a start, reads and an end after a full walk; a start, no reads and
// Declined for a layer the guard holds; nothing once unmounted.
func TestBackgroundFetchTimes(t *testing.T) {
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
	const mp = "/mnt/layer"
	run := func(t *testing.T, mode Mode, holds func(digest.Digest) (bool, bool)) (*backgroundFetch, *BackgroundFetchStatus) {
		t.Helper()
		bg := newBackgroundFetch()
		bg.attach(holds)
		bg.mounted(mp, map[string]string{tocDigestLabel: toc.String(), snapshotters.TargetLayerDigestLabel: layer.String(), ModeLabel: string(mode)})
		if st := bg.fetchStatus(mp); st != nil {
			t.Fatalf("status before any fetch: %+v", st)
		}
		store := tocCheckingStore(memorymetadata.NewReader, tocCheck{background: bg})
		r, err := store(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))), storeOpts...)
		if err != nil {
			t.Fatal(err)
		}
		vr, err := reader.NewReader(r, cache.NewMemoryCache(), layer)
		if err != nil {
			t.Fatal(err)
		}
		defer vr.Close()
		if err := vr.Cache(reader.WithReader(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))))); err != nil {
			t.Fatal(err)
		}
		st := bg.fetchStatus(mp)
		if st == nil {
			t.Fatal("no status after the background fetch")
		}
		if st.Started.IsZero() || st.Finished.IsZero() || st.Finished.Before(st.Started) || st.Finished.After(time.Now()) {
			t.Errorf("fetch ran %s – %s: want a start and a later end", st.Started, st.Finished)
		}
		return bg, st
	}
	t.Run("full walk", func(t *testing.T) {
		before := time.Now()
		bg, st := run(t, ModeLazyOnly, nil)
		if st.Started.Before(before) {
			t.Errorf("started %s, before the fetch (%s)", st.Started, before)
		}
		if st.Reads < 3 || st.Declined || st.LastRead.IsZero() || st.LastRead.After(st.Finished) {
			t.Errorf("full walk: %+v, want at least 3 reads, not declined, last read by the end", st)
		}
		bg.unmounted(mp)
		if st := bg.fetchStatus(mp); st != nil {
			t.Errorf("status after the unmount: %+v", st)
		}
		if st := bg.times.status(toc); st != nil {
			t.Errorf("times kept after the last unmount of the TOC: %+v", st)
		}
	})
	t.Run("declined", func(t *testing.T) {
		_, st := run(t, ModeLazy, guardSays{layer: {true, true}}.holds)
		if st.Reads != 0 || !st.Declined || !st.LastRead.IsZero() {
			t.Errorf("declined: %+v, want no reads and Declined", st)
		}
	})
}

package exportguard

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/internal/cpuacct"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// memBlob is a content.ReaderAt over bytes.
type memBlob struct{ *bytes.Reader }

func (memBlob) Close() error { return nil }

// estargzBlob returns an eStargz layer blob with a directory and a file.
func estargzBlob(t *testing.T) ([]byte, digest.Digest) {
	t.Helper()
	tarball, err := testimage.Tar([]testimage.Entry{
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755, ModTime: testimage.Epoch}},
		{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "etc/motd", Mode: 0o644, Size: 6, ModTime: testimage.Epoch}, Data: []byte("hello\n")},
	})
	if err != nil {
		t.Fatal(err)
	}
	l, err := testimage.EStargz(tarball)
	if err != nil {
		t.Fatal(err)
	}
	return l.Blob, digest.FromBytes(l.Blob)
}

// blobShelf is a BlobOpener whose blobs appear when a test puts them
// there; every call is reported on asked.
type blobShelf struct {
	mu    sync.Mutex
	blobs map[digest.Digest][]byte
	asked chan digest.Digest
}

func (s *blobShelf) open(_ context.Context, d digest.Digest) (content.ReaderAt, bool) {
	s.mu.Lock()
	b, ok := s.blobs[d]
	s.mu.Unlock()
	s.asked <- d
	if !ok {
		return nil, false
	}
	return memBlob{bytes.NewReader(b)}, true
}

func (s *blobShelf) put(d digest.Digest, b []byte) {
	s.mu.Lock()
	s.blobs[d] = b
	s.mu.Unlock()
}

// snapshotMount makes ROOT/N/fs, the shape of an upstream snapshot's
// mountpoint.
func snapshotMount(t *testing.T, n string) string {
	t.Helper()
	mp := filepath.Join(t.TempDir(), n, "fs")
	if err := os.MkdirAll(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	return mp
}

func newTestUnpacker(t *testing.T, open BlobOpener, reg prometheus.Registerer) (*Unpacker, chan UnpackResult) {
	t.Helper()
	results := make(chan UnpackResult, 4)
	u, err := NewUnpacker(context.Background(), open,
		WithUnpackParallelism(2), WithUnpackRegisterer(reg),
		WithOnUnpacked(func(r UnpackResult) { results <- r }))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.Close)
	return u, results
}

// await returns the next value of ch; the generous bound only keeps a
// broken Unpacker from hanging the test run.
func await[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(30 * time.Second):
		t.Fatalf("no %s", what)
	}
	var zero T
	return zero
}

// TestUnpackerActsOnCommit: a layer mounted before its blob is at hand is
// not unpacked; the commit notification alone starts its unpack (nothing
// rescans), after which mounts handed out use the unpacked directory, and
// an unmount forgets it.
func TestUnpackerActsOnCommit(t *testing.T) {
	blob, layer := estargzBlob(t)
	shelf := &blobShelf{blobs: map[digest.Digest][]byte{}, asked: make(chan digest.Digest, 8)}
	reg := prometheus.NewRegistry()
	u, results := newTestUnpacker(t, shelf.open, reg)
	mp := snapshotMount(t, "7")

	u.Mounted(mp, UnpackMount{Image: "r.example/img:1", Layer: layer})
	if d := await(t, shelf.asked, "blob lookup after the mount"); d != layer {
		t.Fatalf("looked up %s, want %s", d, layer)
	}
	if dir := u.LocalDir(mp); dir != "" {
		t.Fatalf("unpacked into %s before the blob was at hand", dir)
	}
	select {
	case r := <-results:
		t.Fatalf("unpack ended without a blob: %+v", r)
	default:
	}

	acct0 := cpuacct.Default.Snapshot()
	shelf.put(layer, blob)
	u.Committed(layer)
	r := await(t, results, "unpack after the commit")
	if r.Err != nil || r.Mountpoint != mp || r.Layer != layer {
		t.Fatalf("unpack result %+v", r)
	}
	// The CPU and I/O account has the unpack as one local_unpack unit.
	acct1 := cpuacct.Default.Snapshot()
	if acct1.Units["local_unpack"] <= acct0.Units["local_unpack"] || acct1.CPUSeconds["local_unpack"] <= acct0.CPUSeconds["local_unpack"] {
		t.Errorf("account: no local_unpack unit or CPU: units %d then %d, cpu %v then %v",
			acct0.Units["local_unpack"], acct1.Units["local_unpack"], acct0.CPUSeconds["local_unpack"], acct1.CPUSeconds["local_unpack"])
	}
	if acct1.DiskWrittenBytes["local_unpack"]-acct0.DiskWrittenBytes["local_unpack"] < int64(len("hello\n")) {
		t.Errorf("account: local_unpack wrote %d bytes", acct1.DiskWrittenBytes["local_unpack"]-acct0.DiskWrittenBytes["local_unpack"])
	}
	want := filepath.Join(filepath.Dir(mp), LocalDirName)
	if r.Dir != want || u.LocalDir(mp) != want {
		t.Fatalf("unpacked into %q (LocalDir %q), want %q", r.Dir, u.LocalDir(mp), want)
	}
	if b, err := os.ReadFile(filepath.Join(want, "etc", "motd")); err != nil || string(b) != "hello\n" {
		t.Fatalf("etc/motd: %q, %v", b, err)
	}
	for _, name := range []string{"stargz.index.json", ".prefetch.landmark", ".no.prefetch.landmark"} {
		if _, err := os.Lstat(filepath.Join(want, name)); !os.IsNotExist(err) {
			t.Errorf("eStargz entry %s unpacked: %v", name, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(filepath.Dir(mp), LocalDoneName)); err != nil || string(b) != layer.String()+"\n" {
		t.Errorf("done marker: %q, %v", b, err)
	}
	if n := gathered(t, reg, "lazybase_snapshotter_localized_layers"); n != 1 {
		t.Errorf("localized_layers = %v, want 1", n)
	}

	other := "/var/lib/other/fs"
	got := u.Rewrite([]mount.Mount{
		{Type: "overlay", Source: "overlay", Options: []string{"workdir=/w", "upperdir=/u", "lowerdir=" + mp + ":" + other}},
		{Type: "bind", Source: mp, Options: []string{"ro", "rbind"}},
		{Type: "overlay", Source: "overlay", Options: []string{"userxattr", "lowerdir=" + mp}},
	})
	if o := got[0].Options[2]; o != "lowerdir="+want+":"+other {
		t.Errorf("overlay rewritten to %q", o)
	}
	if got[1].Source != want {
		t.Errorf("bind source %q, want %q", got[1].Source, want)
	}
	if o := got[2].Options[1]; o != "lowerdir="+mp {
		t.Errorf("userxattr overlay rewritten to %q", o)
	}

	// A second commit of the same blob does nothing more.
	u.Committed(layer)
	u.Unmounted(mp)
	if dir := u.LocalDir(mp); dir != "" {
		t.Errorf("LocalDir after the unmount = %q", dir)
	}
	if got := u.Rewrite([]mount.Mount{{Type: "bind", Source: mp}}); got[0].Source != mp {
		t.Errorf("bind source after the unmount %q", got[0].Source)
	}
	// A mount whose unpack completed before (a restart) is taken as it is.
	// It reports no result for it: LocalDir is what shows it.
	u.Mounted(mp, UnpackMount{Layer: layer})
	eventually.Require(t, 20*time.Second, "completed unpack taken after a remount", func() error {
		if dir := u.LocalDir(mp); dir != want {
			return fmt.Errorf("LocalDir %q", dir)
		}
		return nil
	})
	select {
	case r := <-results:
		t.Errorf("completed unpack done again: %+v", r)
	default:
	}
}

// TestUnpackerBadBlobFailsCleanly: a blob that is not a layer fails its
// unpack, leaves nothing half-unpacked, counts a failure, is not tried
// again on the next commit, and leaves mounts as they are.
func TestUnpackerBadBlobFailsCleanly(t *testing.T) {
	_, layer := estargzBlob(t)
	shelf := &blobShelf{blobs: map[digest.Digest][]byte{layer: []byte("this is no layer")}, asked: make(chan digest.Digest, 8)}
	reg := prometheus.NewRegistry()
	u, results := newTestUnpacker(t, shelf.open, reg)
	mp := snapshotMount(t, "3")
	u.Mounted(mp, UnpackMount{Layer: layer})
	r := await(t, results, "unpack result")
	if r.Err == nil || r.Dir != "" {
		t.Fatalf("unpack of a bad blob: %+v", r)
	}
	for _, name := range []string{LocalDirName, LocalDirName + ".tmp", LocalDoneName} {
		if _, err := os.Stat(filepath.Join(filepath.Dir(mp), name)); !os.IsNotExist(err) {
			t.Errorf("%s left after a failed unpack: %v", name, err)
		}
	}
	if n := counterValue(t, u.m.unpacks.WithLabelValues("failed")); n != 1 {
		t.Errorf("local_unpacks_total{result=failed} = %v, want 1", n)
	}
	<-shelf.asked
	u.Committed(layer)
	select {
	case d := <-shelf.asked:
		t.Errorf("failed layer %s looked up again", d)
	default:
	}
	if got := u.Rewrite([]mount.Mount{{Type: "bind", Source: mp}}); got[0].Source != mp {
		t.Errorf("bind source after a failed unpack %q", got[0].Source)
	}
}

// TestUnpackerSkipsLazyOnly: a mount marked Skip is never looked up nor
// unpacked.
func TestUnpackerSkipsLazyOnly(t *testing.T) {
	blob, layer := estargzBlob(t)
	shelf := &blobShelf{blobs: map[digest.Digest][]byte{layer: blob}, asked: make(chan digest.Digest, 8)}
	u, results := newTestUnpacker(t, shelf.open, nil)
	mp := snapshotMount(t, "5")
	u.Mounted(mp, UnpackMount{Layer: layer, Skip: true})
	u.Committed(layer)
	u.Close() // waits for every lookup and unpack it started
	select {
	case d := <-shelf.asked:
		t.Errorf("lazy-only layer %s looked up", d)
	case r := <-results:
		t.Errorf("lazy-only layer unpacked: %+v", r)
	default:
	}
}

// gatedBlob is a blob whose reads wait until gate is closed.
type gatedBlob struct {
	memBlob
	gate <-chan struct{}
}

func (b gatedBlob) ReadAt(p []byte, off int64) (int, error) {
	<-b.gate
	return b.memBlob.ReadAt(p, off)
}

// TestUnpackerRemountDuringUnpack: a layer unmounted while its unpack runs
// and mounted again before that unpack ends is unpacked once the
// cancelled unpack has ended, never by two unpacks at once.
func TestUnpackerRemountDuringUnpack(t *testing.T) {
	blob, layer := estargzBlob(t)
	gate := make(chan struct{})
	reading := make(chan struct{}, 8)
	var opens sync.Mutex
	n := 0
	early := false // a second open before the first unpack could end
	open := func(context.Context, digest.Digest) (content.ReaderAt, bool) {
		opens.Lock()
		defer opens.Unlock()
		n++
		reading <- struct{}{}
		if n > 1 {
			select {
			case <-gate:
			default:
				early = true
			}
		}
		if n == 1 {
			return gatedBlob{memBlob{bytes.NewReader(blob)}, gate}, true
		}
		return memBlob{bytes.NewReader(blob)}, true
	}
	u, results := newTestUnpacker(t, open, nil)
	mp := snapshotMount(t, "9")
	m := UnpackMount{Layer: layer}
	u.Mounted(mp, m)
	await(t, reading, "first blob open")
	u.Unmounted(mp)
	u.Mounted(mp, m)
	// The first unpack still runs (its reads wait): the remount's try
	// sees it and starts nothing; the first one's end starts the next.
	close(gate)
	r := await(t, results, "unpack after the remount")
	if r.Err != nil || r.Dir == "" || u.LocalDir(mp) != r.Dir {
		t.Fatalf("unpack result %+v, LocalDir %q", r, u.LocalDir(mp))
	}
	opens.Lock()
	defer opens.Unlock()
	if early || n != 2 {
		t.Errorf("blob opened %d times, a second time while the first unpack ran: %v", n, early)
	}
}

// TestUnpackerRetriesBlobNotReadableAtCommit: a commit notification whose
// blob cannot be opened yet (the content store lagging the commit, or
// containerd's connection coming back) is retried, so the layer is still
// unpacked without another mount or commit.
func TestUnpackerRetriesBlobNotReadableAtCommit(t *testing.T) {
	blob, layer := estargzBlob(t)
	shelf := &blobShelf{blobs: map[digest.Digest][]byte{}, asked: make(chan digest.Digest, 64)}
	u, results := newTestUnpacker(t, shelf.open, prometheus.NewRegistry())
	mp := snapshotMount(t, "9")

	u.Mounted(mp, UnpackMount{Image: "r.example/img:1", Layer: layer})
	await(t, shelf.asked, "blob lookup after the mount")
	u.Committed(layer) // not readable yet
	await(t, shelf.asked, "blob lookup at the commit")
	shelf.put(layer, blob)
	r := await(t, results, "unpack after the retried lookup")
	if r.Err != nil || r.Mountpoint != mp || r.Dir == "" {
		t.Fatalf("unpack result %+v", r)
	}
}

// TestUnpackerWantUnpacksSharedLazyOnlyMount: containerd keeps one
// snapshot per chain for all namespaces, so an export-base image in one
// namespace can use the mount a lazy-only image made in another. The
// mount is skipped until an image that wants its layer unpacked says so.
func TestUnpackerWantUnpacksSharedLazyOnlyMount(t *testing.T) {
	blob, layer := estargzBlob(t)
	shelf := &blobShelf{blobs: map[digest.Digest][]byte{}, asked: make(chan digest.Digest, 8)}
	u, results := newTestUnpacker(t, shelf.open, prometheus.NewRegistry())
	mp := snapshotMount(t, "3")

	u.Mounted(mp, UnpackMount{Image: "r.example/lazy:1", Layer: layer, Skip: true})
	shelf.put(layer, blob)
	u.Committed(layer)
	select {
	case r := <-results:
		t.Fatalf("a lazy-only mount was unpacked before any image wanted it: %+v", r)
	case d := <-shelf.asked:
		t.Fatalf("the blob of a lazy-only mount was looked up (%s) before any image wanted it", d)
	default:
	}

	u.Want(layer)
	r := await(t, results, "unpack after Want")
	if r.Err != nil || r.Mountpoint != mp || u.LocalDir(mp) == "" {
		t.Fatalf("unpack result %+v, LocalDir %q", r, u.LocalDir(mp))
	}

	// Once its last mount is gone the layer is no longer wanted: a new
	// lazy-only mount of it is left alone.
	u.Unmounted(mp)
	mp2 := snapshotMount(t, "4")
	u.Mounted(mp2, UnpackMount{Image: "r.example/lazy:1", Layer: layer, Skip: true})
	u.Committed(layer)
	select {
	case r := <-results:
		t.Fatalf("a lazy-only mount was unpacked after the image that wanted its layer was gone: %+v", r)
	default:
	}
	if dir := u.LocalDir(mp2); dir != "" {
		t.Fatalf("LocalDir %q for a lazy-only mount", dir)
	}
}

// TestUnpackerAdoptsCompletedDirOfSkippedMount: after a restart, a mount
// made for a lazy-only image whose layer an export-base image in another
// namespace had unpacked keeps its complete unpacked directory, without
// looking up the blob.
func TestUnpackerAdoptsCompletedDirOfSkippedMount(t *testing.T) {
	blob, layer := estargzBlob(t)
	shelf := &blobShelf{blobs: map[digest.Digest][]byte{layer: blob}, asked: make(chan digest.Digest, 8)}
	mp := snapshotMount(t, "9")
	ra, ok := shelf.open(context.Background(), layer)
	if !ok {
		t.Fatal("test blob not at hand")
	}
	want, err := unpackLocal(context.Background(), filepath.Dir(mp), layer, ra)
	ra.Close()
	if err != nil {
		t.Fatal(err)
	}
	<-shelf.asked // the lookup above

	u, _ := newTestUnpacker(t, shelf.open, prometheus.NewRegistry())
	u.Mounted(mp, UnpackMount{Image: "r.example/lazy:1", Layer: layer, Skip: true})
	eventually.Require(t, 10*time.Second, "the completed directory adopted", func() error {
		if got := u.LocalDir(mp); got != want {
			return fmt.Errorf("LocalDir %q, want %q", got, want)
		}
		return nil
	})
	select {
	case d := <-shelf.asked:
		t.Fatalf("blob %s looked up for a lazy-only mount with a complete unpacked directory", d)
	default:
	}
}

package lazypull

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// memBlob is a content.ReaderAt over bytes.
type memBlob struct{ *bytes.Reader }

func (b memBlob) Close() error { return nil }

// localizeImage is a two-layer eStargz image whose upper layer deletes a
// file (whiteout) and replaces a directory (opaque), with a symlink, a
// hardlink and owners and modes worth checking.
func localizeImage(t *testing.T, reg *testimage.Registry) (testImage, map[digest.Digest][]byte) {
	t.Helper()
	mt := testimage.Epoch
	dir := func(name string) testimage.Entry {
		return testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: mt}}
	}
	file := func(name, data string, mode int64, uid int) testimage.Entry {
		return testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Uid: uid, Gid: uid,
			Size: int64(len(data)), ModTime: mt}, Data: []byte(data)}
	}
	lower := []testimage.Entry{
		dir("a/"), dir("d/"),
		file("a/keep", "kept\n", 0o644, 0),
		file("a/gone", "deleted above\n", 0o644, 0),
		file("d/x", "hidden by opaque\n", 0o600, 0),
		// As tar writes them: a symlink 0777, a hardlink with its
		// target's mode (the modes containerd's unpack applies).
		{Header: &tar.Header{Typeflag: tar.TypeSymlink, Name: "a/sym", Linkname: "keep", Mode: 0o777, ModTime: mt}},
		{Header: &tar.Header{Typeflag: tar.TypeLink, Name: "a/hard", Linkname: "a/keep", Mode: 0o644, ModTime: mt}},
		file("bin/tool", strings.Repeat("tool bytes ", 50_000), 0o755, 0),
	}
	upper := []testimage.Entry{
		dir("a/"), dir("d/"),
		file("a/.wh.gone", "", 0o644, 0),
		file("d/.wh..wh..opq", "", 0o644, 0),
		file("d/y", "new in opaque dir\n", 0o640, 1000),
		file("a/new", "added\n", 0o600, 1000),
	}
	var layers []v1.Layer
	blobs := make(map[digest.Digest][]byte)
	for _, es := range [][]testimage.Entry{lower, upper} {
		tarball, err := testimage.Tar(es)
		if err != nil {
			t.Fatal(err)
		}
		l, err := testimage.EStargz(tarball)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		blobs[digest.FromBytes(b)] = b
		layers = append(layers, l)
	}
	img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, layers...)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Push(t, "localize:estargz", img)
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return testImage{ref: ref.String(), layers: m.Layers}, blobs
}

// treeOf describes every entry below root: type, permissions, owner, size,
// content digest, link target, device.
func treeOf(t *testing.T, root string) map[string]string {
	t.Helper()
	out := make(map[string]string)
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		desc := fmt.Sprintf("mode=%o uid=%d gid=%d", st.Mode, st.Uid, st.Gid)
		switch st.Mode & syscall.S_IFMT {
		case syscall.S_IFREG:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" size=%d sha256=%x nlink=%d mtime=%d", len(b), sha256.Sum256(b), st.Nlink, st.Mtim.Sec)
		case syscall.S_IFLNK:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			desc += " -> " + target
		case syscall.S_IFCHR:
			desc += fmt.Sprintf(" rdev=%d", st.Rdev)
		}
		out[rel] = desc
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func mountAt(t *testing.T, mounts []mount.Mount) string {
	t.Helper()
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := mount.UnmountAll(target, 0); err != nil {
			t.Error(err)
		}
	})
	return target
}

func lowerdirs(mounts []mount.Mount) string {
	var s []string
	for _, m := range mounts {
		if m.Type == "bind" {
			s = append(s, m.Source)
		}
		for _, o := range m.Options {
			if l, ok := strings.CutPrefix(o, "lowerdir="); ok {
				s = append(s, strings.Split(l, ":")...)
			}
		}
	}
	return strings.Join(s, "\n")
}

// attachUnpacker gives td an Unpacker whose verified blobs come from
// find, as the export guard's would, told about td's mounts; it returns
// the channel of unpack results.
func attachUnpacker(t *testing.T, td *testDaemon, find exportguard.BlobOpener) <-chan exportguard.UnpackResult {
	t.Helper()
	results := make(chan exportguard.UnpackResult, 16)
	u, err := exportguard.NewUnpacker(context.Background(), find, exportguard.WithUnpackParallelism(2),
		exportguard.WithOnUnpacked(func(r exportguard.UnpackResult) { results <- r }))
	if err != nil {
		t.Fatal(err)
	}
	td.d.attachUnpacker(u)
	return results
}

func waitLocal(t *testing.T, td *testDaemon, n int) []LayerStatus {
	t.Helper()
	var layers []LayerStatus
	eventually.Require(t, 30*time.Second, fmt.Sprintf("%d layers unpacked locally", n), func() error {
		st, err := td.d.Status(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		local := 0
		for _, l := range st.Layers {
			if l.LocalDir != "" {
				local++
			}
		}
		layers = st.Layers
		if local < n {
			return fmt.Errorf("%d unpacked: %+v", local, st.Layers)
		}
		return nil
	})
	return layers
}

// TestLocalUnpack mounts a two-layer image lazily, then lets the daemon
// unpack both layers from their verified blobs: a container rootfs
// prepared afterwards uses the unpacked directories instead of the FUSE
// mounts and shows exactly the same tree (whiteout and opaque directory
// applied, owners, modes, contents, links); rootfs mounts handed out
// before keep working; a restarted daemon unpacks them again.
func TestLocalUnpack(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img, blobs := localizeImage(t, reg)
	find := func(_ context.Context, layer digest.Digest) (content.ReaderAt, bool) {
		b, ok := blobs[layer]
		if !ok {
			return nil, false
		}
		return memBlob{bytes.NewReader(b)}, true
	}
	root := t.TempDir()
	noGuard := func(c *Config) { c.Guard.Enable = false }
	td := startDaemon(t, root, noGuard)
	if td.d.local != nil {
		t.Fatal("local unpacking is on with the guard off")
	}
	ctx := namespaces.WithNamespace(context.Background(), "test")
	for i, parent := range []string{"", "c0"} {
		_, err := td.sn.Prepare(ctx, fmt.Sprintf("extract-%d", i), parent,
			snapshots.WithLabels(img.unpackLabels(i, fmt.Sprintf("c%d", i))))
		if !errdefs.IsAlreadyExists(err) {
			t.Fatalf("Prepare layer %d = %v, want a remote snapshot", i, err)
		}
	}
	before, err := td.sn.Prepare(ctx, "rootfs-before", "c1")
	if err != nil {
		t.Fatal(err)
	}
	if l := lowerdirs(before); strings.Contains(l, exportguard.LocalDirName) {
		t.Fatalf("lowerdirs before unpacking = %s", l)
	}
	fuseRoot := mountAt(t, before)
	want := treeOf(t, fuseRoot)
	for _, p := range []string{"a/gone", "d/x", stargzTOC} {
		if _, ok := want[p]; ok {
			t.Fatalf("lazy rootfs shows %s", p)
		}
	}

	attachUnpacker(t, td, find)
	layers := waitLocal(t, td, 2)
	after, err := td.sn.Prepare(ctx, "rootfs-after", "c1")
	if err != nil {
		t.Fatal(err)
	}
	lows := lowerdirs(after)
	for _, l := range layers {
		if !strings.Contains(lows, l.LocalDir) || strings.Contains(lows, l.Mountpoint+"\n") || strings.HasSuffix(lows, l.Mountpoint) {
			t.Fatalf("lowerdirs after unpacking:\n%s\nwant %s instead of %s", lows, l.LocalDir, l.Mountpoint)
		}
	}
	if got := treeOf(t, mountAt(t, after)); !equalTrees(t, got, want) {
		t.Fatal("unpacked rootfs differs from the lazy one")
	}
	// The rootfs handed out before still reads through FUSE.
	if b, err := os.ReadFile(filepath.Join(fuseRoot, "a", "keep")); err != nil || string(b) != "kept\n" {
		t.Fatalf("old rootfs: %q, %v", b, err)
	}
	// A view of the lower layer alone is a bind mount of its unpacked copy.
	view, err := td.sn.View(ctx, "view-c0", "c0")
	if err != nil {
		t.Fatal(err)
	}
	if len(view) != 1 || !strings.HasSuffix(view[0].Source, exportguard.LocalDirName) {
		t.Fatalf("view of the lower layer = %+v", view)
	}
	if _, err := os.Stat(filepath.Join(mountAt(t, view), "d", "x")); err != nil {
		t.Fatalf("lower view: %v", err)
	}
	for _, key := range []string{"rootfs-before", "rootfs-after", "view-c0"} {
		if err := td.sn.Remove(ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	td.stop(t)

	// A clean stop removes the remote snapshots' directories with the
	// unpacked copies; after a restart the layers are unpacked again from
	// their verified blobs.
	td = startDaemon(t, root, noGuard)
	for _, l := range layers {
		if _, err := os.Stat(l.LocalDir); !os.IsNotExist(err) {
			t.Errorf("unpacked copy %s kept over a clean restart: %v", l.LocalDir, err)
		}
	}
	attachUnpacker(t, td, find)
	waitLocal(t, td, 2)
	again, err := td.sn.Prepare(ctx, "rootfs-again", "c1")
	if err != nil {
		t.Fatal(err)
	}
	if got := treeOf(t, mountAt(t, again)); !equalTrees(t, got, want) {
		t.Fatal("unpacked rootfs after a restart differs from the lazy one")
	}
	if err := td.sn.Remove(ctx, "rootfs-again"); err != nil {
		t.Fatal(err)
	}
}

const stargzTOC = "stargz.index.json"

func equalTrees(t *testing.T, got, want map[string]string) bool {
	t.Helper()
	ok := true
	for p, w := range want {
		if g, found := got[p]; !found {
			t.Errorf("%s: missing (want %s)", p, w)
			ok = false
		} else if g != w {
			t.Errorf("%s: %s, want %s", p, g, w)
			ok = false
		}
	}
	for p, g := range got {
		if _, found := want[p]; !found {
			t.Errorf("%s: unexpected (%s)", p, g)
			ok = false
		}
	}
	return ok
}

// TestLocalUnpackBadBlob: a blob that is not the layer (here: not even
// compressed tar) fails the unpack cleanly; the layer stays on its lazy
// mount and nothing is left half-unpacked.
func TestLocalUnpackBadBlob(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img, _ := localizeImage(t, reg)
	td := startDaemon(t, "", func(c *Config) { c.Guard.Enable = false })
	results := attachUnpacker(t, td, func(context.Context, digest.Digest) (content.ReaderAt, bool) {
		return memBlob{bytes.NewReader([]byte("this is no layer"))}, true
	})
	ctx := namespaces.WithNamespace(context.Background(), "test")
	_, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "c0")))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v", err)
	}
	select {
	case r := <-results:
		if r.Err == nil {
			t.Fatalf("unpack of a bad blob succeeded: %+v", r)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the bad blob's unpack did not end")
	}
	st, err := td.d.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Layers) != 1 || st.Layers[0].LocalDir != "" {
		t.Fatalf("status = %+v", st.Layers)
	}
	snDir := filepath.Dir(st.Layers[0].Mountpoint)
	for _, name := range []string{exportguard.LocalDirName, exportguard.LocalDirName + ".tmp", exportguard.LocalDoneName} {
		if _, err := os.Stat(filepath.Join(snDir, name)); !os.IsNotExist(err) {
			t.Errorf("%s left after a failed unpack: %v", name, err)
		}
	}
	view, err := td.sn.View(ctx, "view-0", "c0")
	if err != nil {
		t.Fatal(err)
	}
	if lowerdirs(view) != st.Layers[0].Mountpoint {
		t.Fatalf("view after a failed unpack = %+v", view)
	}
	if err := td.sn.Remove(ctx, "view-0"); err != nil {
		t.Fatal(err)
	}
}

package refimage

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// makeTree builds a small tree with the kinds of entries a root file system
// holds. It reports whether user xattrs are supported.
func makeTree(t *testing.T) (string, bool) {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "etc/skel"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755))
	must(os.MkdirAll(filepath.Join(root, "tmp"), 0o755))
	must(os.Chmod(filepath.Join(root, "tmp"), 0o777|os.ModeSticky))
	must(os.WriteFile(filepath.Join(root, "etc/hosts"), []byte("127.0.0.1 localhost\n"), 0o644))
	must(os.WriteFile(filepath.Join(root, "etc/shadow"), []byte("root:*:19000:0:99999:7:::\n"), 0o640))
	must(os.WriteFile(filepath.Join(root, "usr/bin/tool"), bytes.Repeat([]byte("binary"), 10000), 0o755))
	must(os.Chmod(filepath.Join(root, "usr/bin/tool"), 0o755|os.ModeSetuid))
	must(os.WriteFile(filepath.Join(root, "usr/bin/empty"), nil, 0o600))
	must(os.Link(filepath.Join(root, "usr/bin/tool"), filepath.Join(root, "usr/bin/tool-alias")))
	must(os.Symlink("../etc/hosts", filepath.Join(root, "usr/hosts-link")))
	must(os.Symlink("/nonexistent/target", filepath.Join(root, "usr/dangling")))
	must(unix.Mkfifo(filepath.Join(root, "usr/fifo"), 0o644))
	// A long name needs PAX.
	long := filepath.Join(root, "usr", string(bytes.Repeat([]byte("d"), 120)))
	must(os.MkdirAll(long, 0o755))
	must(os.WriteFile(filepath.Join(long, "file"), []byte("deep"), 0o644))
	if os.Geteuid() == 0 {
		must(unix.Mknod(filepath.Join(root, "usr/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
		must(os.Chmod(filepath.Join(root, "usr/null"), 0o666))
		must(os.Lchown(filepath.Join(root, "etc/shadow"), 0, 42))
	}
	old := time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)
	must(os.Chtimes(filepath.Join(root, "etc/hosts"), old, old))
	xattrs := unix.Setxattr(filepath.Join(root, "etc/hosts"), "user.lazybase.test", []byte("value"), 0) == nil
	return root, xattrs
}

func packTo(t *testing.T, root, prefix string) ([]byte, treeStats) {
	t.Helper()
	var buf bytes.Buffer
	p := newPacker(&buf, Epoch)
	if err := p.addTree(context.Background(), root, prefix); err != nil {
		t.Fatal(err)
	}
	if err := p.close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes(), p.stats
}

func TestPackDeterministic(t *testing.T) {
	root, _ := makeTree(t)
	a, _ := packTo(t, root, "")
	// Touch every file: times past the epoch must not change the output.
	now := time.Now()
	if err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if fi.Mode()&os.ModeSymlink != 0 || filepath.Base(p) == "hosts" {
			return nil
		}
		return os.Chtimes(p, now, now)
	}); err != nil {
		t.Fatal(err)
	}
	b, _ := packTo(t, root, "")
	if sha256.Sum256(a) != sha256.Sum256(b) {
		t.Fatal("two packs of the same tree differ")
	}
	// The same content in another directory packs the same.
	c, _ := packTo(t, copyTree(t, root), "")
	if sha256.Sum256(a) != sha256.Sum256(c) {
		t.Fatal("pack of a copy of the tree differs")
	}
}

// copyTree copies root with tar, which preserves what the packer reads.
func copyTree(t *testing.T, root string) string {
	t.Helper()
	data, _ := packTo(t, root, "")
	dst := t.TempDir()
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dst, h.Name)
		var err2 error
		switch h.Typeflag {
		case tar.TypeDir:
			err2 = os.MkdirAll(p, 0o755)
		case tar.TypeReg:
			var b []byte
			if b, err2 = io.ReadAll(tr); err2 == nil {
				err2 = os.WriteFile(p, b, 0o600)
			}
		case tar.TypeLink:
			err2 = os.Link(filepath.Join(dst, h.Linkname), p)
		case tar.TypeSymlink:
			err2 = os.Symlink(h.Linkname, p)
		case tar.TypeFifo:
			err2 = unix.Mkfifo(p, 0o600)
		case tar.TypeChar:
			err2 = unix.Mknod(p, unix.S_IFCHR|0o600, int(unix.Mkdev(uint32(h.Devmajor), uint32(h.Devminor))))
		}
		if err2 != nil {
			t.Fatal(err2)
		}
		for k, v := range h.PAXRecords {
			if name, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if err := unix.Lsetxattr(p, name, []byte(v), 0); err != nil {
					t.Fatal(err)
				}
			}
		}
		if h.Typeflag != tar.TypeSymlink && h.Typeflag != tar.TypeLink {
			if err := os.Lchown(p, h.Uid, h.Gid); err != nil && os.Geteuid() == 0 {
				t.Fatal(err)
			}
			if err := os.Chmod(p, os.FileMode(h.Mode&0o777)|modeBits(h.Mode)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Directory times last, after their contents were written.
	tr = tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		if h.Typeflag != tar.TypeSymlink {
			_ = os.Chtimes(filepath.Join(dst, h.Name), h.ModTime, h.ModTime)
		}
	}
	return dst
}

func modeBits(m int64) os.FileMode {
	var fm os.FileMode
	if m&0o4000 != 0 {
		fm |= os.ModeSetuid
	}
	if m&0o2000 != 0 {
		fm |= os.ModeSetgid
	}
	if m&0o1000 != 0 {
		fm |= os.ModeSticky
	}
	return fm
}

func TestPackContent(t *testing.T) {
	root, xattrs := makeTree(t)
	data, stats := packTo(t, root, "opt/pkg")
	headers := map[string]*tar.Header{}
	contents := map[string][]byte{}
	var names []string
	tr := tar.NewReader(bytes.NewReader(data))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if _, dup := headers[h.Name]; dup {
			t.Errorf("%s: written twice", h.Name)
		}
		headers[h.Name] = h
		names = append(names, h.Name)
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		contents[h.Name] = b
		if !h.AccessTime.IsZero() || !h.ChangeTime.IsZero() {
			t.Errorf("%s: has access or change time", h.Name)
		}
		if h.Uname != "" || h.Gname != "" {
			t.Errorf("%s: has user or group name %q/%q", h.Name, h.Uname, h.Gname)
		}
		if h.ModTime.After(Epoch) {
			t.Errorf("%s: mtime %v after the epoch", h.Name, h.ModTime)
		}
	}
	if len(names) != stats.Entries {
		t.Errorf("stats count %d entries, tar has %d", stats.Entries, len(names))
	}
	if names[0] != "opt/" || names[1] != "opt/pkg/" {
		t.Errorf("parents not first: %v", names[:3])
	}
	for i := 1; i < len(names); i++ {
		if dir := filepath.Dir(names[i]); dir != "." && headers[dir+"/"] == nil {
			t.Errorf("%s comes before its directory", names[i])
		}
	}
	get := func(name string) *tar.Header {
		t.Helper()
		h := headers["opt/pkg/"+name]
		if h == nil {
			t.Fatalf("%s missing from the tar", name)
		}
		return h
	}
	if h := get("etc/hosts"); h.Mode != 0o644 || string(contents[h.Name]) != "127.0.0.1 localhost\n" ||
		!h.ModTime.Equal(time.Date(2001, 2, 3, 4, 5, 6, 0, time.UTC)) {
		t.Errorf("etc/hosts: mode %o, mtime %v, content %q", h.Mode, h.ModTime, contents[h.Name])
	}
	if h := get("usr/bin/tool"); h.Typeflag != tar.TypeReg || h.Mode != 0o4755 || len(contents[h.Name]) != 60000 {
		t.Errorf("usr/bin/tool: type %c mode %o size %d", h.Typeflag, h.Mode, len(contents[h.Name]))
	}
	if h := get("usr/bin/tool-alias"); h.Typeflag != tar.TypeLink || h.Linkname != "opt/pkg/usr/bin/tool" {
		t.Errorf("usr/bin/tool-alias: type %c link %q", h.Typeflag, h.Linkname)
	}
	if h := get("usr/hosts-link"); h.Typeflag != tar.TypeSymlink || h.Linkname != "../etc/hosts" {
		t.Errorf("usr/hosts-link: type %c link %q", h.Typeflag, h.Linkname)
	}
	if h := get("usr/dangling"); h.Typeflag != tar.TypeSymlink || h.Linkname != "/nonexistent/target" {
		t.Errorf("usr/dangling: type %c link %q", h.Typeflag, h.Linkname)
	}
	if h := get("usr/fifo"); h.Typeflag != tar.TypeFifo {
		t.Errorf("usr/fifo: type %c", h.Typeflag)
	}
	if h := get("tmp/"); h.Typeflag != tar.TypeDir || h.Mode != 0o1777 {
		t.Errorf("tmp/: type %c mode %o", h.Typeflag, h.Mode)
	}
	if h := get("usr/bin/empty"); h.Mode != 0o600 || h.Size != 0 {
		t.Errorf("usr/bin/empty: mode %o size %d", h.Mode, h.Size)
	}
	if h := get("usr/" + string(bytes.Repeat([]byte("d"), 120)) + "/file"); string(contents[h.Name]) != "deep" {
		t.Errorf("long name: content %q", contents[h.Name])
	}
	if os.Geteuid() == 0 {
		if h := get("usr/null"); h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 || h.Mode != 0o666 {
			t.Errorf("usr/null: type %c dev %d,%d mode %o", h.Typeflag, h.Devmajor, h.Devminor, h.Mode)
		}
		if h := get("etc/shadow"); h.Uid != 0 || h.Gid != 42 || h.Mode != 0o640 {
			t.Errorf("etc/shadow: owner %d:%d mode %o", h.Uid, h.Gid, h.Mode)
		}
	} else {
		t.Log("not root: device nodes and owners not tested")
	}
	if xattrs {
		if h := get("etc/hosts"); h.PAXRecords["SCHILY.xattr.user.lazybase.test"] != "value" {
			t.Errorf("etc/hosts: xattrs %v", h.PAXRecords)
		}
	} else {
		t.Log("file system has no user xattrs: xattrs not tested")
	}
}

func TestWriteLayerIsReproducibleAndHoldsThePackedTar(t *testing.T) {
	root, _ := makeTree(t)
	dir := t.TempDir()
	l1, err := writeLayer(filepath.Join(dir, "a"), Epoch, func(p *packer) error { return p.addTree(context.Background(), root, "") })
	if err != nil {
		t.Fatal(err)
	}
	l2, err := writeLayer(filepath.Join(dir, "b"), Epoch, func(p *packer) error { return p.addTree(context.Background(), root, "") })
	if err != nil {
		t.Fatal(err)
	}
	if l1.digest != l2.digest || l1.diffID != l2.diffID {
		t.Fatalf("two layers of one tree differ: %s/%s vs %s/%s", l1.digest, l1.diffID, l2.digest, l2.diffID)
	}
	raw, _ := packTo(t, root, "")
	if h := sha256.Sum256(raw); l1.diffID.Hex != hex.EncodeToString(h[:]) || l1.stats.Bytes != int64(len(raw)) {
		t.Errorf("diffID %s size %d, want sha256:%x size %d", l1.diffID, l1.stats.Bytes, h, len(raw))
	}
	fi, err := os.Stat(filepath.Join(dir, "a", l1.digest.Hex))
	if err != nil || fi.Size() != l1.size {
		t.Fatalf("blob: %v, size mismatch", err)
	}
	rc, err := l1.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil || !bytes.Equal(got, raw) {
		t.Fatalf("uncompressed blob differs from the tar (err %v)", err)
	}
}

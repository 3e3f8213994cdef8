package convert_test

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"path"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
)

// fuzzTimeout bounds one conversion of a fuzz input; inputs are small, so
// anything near it is a hang.
const fuzzTimeout = 20 * time.Second

// FuzzConvertLayer feeds arbitrary bytes to Converter.Layer, both as a gzip
// blob and as a tar stream wrapped in gzip. A conversion must return (no
// panic, no hang) and return a layer exactly when it returns no error. When
// it succeeds, the output must open with the stargz reader and pass
// VerifyTOC against its annotation, every chunk must verify, the output must
// decompress to its DiffID, the source must not have held a path escaping
// the root, and the output's tar tree must equal the source's.
//
// The seed corpus is in testdata/fuzz/FuzzConvertLayer.
func FuzzConvertLayer(f *testing.F) {
	f.Add(testimage.MustTar(testimage.Files("a", "hello\n")))
	f.Add(testimage.Gzip(testimage.MustTar(testimage.Files("etc/os-release", "ID=fuzz\n"))))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzConvert(t, dir, data)
		fuzzConvert(t, dir, testimage.Gzip(data))
	})
}

func fuzzConvert(t *testing.T, dir string, blob []byte) {
	c, err := convert.New(convert.WithTempDir(dir), convert.WithWorkers(2), convert.WithJobs(1))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), fuzzTimeout)
	defer cancel()
	type result struct {
		l   *convert.Layer
		err error
	}
	done := make(chan result, 1)
	go func() {
		l, err := c.Layer(ctx, testimage.NewLayer(blob, types.OCILayer), v1.Hash{})
		done <- result{l, err}
	}()
	var res result
	select {
	case res = <-done:
	case <-time.After(fuzzTimeout + 5*time.Second):
		t.Fatalf("conversion of a %d-byte blob did not return within %s", len(blob), fuzzTimeout+5*time.Second)
	}
	if res.err != nil {
		if res.l != nil {
			t.Fatalf("Layer returned a layer with error %v", res.err)
		}
		return
	}
	if res.l == nil {
		t.Fatal("Layer returned neither a layer nor an error")
	}
	if err := checkFuzzOutput(blob, res.l); err != nil {
		t.Fatalf("converted a %d-byte blob: %v", len(blob), err)
	}
}

// checkFuzzOutput checks a successful conversion of blob.
func checkFuzzOutput(blob []byte, l *convert.Layer) error {
	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	out, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return err
	}
	desc, err := l.Descriptor()
	if err != nil {
		return err
	}
	r, v, err := openOutput(out, desc)
	if err != nil {
		return err
	}
	if _, err := readTOCTree(r, v, convert.DefaultChunkSize); err != nil {
		return fmt.Errorf("reading through the TOC: %w", err)
	}
	raw, err := testimage.ReadAll(out)
	if err != nil {
		return fmt.Errorf("decompressing output: %w", err)
	}
	if d, _ := l.DiffID(); testimage.SHA256(raw) != d {
		return fmt.Errorf("uncompressed output sha256 %s, DiffID %s", testimage.SHA256(raw), d)
	}
	got, _, err := readTarTree(bytes.NewReader(raw))
	if err != nil {
		return fmt.Errorf("output as tar: %w", err)
	}
	srcTar, err := testimage.ReadAll(blob)
	if err != nil {
		return nil // the converter read more into it than the oracle can
	}
	names, err := tarPaths(srcTar)
	if err != nil {
		return nil
	}
	for _, n := range names {
		if c := path.Clean(n); c == ".." || strings.HasPrefix(c, "../") {
			return fmt.Errorf("source path %q escapes the root but was converted", n)
		}
	}
	if h := lazyViewHazard(srcTar); h != "" {
		return fmt.Errorf("source has %s but was converted", h)
	}
	src, _, err := readTarTree(bytes.NewReader(srcTar))
	if err != nil {
		return nil // the converter read more into it than the oracle can
	}
	// A source that already is eStargz (without the annotation that would
	// make it reused) carries its own landmark and TOC entries.
	if d := diffTrees(withoutConverterEntries(src), withoutConverterEntries(got)); d != "" {
		return fmt.Errorf("output tree differs from source:\n%s", d)
	}
	return nil
}

// FuzzConvertEntry converts a small layer holding one fuzzed tar entry (name,
// link target, type, mode, owner, contents, an xattr) next to a few fixed
// ones. A conversion must either fail with an error naming the layer digest,
// or produce a layer whose tree equals the source's, read as a plain tar and
// through the verified TOC.
func FuzzConvertEntry(f *testing.F) {
	f.Add("etc/passwd", "", byte(tar.TypeReg), int64(0o644), 0, "root:x:0:0::/root:/bin/sh\n", "user.a", "b")
	f.Add("./bin/sh", "busybox", byte(tar.TypeSymlink), int64(0o777), 0, "", "", "")
	f.Add("base/hard", "base/file", byte(tar.TypeLink), int64(0o644), 0, "", "", "")
	f.Add("base/hard", "base/file", byte(tar.TypeLink), int64(0o4755), 0, "", "", "")
	f.Add("base/hard", "base/file", byte(tar.TypeLink), int64(0o644), 7, "", "user.a", "b")
	f.Add("base/f", "", byte(tar.TypeReg), int64(0o644), 0, "x", "trusted.overlay.redirect", "/etc")
	f.Add("../x", "", byte(tar.TypeReg), int64(0o644), 0, "x", "", "")
	f.Add("/abs/x", "", byte(tar.TypeReg), int64(0o644), 0, "x", "", "")
	f.Add("dev/tty", "", byte(tar.TypeChar), int64(0o620), 5, "", "", "")
	f.Add("run/fifo", "", byte(tar.TypeFifo), int64(0o600), 0, "", "", "")
	f.Add("base/", "", byte(tar.TypeDir), int64(0o1777), 1000, "", "trusted.overlay.opaque", "y")
	f.Add("unicode/é/"+strings.Repeat("x", 120), "", byte(tar.TypeReg), int64(0o4755), 0, "payload", "", "")
	f.Add("base/.wh..wh..opq", "", byte(tar.TypeReg), int64(0), 0, "", "", "")
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, name, link string, typ byte, mode int64, id int, data, xk, xv string) {
		h := &tar.Header{Typeflag: typ, Name: name, Linkname: link, Mode: mode & 0o7777, Uid: id & 0xffffff, Gid: id & 0xffff,
			ModTime: testimage.Epoch, Devmajor: int64(id & 0xfff), Devminor: int64(id & 0xfffff)}
		if typ == tar.TypeReg {
			h.Size = int64(len(data))
		} else {
			data = ""
		}
		if xk != "" {
			h.PAXRecords = map[string]string{"SCHILY.xattr." + xk: xv}
			h.Format = tar.FormatPAX
		}
		entries := []testimage.Entry{
			{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "base/", Mode: 0o755, ModTime: testimage.Epoch}},
			{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "base/file", Mode: 0o644, ModTime: testimage.Epoch, Size: 5}, Data: []byte("file\n")},
			{Header: h, Data: []byte(data)},
			{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "zz-last", Mode: 0o644, ModTime: testimage.Epoch, Size: 4}, Data: []byte("end\n")},
		}
		tarball, err := testimage.Tar(entries)
		if err != nil {
			return // archive/tar cannot write it: not a layer anyone has
		}
		src, _, err := readTarTree(bytes.NewReader(tarball))
		if err != nil || len(src) != len(entries) {
			return // the oracle cannot read it, or names repeat
		}
		layer := testimage.GzipLayer(tarball)
		dgst, _ := layer.Digest()
		c, err := convert.New(convert.WithTempDir(dir), convert.WithWorkers(2))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), fuzzTimeout)
		defer cancel()
		l, err := c.Layer(ctx, layer, testimage.SHA256(tarball))
		if err != nil {
			if !strings.Contains(err.Error(), dgst.String()) {
				t.Fatalf("error does not name the layer %s: %v", dgst, err)
			}
			return
		}
		if h := lazyViewHazard(tarball); h != "" {
			t.Fatalf("source has %s but was converted", h)
		}
		checkLayerTree(t, src, l, convert.DefaultChunkSize)
	})
}

// lazyViewHazard is the fuzzers' oracle for layers the converter must
// refuse because a lazy mount could not show them as containerd unpacks
// them: it names a hardlink whose target (followed through other hardlinks,
// as the stargz reader does, by the last entry of each name) is a
// directory, an entry placed under a symbolic link of the layer, an entry
// with a trusted.overlay.* xattr, or a hardlink whose owner or mode differs
// from its (regular, non-link) target's. It returns "" for a layer with
// none of these.
func lazyViewHazard(tarball []byte) string {
	last := map[string]*tar.Header{}
	var links []*tar.Header
	tr := tar.NewReader(bytes.NewReader(tarball))
	for {
		h, err := tr.Next()
		if err != nil {
			break
		}
		name := path.Clean(h.Name)
		for dir := path.Dir(name); dir != "." && dir != "/"; dir = path.Dir(dir) {
			if p, ok := last[dir]; ok && p.Typeflag == tar.TypeSymlink {
				return fmt.Sprintf("%q under the symbolic link %q", h.Name, p.Name)
			}
		}
		for k := range h.PAXRecords {
			if strings.HasPrefix(k, "SCHILY.xattr.trusted.overlay.") {
				return fmt.Sprintf("%q with the overlay xattr %q", h.Name, strings.TrimPrefix(k, "SCHILY.xattr."))
			}
		}
		if h.Typeflag == tar.TypeLink {
			links = append(links, h)
			if t, ok := last[path.Clean(h.Linkname)]; ok && t.Typeflag != tar.TypeDir && t.Typeflag != tar.TypeLink &&
				(t.Uid != h.Uid || t.Gid != h.Gid || (t.Typeflag != tar.TypeSymlink && t.Mode&0o7777 != h.Mode&0o7777)) {
				return fmt.Sprintf("the hardlink %q with another owner or mode than its target %q", h.Name, t.Name)
			}
		}
		last[name] = h
	}
	for _, l := range links {
		h := l
		for range 64 {
			t, ok := last[path.Clean(h.Linkname)]
			if !ok {
				break
			}
			if t.Typeflag == tar.TypeDir {
				return fmt.Sprintf("the hardlink %q to the directory %q", l.Name, t.Name)
			}
			if t.Typeflag != tar.TypeLink {
				break
			}
			h = t
		}
	}
	return ""
}

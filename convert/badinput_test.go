package convert_test

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// badLayer is a bad input with what its error must mention.
type badLayer struct {
	name  string
	layer *testimage.Layer
	// diffID passed to Converter.Layer; zero means the honest one when it
	// can be computed.
	diffID v1.Hash
	// mention lists strings the error must contain besides the layer
	// digest; any one of anyOf must also be there when set.
	mention []string
	anyOf   []string
	// is, when set, must match the error with errors.Is.
	is error
}

func entriesWith(extra ...testimage.Entry) []testimage.Entry {
	es := testimage.Files("ok.txt", "fine\n", "dir/file", "also fine\n")
	return append(es, extra...)
}

func hdr(typ byte, name, link string) testimage.Entry {
	h := &tar.Header{Typeflag: typ, Name: name, Linkname: link, Mode: 0o644, ModTime: testimage.Epoch}
	var data []byte
	if typ == tar.TypeReg {
		data = []byte("payload of " + name + "\n")
		h.Size = int64(len(data))
	}
	return testimage.Entry{Header: h, Data: data}
}

func withXattr(e testimage.Entry, k, v string) testimage.Entry {
	e.Header.Format = tar.FormatPAX
	if e.Header.PAXRecords == nil {
		e.Header.PAXRecords = map[string]string{}
	}
	e.Header.PAXRecords["SCHILY.xattr."+k] = v
	return e
}

func withMode(e testimage.Entry, mode int64) testimage.Entry {
	e.Header.Mode = mode
	return e
}

func withOwner(e testimage.Entry, uid, gid int) testimage.Entry {
	e.Header.Uid, e.Header.Gid = uid, gid
	return e
}

func withMtime(e testimage.Entry, mt time.Time) testimage.Entry {
	e.Header.ModTime = mt
	return e
}

func mustGzipLayer(t testing.TB, es []testimage.Entry) *testimage.Layer {
	t.Helper()
	l, err := testimage.EntriesLayer(es)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func mustEStargz(t testing.TB) *testimage.Layer {
	t.Helper()
	tarball := testimage.MustTar(testimage.Entries(7, testimage.WithoutLargeFiles()))
	l, err := testimage.EStargz(tarball)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func badLayers(t testing.TB) []badLayer {
	good := mustGzipLayer(t, testimage.Entries(5, testimage.WithoutLargeFiles()))
	goodTar, err := testimage.ReadAll(good.Blob)
	if err != nil {
		t.Fatal(err)
	}
	short := good.Clone()
	shortLen := int64(len(good.Blob) - 1)
	short.Length = &shortLen
	long := good.Clone()
	longLen := int64(len(good.Blob) + 1)
	long.Length = &longLen
	// Bytes damaged in transit or storage: the manifest digest is right, the
	// bytes are not, and they no longer decompress. The error must say the
	// blob does not match its digest, not only that the tar is bad.
	corrupt := good.Clone()
	goodDigest, _ := good.Digest()
	corrupt.Hash = &goodDigest
	corrupt.Blob[len(corrupt.Blob)/3] ^= 0xff
	lying := good.Clone()
	claimed := testimage.SHA256([]byte("some other blob"))
	lying.Hash = &claimed

	esgz := mustEStargz(t)
	flipped, err := esgz.FlipPayloadByte("data/medium.bin")
	if err != nil {
		t.Fatal(err)
	}

	esgzWith := func(extra ...testimage.Entry) *testimage.Layer {
		l, err := testimage.EStargz(testimage.MustTar(entriesWith(extra...)))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	esgzBadPath := func(name string) *testimage.Layer { return esgzWith(hdr(tar.TypeReg, name, "")) }

	return []badLayer{
		{name: "truncated-gzip", layer: testimage.NewLayer(testimage.Truncate(good.Blob, len(good.Blob)/2), types.OCILayer)},
		{name: "truncated-gzip-trailer", layer: testimage.NewLayer(testimage.Truncate(good.Blob, -4), types.OCILayer)},
		{name: "gzip-of-non-tar", layer: testimage.GzipLayer(testimage.NotTar())},
		{name: "not-gzip-at-all", layer: testimage.NewLayer(testimage.NotTar(), types.OCILayer)},
		{name: "digest-mismatch", layer: lying},
		{name: "corrupt-bytes-digest-mismatch", layer: corrupt, anyOf: []string{"digest mismatch", "verifying sha256 checksum"}},
		{name: "size-smaller-than-blob", layer: short},
		{name: "size-larger-than-blob", layer: long},
		{name: "empty-blob", layer: testimage.NewLayer(nil, types.OCILayer)},
		{name: "diffid-mismatch", layer: good, diffID: testimage.SHA256(append(goodTar, 0))},
		{name: "path-dotdot", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeReg, "../x", ""))), mention: []string{"../x"}},
		{name: "path-nested-dotdot", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeReg, "a/../../x", ""))), mention: []string{"a/../../x"}},
		{name: "path-absolute", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeReg, "/etc/x", ""))), mention: []string{"/etc/x"}},
		{name: "hardlink-target-escapes", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "evil", "../../etc/shadow"))), anyOf: []string{"evil", "../../etc/shadow"}},
		{name: "hardlink-missing-target", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "dir/hl", "no/such/file"))), anyOf: []string{"dir/hl", "no/such/file"}},
		{name: "hardlink-before-target", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "early", "late"), hdr(tar.TypeReg, "late", ""))), anyOf: []string{"early", "late"}},
		{name: "estargz-damaged-footer", layer: esgz.DamageFooter()},
		{name: "estargz-wrong-toc-digest", layer: esgz.WrongTOCDigest()},
		{name: "estargz-flipped-payload-byte", layer: flipped},
		// A valid eStargz layer (annotation and TOC verify) is still a tar
		// stream that an applier extracts: reusing it must not skip the path
		// checks.
		{name: "estargz-valid-path-dotdot", layer: esgzBadPath("../x"), mention: []string{"../x"}},
		{name: "estargz-valid-path-absolute", layer: esgzBadPath("/etc/x"), mention: []string{"/etc/x"}},
		{name: "estargz-valid-hardlink-before-target", layer: esgzWith(hdr(tar.TypeLink, "early", "late"), hdr(tar.TypeReg, "late", "")), anyOf: []string{"early", "late"}},
		// Hardlinks to directories make a cycle in the TOC that crashes the
		// stargz reader; entries under a symlink of the same layer would be
		// placed elsewhere by containerd's unpack than in the lazy view.
		{name: "hardlink-to-dir", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeDir, "etc/", ""), hdr(tar.TypeLink, "etc/hl", "etc"))), mention: []string{"etc/hl", "is a directory"}},
		{name: "hardlink-to-implied-dir", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "hl", "dir"))), mention: []string{`"hl"`, "is a directory"}},
		{name: "hardlink-to-root", layer: mustGzipLayer(t, append([]testimage.Entry{hdr(tar.TypeDir, "./", "")}, entriesWith(hdr(tar.TypeLink, "hl", "."))...)), mention: []string{`"hl"`, "is a directory"}},
		{name: "hardlink-to-itself", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "ok.txt", "ok.txt"))), mention: []string{"ok.txt", "itself"}},
		{name: "hardlink-chain-target-becomes-dir", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeReg, "f", ""), hdr(tar.TypeLink, "h1", "f"), hdr(tar.TypeDir, "f/", ""), hdr(tar.TypeLink, "h2", "h1"))), mention: []string{`"f/"`, `"h1"`}},
		{name: "hardlink-target-replaced", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "hl", "ok.txt"), hdr(tar.TypeReg, "ok.txt", ""))), mention: []string{"ok.txt", "hl"}},
		{name: "under-symlinked-dir", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeDir, "b/", ""), hdr(tar.TypeSymlink, "a", "b"), hdr(tar.TypeReg, "a/x", ""))), mention: []string{"a/x", "symbolic link"}},
		{name: "under-symlinked-dir-deep", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeSymlink, "dir/lnk", "/usr"), hdr(tar.TypeDir, "dir/lnk/sub/", ""), hdr(tar.TypeReg, "dir/lnk/sub/x", ""))), mention: []string{"dir/lnk/sub", "symbolic link"}},
		{name: "under-hardlinked-symlink", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeSymlink, "s", "dir"), hdr(tar.TypeLink, "h", "s"), hdr(tar.TypeReg, "h/x", ""))), mention: []string{"h/x", "symbolic link"}},
		{name: "under-regular-file", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeReg, "ok.txt/x", ""))), mention: []string{"ok.txt/x", "not a directory"}},
		{name: "dir-replaced-by-symlink", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeSymlink, "dir", "elsewhere"))), mention: []string{`"dir"`, "replaces a directory"}},
		{name: "estargz-valid-hardlink-to-dir", layer: esgzWith(hdr(tar.TypeDir, "etc/", ""), hdr(tar.TypeLink, "etc/hl", "etc")), mention: []string{"etc/hl", "is a directory"}},
		{name: "estargz-valid-under-symlinked-dir", layer: esgzWith(hdr(tar.TypeDir, "b/", ""), hdr(tar.TypeSymlink, "a", "b"), hdr(tar.TypeReg, "a/x", "")), mention: []string{"a/x", "symbolic link"}},
		// containerd's unpack ignores trusted.* xattrs; overlayfs obeys
		// trusted.overlay.* ones served by a lazily mounted layer.
		{name: "overlay-xattr-opaque", layer: mustGzipLayer(t, entriesWith(withXattr(hdr(tar.TypeDir, "opq/", ""), "trusted.overlay.opaque", "y"))), mention: []string{`"opq/"`, `"trusted.overlay.opaque"`}},
		{name: "overlay-xattr-redirect", layer: mustGzipLayer(t, entriesWith(withXattr(hdr(tar.TypeReg, "f", ""), "trusted.overlay.redirect", "/etc"))), mention: []string{`"f"`, `"trusted.overlay.redirect"`}},
		{name: "estargz-valid-overlay-xattr", layer: esgzWith(withXattr(hdr(tar.TypeDir, "opq/", ""), "trusted.overlay.opaque", "y")), mention: []string{`"opq/"`, `"trusted.overlay.opaque"`}},
		// containerd's unpack applies a hardlink header's attributes to
		// the shared file; the lazy view keeps the target's.
		{name: "hardlink-setuid", layer: mustGzipLayer(t, entriesWith(withMode(hdr(tar.TypeLink, "hl", "ok.txt"), 0o4755))), mention: []string{`"hl"`, `"ok.txt"`, "mode 04755 where the target has 0644"}},
		{name: "hardlink-owner", layer: mustGzipLayer(t, entriesWith(withOwner(hdr(tar.TypeLink, "hl", "ok.txt"), 0, 42))), mention: []string{`"hl"`, "owner 0:42 where the target has 0:0"}},
		{name: "hardlink-mtime", layer: mustGzipLayer(t, entriesWith(withMtime(hdr(tar.TypeLink, "hl", "ok.txt"), testimage.Epoch.Add(time.Hour)))), mention: []string{`"hl"`, "modification time"}},
		{name: "hardlink-xattr", layer: mustGzipLayer(t, entriesWith(withXattr(hdr(tar.TypeLink, "hl", "ok.txt"), "security.capability", "cap"))), mention: []string{`"hl"`, `"security.capability"`}},
		{name: "hardlink-chain-mode", layer: mustGzipLayer(t, entriesWith(hdr(tar.TypeLink, "h1", "ok.txt"), withMode(hdr(tar.TypeLink, "h2", "h1"), 0o600))), mention: []string{`"h2"`, "mode 0600"}},
		{name: "estargz-valid-hardlink-setuid", layer: esgzWith(withMode(hdr(tar.TypeLink, "hl", "ok.txt"), 0o4755)), mention: []string{`"hl"`, "mode 04755"}},
		{name: "media-type-foreign", layer: testimage.NewLayer(good.Blob, types.DockerForeignLayer), mention: []string{string(types.DockerForeignLayer)}, is: convert.ErrUnsupportedMediaType},
		{name: "media-type-text-plain", layer: testimage.NewLayer(good.Blob, "text/plain"), mention: []string{"text/plain"}, is: convert.ErrUnsupportedMediaType},
	}
}

// honestDiffID returns the layer's diffID, or, when its bytes do not
// decompress, a stand-in (an image config needs some value).
func honestDiffID(l *testimage.Layer) v1.Hash {
	d, err := l.DiffID()
	if err != nil {
		return testimage.SHA256(l.Blob)
	}
	return d
}

// checkBadError asserts the error names the layer digest and the paths.
func checkBadError(t *testing.T, err error, dgst v1.Hash, tc badLayer) {
	t.Helper()
	if err == nil {
		t.Fatal("conversion succeeded, want an error")
	}
	msg := err.Error()
	t.Logf("error: %s", msg)
	if !strings.Contains(msg, dgst.String()) {
		t.Errorf("error does not name the layer digest %s", dgst)
	}
	for _, s := range tc.mention {
		if !strings.Contains(msg, s) {
			t.Errorf("error does not mention %q", s)
		}
	}
	if tc.is != nil && !errors.Is(err, tc.is) {
		t.Errorf("error is not %v", tc.is)
	}
	if len(tc.anyOf) > 0 {
		found := false
		for _, s := range tc.anyOf {
			found = found || strings.Contains(msg, s)
		}
		if !found {
			t.Errorf("error mentions none of %q", tc.anyOf)
		}
	}
}

// leftoverFiles lists regular files under dir.
func leftoverFiles(t *testing.T, dir string) []string {
	t.Helper()
	var files []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.Type().IsRegular() {
			files = append(files, p)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// TestBadLayerFailsNamingItAndLeavesNoFiles converts every bad layer,
// streamed and spooled for a prefetch list: the error names the layer and
// what is wrong, no layer is returned and no temporary file is left.
func TestBadLayerFailsNamingItAndLeavesNoFiles(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// With a prefetch list the converter spools the tar and reorders it: a
	// different code path that must fail the same way.
	pf := &prefetch.List{Version: prefetch.ListVersion, Files: []string{"dir/file", testimage.OSRelease}}
	for _, mode := range []struct {
		name string
		opts []convert.Option
	}{{"stream", nil}, {"prefetch", []convert.Option{convert.WithPrefetch(pf)}}} {
		for _, tc := range badLayers(t) {
			t.Run(mode.name+"/"+tc.name, func(t *testing.T) {
				tmp := t.TempDir()
				c := newConverter(t, append([]convert.Option{convert.WithTempDir(tmp)}, mode.opts...)...)
				dgst, _ := tc.layer.Digest()
				l, err := c.Layer(ctx, tc.layer, tc.diffID)
				checkBadError(t, err, dgst, tc)
				if l != nil {
					t.Errorf("Layer returned a layer (%v) with the error", l)
				}
				if files := leftoverFiles(t, tmp); len(files) != 0 {
					t.Errorf("temporary files left after a failed conversion: %q", files)
				}
			})
		}
	}
}

// TestBadLayerFailsItsImage converts an image whose second layer is bad: the
// error names the image and the layer, and no result is returned.
func TestBadLayerFailsItsImage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	first := mustGzipLayer(t, testimage.Files("etc/hostname", "first\n"))
	for _, tc := range badLayers(t) {
		t.Run(tc.name, func(t *testing.T) {
			bad := tc.layer.Clone()
			diff := tc.diffID
			if diff == (v1.Hash{}) {
				diff = honestDiffID(tc.layer)
			}
			bad.Diff = &diff
			img, err := testimage.Image(testimage.LinuxAMD64, first, bad)
			if err != nil {
				t.Fatal(err)
			}
			c := newConverter(t)
			dgst, _ := tc.layer.Digest()
			res, err := c.Image(ctx, img)
			checkBadError(t, err, dgst, tc)
			checkNamesImage(t, err, img)
			if res != nil {
				t.Errorf("Image returned a result with the error: %+v", res)
			}
		})
	}
}

// TestRegistryBlobErrorsNameTheLayer reads images through remote.Image from
// an in-process registry that loses a blob or answers blob reads with
// errors.
func TestRegistryBlobErrorsNameTheLayer(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	reg := testimage.NewRegistry(t)
	cases := []struct {
		name    string
		status  int      // injected status for the layer blob
		delete  bool     // delete the blob from the registry instead
		corrupt bool     // serve other bytes under the blob's digest
		mention string   // what the error should say besides the digest
		anyOf   []string // one of which the error should say
	}{
		{name: "missing-blob", delete: true},
		{name: "401", status: http.StatusUnauthorized, mention: "UNAUTHORIZED"},
		{name: "404", status: http.StatusNotFound, mention: "BLOB_UNKNOWN"},
		{name: "500", status: http.StatusInternalServerError, mention: "500"},
		{name: "503", status: http.StatusServiceUnavailable, mention: "503"},
		{name: "corrupt-blob", corrupt: true, anyOf: []string{"digest mismatch", "verifying sha256 checksum"}},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			src, err := testimage.SeedImage(uint64(100+i), testimage.LinuxAMD64, testimage.WithoutLargeFiles())
			if err != nil {
				t.Fatal(err)
			}
			repo := "bad/" + tc.name
			ref := reg.Push(t, repo+":v1", src)
			layers, err := src.Layers()
			if err != nil {
				t.Fatal(err)
			}
			victim, err := layers[len(layers)-1].Digest()
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tc.delete:
				reg.DeleteBlob(t, repo, victim)
			case tc.corrupt:
				reg.Corrupt(victim)
			default:
				reg.Fail(victim, tc.status)
			}
			t.Cleanup(func() { reg.Fail(victim, 0); reg.Corrupt(v1.Hash{}) })
			img := reg.Image(t, ref)
			c := newConverter(t)
			res, err := c.Image(ctx, img)
			checkBadError(t, err, victim, badLayer{mention: nonEmpty(tc.mention), anyOf: tc.anyOf})
			checkNamesImage(t, err, img)
			if res != nil {
				t.Errorf("Image returned a result with the error: %+v", res)
			}
		})
	}
}

// checkNamesImage asserts that an image-level error names the image's
// manifest digest.
func checkNamesImage(t *testing.T, err error, img v1.Image) {
	t.Helper()
	d, derr := img.Digest()
	if derr != nil {
		t.Fatal(derr)
	}
	if err != nil && !strings.Contains(err.Error(), d.String()) {
		t.Errorf("error does not name the image %s", d)
	}
}

func nonEmpty(s string) []string {
	if s == "" {
		return nil
	}
	return []string{s}
}

// TestEmptyAndDirectoryOnlyLayersConvert converts inputs that are odd but
// valid.
func TestEmptyAndDirectoryOnlyLayersConvert(t *testing.T) {
	ctx := context.Background()
	dirs := []testimage.Entry{
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "only/", Mode: 0o755, ModTime: testimage.Epoch}},
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "only/dirs/", Mode: 0o755, ModTime: testimage.Epoch}},
	}
	for _, format := range formats {
		for _, tc := range []struct {
			name    string
			entries []testimage.Entry
		}{
			{"empty", nil},
			{"only-dirs", dirs},
		} {
			t.Run(string(format)+"/"+tc.name, func(t *testing.T) {
				c := newConverter(t, convert.WithFormat(format))
				tarball := testimage.MustTar(tc.entries)
				l, err := c.Layer(ctx, testimage.GzipLayer(tarball), testimage.SHA256(tarball))
				if err != nil {
					t.Fatalf("Layer: %v", err)
				}
				checkLayerTree(t, treeOfTar(t, tarball), l, convert.DefaultChunkSize)
			})
		}
	}
}

// TestEStargzLayerIsReusedUnlessForcedOrUnannotated converts a layer
// estargz.Build wrote, with its TOC digest annotation: it is reused byte for
// byte; with WithForce, or without the annotation, it is rebuilt, and the
// tree is the source's every time.
func TestEStargzLayerIsReusedUnlessForcedOrUnannotated(t *testing.T) {
	ctx := context.Background()
	src := mustEStargz(t)
	srcDigest, _ := src.Digest()
	srcDiff, _ := src.DiffID()
	srcTree := treeOfTar(t, testimage.MustTar(testimage.Entries(7, testimage.WithoutLargeFiles())))

	c := newConverter(t)
	l, err := c.Layer(ctx, src, srcDiff)
	if err != nil {
		t.Fatalf("Layer: %v", err)
	}
	r := l.Result()
	if !r.Reused {
		t.Errorf("valid eStargz layer was not reused: %+v", r)
	}
	if d, _ := l.Digest(); d != srcDigest {
		t.Errorf("reused layer digest %s, source %s", d, srcDigest)
	}
	blob, desc := convertedBlob(t, l)
	if testimage.SHA256(blob) != srcDigest {
		t.Errorf("reused blob bytes differ from the source")
	}
	if desc.Annotations[convert.AnnotationTOCDigest] != src.Annotations[testimage.AnnotationTOCDigest] {
		t.Errorf("reused TOC digest %q, source %q", desc.Annotations[convert.AnnotationTOCDigest], src.Annotations[testimage.AnnotationTOCDigest])
	}
	if s := c.Stats(); s.Reused != 1 || s.Converted != 0 {
		t.Errorf("stats %+v: want 1 reused, 0 converted", s)
	}
	// estargz.Build's output keeps the tree too.
	checkLayerTree(t, srcTree, l, convert.DefaultChunkSize)

	t.Run("force", func(t *testing.T) {
		c := newConverter(t, convert.WithForce(true))
		l, err := c.Layer(ctx, src, srcDiff)
		if err != nil {
			t.Fatalf("Layer: %v", err)
		}
		if l.Result().Reused {
			t.Errorf("WithForce(true): layer reused")
		}
		if s := c.Stats(); s.Reused != 0 || s.Converted != 1 {
			t.Errorf("stats %+v: want 0 reused, 1 converted", s)
		}
		checkLayerTree(t, srcTree, l, convert.DefaultChunkSize)
	})

	t.Run("without-annotation", func(t *testing.T) {
		// Without the TOC digest annotation nothing vouches for the TOC:
		// the layer is converted like any gzip layer.
		plain := src.Clone()
		plain.Annotations = nil
		c := newConverter(t)
		l, err := c.Layer(ctx, plain, srcDiff)
		if err != nil {
			t.Fatalf("Layer: %v", err)
		}
		if l.Result().Reused {
			t.Errorf("layer without TOC digest annotation was reused")
		}
		checkLayerTree(t, srcTree, l, convert.DefaultChunkSize)
	})
}

// TestZstdChunkedOutputOpensThroughItsTOC converts a layer to zstd:chunked:
// it carries the zstd:chunked annotations, its files are found through the
// TOC, and it does not open as gzip eStargz.
func TestZstdChunkedOutputOpensThroughItsTOC(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(8, testimage.WithoutLargeFiles()))
	c := newConverter(t, convert.WithFormat(convert.FormatZstdChunked))
	l, err := c.Layer(context.Background(), testimage.GzipLayer(tarball), v1.Hash{})
	if err != nil {
		t.Fatalf("Layer: %v", err)
	}
	blob, desc := convertedBlob(t, l)
	if desc.MediaType != types.OCILayerZStd {
		t.Errorf("media type %s, want %s", desc.MediaType, types.OCILayerZStd)
	}
	for _, a := range []string{convert.AnnotationZstdChunkedManifestChecksum, convert.AnnotationZstdChunkedManifestPosition} {
		if desc.Annotations[a] == "" {
			t.Errorf("no %s annotation", a)
		}
	}
	r, _, err := openOutput(blob, desc)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := r.Lookup(testimage.OSRelease); !ok {
		t.Errorf("%s not found through the zstd:chunked TOC", testimage.OSRelease)
	}
	// The gzip reader must not take it.
	if _, err := estargz.Open(sectionOf(blob)); err == nil {
		t.Errorf("zstd:chunked output opens as gzip eStargz")
	}
}

// TestBadLayerFailsTheWholeIndex converts an index whose arm64 image holds a
// bad layer: the whole conversion fails, naming the layer, and returns no
// index.
func TestBadLayerFailsTheWholeIndex(t *testing.T) {
	good, err := testimage.SeedImage(20, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	bad := mustGzipLayer(t, entriesWith(hdr(tar.TypeReg, "../escape", "")))
	badImg, err := testimage.Image(testimage.LinuxARM64, mustGzipLayer(t, testimage.Files("a", "b")), bad)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := testimage.Index(good, badImg)
	if err != nil {
		t.Fatal(err)
	}
	c := newConverter(t)
	res, err := c.Index(context.Background(), idx)
	dgst, _ := bad.Digest()
	checkBadError(t, err, dgst, badLayer{mention: []string{"../escape"}})
	if res != nil {
		t.Errorf("Index returned a result with the error: %+v", res)
	}
}

// TestCancelledConversion cancels a conversion while it reads the blob: the
// error says so, no layer and no temporary file is left, and the same
// Converter converts the layer afterwards.
func TestCancelledConversion(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(30, testimage.WithoutLargeFiles()))
	src := newHeldLayer(testimage.GzipLayer(tarball))
	tmp := t.TempDir()
	c := newConverter(t, convert.WithTempDir(tmp))

	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-src.started
		cancel()
		src.release()
	}()
	l, err := c.Layer(ctx, src, v1.Hash{})
	if err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Layer cancelled midway: %v, want context.Canceled", err)
	}
	if l != nil {
		t.Error("Layer returned a layer with the error")
	}
	if files := leftoverFiles(t, tmp); len(files) != 0 {
		t.Errorf("temporary files left after a cancelled conversion: %q", files)
	}
	if _, err := c.Layer(context.Background(), src, v1.Hash{}); err != nil {
		t.Fatalf("converting after a cancelled attempt: %v", err)
	}
}

// TestCancelledCallerDoesNotFailJoinedCaller converts the same layer from
// two callers: B joins the conversion A started (Stats.Joined proves it),
// then A is cancelled while the blob read is held. A fails with
// context.Canceled, B still gets the layer, and the layer is converted once.
func TestCancelledCallerDoesNotFailJoinedCaller(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(31, testimage.WithoutLargeFiles()))
	src := newHeldLayer(testimage.GzipLayer(tarball))
	c := newConverter(t)

	ctxA, cancelA := context.WithCancel(context.Background())
	errA := make(chan error, 1)
	go func() {
		_, err := c.Layer(ctxA, src, v1.Hash{})
		errA <- err
	}()
	<-src.started // A's conversion is reading the blob, held there
	errB := make(chan error, 1)
	go func() {
		_, err := c.Layer(context.Background(), src, v1.Hash{})
		errB <- err
	}()
	eventually.Require(t, 10*time.Second, "B joins the conversion in flight", func() error {
		if n := c.Stats().Joined; n != 1 {
			return fmt.Errorf("%d calls joined", n)
		}
		return nil
	})
	cancelA()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Errorf("caller A, cancelled while the conversion was held: %v, want context.Canceled", err)
	}
	src.release()
	if err := <-errB; err != nil {
		t.Errorf("caller B failed because caller A was cancelled: %v", err)
	}
	if s := c.Stats(); s.Converted != 1 || s.BlobReads != 1 {
		t.Errorf("stats %+v, want the layer converted once from one blob read", s)
	}
}

// heldLayer holds the first read of its blob until release is called, so a
// test can act while a conversion is under way.
type heldLayer struct {
	*testimage.Layer
	started  chan struct{} // closed when the first read begins
	released chan struct{}
	once     sync.Once
	relOnce  sync.Once
}

func newHeldLayer(l *testimage.Layer) *heldLayer {
	return &heldLayer{Layer: l, started: make(chan struct{}), released: make(chan struct{})}
}

// release lets the held read, and every later one, go on.
func (l *heldLayer) release() { l.relOnce.Do(func() { close(l.released) }) }

func (l *heldLayer) Compressed() (io.ReadCloser, error) {
	rc, err := l.Layer.Compressed()
	if err != nil {
		return nil, err
	}
	return &heldReader{ReadCloser: rc, l: l}, nil
}

type heldReader struct {
	io.ReadCloser
	l *heldLayer
}

func (r *heldReader) Read(p []byte) (int, error) {
	r.l.once.Do(func() { close(r.l.started) })
	<-r.l.released
	return r.ReadCloser.Read(p)
}

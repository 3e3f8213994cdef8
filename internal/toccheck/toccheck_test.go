package toccheck_test

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/externaltoc"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"
	"github.com/klauspost/compress/zstd"

	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/internal/toccheck"
)

// decs are the decompressors stargz's layer resolver gives its metadata
// store besides gzip.
var decs = []toccheck.Decompressor{new(zstdchunked.Decompressor)}

func ent(name, typ string, mods ...func(*estargz.TOCEntry)) *estargz.TOCEntry {
	e := &estargz.TOCEntry{Name: name, Type: typ}
	for _, m := range mods {
		m(e)
	}
	return e
}

func link(target string) func(*estargz.TOCEntry) {
	return func(e *estargz.TOCEntry) { e.LinkName = target }
}

func mode(m int64) func(*estargz.TOCEntry) {
	return func(e *estargz.TOCEntry) { e.Mode = m }
}

func mtime(s string) func(*estargz.TOCEntry) {
	return func(e *estargz.TOCEntry) { e.ModTime3339 = s }
}

func xattr(k, v string) func(*estargz.TOCEntry) {
	return func(e *estargz.TOCEntry) {
		if e.Xattrs == nil {
			e.Xattrs = map[string][]byte{}
		}
		e.Xattrs[k] = []byte(v)
	}
}

func data(off, size int64) func(*estargz.TOCEntry) {
	return func(e *estargz.TOCEntry) { e.Offset, e.Size = off, size }
}

func toc(es ...*estargz.TOCEntry) *estargz.JTOC {
	return &estargz.JTOC{Version: 1, Entries: es}
}

var blob = toccheck.Blob{Size: 1 << 20, TOCOffset: 1<<20 - 4096}

func TestValidateRefusesHostileTOCs(t *testing.T) {
	deep := strings.Repeat("d/", toccheck.DefaultMaxDepth) + "f"
	many := make([]*estargz.TOCEntry, toccheck.DefaultMaxEntries+1)
	tests := []struct {
		name    string
		toc     *estargz.JTOC
		blob    toccheck.Blob
		entry   string // the entry the error names, "" for the TOC
		problem string
	}{
		{"cycle via dir hardlink", toc(ent("etc/", "dir"), ent("etc/hl", "hardlink", link("etc"))), blob, "etc/hl", "hardlink to directory"},
		{"cycle via hardlink to an ancestor", toc(ent("a/", "dir"), ent("a/b/", "dir"), ent("a/b/up", "hardlink", link("a/"))), blob, "a/b/up", "hardlink to directory"},
		{"hardlink to the root", toc(ent("./", "dir"), ent("r", "hardlink", link("."))), blob, "r", "hardlink to directory"},
		{"hardlink to an implicit dir", toc(ent("x/y", "fifo"), ent("z", "hardlink", link("x"))), blob, "z", "no earlier entry"},
		{"hardlink to missing", toc(ent("a", "hardlink", link("nowhere"))), blob, "a", "no earlier entry defines"},
		{"hardlink to a later entry", toc(ent("a", "hardlink", link("b")), ent("b", "fifo")), blob, "a", "no earlier entry defines"},
		{"hardlink cycle", toc(ent("a", "hardlink", link("b")), ent("b", "hardlink", link("a"))), blob, "a", "no earlier entry defines"},
		{"hardlink to itself", toc(ent("a", "hardlink", link("a"))), blob, "a", "hardlink to itself"},
		{"hardlink chain to dir", toc(ent("d/", "dir"), ent("l1", "hardlink", link("d")), ent("l2", "hardlink", link("l1"))), blob, "l1", "hardlink to directory"},
		{"hardlink without target", toc(ent("a", "hardlink")), blob, "a", "without a target"},
		{"hardlink target escapes", toc(ent("a", "fifo"), ent("b", "hardlink", link("../a"))), blob, "b", `".." path component`},
		{"dot-dot name", toc(ent("../x", "fifo")), blob, "../x", `".." path component`},
		{"dot-dot inside", toc(ent("a/../../x", "fifo")), blob, "a/../../x", `".." path component`},
		{"absolute name", toc(ent("/abs", "fifo")), blob, "/abs", "absolute path"},
		{"slash only", toc(ent("/", "dir")), blob, "/", "absolute path"},
		{"empty component", toc(ent("a//b", "fifo")), blob, "a//b", "empty path component"},
		{"dot component", toc(ent("a/./b", "fifo")), blob, "a/./b", `"." path component`},
		{"empty name", toc(ent("", "fifo")), blob, "", "empty"},
		{"NUL in name", toc(ent("a\x00b", "fifo")), blob, "a\x00b", "NUL"},
		{"invalid UTF-8", toc(ent("a\xffb", "fifo")), blob, "a\xffb", "UTF-8"},
		{"trailing slash on a file", toc(ent("a/", "reg")), blob, "a/", "trailing slash"},
		{"long component", toc(ent(strings.Repeat("n", 256), "fifo")), blob, strings.Repeat("n", 256), "path component of 256 bytes"},
		{"long name", toc(ent(strings.Repeat("abcdefg/", 600), "dir")), blob, strings.Repeat("abcdefg/", 600), "more than the limit of 4096"},
		{"deep nesting", toc(ent(deep, "fifo")), blob, deep, "257 path components"},
		{"huge entry count", toc(many...), blob, "", "1000001 entries"},
		{"root is a file", toc(ent("./", "dir"), ent(".", "reg")), blob, ".", "the root is a reg"},
		{"duplicate file", toc(ent("a", "reg"), ent("./a", "reg")), blob, "./a", "duplicate of entry #0 (reg)"},
		{"dir replaced by file", toc(ent("a/", "dir"), ent("a", "symlink", link("x"))), blob, "a", "duplicate of entry #0 (dir)"},
		{"file under a file", toc(ent("a", "fifo"), ent("a/b", "fifo")), blob, "a/b", `parent "a" is a fifo`},
		{"file under a later file", toc(ent("a/b/c", "fifo"), ent("a", "reg")), blob, "a/b/c", `parent "a" is a reg`},
		{"entry under a symlinked dir", toc(ent("etc/", "dir"), ent("lnk", "symlink", link("etc")), ent("lnk/x", "fifo")), blob, "lnk/x", `parent "lnk" is a symlink`},
		{"entry deep under a symlink", toc(ent("lnk", "symlink", link("/")), ent("lnk/a/b/c", "fifo")), blob, "lnk/a/b/c", `parent "lnk" is a symlink`},
		{"entry under a hardlink", toc(ent("f", "fifo"), ent("h", "hardlink", link("f")), ent("h/x", "fifo")), blob, "h/x", `parent "h" is a hardlink`},
		{"unknown type", toc(ent("a", "socket")), blob, "a", `unknown type "socket"`},
		{"null entry", toc(ent("a", "fifo"), nil), blob, "", "null entry"},
		{"symlink without target", toc(ent("a", "symlink")), blob, "a", "symlink target: empty"},
		{"symlink target with NUL", toc(ent("a", "symlink", link("x\x00y"))), blob, "a", "symlink target: contains NUL"},
		{"negative size", toc(ent("a", "reg", data(10, -1))), blob, "a", "negative size"},
		{"negative offset", toc(ent("a", "reg", data(-10, 5))), blob, "a", "negative offset"},
		{"negative chunk size", toc(ent("a", "reg", data(10, 5), func(e *estargz.TOCEntry) { e.ChunkSize = -1 })), blob, "a", "negative chunk size"},
		{"negative inner offset", toc(ent("a", "reg", data(10, 5), func(e *estargz.TOCEntry) { e.InnerOffset = -1 })), blob, "a", "negative inner offset"},
		{"negative device", toc(ent("a", "char", func(e *estargz.TOCEntry) { e.DevMajor = -1 })), blob, "a", "negative device"},
		{"offset past blob end", toc(ent("a", "reg", data(blob.Size+1, 5))), blob, "a", "at or past the TOC offset"},
		{"offset inside the TOC", toc(ent("a", "reg", data(blob.TOCOffset, 5))), blob, "a", "at or past the TOC offset"},
		{"offsets going backwards", toc(ent("a", "reg", data(500, 5)), ent("b", "reg", data(100, 5))), blob, "b", "before the previous entry's 500"},
		{"dir offset before a file's", toc(ent("a", "reg", data(500, 5)), ent("d/", "dir", data(100, 0))), blob, "d/", "before the previous entry's 500"},
		{"symlink offset past the TOC", toc(ent("s", "symlink", link("x"), data(blob.TOCOffset+1, 0))), blob, "s", "at or past the TOC offset"},
		{"chunk without a file", toc(ent("a", "chunk", data(10, 0))), blob, "a", "does not follow a non-empty regular file"},
		{"chunk after an empty file", toc(ent("a", "reg"), ent("a", "chunk", data(10, 0))), blob, "a", "does not follow"},
		{"chunk of another file", toc(ent("a", "reg", data(10, 8), chunked(0, 4)), ent("b", "chunk", data(20, 0), chunked(4, 4))), blob, "b", `chunk of "b" follows file "a"`},
		{"chunk gap", toc(ent("a", "reg", data(10, 8), chunked(0, 4)), ent("a", "chunk", data(20, 0), chunked(5, 3))), blob, "a", "chunk offset 5, want 4"},
		{"chunk past the file", toc(ent("a", "reg", data(10, 8), chunked(0, 4)), ent("a", "chunk", data(20, 0), chunked(4, 5))), blob, "a", "outside the file's 8 bytes"},
		{"chunks short of the file", toc(ent("a", "reg", data(10, 8), chunked(0, 4))), blob, "a", "chunks cover 4 of the file's 8 bytes"},
		{"chunk list bomb", toc(ent("a", "reg", data(10, 1<<62), chunked(0, 1)), ent("a", "chunk", data(20, 0), chunked(1, 0))), blob, "a", "implies 4611686018427387905 chunks"},
		{"chunk size over file size", toc(ent("a", "reg", data(10, 8), chunked(0, 9))), blob, "a", "larger than the file size"},
		{"first chunk offset", toc(ent("a", "reg", data(10, 8), chunked(3, 0))), blob, "a", "chunk offset 3"},
		{"chunk offset past TOC", toc(ent("a", "reg", data(10, 8), chunked(0, 4)), ent("a", "chunk", data(blob.TOCOffset, 0), chunked(4, 4))), blob, "a", "at or past the TOC offset"},
		{"bad digest", toc(ent("a", "reg", data(10, 8), func(e *estargz.TOCEntry) { e.Digest = "sha256:zz" })), blob, "a", `digest "sha256:zz"`},
		{"bad xattr name", toc(ent("a", "fifo", func(e *estargz.TOCEntry) { e.Xattrs = map[string][]byte{"": nil} })), blob, "a", "extended attribute name"},
		{"overlay opaque xattr", toc(ent("d/", "dir", xattr("trusted.overlay.opaque", "y"))), blob, "d/", `extended attribute "trusted.overlay.opaque"`},
		{"overlay redirect xattr", toc(ent("f", "fifo", xattr("trusted.overlay.redirect", "/x"))), blob, "f", `extended attribute "trusted.overlay.redirect"`},
		{"hardlink setuid", toc(ent("f", "fifo", mode(0o755)), ent("h", "hardlink", link("f"), mode(0o4755))), blob, "h", "mode 04755 where the target has 0755"},
		{"hardlink owner", toc(ent("f", "fifo"), ent("h", "hardlink", link("f"), func(e *estargz.TOCEntry) { e.UID = 1000 })), blob, "h", "owner 1000:0 where the target has 0:0"},
		{"hardlink modtime", toc(ent("f", "fifo", mtime("2024-01-01T00:00:00Z")), ent("h", "hardlink", link("f"), mtime("2024-01-01T00:00:01Z"))), blob, "h", "modtime"},
		{"hardlink modtime where the target has none", toc(ent("f", "fifo"), ent("h", "hardlink", link("f"), mtime("2024-01-01T00:00:01Z"))), blob, "h", "modtime"},
		{"hardlink xattr", toc(ent("f", "fifo"), ent("h", "hardlink", link("f"), xattr("security.capability", "c"))), blob, "h", `extended attribute "security.capability"`},
		{"hardlink xattr value", toc(ent("f", "fifo", xattr("user.a", "1")), ent("h", "hardlink", link("f"), xattr("user.a", "2"))), blob, "h", `another value of extended attribute "user.a"`},
		{"hardlink chain owner", toc(ent("f", "fifo"), ent("h1", "hardlink", link("f")), ent("h2", "hardlink", link("h1"), func(e *estargz.TOCEntry) { e.GID = 5 })), blob, "h2", "owner 0:5"},
		{"TOC offset past blob", toc(ent("a", "fifo")), toccheck.Blob{Size: 10, TOCOffset: 11}, "", "TOC offset 11 outside the blob"},
		{"version 2", &estargz.JTOC{Version: 2}, blob, "", "version 2, want 1"},
		{"no TOC", nil, blob, "", "no TOC"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := toccheck.Validate(tt.toc, tt.blob)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, toccheck.ErrInvalid) {
				t.Errorf("error %v does not match ErrInvalid", err)
			}
			var ve *toccheck.Error
			if !errors.As(err, &ve) {
				t.Fatalf("error %v is not a *toccheck.Error", err)
			}
			if ve.Entry != tt.entry {
				t.Errorf("error names entry %q, want %q (%v)", ve.Entry, tt.entry, err)
			}
			if !strings.Contains(err.Error(), tt.problem) {
				t.Errorf("error %q does not say %q", err, tt.problem)
			}
		})
	}
}

func chunked(off, size int64) func(*estargz.TOCEntry) {
	return func(e *estargz.TOCEntry) { e.ChunkOffset, e.ChunkSize = off, size }
}

func TestValidateAcceptsOddButSafeTOCs(t *testing.T) {
	tests := []struct {
		name string
		toc  *estargz.JTOC
	}{
		{"empty", toc()},
		{"root variants", toc(ent("./", "dir"), ent(".", "dir"))},
		{"implicit parents", toc(ent("a/b/c/d", "fifo"))},
		{"dir declared twice", toc(ent("a/", "dir"), ent("a/x", "fifo"), ent("./a/", "dir"))},
		{"dir declared after its child", toc(ent("a/x", "fifo"), ent("a/", "dir"))},
		{"hardlink chain", toc(ent("f", "reg", data(0, 3)), ent("h1", "hardlink", link("f")), ent("h2", "hardlink", link("./h1")))},
		{"hardlink to a symlink", toc(ent("s", "symlink", link("/etc")), ent("h", "hardlink", link("s")))},
		{"symlinks anywhere", toc(ent("up", "symlink", link("../../../../etc/passwd")), ent("abs", "symlink", link("/")))},
		{"chunked file", toc(ent("a", "reg", data(10, 10), chunked(0, 4)), ent("a", "chunk", data(20, 0), chunked(4, 4)), ent("", "chunk", data(30, 0), chunked(8, 0)))},
		{"shared gzip member", toc(ent("a", "reg", data(10, 4)), ent("b", "reg", data(10, 4), func(e *estargz.TOCEntry) { e.InnerOffset = 512 }))},
		{"hardlink with the same attributes", toc(ent("f", "fifo", mode(0o4755), mtime("2024-01-01T00:00:00Z"), xattr("user.a", "1")), ent("h", "hardlink", link("f"), mode(0o104755), mtime("2024-01-01T00:00:00Z"), xattr("user.a", "1")))},
		{"hardlink without the target's xattr", toc(ent("f", "fifo", xattr("user.a", "1")), ent("h", "hardlink", link("f")))},
		{"hardlink with a trusted xattr", toc(ent("f", "fifo"), ent("h", "hardlink", link("f"), xattr("trusted.md5", "x")))},
		{"hardlinked symlink of another mode", toc(ent("s", "symlink", link("x"), mode(0o777)), ent("h", "hardlink", link("s"), mode(0o644)))},
		{"hardlink modtimes both before 1970", toc(ent("f", "fifo", mtime("1960-01-01T00:00:00Z")), ent("h", "hardlink", link("f"), mtime("1950-01-01T00:00:00Z")))},
		{"hardlink modtime 1970 where the target has none", toc(ent("f", "fifo"), ent("h", "hardlink", link("f"), mtime("1970-01-01T00:00:00Z")))},
		{"max depth", toc(ent(strings.Repeat("d/", toccheck.DefaultMaxDepth-1)+"f", "fifo"))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := toccheck.Validate(tt.toc, blob); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestOptionsLowerLimitsAndRefuseBadValues(t *testing.T) {
	tc := toc(ent("a/b/c", "fifo"), ent("d", "fifo"), ent("e", "fifo"))
	if err := toccheck.Validate(tc, blob, toccheck.WithMaxEntries(2)); err == nil || !strings.Contains(err.Error(), "3 entries, more than the limit of 2") {
		t.Errorf("WithMaxEntries(2): %v", err)
	}
	if err := toccheck.Validate(tc, blob, toccheck.WithMaxDepth(2)); err == nil || !strings.Contains(err.Error(), "3 path components") {
		t.Errorf("WithMaxDepth(2): %v", err)
	}
	if err := toccheck.Validate(tc, blob, toccheck.WithMaxNameLen(4)); err == nil || !strings.Contains(err.Error(), "5 bytes") {
		t.Errorf("WithMaxNameLen(4): %v", err)
	}
	for _, o := range []toccheck.Option{toccheck.WithMaxEntries(0), toccheck.WithMaxDepth(-1), toccheck.WithMaxNameLen(0), toccheck.WithMaxTOCBytes(0)} {
		if err := toccheck.Validate(tc, blob, o); err == nil || errors.Is(err, toccheck.ErrInvalid) {
			t.Errorf("bad option: %v, want an option error", err)
		}
	}
}

// realLayers are eStargz blobs built by estargz.Build from a tar with every
// entry kind, gzip and zstd:chunked, with small chunks so that large files
// have chunk entries.
func realLayers(t testing.TB) map[string][]byte {
	t.Helper()
	realOnce.Do(func() { realBlobs, realErr = buildRealLayers() })
	if realErr != nil {
		t.Fatal(realErr)
	}
	return realBlobs
}

var (
	realOnce  sync.Once
	realBlobs map[string][]byte
	realErr   error
)

func buildRealLayers() (map[string][]byte, error) {
	tb, err := testimage.Tar(testimage.Entries(7, testimage.WithoutLargeFiles()))
	if err != nil {
		return nil, err
	}
	out := make(map[string][]byte)
	for name, opts := range map[string][]estargz.Option{
		"gzip":              {estargz.WithChunkSize(16 << 10)},
		"gzip-min-chunk":    {estargz.WithChunkSize(16 << 10), estargz.WithMinChunkSize(8 << 10)},
		"gzip-prioritized":  {estargz.WithChunkSize(16 << 10), estargz.WithPrioritizedFiles([]string{testimage.OSRelease, testimage.SmallFile})},
		"zstdchunked":       {estargz.WithChunkSize(16 << 10), estargz.WithCompression(zstdCompression{&zstdchunked.Compressor{CompressionLevel: zstd.SpeedDefault}, new(zstdchunked.Decompressor)})},
		"gzip-default-size": nil,
	} {
		b, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb), 0, int64(len(tb))), opts...)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		raw, err := io.ReadAll(b)
		b.Close()
		if err != nil {
			return nil, err
		}
		out[name] = raw
	}
	return out, nil
}

// zstdCompression is zstd:chunked as estargz.Build takes it.
type zstdCompression struct {
	*zstdchunked.Compressor
	*zstdchunked.Decompressor
}

func TestCheckAcceptsRealEStargz(t *testing.T) {
	for name, raw := range realLayers(t) {
		t.Run(name, func(t *testing.T) {
			sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
			f, err := toccheck.Check(sr, 0, decs)
			if err != nil {
				t.Fatal(err)
			}
			kinds := make(map[string]int)
			for _, e := range f.TOC.Entries {
				kinds[e.Type]++
			}
			for _, k := range []string{"reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk"} {
				if kinds[k] == 0 && !(k == "chunk" && name == "gzip-default-size") {
					t.Errorf("the TOC has no %s entry: %v", k, kinds)
				}
			}
			// The TOC Check saw is the one stargz's reader opens.
			r, err := memorymetadata.NewReader(sr, zstdDecompressor())
			if err != nil {
				t.Fatal(err)
			}
			id, _, err := r.GetChild(r.RootID(), "etc")
			if err != nil {
				t.Fatal(err)
			}
			if _, _, err := r.GetChild(id, "os-release"); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestReadRefusesHostileBlobs(t *testing.T) {
	good := realLayers(t)["gzip"]
	tocOff, _, err := estargz.OpenFooter(io.NewSectionReader(bytes.NewReader(good), 0, int64(len(good))))
	if err != nil {
		t.Fatal(err)
	}
	gzipFooter := func(tocOffset string) []byte {
		sub := tocOffset + "STARGZ"
		extra := append([]byte{'S', 'G', byte(len(sub)), 0}, sub...)
		return estargz.CreateGzipFooter(extra)
	}
	withTOC := func(payload []byte, tocJSON []byte) []byte {
		var b bytes.Buffer
		b.Write(payload)
		zw, tw := newTOCWriter(&b)
		hdr := &tar.Header{Name: estargz.TOCTarName, Size: int64(len(tocJSON)), Mode: 0o644, Typeflag: tar.TypeReg}
		if err := tw.WriteHeader(hdr); err != nil {
			t.Fatal(err)
		}
		tw.Write(tocJSON)
		tw.Close()
		zw.Close()
		b.Write(gzipFooter(fmt.Sprintf("%016x", len(payload))))
		return b.Bytes()
	}
	tests := []struct {
		name    string
		blob    []byte
		opts    []toccheck.Option
		problem string
	}{
		{"empty blob", nil, nil, "shorter than the"},
		{"20-byte blob", make([]byte, 20), nil, "shorter than the"},
		{"negative TOC offset", append(bytes.Repeat([]byte{0}, 100), gzipFooter("-000000000000001")...), nil, "outside the blob; external TOCs are not supported"},
		{"TOC offset past the end", append(bytes.Repeat([]byte{0}, 100), gzipFooter("00000000ffffffff")...), nil, "past the end of the blob"},
		{"TOC offset option past the end", good, nil, ""},
		{"external TOC", append(bytes.Repeat([]byte{0}, 100), estargz.CreateGzipFooter(append([]byte{'S', 'G', 17, 0}, "STARGZEXTERNALTOC"...))...), nil, "external TOCs are not supported"},
		{"null TOC", withTOC(nil, []byte("null")), nil, "no TOC"},
		{"TOC too large", good, []toccheck.Option{toccheck.WithMaxTOCBytes(1024)}, "more than the limit of 1024"},
		{"TOC JSON bomb", withTOC(nil, []byte(`{"version":1,`+strings.Repeat(" ", 1<<20)+`"entries":[]}`)), []toccheck.Option{toccheck.WithMaxTOCBytes(64 << 10)}, "TOC JSON larger than the limit"},
		{"TOC array bomb", withTOC(nil, []byte(`{"version":1,"entries":[`+strings.Repeat("null,", 1000)+`null]}`)), []toccheck.Option{toccheck.WithMaxEntries(100)}, "more than 100 entries"},
		{"TOC array bomb in another key", withTOC(nil, []byte(`{"version":1,"junk":[`+strings.Repeat("1,", 1000)+`1],"entries":[]}`)), []toccheck.Option{toccheck.WithMaxEntries(100)}, "more than 100 entries"},
		{"not eStargz", bytes.Repeat([]byte("x"), 1000), nil, "no TOC found"},
		{"cyclic TOC", withTOC(good[:tocOff], mustJSON(t, toc(ent("etc/", "dir"), ent("etc/hl", "hardlink", link("etc"))))), nil, "hardlink to directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sr := io.NewSectionReader(bytes.NewReader(tt.blob), 0, int64(len(tt.blob)))
			hint := int64(0)
			if tt.name == "TOC offset option past the end" {
				hint = int64(len(tt.blob)) + 1
				tt.problem = "past the end of the blob"
			}
			ext := externaltoc.NewGzipDecompressor(func() ([]byte, error) { return nil, errors.New("no external TOC") })
			_, err := toccheck.Check(sr, hint, append(decs, ext), tt.opts...)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, toccheck.ErrInvalid) || !strings.Contains(err.Error(), tt.problem) {
				t.Errorf("error %v, want ErrInvalid saying %q", err, tt.problem)
			}
		})
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// failingReaderAt fails every read past an offset, as a registry might.
type failingReaderAt struct {
	r     io.ReaderAt
	after int64
}

func (f failingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off+int64(len(p)) > f.after && off < f.after {
		return 0, errors.New("registry went away")
	}
	return f.r.ReadAt(p, off)
}

// TestReadIOErrorIsNotInvalid keeps a registry failure while reading the TOC
// apart from an invalid TOC, so the fallback reason says which it was.
func TestReadIOErrorIsNotInvalid(t *testing.T) {
	good := realLayers(t)["gzip"]
	fr := failingReaderAt{r: bytes.NewReader(good), after: int64(len(good)) - 200}
	_, err := toccheck.Check(io.NewSectionReader(fr, 0, int64(len(good))), 0, decs)
	if err == nil || errors.Is(err, toccheck.ErrInvalid) || !strings.Contains(err.Error(), "registry went away") {
		t.Errorf("Check = %v, want the I/O error, not an invalid TOC", err)
	}
}

package convert_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	digest "github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// fsNode is what the tree tests compare of one file-system entry.
type fsNode struct {
	Mode     os.FileMode // type and permission bits, as the stargz reader reports them
	UID, GID int
	Uname    string
	Gname    string
	ModTime  int64  // unix seconds
	Link     string // symlink target as written, hardlink target cleaned
	Hardlink bool
	DevMajor int64
	DevMinor int64
	Xattrs   map[string]string
	Size     int64
	SHA256   string // of the contents of regular files
}

// fsTree maps cleaned paths ("" is the root) to entries.
type fsTree map[string]fsNode

// cleanName cleans a tar entry name the way layer appliers do.
func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// modeOf interprets tar mode bits of an entry of type typ as the stargz
// reader does (permission, setuid, setgid and sticky bits, plus the type).
func modeOf(typ string, mode int64) os.FileMode {
	m := (&tar.Header{Mode: mode}).FileInfo().Mode() & (os.ModePerm | os.ModeSetuid | os.ModeSetgid | os.ModeSticky)
	switch typ {
	case "dir":
		m |= os.ModeDir
	case "symlink":
		m |= os.ModeSymlink
	case "char":
		m |= os.ModeDevice | os.ModeCharDevice
	case "block":
		m |= os.ModeDevice
	case "fifo":
		m |= os.ModeNamedPipe
	}
	return m
}

func tarType(flag byte) string {
	switch flag {
	case tar.TypeReg, tar.TypeRegA:
		return "reg"
	case tar.TypeDir:
		return "dir"
	case tar.TypeSymlink:
		return "symlink"
	case tar.TypeLink:
		return "hardlink"
	case tar.TypeChar:
		return "char"
	case tar.TypeBlock:
		return "block"
	case tar.TypeFifo:
		return "fifo"
	}
	return fmt.Sprintf("unknown(%q)", flag)
}

func sha256Hex(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// landmark and TOC names that a converter adds.
func isConverterEntry(name string) bool {
	switch cleanName(name) {
	case estargz.PrefetchLandmark, estargz.NoPrefetchLandmark, estargz.TOCTarName:
		return true
	}
	return false
}

// readTarTree reads a whole tar stream. It returns the tree (where a later
// entry of a name replaces an earlier one, as when a layer is applied) and
// the cleaned names in stream order, converter entries and duplicates
// included.
func readTarTree(r io.Reader) (fsTree, []string, error) {
	t := fsTree{}
	var order []string
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return t, order, nil
		}
		if err != nil {
			return nil, nil, fmt.Errorf("reading tar after %d entries: %w", len(order), err)
		}
		name := cleanName(h.Name)
		order = append(order, name)
		typ := tarType(h.Typeflag)
		n := fsNode{
			Mode: modeOf(typ, h.Mode), UID: h.Uid, GID: h.Gid, Uname: h.Uname, Gname: h.Gname,
			ModTime: h.ModTime.Unix(),
		}
		switch typ {
		case "reg":
			b, err := io.ReadAll(tr)
			if err != nil {
				return nil, nil, fmt.Errorf("reading %s: %w", name, err)
			}
			n.Size, n.SHA256 = int64(len(b)), sha256Hex(b)
		case "symlink":
			n.Link = h.Linkname
		case "hardlink":
			n.Link, n.Hardlink = cleanName(h.Linkname), true
		case "char", "block":
			n.DevMajor, n.DevMinor = h.Devmajor, h.Devminor
		}
		for k, v := range h.PAXRecords {
			if x, ok := strings.CutPrefix(k, "SCHILY.xattr."); ok {
				if n.Xattrs == nil {
					n.Xattrs = map[string]string{}
				}
				n.Xattrs[x] = v
			}
		}
		t[name] = n // a later entry of the same name replaces an earlier one
	}
}

func countConverterEntries(names []string) int {
	n := 0
	for _, name := range names {
		if isConverterEntry(name) {
			n++
		}
	}
	return n
}

// withoutConverterEntries returns t without landmarks and the TOC.
func withoutConverterEntries(t fsTree) fsTree {
	out := fsTree{}
	for k, v := range t {
		if !isConverterEntry(k) {
			out[k] = v
		}
	}
	return out
}

// diffTrees describes how got differs from want, or returns "".
func diffTrees(want, got fsTree) string {
	var b strings.Builder
	keys := map[string]bool{}
	for k := range want {
		keys[k] = true
	}
	for k := range got {
		keys[k] = true
	}
	sorted := make([]string, 0, len(keys))
	for k := range keys {
		sorted = append(sorted, k)
	}
	sort.Strings(sorted)
	n := 0
	for _, k := range sorted {
		w, wok := want[k]
		g, gok := got[k]
		switch {
		case !gok:
			fmt.Fprintf(&b, "  missing %q: %+v\n", k, w)
		case !wok:
			fmt.Fprintf(&b, "  extra %q: %+v\n", k, g)
		case !reflect.DeepEqual(w, g):
			fmt.Fprintf(&b, "  %q differs:\n    want %+v\n    got  %+v\n", k, w, g)
		default:
			continue
		}
		if n++; n >= 20 {
			b.WriteString("  ...\n")
			break
		}
	}
	return b.String()
}

// resolveHardlinks returns t with every hardlink replaced by its target's
// node, as a file system (and the stargz reader) presents it.
func resolveHardlinks(t fsTree) fsTree {
	out := fsTree{}
	for k, v := range t {
		for i := 0; v.Hardlink && i < 16; i++ {
			v = t[v.Link]
		}
		out[k] = v
	}
	return out
}

func sectionOf(b []byte) *io.SectionReader {
	return io.NewSectionReader(bytes.NewReader(b), 0, int64(len(b)))
}

// openOutput opens a converted blob with the stargz reader for its media
// type and verifies its TOC against the descriptor's annotation.
func openOutput(blob []byte, desc *v1.Descriptor) (*estargz.Reader, estargz.TOCEntryVerifier, error) {
	var opts []estargz.OpenOption
	if strings.Contains(string(desc.MediaType), "zstd") {
		opts = append(opts, estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	}
	r, err := estargz.Open(sectionOf(blob), opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("estargz.Open: %w", err)
	}
	ann := desc.Annotations[convert.AnnotationTOCDigest]
	if ann == "" {
		return nil, nil, fmt.Errorf("descriptor has no %s annotation", convert.AnnotationTOCDigest)
	}
	tocDigest, err := digest.Parse(ann)
	if err != nil {
		return nil, nil, fmt.Errorf("TOC digest annotation %q: %w", ann, err)
	}
	v, err := r.VerifyTOC(tocDigest)
	if err != nil {
		return nil, nil, fmt.Errorf("VerifyTOC: %w", err)
	}
	return r, v, nil
}

// readTOCTree walks the stargz reader's tree from the root and reads every
// regular file through OpenFile, checking each chunk against its verified
// digest. Hardlinks appear as their targets, as in a mounted file system.
func readTOCTree(r *estargz.Reader, v estargz.TOCEntryVerifier, chunkSize int64) (fsTree, error) {
	t := fsTree{}
	root, ok := r.Lookup("")
	if !ok {
		return nil, errors.New("no root directory in TOC")
	}
	var walk func(dir string, e *estargz.TOCEntry) error
	walk = func(name string, e *estargz.TOCEntry) error {
		n := fsNode{
			Mode: e.Stat().Mode(), UID: e.UID, GID: e.GID, Uname: e.Uname, Gname: e.Gname,
			ModTime: e.ModTime().Unix(),
		}
		if e.ModTime3339 == "" {
			n.ModTime = 0
		}
		switch e.Type {
		case "reg":
			n.Size = e.Size
			sum, err := readVerifiedFile(r, v, name, e, chunkSize)
			if err != nil {
				return err
			}
			n.SHA256 = sum
		case "symlink":
			n.Link = e.LinkName
		case "char", "block":
			n.DevMajor, n.DevMinor = int64(e.DevMajor), int64(e.DevMinor)
		case "dir":
		case "fifo":
		default:
			return fmt.Errorf("%s: unexpected TOC entry type %q", name, e.Type)
		}
		for k, x := range e.Xattrs {
			if n.Xattrs == nil {
				n.Xattrs = map[string]string{}
			}
			n.Xattrs[k] = string(x)
		}
		t[name] = n
		var err error
		e.ForeachChild(func(base string, c *estargz.TOCEntry) bool {
			err = walk(path.Join(name, base), c)
			return err == nil
		})
		return err
	}
	if err := walk("", root); err != nil {
		return nil, err
	}
	return t, nil
}

// readVerifiedFile reads a regular file chunk by chunk, verifies each chunk
// with the TOC's digests, checks chunk sizes, and returns the sha256 of the
// whole contents, which it also checks against the TOC's file digest.
func readVerifiedFile(r *estargz.Reader, v estargz.TOCEntryVerifier, name string, e *estargz.TOCEntry, chunkSize int64) (string, error) {
	sr, err := r.OpenFile(name)
	if err != nil {
		return "", fmt.Errorf("OpenFile %s: %w", name, err)
	}
	h := sha256.New()
	if e.Name == name { // hardlinks resolve to their target; verify chunks under the target's own name
		for off := int64(0); off < e.Size; {
			ce, ok := r.ChunkEntryForOffset(name, off)
			if !ok {
				return "", fmt.Errorf("%s: no chunk at offset %d", name, off)
			}
			if ce.ChunkOffset != off || ce.ChunkSize <= 0 {
				return "", fmt.Errorf("%s: chunk at offset %d starts at %d, size %d", name, off, ce.ChunkOffset, ce.ChunkSize)
			}
			if ce.ChunkSize > chunkSize {
				return "", fmt.Errorf("%s: chunk at %d is %d bytes, more than the chunk size %d", name, off, ce.ChunkSize, chunkSize)
			}
			dv, err := v.Verifier(ce)
			if err != nil {
				return "", fmt.Errorf("%s: chunk at %d: %w", name, off, err)
			}
			// One ReadAt per chunk: the reader decompresses from the start
			// of the chunk on every call.
			buf := make([]byte, ce.ChunkSize)
			if _, err := sr.ReadAt(buf, ce.ChunkOffset); err != nil && !(errors.Is(err, io.EOF) && ce.ChunkOffset+ce.ChunkSize == e.Size) {
				return "", fmt.Errorf("%s: reading chunk at %d: %w", name, off, err)
			}
			dv.Write(buf)
			h.Write(buf)
			if !dv.Verified() {
				return "", fmt.Errorf("%s: chunk at %d fails verification", name, off)
			}
			off += ce.ChunkSize
		}
	} else if e.Size > 0 {
		buf := make([]byte, e.Size)
		if _, err := sr.ReadAt(buf, 0); err != nil && !errors.Is(err, io.EOF) {
			return "", fmt.Errorf("reading %s: %w", name, err)
		}
		h.Write(buf)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if e.Size > 0 && e.Digest != "sha256:"+sum {
		return "", fmt.Errorf("%s: TOC digest %s, contents sha256:%s", name, e.Digest, sum)
	}
	return sum, nil
}

// tocView turns a source tree into what the stargz reader should show:
// hardlinks resolved, root present, implicit parent directories of the
// source taken from got (they have no source entry to compare with).
func tocView(src, got fsTree) (fsTree, error) {
	want := resolveHardlinks(src)
	for k := range want {
		for d := path.Dir(k); k != "" && d != "."; d = path.Dir(d) {
			if _, ok := want[d]; !ok {
				g, ok := got[d]
				if !ok || !g.Mode.IsDir() {
					return nil, fmt.Errorf("implicit parent %q of %q missing in TOC", d, k)
				}
				want[d] = g
			}
		}
	}
	if _, ok := want[""]; !ok {
		g, ok := got[""]
		if !ok {
			return nil, errors.New("no root in TOC")
		}
		want[""] = g
	}
	// Hardlinked regular files: the reader counts links but the tree has no
	// other trace of them.
	return want, nil
}

// convertedBlob reads a converted layer's blob and descriptor.
func convertedBlob(t testing.TB, l *convert.Layer) ([]byte, *v1.Descriptor) {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatalf("opening converted blob: %v", err)
	}
	defer rc.Close()
	blob, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("reading converted blob: %v", err)
	}
	desc, err := l.Descriptor()
	if err != nil {
		t.Fatalf("descriptor: %v", err)
	}
	return blob, desc
}

// checkLayerTree proves that the converted layer holds exactly the source
// tree, read both as a plain tar stream and through the stargz reader, and
// returns the output's entry order (converter entries included).
func checkLayerTree(t testing.TB, src fsTree, l *convert.Layer, chunkSize int64) []string {
	t.Helper()
	blob, desc := convertedBlob(t, l)
	if got := testimage.SHA256(blob); got != desc.Digest {
		t.Fatalf("blob sha256 %s, descriptor digest %s", got, desc.Digest)
	}
	if desc.Size != int64(len(blob)) {
		t.Fatalf("blob is %d bytes, descriptor says %d", len(blob), desc.Size)
	}
	wantMT := types.OCILayer
	if strings.Contains(string(desc.MediaType), "zstd") {
		wantMT = types.OCILayerZStd
	}
	if desc.MediaType != wantMT {
		t.Errorf("media type %s, want %s", desc.MediaType, wantMT)
	}

	// (a) The whole blob as one plain compressed tar stream.
	raw, err := testimage.ReadAll(blob)
	if err != nil {
		t.Fatalf("decompressing output: %v", err)
	}
	diffID, err := l.DiffID()
	if err != nil {
		t.Fatal(err)
	}
	if got := testimage.SHA256(raw); got != diffID || got != l.Result().DiffID {
		t.Errorf("uncompressed sha256 %s, DiffID() %s, Result().DiffID %s", got, diffID, l.Result().DiffID)
	}
	if urc, err := l.Uncompressed(); err != nil {
		t.Errorf("Uncompressed: %v", err)
	} else {
		u, err := io.ReadAll(urc)
		urc.Close()
		if err != nil || !bytes.Equal(u, raw) {
			t.Errorf("Uncompressed() gives %d bytes (err %v), not the %d-byte decompressed blob", len(u), err, len(raw))
		}
	}
	if got := l.Result().UncompressedSize; got != int64(len(raw)) {
		t.Errorf("Result().UncompressedSize %d, uncompressed output is %d bytes", got, len(raw))
	}
	if s := desc.Annotations[convert.AnnotationUncompressedSize]; s != strconv.Itoa(len(raw)) {
		t.Errorf("annotation %s = %q, uncompressed output is %d bytes", convert.AnnotationUncompressedSize, s, len(raw))
	}
	got, order, err := readTarTree(bytes.NewReader(raw))
	if err != nil {
		t.Fatalf("output as tar: %v", err)
	}
	if d := diffTrees(src, withoutConverterEntries(got)); d != "" {
		t.Errorf("output tar tree differs from source:\n%s", d)
	}
	// A hardlink must come after its target, or appliers cannot make it.
	seen := map[string]bool{}
	for _, name := range order {
		if n := got[name]; n.Hardlink && !seen[n.Link] {
			t.Errorf("hardlink %s comes before its target %s in the output", name, n.Link)
		}
		seen[name] = true
	}
	if len(withoutConverterEntries(got)) != len(order)-countConverterEntries(order) {
		t.Errorf("output has duplicate entries: %d entries, %d names", len(order), len(got))
	}

	// (b) Through the stargz reader, verified against the annotation.
	r, v, err := openOutput(blob, desc)
	if err != nil {
		t.Fatalf("output as %s: %v", desc.MediaType, err)
	}
	if got, want := desc.Annotations[convert.AnnotationTOCDigest], l.Result().TOCDigest; got != want {
		t.Errorf("TOC digest annotation %s, Result().TOCDigest %s", got, want)
	}
	toc, err := readTOCTree(r, v, chunkSize)
	if err != nil {
		t.Fatalf("output through the stargz reader: %v", err)
	}
	want, err := tocView(src, toc)
	if err != nil {
		t.Fatal(err)
	}
	if d := diffTrees(want, withoutConverterEntries(toc)); d != "" {
		t.Errorf("stargz reader tree differs from source:\n%s", d)
	}
	// Hardlinks must resolve to the very entry of their target.
	for name, n := range src {
		if !n.Hardlink {
			continue
		}
		a, aok := r.Lookup(name)
		b, bok := r.Lookup(n.Link)
		if !aok || !bok || a != b {
			t.Errorf("hardlink %s -> %s does not resolve to its target in the TOC", name, n.Link)
		}
	}
	return order
}

// treeOfTar reads a source tar stream's tree.
func treeOfTar(t testing.TB, tarball []byte) fsTree {
	t.Helper()
	tr, _, err := readTarTree(bytes.NewReader(tarball))
	if err != nil {
		t.Fatalf("source tar: %v", err)
	}
	return tr
}

var formats = []convert.Format{convert.FormatEStargz, convert.FormatZstdChunked}

func TestTreeEquality(t *testing.T) {
	onlyDirs := []testimage.Entry{
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "a/", Mode: 0o755, ModTime: testimage.Epoch}},
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "a/b/", Mode: 0o700, ModTime: testimage.Epoch}},
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "c/", Mode: 0o1777, ModTime: testimage.Epoch, Uid: 5, Gid: 6}},
	}
	layers := []struct {
		name    string
		entries []testimage.Entry
	}{
		{"every-kind", testimage.Entries(1)},
		{"small-explicit-dirs", testimage.Entries(2, testimage.WithoutLargeFiles(), testimage.WithoutRootDir(), testimage.WithoutImplicitDirs())},
		{"empty", nil},
		{"only-dirs", onlyDirs},
		{"many-small-files", testimage.ManyFiles(9, 1000, 8<<10)},
	}
	for _, format := range formats {
		c := newConverter(t, convert.WithFormat(format))
		for _, tc := range layers {
			t.Run(string(format)+"/"+tc.name, func(t *testing.T) {
				tarball := testimage.MustTar(tc.entries)
				src := treeOfTar(t, tarball)
				if len(src) != len(tc.entries) {
					t.Fatalf("source tree has %d entries, generator wrote %d", len(src), len(tc.entries))
				}
				l, err := c.Layer(context.Background(), testimage.GzipLayer(tarball), testimage.SHA256(tarball))
				if err != nil {
					t.Fatalf("Layer: %v", err)
				}
				order := checkLayerTree(t, src, l, convert.DefaultChunkSize)
				if len(order) == 0 || order[0] != estargz.NoPrefetchLandmark {
					t.Errorf("first entry %q, want %s", first(order), estargz.NoPrefetchLandmark)
				}
				if slices.Contains(order, estargz.PrefetchLandmark) {
					t.Errorf("%s present without a prefetch list", estargz.PrefetchLandmark)
				}
				if r := l.Result(); r.Reused || r.Prefetch != 0 || len(r.MissingPrefetch) != 0 {
					t.Errorf("result %+v: want not reused, no prefetch", r)
				}
			})
		}
	}
}

// TestTreeSourceCompressions converts the same tree from gzip, zstd and
// uncompressed source layers (OCI and Docker media types) and checks each
// output; all must be identical, since the uncompressed tar is the same.
func TestTreeSourceCompressions(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(12, testimage.WithoutLargeFiles()))
	src := treeOfTar(t, tarball)
	sources := map[string]*testimage.Layer{
		"gzip":                testimage.GzipLayer(tarball),
		"docker-gzip":         testimage.NewLayer(testimage.Gzip(tarball), types.DockerLayer),
		"zstd":                testimage.ZstdLayer(tarball),
		"uncompressed":        testimage.NewLayer(tarball, types.OCIUncompressedLayer),
		"docker-uncompressed": testimage.NewLayer(tarball, types.DockerUncompressedLayer),
	}
	digests := map[v1.Hash][]string{}
	for name, layer := range sources {
		t.Run(name, func(t *testing.T) {
			c := newConverter(t)
			l, err := c.Layer(context.Background(), layer, testimage.SHA256(tarball))
			if err != nil {
				t.Fatalf("Layer: %v", err)
			}
			checkLayerTree(t, src, l, convert.DefaultChunkSize)
			d, _ := l.Digest()
			digests[d] = append(digests[d], name)
			if r := l.Result(); r.SourceUncompressedSize != int64(len(tarball)) {
				t.Errorf("SourceUncompressedSize %d, source tar is %d bytes", r.SourceUncompressedSize, len(tarball))
			}
		})
	}
	if len(digests) != 1 {
		t.Errorf("same tar, different outputs: %v", digests)
	}
}

// TestTreeChunkBoundaries converts files sized at and around multiples of a
// small chunk size and checks every chunk.
func TestTreeChunkBoundaries(t *testing.T) {
	const chunk = 64 << 10
	tarball := testimage.MustTar(testimage.SizeBoundaries(11, chunk))
	src := treeOfTar(t, tarball)
	for _, format := range formats {
		t.Run(string(format), func(t *testing.T) {
			c := newConverter(t, convert.WithFormat(format), convert.WithChunkSize(chunk))
			l, err := c.Layer(context.Background(), testimage.GzipLayer(tarball), testimage.SHA256(tarball))
			if err != nil {
				t.Fatalf("Layer: %v", err)
			}
			checkLayerTree(t, src, l, chunk)
			blob, desc := convertedBlob(t, l)
			r, _, err := openOutput(blob, desc)
			if err != nil {
				t.Fatal(err)
			}
			// Files of n bytes must be cut into ceil(n/chunk) chunks.
			for name, n := range src {
				if n.Size == 0 {
					continue
				}
				want := int((n.Size + chunk - 1) / chunk)
				got := 0
				for off := int64(0); off < n.Size; got++ {
					ce, ok := r.ChunkEntryForOffset(name, off)
					if !ok {
						t.Fatalf("%s: no chunk at %d", name, off)
					}
					off = ce.ChunkOffset + ce.ChunkSize
				}
				if got != want {
					t.Errorf("%s (%d bytes): %d chunks, want %d", name, n.Size, got, want)
				}
			}
		})
	}
}

// TestTreeInvalidUTF8 converts names, link targets and xattr names that are
// not valid UTF-8 (legal on Linux, e.g. Latin-1 file names from old
// archives). The TOC is JSON, which cannot hold them: a converter must either
// keep them exactly or refuse the layer with an error naming the file, never
// change them silently.
func TestTreeInvalidUTF8(t *testing.T) {
	cases := []testimage.Entry{
		{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "latin1-caf\xe9.txt", Mode: 0o644, ModTime: testimage.Epoch, Size: 3}, Data: []byte("abc")},
		{Header: &tar.Header{Typeflag: tar.TypeSymlink, Name: "link", Linkname: "caf\xe9", Mode: 0o777, ModTime: testimage.Epoch}},
		{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "xattr", Mode: 0o644, ModTime: testimage.Epoch, Format: tar.FormatPAX,
			PAXRecords: map[string]string{"SCHILY.xattr.user.\x93": "v"}}},
	}
	for _, e := range cases {
		t.Run(e.Header.Name, func(t *testing.T) {
			tarball := testimage.MustTar([]testimage.Entry{e})
			layer := testimage.GzipLayer(tarball)
			c := newConverter(t)
			l, err := c.Layer(context.Background(), layer, v1.Hash{})
			if err != nil {
				dgst, _ := layer.Digest()
				// The name may be quoted (%q escapes the invalid bytes).
				named := strings.Contains(err.Error(), e.Header.Name) || strings.Contains(err.Error(), strconv.Quote(e.Header.Name))
				if !strings.Contains(err.Error(), dgst.String()) || !named {
					t.Errorf("error does not name the layer %s and file %q: %v", dgst, e.Header.Name, err)
				}
				return
			}
			checkLayerTree(t, treeOfTar(t, tarball), l, convert.DefaultChunkSize)
		})
	}
}

func first(s []string) string {
	if len(s) == 0 {
		return "<none>"
	}
	return s[0]
}

func TestTreePrefetchOrder(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(3))
	src := treeOfTar(t, tarball)
	list := &prefetch.List{Version: prefetch.ListVersion, Files: []string{
		testimage.TextLarge,
		"/" + testimage.OSRelease, // source writes it as ./etc/os-release
		"missing/file",
		testimage.SmallFile,
		"dev/null",
		testimage.RandomLarge,
	}}
	wantPrefetched := []string{testimage.TextLarge, testimage.OSRelease, testimage.SmallFile, "dev/null", testimage.RandomLarge}
	for _, format := range formats {
		t.Run(string(format), func(t *testing.T) {
			c := newConverter(t, convert.WithFormat(format), convert.WithPrefetch(list))
			l, err := c.Layer(context.Background(), testimage.GzipLayer(tarball), v1.Hash{})
			if err != nil {
				t.Fatalf("Layer: %v", err)
			}
			order := checkLayerTree(t, src, l, convert.DefaultChunkSize)
			i := slices.Index(order, estargz.PrefetchLandmark)
			if i < 0 {
				t.Fatalf("no %s in output; order starts %q", estargz.PrefetchLandmark, order[:min(len(order), 10)])
			}
			if slices.Contains(order, estargz.NoPrefetchLandmark) {
				t.Errorf("%s present with a prefetch list", estargz.NoPrefetchLandmark)
			}
			// Before the landmark: the listed files in list order, and
			// nothing else but their parent directories.
			var files []string
			for _, name := range order[:i] {
				n := src[name]
				if n.Mode.IsDir() && isAncestorOfAny(name, wantPrefetched) {
					continue
				}
				files = append(files, name)
			}
			if !slices.Equal(files, wantPrefetched) {
				t.Errorf("entries before the landmark %q, want %q (in this order)", files, wantPrefetched)
			}
			r := l.Result()
			if r.Prefetch != len(wantPrefetched) {
				t.Errorf("Result().Prefetch = %d, want %d", r.Prefetch, len(wantPrefetched))
			}
			if !slices.Equal(r.MissingPrefetch, []string{"missing/file"}) {
				t.Errorf("Result().MissingPrefetch = %q, want [missing/file]", r.MissingPrefetch)
			}
			blob, desc := convertedBlob(t, l)
			sr, _, err := openOutput(blob, desc)
			if err != nil {
				t.Fatal(err)
			}
			lm, ok := sr.Lookup(estargz.PrefetchLandmark)
			if !ok {
				t.Fatalf("%s not in TOC", estargz.PrefetchLandmark)
			}
			for _, f := range wantPrefetched {
				e, ok := sr.Lookup(f)
				if ok && e.Type == "reg" && e.Size > 0 && e.Offset >= lm.Offset {
					t.Errorf("prefetched %s at offset %d, not before the landmark at %d", f, e.Offset, lm.Offset)
				}
			}
		})
	}
}

// TestTreePrefetchHardlinks lists hardlinks (whose targets are not listed)
// and a symlink in the prefetch list: the output must stay applicable.
func TestTreePrefetchHardlinks(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(4, testimage.WithoutLargeFiles()))
	src := treeOfTar(t, tarball)
	list := &prefetch.List{Version: prefetch.ListVersion, Files: []string{
		testimage.HardlinkSmall, "long/hard-to-long", "bin/sh",
	}}
	c := newConverter(t, convert.WithPrefetch(list))
	l, err := c.Layer(context.Background(), testimage.GzipLayer(tarball), v1.Hash{})
	if err != nil {
		t.Fatalf("Layer: %v", err)
	}
	checkLayerTree(t, src, l, convert.DefaultChunkSize)
	if m := l.Result().MissingPrefetch; len(m) != 0 {
		t.Errorf("MissingPrefetch = %q, want none", m)
	}
}

// TestTreeDuplicateNames converts a layer that writes the same name twice
// (valid tar: appliers replace the file, the last version wins). The output
// must stay applicable, with and without a prefetch list: every hardlink
// after its target, the last version of a name winning. With a hardlink to
// the first version in between, containerd's unpack keeps the first
// version's inode under the link while a lazy mount (whose TOC resolves a
// link by name, to the last version) would show the second: that layer is
// refused, naming the link and the file.
func TestTreeDuplicateNames(t *testing.T) {
	v1a := testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "a", Mode: 0o644, ModTime: testimage.Epoch, Size: 3}, Data: []byte("v1\n")}
	link := testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeLink, Name: "h", Linkname: "a", Mode: 0o644, ModTime: testimage.Epoch}}
	early := testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeLink, Name: "h0", Linkname: "b", Mode: 0o644, ModTime: testimage.Epoch}}
	b := testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "b", Mode: 0o644, ModTime: testimage.Epoch, Size: 2}, Data: []byte("b\n")}
	v2a := testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "a", Mode: 0o600, ModTime: testimage.Epoch, Size: 3}, Data: []byte("v2\n")}
	z := testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "z", Mode: 0o644, ModTime: testimage.Epoch, Size: 2}, Data: []byte("z\n")}
	good := testimage.MustTar([]testimage.Entry{v1a, b, early, v2a, z})
	refused := testimage.MustTar([]testimage.Entry{v1a, link, v2a, z})
	for _, tc := range []struct {
		name string
		opts []convert.Option
	}{
		{"no-prefetch", nil},
		{"prefetch", []convert.Option{convert.WithPrefetch(&prefetch.List{Version: prefetch.ListVersion, Files: []string{"z", "h0"}})}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newConverter(t, tc.opts...)
			l, err := c.Layer(context.Background(), testimage.GzipLayer(good), v1.Hash{})
			if err != nil {
				t.Fatalf("Layer: %v", err)
			}
			blob, _ := convertedBlob(t, l)
			raw, err := testimage.ReadAll(blob)
			if err != nil {
				t.Fatal(err)
			}
			got, order, err := readTarTree(bytes.NewReader(raw))
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			for _, name := range order {
				if n := got[name]; n.Hardlink && !seen[n.Link] {
					t.Errorf("hardlink %s comes before any %s in the output (order %q)", name, n.Link, order)
				}
				seen[name] = true
			}
			if d := diffTrees(treeOfTar(t, good), withoutConverterEntries(got)); d != "" {
				t.Errorf("output tree differs from source:\n%s", d)
			}

			l, err = c.Layer(context.Background(), testimage.GzipLayer(refused), v1.Hash{})
			if err == nil {
				t.Fatalf("layer replacing a hardlink's target converted to %v, want an error", l)
			}
			if msg := err.Error(); !strings.Contains(msg, `"a"`) || !strings.Contains(msg, `"h"`) {
				t.Errorf("error does not name the file and the hardlink: %v", err)
			}
		})
	}
}

func isAncestorOfAny(dir string, files []string) bool {
	for _, f := range files {
		if dir == "" || strings.HasPrefix(f, dir+"/") {
			return true
		}
	}
	return false
}

// TestTreeImage converts a two-platform index and checks every layer of
// every converted image against its source layer.
func TestTreeImage(t *testing.T) {
	idx, err := testimage.SeedIndex(10, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	c := newConverter(t)
	res, err := c.Index(context.Background(), idx)
	if err != nil {
		t.Fatalf("Index: %v", err)
	}
	if len(res.Images) != 2 {
		t.Fatalf("converted %d images, want 2", len(res.Images))
	}
	srcManifest, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	for i, ir := range res.Images {
		if err := validate.Image(ir.Image); err != nil {
			t.Errorf("image %d: validate.Image: %v", i, err)
		}
		srcImg, err := idx.Image(srcManifest.Manifests[i].Digest)
		if err != nil {
			t.Fatal(err)
		}
		srcLayers, err := srcImg.Layers()
		if err != nil {
			t.Fatal(err)
		}
		outLayers, err := ir.Image.Layers()
		if err != nil {
			t.Fatal(err)
		}
		if len(outLayers) != len(srcLayers) {
			t.Fatalf("image %d: %d layers, source has %d", i, len(outLayers), len(srcLayers))
		}
		for j := range srcLayers {
			rc, err := srcLayers[j].Uncompressed()
			if err != nil {
				t.Fatal(err)
			}
			src, _, err := readTarTree(rc)
			rc.Close()
			if err != nil {
				t.Fatal(err)
			}
			dgst, err := outLayers[j].Digest()
			if err != nil {
				t.Fatal(err)
			}
			cl, ok := outLayers[j].(*convert.Layer)
			if !ok {
				// The image may wrap its layers; convert the source layer
				// again: the Converter returns its cached result.
				srcDiff, _ := srcLayers[j].DiffID()
				cl, err = c.Layer(context.Background(), srcLayers[j], srcDiff)
				if err != nil {
					t.Fatal(err)
				}
			}
			if d, _ := cl.Digest(); d != dgst {
				t.Fatalf("image %d layer %d: image says %s, converter %s", i, j, dgst, d)
			}
			checkLayerTree(t, src, cl, convert.DefaultChunkSize)
		}
	}
}

// tarPaths lists the raw entry names and hardlink targets of a tar stream.
func tarPaths(b []byte) ([]string, error) {
	var names []string
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names, nil
		}
		if err != nil {
			return nil, err
		}
		names = append(names, h.Name)
		if h.Typeflag == tar.TypeLink {
			names = append(names, h.Linkname)
		}
	}
}

// TestTreeImageRepeatedLayer converts an image that lists the same layer
// twice (old Docker images repeat the empty layer): the converted image
// repeats the converted layer, validates, and the blob is converted once.
func TestTreeImageRepeatedLayer(t *testing.T) {
	empty := testimage.GzipLayer(testimage.MustTar(nil))
	other := testimage.GzipLayer(testimage.MustTar(testimage.Files("etc/hostname", "repeat\n")))
	img, err := testimage.Image(testimage.LinuxAMD64, empty, other, empty)
	if err != nil {
		t.Fatal(err)
	}
	c := newConverter(t)
	res, err := c.Image(context.Background(), img)
	if err != nil {
		t.Fatalf("Image: %v", err)
	}
	if err := validate.Image(res.Image); err != nil {
		t.Errorf("validate.Image: %v", err)
	}
	m, err := res.Image.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != 3 || m.Layers[0].Digest != m.Layers[2].Digest || m.Layers[0].Digest == m.Layers[1].Digest {
		t.Errorf("converted layers %v, want 3 with the first and last the same", m.Layers)
	}
	cf, err := res.Image.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if d := cf.RootFS.DiffIDs; len(d) != 3 || d[0] != d[2] {
		t.Errorf("diff_ids %v, want 3 with the first and last the same", d)
	}
	if s := c.Stats(); s.Converted != 2 {
		t.Errorf("converted %d layers, want 2", s.Converted)
	}
}

// TestTreeDeterministicPrefetch converts a layer with multi-chunk files (a
// small chunk size) and a prefetch list with one worker and with many: the
// blobs must be byte-identical.
func TestTreeDeterministicPrefetch(t *testing.T) {
	tarball := testimage.MustTar(testimage.Entries(13, testimage.WithoutLargeFiles()))
	list := &prefetch.List{Version: prefetch.ListVersion, Files: []string{"data/medium.txt", testimage.SmallFile, "missing"}}
	for _, format := range formats {
		t.Run(string(format), func(t *testing.T) {
			var want v1.Hash
			for _, workers := range []int{1, 5} {
				c := newConverter(t, convert.WithFormat(format), convert.WithPrefetch(list), convert.WithWorkers(workers), convert.WithChunkSize(32<<10))
				l, err := c.Layer(context.Background(), testimage.GzipLayer(tarball), v1.Hash{})
				if err != nil {
					t.Fatalf("Layer: %v", err)
				}
				d, _ := l.Digest()
				if workers == 1 {
					want = d
				} else if d != want {
					t.Errorf("%d workers: digest %s, one worker: %s", workers, d, want)
				}
			}
		})
	}
}

package toccheck_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/externaltoc"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/containerd/stargz-snapshotter/metadata"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"

	"github.com/lazybase/lazybase/internal/toccheck"
)

func zstdDecompressor() metadata.Option {
	return metadata.WithDecompressors(new(zstdchunked.Decompressor))
}

func newTOCWriter(w io.Writer) (*gzip.Writer, *tar.Writer) {
	zw := gzip.NewWriter(w)
	return zw, tar.NewWriter(zw)
}

// fuzzPayload is the size of the zero payload fuzzed TOCs are placed
// after: data offsets below it are inside the blob.
const fuzzPayload = 4096

// blobWithTOC returns a gzip eStargz blob of fuzzPayload zero bytes
// followed by tocJSON, stored as estargz stores a TOC, and the footer.
func blobWithTOC(tocJSON []byte) []byte {
	var b bytes.Buffer
	b.Write(make([]byte, fuzzPayload))
	zw, tw := newTOCWriter(&b)
	tw.WriteHeader(&tar.Header{Name: estargz.TOCTarName, Size: int64(len(tocJSON)), Mode: 0o644, Typeflag: tar.TypeReg})
	tw.Write(tocJSON)
	tw.Close()
	zw.Close()
	sub := fmt.Sprintf("%016xSTARGZ", fuzzPayload)
	b.Write(estargz.CreateGzipFooter(append([]byte{'S', 'G', byte(len(sub)), 0}, sub...)))
	return b.Bytes()
}

// fuzzLimits keep each fuzz input cheap.
var fuzzLimits = []toccheck.Option{toccheck.WithMaxEntries(4096), toccheck.WithMaxTOCBytes(1 << 20)}

// FuzzValidate feeds TOC JSON to the validator, directly and built into an
// eStargz blob, and checks that (1) both ways agree and (2) whatever the
// validator accepts, stargz's memory metadata reader opens and walks
// without panicking or recursing for ever (a stack overflow kills the fuzz
// process, which go test reports as a failure).
func FuzzValidate(f *testing.F) {
	f.Add([]byte(`{"version":1,"entries":[{"name":"etc/","type":"dir"},{"name":"etc/hl","type":"hardlink","linkName":"etc"}]}`))
	f.Add([]byte(`{"version":1,"entries":[{"name":"a","type":"reg","size":8,"offset":10,"chunkSize":4},{"name":"a","type":"chunk","offset":20,"chunkOffset":4}]}`))
	f.Add([]byte(`{"version":1,"entries":[{"name":"./","type":"dir"},{"name":"f","type":"reg","size":3,"offset":1},{"name":"h","type":"hardlink","linkName":"f"},{"name":"s","type":"symlink","linkName":"/etc"}]}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, tocJSON []byte) {
		direct := func() error {
			toc, err := toccheck.Decode(bytes.NewReader(tocJSON), fuzzLimits...)
			if err != nil {
				return err
			}
			return toccheck.Validate(toc, toccheck.Blob{Size: int64(len(blobWithTOC(tocJSON))), TOCOffset: fuzzPayload}, fuzzLimits...)
		}()
		raw := blobWithTOC(tocJSON)
		sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
		_, err := toccheck.Check(sr, 0, decs, fuzzLimits...)
		if (err == nil) != (direct == nil) {
			t.Fatalf("Check says %v, Decode+Validate says %v", err, direct)
		}
		if err != nil {
			return
		}
		openAndWalk(t, sr)
	})
}

// FuzzRead feeds arbitrary bytes as a blob: Check must not panic, and
// whatever it accepts, stargz's reader must open and walk.
func FuzzRead(f *testing.F) {
	for _, raw := range realLayers(f) {
		if len(raw) < 64<<10 {
			f.Add(raw)
		}
	}
	f.Add(blobWithTOC([]byte(`{"version":1,"entries":[{"name":"d/","type":"dir"}]}`)))
	f.Add(make([]byte, 30))
	f.Fuzz(func(t *testing.T, raw []byte) {
		sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
		if _, err := toccheck.Check(sr, 0, decs, fuzzLimits...); err != nil {
			return
		}
		openAndWalk(t, sr)
	})
}

// openAndWalk opens sr with stargz's memory metadata reader and visits
// every node, reading a byte of every regular file.
func openAndWalk(t *testing.T, sr *io.SectionReader) {
	t.Helper()
	r, err := memorymetadata.NewReader(sr, zstdDecompressor())
	if err != nil {
		// What the check accepts, stargz's reader builds a tree of.
		t.Fatalf("Check accepted a TOC stargz's reader refuses: %v", err)
	}
	var walk func(id uint32, depth int)
	walk = func(id uint32, depth int) {
		if depth > toccheck.DefaultMaxDepth+1 {
			t.Fatalf("tree deeper than %d", depth)
		}
		r.ForeachChild(id, func(name string, cid uint32, mode os.FileMode) bool {
			if _, err := r.GetAttr(cid); err != nil {
				return true
			}
			switch {
			case mode.IsDir():
				walk(cid, depth+1)
			case mode.IsRegular():
				if fr, err := r.OpenFile(cid); err == nil {
					fr.ReadAt(make([]byte, 1), 0)
					fr.ChunkEntryForOffset(0)
				}
			}
			return true
		})
	}
	walk(r.RootID(), 0)
	r.Clone(sr) // stargz's Clone opens the blob again
}

// TestStargzReaderPanicsWithoutCheck pins why Read refuses what it refuses:
// stargz v0.19.1's memory metadata reader panics on these blobs, and in
// the daemon a panic there is not recovered. If a stargz upgrade makes one
// of them an error, the case can go.
func TestStargzReaderPanicsWithoutCheck(t *testing.T) {
	footer := func(off string) []byte {
		sub := off + "STARGZ"
		return append(make([]byte, 100), estargz.CreateGzipFooter(append([]byte{'S', 'G', byte(len(sub)), 0}, sub...))...)
	}
	// A gzip header without an extra field where the external-TOC
	// decompressor (which stargz's service adds) looks for its footer.
	noExtra := append(make([]byte, 100), 0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff)
	noExtra = append(noExtra, make([]byte, externaltoc.FooterSize-10)...)
	for name, raw := range map[string][]byte{
		"TOC offset past the end":           footer("00000000ffffffff"),
		"negative TOC offset":               footer("-000000000000001"),
		"external-TOC footer without extra": noExtra,
		"null TOC":                          blobWithTOC([]byte("null")),
	} {
		t.Run(name, func(t *testing.T) {
			sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
			ext := externaltoc.NewGzipDecompressor(func() ([]byte, error) { return nil, errors.New("no external TOC") })
			if _, err := toccheck.Check(sr, 0, append(decs, ext)); err == nil {
				t.Fatal("Check accepted it")
			}
			panicked := func() (p bool) {
				defer func() { p = recover() != nil }()
				memorymetadata.NewReader(sr, metadata.WithDecompressors(new(zstdchunked.Decompressor), ext))
				return false
			}()
			if !panicked {
				t.Error("stargz's reader no longer panics on it")
			}
		})
	}
}

// FuzzValidateEntries builds TOCs from a compact encoding, 8 bytes an
// entry, over a small alphabet of names, so that the fuzzer explores
// hardlinks, duplicates, parents, chunks and offsets rather than JSON
// syntax. Whatever Check accepts must open in stargz's reader and walk.
func FuzzValidateEntries(f *testing.F) {
	f.Add([]byte{1, 0x01, 0, 0, 0, 0, 0, 0, 3, 0x02, 0x01, 0, 0, 0, 0, 0})
	f.Add([]byte{0, 0x01, 0, 0, 2, 9, 0x41, 0, 7, 0x01, 0, 0, 3, 0, 0x14, 0})
	f.Add([]byte{2, 0x01, 0, 1, 0, 0, 0, 0, 5, 0x11, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		j, err := json.Marshal(tocFromBytes(b))
		if err != nil {
			t.Fatal(err)
		}
		raw := blobWithTOC(j)
		sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
		if _, err := toccheck.Check(sr, 0, decs, fuzzLimits...); err != nil {
			return
		}
		openAndWalk(t, sr)
	})
}

// tocFromBytes decodes FuzzValidateEntries' compact encoding: per 8 bytes,
// type, name (1-4 components over a small alphabet, "./" prefix, trailing
// slash), link target, offset, size, chunk offset and size, inner offset.
func tocFromBytes(b []byte) *estargz.JTOC {
	types := []string{"reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk", "socket"}
	comps := []string{"a", "b", "c", "a", "b", "..", ".", ""}
	path := func(x, y byte) string {
		depth := int(x>>4)%4 + 1
		var cs []string
		for i := 0; i < depth; i++ {
			cs = append(cs, comps[(int(y>>(2*i))&3+int(x>>i)&4)%len(comps)])
		}
		p := strings.Join(cs, "/")
		if x&0x04 != 0 {
			p = "./" + p
		}
		if x&0x08 != 0 {
			p += "/"
		}
		return p
	}
	toc := &estargz.JTOC{Version: 1}
	var off int64
	for len(b) >= 8 {
		r := b[:8]
		b = b[8:]
		// Offsets mostly move forward, sometimes jump anywhere.
		if r[4]&0x80 != 0 {
			off = int64(r[4]&0x7f) * 32
		} else {
			off += int64(r[4]&0x0f) * 16
		}
		e := &estargz.TOCEntry{
			Type:   types[int(r[0])%len(types)],
			Name:   path(r[1], r[2]),
			Offset: off,
			Size:   int64(r[5]),
		}
		if r[6]&0x80 != 0 {
			e.ChunkOffset, e.ChunkSize = int64(r[6]&0x07), int64(r[6]>>3&0x0f)
		}
		if (e.Type == "hardlink" || e.Type == "symlink") && r[3] != 0 || r[3] == 0xff {
			e.LinkName = path(r[3], r[7])
		}
		if r[7]&1 != 0 {
			e.InnerOffset = int64(r[7])
		}
		toc.Entries = append(toc.Entries, e)
	}
	return toc
}

// TestTOCFromBytesIsNotVacuous checks that FuzzValidateEntries' encoding
// yields TOCs Check accepts (so the reader property is exercised) as well
// as ones it refuses.
func TestTOCFromBytesIsNotVacuous(t *testing.T) {
	rnd := rand.New(rand.NewPCG(1, 2))
	var accepted, refused int
	for i := 0; i < 3000; i++ {
		b := make([]byte, 8*(1+rnd.IntN(6)))
		for j := range b {
			b[j] = byte(rnd.UintN(256))
		}
		j, err := json.Marshal(tocFromBytes(b))
		if err != nil {
			t.Fatal(err)
		}
		raw := blobWithTOC(j)
		if _, err := toccheck.Check(io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw))), 0, decs, fuzzLimits...); err != nil {
			refused++
		} else {
			accepted++
		}
	}
	t.Logf("%d accepted, %d refused", accepted, refused)
	if accepted < 30 || refused < 30 {
		t.Errorf("%d accepted, %d refused: the encoding does not explore both sides", accepted, refused)
	}
}

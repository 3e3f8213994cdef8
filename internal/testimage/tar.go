package testimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"path"
	"strings"
	"time"
)

// Epoch is the modification time of the first generated entry; later entries
// are one second apart.
var Epoch = time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)

// ChunkSize is the eStargz chunk size the large files are sized against.
const ChunkSize = 4 << 20

// Entry is one tar entry: its header and, for regular files, its contents.
type Entry struct {
	Header *tar.Header
	Data   []byte
}

type options struct {
	large    bool
	rootDir  bool
	implicit bool
}

// Option changes what Entries generates.
type Option func(*options)

// WithoutLargeFiles leaves out the files larger than ChunkSize, for tests
// that need to be quick.
func WithoutLargeFiles() Option { return func(o *options) { o.large = false } }

// WithoutRootDir leaves out the "./" entry for the root directory.
func WithoutRootDir() Option { return func(o *options) { o.rootDir = false } }

// WithoutImplicitDirs makes every directory explicit: by default one file's
// parent directory has no entry of its own, as happens in real layers.
func WithoutImplicitDirs() Option { return func(o *options) { o.implicit = false } }

// Names of some generated entries, for tests that refer to them.
const (
	SmallFile     = "bin/small"
	OSRelease     = "etc/os-release"
	RandomLarge   = "data/random-large.bin"
	TextLarge     = "data/text-large.txt"
	HardlinkSmall = "bin/small-hard"
)

// Entries returns a layer's entries covering every entry kind, with contents
// derived from seed. Names are as written into the tar (some start with
// "./", directories end with "/").
func Entries(seed uint64, opts ...Option) []Entry {
	o := options{large: true, rootDir: true, implicit: true}
	for _, opt := range opts {
		opt(&o)
	}
	rnd := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	random := func(n int) []byte {
		b := make([]byte, n+8)
		for i := 0; i < n; i += 8 {
			binary.LittleEndian.PutUint64(b[i:], rnd.Uint64())
		}
		return b[:n:n]
	}
	text := func(n int) []byte {
		words := []string{"lazy", "base", "layer", "chunk", "stargz", "gzip", "zstd", "toc", "landmark", "prefetch", "\n"}
		var b bytes.Buffer
		for b.Len() < n {
			b.WriteString(words[rnd.IntN(len(words))])
			b.WriteByte(' ')
		}
		return b.Bytes()[:n]
	}
	var es []Entry
	mt := Epoch
	add := func(h *tar.Header, data []byte) {
		h.ModTime = mt
		mt = mt.Add(time.Second)
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(data))
		}
		es = append(es, Entry{Header: h, Data: data})
	}
	dir := func(name string, mode int64) {
		add(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode}, nil)
	}
	reg := func(name string, mode int64, data []byte) {
		add(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode}, data)
	}
	link := func(typ byte, name, target string) {
		h := &tar.Header{Typeflag: typ, Name: name, Linkname: target, Mode: 0o777}
		add(h, nil)
		if typ != tar.TypeLink {
			return
		}
		// tar writes a hardlink's header with its file's attributes.
		for _, e := range es {
			if t := e.Header; t.Typeflag != tar.TypeLink && path.Clean(t.Name) == path.Clean(target) {
				h.Mode, h.Uid, h.Gid, h.Uname, h.Gname, h.ModTime = t.Mode, t.Uid, t.Gid, t.Uname, t.Gname, t.ModTime
			}
		}
	}

	if o.rootDir {
		dir("./", 0o755)
	}
	dir("bin/", 0o755)
	reg("bin/empty", 0o644, nil)
	reg(SmallFile, 0o755, random(1+rnd.IntN(4096)))
	link(tar.TypeSymlink, "bin/sh", "small")
	link(tar.TypeSymlink, "bin/dangling", "../nowhere/at/all")
	link(tar.TypeLink, HardlinkSmall, SmallFile)
	dir("./etc/", 0o755)
	reg("./"+OSRelease, 0o644, []byte(fmt.Sprintf("PRETTY_NAME=\"testimage %d\"\nID=testimage\n", seed)))
	link(tar.TypeSymlink, "./etc/abs-link", "/"+OSRelease)
	dir("data/", 0o755)
	reg("data/medium.bin", 0o644, random(200<<10))
	reg("data/medium.txt", 0o644, text(300<<10))
	if o.large {
		reg(RandomLarge, 0o644, random(ChunkSize+12345))
		reg(TextLarge, 0o644, text(2*ChunkSize+1))
		link(tar.TypeLink, "data/large-hard", RandomLarge)
	}
	dir("dev/", 0o755)
	add(&tar.Header{Typeflag: tar.TypeChar, Name: "dev/null", Mode: 0o666, Devmajor: 1, Devminor: 3}, nil)
	add(&tar.Header{Typeflag: tar.TypeBlock, Name: "dev/sda", Mode: 0o660, Devmajor: 8, Devminor: 0, Gid: 6, Gname: "disk"}, nil)
	add(&tar.Header{Typeflag: tar.TypeBlock, Name: "dev/big-minor", Mode: 0o600, Devmajor: 259, Devminor: 65537}, nil)
	add(&tar.Header{Typeflag: tar.TypeFifo, Name: "dev/fifo", Mode: 0o644}, nil)
	dir("emptydir/", 0o700)

	longDir := "long/" + strings.Repeat("d", 120) + "/"
	dir("long/", 0o755)
	dir(longDir, 0o755)
	longFile := longDir + strings.Repeat("f", 130) + ".txt"
	reg(longFile, 0o644, text(777))
	link(tar.TypeSymlink, "long/link-to-long", strings.TrimPrefix(longFile, "long/"))
	link(tar.TypeLink, "long/hard-to-long", longFile)

	dir("unicode/", 0o755)
	reg("unicode/日本語.txt", 0o644, []byte("こんにちは\n"))
	reg("unicode/café-ñ.txt", 0o644, []byte("crème brûlée\n"))
	reg("unicode/emoji-🚀.bin", 0o600, random(64))
	link(tar.TypeSymlink, "unicode/ссылка", "日本語.txt")

	dir("xattr/", 0o755)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "xattr/file", Mode: 0o644, Format: tar.FormatPAX,
		PAXRecords: map[string]string{
			"SCHILY.xattr.user.comment":        "hello xattr",
			"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
		}}, text(100))
	// A directory with an xattr (trusted.overlay.* ones, which overlayfs
	// obeys, make lazybase refuse a layer).
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "xattr/dir/", Mode: 0o755, Format: tar.FormatPAX,
		PAXRecords: map[string]string{"SCHILY.xattr.user.dir-note": "a directory's xattr"}}, nil)

	dir("owned/", 0o755)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "owned/alice", Mode: 0o640, Uid: 1000, Gid: 1000, Uname: "alice", Gname: "staff"}, []byte("alice's\n"))
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "owned/big-ids", Mode: 0o644, Uid: 3000000, Gid: 4000000, Uname: "big", Gname: "bigger"}, []byte("big ids\n"))
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "owned/nobody/", Mode: 0o755, Uid: 65534, Gid: 65534, Uname: "nobody", Gname: "nogroup"}, nil)

	dir("modes/", 0o755)
	reg("modes/setuid", 0o4755, []byte("#!/bin/true\n"))
	reg("modes/setgid", 0o2711, []byte("#!/bin/true\n"))
	dir("modes/sticky/", 0o1777)
	reg("modes/none", 0o000, []byte("nobody reads me\n"))

	dir("wh/", 0o755)
	reg("wh/.wh.foo", 0o644, nil)
	dir("wh/opq/", 0o755)
	reg("wh/opq/.wh..wh..opq", 0o644, nil)

	// GNU tar writes long names and targets as ././@LongLink records.
	dir("gnu/", 0o755)
	gnuName := "gnu/" + strings.Repeat("g", 140)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: gnuName, Mode: 0o644, Format: tar.FormatGNU}, text(333))
	add(&tar.Header{Typeflag: tar.TypeSymlink, Name: "gnu/long-target", Linkname: strings.Repeat("t", 150), Mode: 0o777, Format: tar.FormatGNU}, nil)

	// USTAR splits names of up to 255 bytes into prefix and name fields.
	ustarDir := "ustar/" + strings.Repeat("p", 90) + "/"
	dir("ustar/", 0o755)
	dir(ustarDir, 0o755)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: ustarDir + strings.Repeat("n", 90), Mode: 0o644, Format: tar.FormatUSTAR}, text(99))

	// Names that are legal but awkward.
	dir("odd/", 0o755)
	reg("odd/with space", 0o644, []byte("space\n"))
	reg("odd/new\nline", 0o644, []byte("newline\n"))
	reg("odd/back\\slash", 0o644, []byte("backslash\n"))
	reg("odd/-dash", 0o644, []byte("dash\n"))
	reg("odd/..dots", 0o644, []byte("not a parent\n"))
	reg("odd/"+strings.Repeat("n", 255), 0o644, []byte("a 255-byte name\n"))
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "odd/no-trailing-slash", Mode: 0o755}, nil)

	if o.implicit {
		reg("implicit/child.txt", 0o644, []byte("my parent has no entry\n"))
	} else {
		dir("implicit/", 0o755)
		reg("implicit/child.txt", 0o644, []byte("my parent has an entry\n"))
	}
	return es
}

// ManyFiles returns n regular files of random sizes up to maxSize spread
// over directories, with their directories, for tests of layers with many
// small files.
func ManyFiles(seed uint64, n, maxSize int) []Entry {
	rnd := rand.New(rand.NewPCG(seed, ^seed))
	var es []Entry
	mt := Epoch
	for i := 0; i < n; i++ {
		if i%100 == 0 {
			es = append(es, Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: fmt.Sprintf("many/d%03d/", i/100), Mode: 0o755, ModTime: mt}})
		}
		data := make([]byte, rnd.IntN(maxSize+1))
		for j := range data {
			data[j] = byte('a' + rnd.IntN(8)) // compressible, not trivially
		}
		es = append(es, Entry{
			Header: &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("many/d%03d/f%05d", i/100, i), Mode: 0o644, ModTime: mt, Size: int64(len(data))},
			Data:   data,
		})
		mt = mt.Add(time.Second)
	}
	return es
}

// SizeBoundaries returns regular files sized around multiples of chunk
// (0, 1, chunk-1, chunk, chunk+1, 2*chunk-1, 2*chunk, 2*chunk+1, 3*chunk),
// interleaved with small files, with random contents.
func SizeBoundaries(seed uint64, chunk int) []Entry {
	rnd := rand.New(rand.NewPCG(seed, seed+1))
	sizes := []int{0, 1, chunk - 1, chunk, chunk + 1, 2*chunk - 1, 2 * chunk, 2*chunk + 1, 3 * chunk}
	es := []Entry{{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "sizes/", Mode: 0o755, ModTime: Epoch}}}
	for i, n := range sizes {
		data := make([]byte, n)
		for j := range data {
			data[j] = byte(rnd.UintN(256))
		}
		es = append(es,
			Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("sizes/%02d-%d", i, n), Mode: 0o644, ModTime: Epoch, Size: int64(n)}, Data: data},
			Entry{Header: &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("sizes/%02d-small", i), Mode: 0o644, ModTime: Epoch, Size: 3}, Data: []byte("abc")},
		)
	}
	return es
}

// Tar writes entries as a tar stream. Headers are written as given, so bad
// names ("../x", "/abs") and dangling hardlinks can be made on purpose.
func Tar(entries []Entry) ([]byte, error) {
	var b bytes.Buffer
	tw := tar.NewWriter(&b)
	for _, e := range entries {
		h := *e.Header
		if h.Typeflag == tar.TypeReg && h.Size == 0 {
			h.Size = int64(len(e.Data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, fmt.Errorf("writing header %q: %w", h.Name, err)
		}
		if len(e.Data) > 0 {
			if _, err := tw.Write(e.Data); err != nil {
				return nil, fmt.Errorf("writing %q: %w", h.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// MustTar is Tar that panics on error, for test tables.
func MustTar(entries []Entry) []byte {
	b, err := Tar(entries)
	if err != nil {
		panic(err)
	}
	return b
}

// Files returns entries for regular files mapping name to contents, in the
// given order, with mode 0644.
func Files(kv ...string) []Entry {
	if len(kv)%2 != 0 {
		panic("testimage.Files: odd number of arguments")
	}
	var es []Entry
	for i := 0; i < len(kv); i += 2 {
		es = append(es, Entry{
			Header: &tar.Header{Typeflag: tar.TypeReg, Name: kv[i], Mode: 0o644, ModTime: Epoch, Size: int64(len(kv[i+1]))},
			Data:   []byte(kv[i+1]),
		})
	}
	return es
}

// Gzip compresses b with the standard library at the default level and no
// name or time in the header, so the output is deterministic.
func Gzip(b []byte) []byte {
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	if _, err := zw.Write(b); err != nil {
		panic(err) // writes to a bytes.Buffer do not fail
	}
	if err := zw.Close(); err != nil {
		panic(err)
	}
	return out.Bytes()
}

// Truncate returns the first n bytes of b (all of b if it is shorter), or,
// for negative n, b without its last -n bytes.
func Truncate(b []byte, n int) []byte {
	if n < 0 {
		n = len(b) + n
	}
	if n < 0 {
		n = 0
	}
	if n > len(b) {
		n = len(b)
	}
	return append([]byte(nil), b[:n]...)
}

// NotTar is text that no tar reader accepts: longer than a tar header block
// and without a valid header checksum.
func NotTar() []byte {
	return []byte(strings.Repeat("this is plain text, not a tar archive. ", 40))
}

package testimage

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// RewriteTOC returns a copy of the eStargz layer l whose TOC is replaced by
// what mutate makes of it: the payload before the TOC is kept, the new TOC
// and footer are written as estargz writes them, and the TOC digest
// annotation is updated, so that stargz trusts the new TOC. mutate also gets
// the TOC's offset in the blob. It is how tests make eStargz layers whose
// TOC lies about a benign tar stream.
func RewriteTOC(l *Layer, mutate func(toc *estargz.JTOC, tocOffset int64)) (*Layer, error) {
	sr := io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob)))
	tocOff, footerSize, err := estargz.OpenFooter(sr)
	if err != nil {
		return nil, fmt.Errorf("reading eStargz footer: %w", err)
	}
	toc, _, err := new(estargz.GzipDecompressor).ParseTOC(bytes.NewReader(l.Blob[tocOff : int64(len(l.Blob))-footerSize]))
	if err != nil {
		return nil, fmt.Errorf("reading eStargz TOC: %w", err)
	}
	mutate(toc, tocOff)
	return WithTOC(l.Blob[:tocOff], toc)
}

// WithTOC returns an OCI gzip layer made of payload (gzip members, possibly
// none) followed by toc and the footer, written by estargz's gzip
// compressor, with the TOC digest and uncompressed size annotations. The
// TOC is not checked: this builds the eStargz layers estargz.Build refuses
// to.
func WithTOC(payload []byte, toc *estargz.JTOC) (*Layer, error) {
	var b bytes.Buffer
	b.Write(payload)
	tocDigest, err := estargz.NewGzipCompressor().WriteTOCAndFooter(&b, int64(len(payload)), toc, nil)
	if err != nil {
		return nil, fmt.Errorf("writing eStargz TOC: %w", err)
	}
	l := NewLayer(b.Bytes(), "")
	rc, err := l.Uncompressed()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	n, err := io.Copy(io.Discard, rc)
	if err != nil {
		return nil, fmt.Errorf("decompressing eStargz layer: %w", err)
	}
	l.Annotations = map[string]string{
		AnnotationTOCDigest:        tocDigest.String(),
		AnnotationUncompressedSize: strconv.FormatInt(n, 10),
	}
	return l, nil
}

// Hostile is an eStargz layer built to hurt stargz's reader.
type Hostile struct {
	// Name says what is wrong with it.
	Name string
	// Layer is the layer, with the annotations that make stargz try to
	// mount it lazily.
	Layer *Layer
	// Problem is a part of the error the TOC validator gives for it.
	Problem string
	// Unpackable is whether the layer's tar stream unpacks normally, so
	// that a fallback pull succeeds; when false the normal pull fails too.
	Unpackable bool
}

// hostileBase is the benign tar every TOC-only hostile layer lies about.
func hostileBase() ([]byte, error) {
	es := []Entry{
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755}},
		{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "etc/os-release", Mode: 0o644, Size: 14}, Data: []byte("ID=hostile\nX\n\n")},
		{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "etc/sub/", Mode: 0o755}},
		{Header: &tar.Header{Typeflag: tar.TypeReg, Name: "etc/sub/file", Mode: 0o644, Size: 5}, Data: []byte("hello")},
	}
	for _, e := range es {
		e.Header.ModTime = Epoch
	}
	return Tar(es)
}

// HostileLayers returns the eStargz layers hostile to stargz's reader that
// tests serve to the snapshotter: each is built with the estargz library
// directly, never by lazybase's converter. A huge entry count needs a TOC
// of hugeEntries entries (pass more than the daemon's limit).
func HostileLayers(hugeEntries int) ([]Hostile, error) {
	base, err := hostileBase()
	if err != nil {
		return nil, err
	}
	good, err := EStargz(base)
	if err != nil {
		return nil, err
	}
	var out []Hostile
	rewrite := func(name, problem string, mutate func(toc *estargz.JTOC, tocOffset int64)) error {
		l, err := RewriteTOC(good, mutate)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		out = append(out, Hostile{Name: name, Layer: l, Problem: problem, Unpackable: true})
		return nil
	}
	entry := func(toc *estargz.JTOC, name string) *estargz.TOCEntry {
		for _, e := range toc.Entries {
			if e.Name == name {
				return e
			}
		}
		panic("testimage: no TOC entry " + name)
	}
	steps := []func() error{
		// The crash: the TOC makes etc its own grandchild.
		func() error {
			return rewrite("toc-cycle", "hardlink to directory", func(toc *estargz.JTOC, _ int64) {
				toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: "etc/sub/up", Type: "hardlink", LinkName: "etc/", Mode: 0o755})
			})
		},
		func() error {
			return rewrite("hardlink-cycle", "no earlier entry defines", func(toc *estargz.JTOC, _ int64) {
				toc.Entries = append(toc.Entries,
					&estargz.TOCEntry{Name: "a", Type: "hardlink", LinkName: "b"},
					&estargz.TOCEntry{Name: "b", Type: "hardlink", LinkName: "a"})
			})
		},
		func() error {
			return rewrite("offset-past-end", "at or past the TOC offset", func(toc *estargz.JTOC, tocOffset int64) {
				entry(toc, "etc/os-release").Offset = tocOffset + 4096
			})
		},
		func() error {
			return rewrite("name-escapes-root", `".." path component`, func(toc *estargz.JTOC, _ int64) {
				entry(toc, "etc/sub/file").Name = "../../etc/sub/file"
			})
		},
		func() error {
			return rewrite("absolute-name", "absolute path", func(toc *estargz.JTOC, _ int64) {
				toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: "/etc/passwd", Type: "symlink", LinkName: "x"})
			})
		},
		func() error {
			return rewrite("huge-entry-count", "entries", func(toc *estargz.JTOC, _ int64) {
				for i := 0; i < hugeEntries; i++ {
					toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: "many/" + strconv.Itoa(i), Type: "fifo"})
				}
			})
		},
		func() error {
			return rewrite("deep-nesting", "path components", func(toc *estargz.JTOC, _ int64) {
				toc.Entries = append(toc.Entries, &estargz.TOCEntry{Name: strings.Repeat("d/", 300) + "f", Type: "fifo"})
			})
		},
		func() error {
			return rewrite("under-symlinked-dir", "is a symlink", func(toc *estargz.JTOC, _ int64) {
				toc.Entries = append(toc.Entries,
					&estargz.TOCEntry{Name: "lnk", Type: "symlink", LinkName: "etc"},
					&estargz.TOCEntry{Name: "lnk/evil", Type: "fifo"})
			})
		},
		// A tar with a hardlink to a directory, built by estargz.Build:
		// the normal pull fails on it too.
		func() error {
			t, err := Tar([]Entry{
				{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755, ModTime: Epoch}},
				{Header: &tar.Header{Typeflag: tar.TypeLink, Name: "etc/hl", Linkname: "etc", ModTime: Epoch}},
			})
			if err != nil {
				return err
			}
			l, err := EStargz(t)
			if err != nil {
				return fmt.Errorf("dir-hardlink: %w", err)
			}
			out = append(out, Hostile{Name: "dir-hardlink", Layer: l, Problem: "hardlink to directory"})
			return nil
		},
	}
	for _, s := range steps {
		if err := s(); err != nil {
			return nil, err
		}
	}
	return out, nil
}

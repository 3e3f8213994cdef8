package convert

import (
	"archive/tar"
	"bufio"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"path"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	kgzip "github.com/klauspost/compress/gzip"
	digest "github.com/opencontainers/go-digest"
)

// Verified describes a blob that passed VerifyEStargz.
type Verified struct {
	// DiffID is the digest of the blob's uncompressed tar stream.
	DiffID digest.Digest
	// UncompressedSize is the size of that stream.
	UncompressedSize int64
	// Entries is how many TOC entries were checked.
	Entries int

	paths *layerPaths
}

// VerifyEStargz checks that the gzip eStargz blob in ra (size bytes) is
// complete and consistent, decompressing every byte once: the footer and TOC
// parse, the TOC digest equals tocDigest, every chunk the TOC points to
// decompresses at its offset to bytes with the chunk's digest, the tar stream
// holds exactly the TOC's entries with the same metadata, and every regular
// file matches its digest.
func VerifyEStargz(ra io.ReaderAt, size int64, tocDigest digest.Digest) (*Verified, error) {
	sr := io.NewSectionReader(ra, 0, size)
	if _, err := estargz.Open(sr); err != nil {
		return nil, fmt.Errorf("not a valid eStargz blob: %w", err)
	}
	tocOff, footerSize, err := estargz.OpenFooter(sr)
	if err != nil {
		return nil, fmt.Errorf("reading eStargz footer: %w", err)
	}
	if tocOff <= 0 || tocOff > size-footerSize {
		return nil, fmt.Errorf("TOC offset %d out of range", tocOff)
	}
	toc, gotTOC, err := new(estargz.GzipDecompressor).ParseTOC(io.NewSectionReader(ra, tocOff, size-footerSize-tocOff))
	if err != nil {
		return nil, fmt.Errorf("parsing TOC: %w", err)
	}
	if gotTOC != tocDigest {
		return nil, fmt.Errorf("TOC digest is %s, annotation says %s", gotTOC, tocDigest)
	}

	// Ranges: [0, first chunk), one per chunk offset, then the TOC member.
	type rng struct {
		start, end int64
		checks     []check
	}
	ranges := []*rng{{start: 0}}
	var fileSize int64
	for _, e := range toc.Entries {
		switch e.Type {
		case "reg":
			fileSize = e.Size
			if e.Size == 0 {
				continue
			}
		case "chunk":
		default:
			continue
		}
		n := e.ChunkSize
		if n == 0 {
			n = fileSize - e.ChunkOffset
		}
		if n <= 0 || e.ChunkOffset+n > fileSize {
			return nil, fmt.Errorf("file %q: chunk at %d has bad size %d", e.Name, e.ChunkOffset, n)
		}
		last := ranges[len(ranges)-1]
		switch {
		case e.Offset == last.start && len(ranges) > 1:
		case e.Offset > last.start:
			last.end = e.Offset
			last = &rng{start: e.Offset}
			ranges = append(ranges, last)
		default:
			return nil, fmt.Errorf("file %q: chunk offset %d goes backwards", e.Name, e.Offset)
		}
		if e.Offset >= tocOff {
			return nil, fmt.Errorf("file %q: chunk offset %d beyond the TOC at %d", e.Name, e.Offset, tocOff)
		}
		last.checks = append(last.checks, check{inner: e.InnerOffset, n: n, dgst: e.ChunkDigest, name: e.Name})
	}
	ranges[len(ranges)-1].end = tocOff
	ranges = append(ranges, &rng{start: tocOff, end: size - footerSize})

	// Stream every range once: check chunks on the way, feed the tar parser.
	diff := sha256.New()
	var usize int64
	pr, pw := io.Pipe()
	go func() {
		var zr *kgzip.Reader
		br := bufio.NewReaderSize(nil, 256<<10)
		buf := make([]byte, 256<<10)
		for _, r := range ranges {
			if r.end == r.start {
				if len(r.checks) > 0 {
					pw.CloseWithError(fmt.Errorf("file %q: empty chunk at offset %d", r.checks[0].name, r.start))
					return
				}
				continue
			}
			br.Reset(io.NewSectionReader(ra, r.start, r.end-r.start))
			var err error
			if zr == nil {
				zr, err = kgzip.NewReader(br)
			} else {
				err = zr.Reset(br)
			}
			if err != nil {
				pw.CloseWithError(fmt.Errorf("decompressing at offset %d: %w", r.start, err))
				return
			}
			if err := copyChecked(pw, zr, r.start, r.checks, buf); err != nil {
				pw.CloseWithError(err)
				return
			}
		}
		pw.Close()
	}()
	defer pr.Close()

	tr := tar.NewReader(io.TeeReader(pr, countingHash{diff, &usize}))
	var entries []*estargz.TOCEntry
	for _, e := range toc.Entries {
		if e.Type != "chunk" {
			entries = append(entries, e)
		}
	}
	i := 0
	sawTOC := false
	// A verified blob is still a tar stream that appliers extract: it gets
	// the same path and hardlink checks as a layer being converted.
	filter := newEntryFilter()
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("reading tar stream: %w", err)
		}
		if sawTOC {
			return nil, fmt.Errorf("entry %q after the TOC", h.Name)
		}
		if cleanName(h.Name) == estargz.TOCTarName {
			sawTOC = true
			d := sha256.New()
			if _, err := io.Copy(d, tr); err != nil {
				return nil, fmt.Errorf("reading TOC entry: %w", err)
			}
			if got := digest.NewDigest(digest.SHA256, d); got != tocDigest {
				return nil, fmt.Errorf("TOC in the tar stream has digest %s, want %s", got, tocDigest)
			}
			continue
		}
		if _, err := filter.check(context.Background(), h); err != nil {
			return nil, err
		}
		if i >= len(entries) {
			return nil, fmt.Errorf("tar entry %q is not in the TOC", h.Name)
		}
		if err := sameEntry(entries[i], h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			d := sha256.New()
			if _, err := io.Copy(d, tr); err != nil {
				return nil, fmt.Errorf("file %q: %w", h.Name, err)
			}
			if got := digest.NewDigest(digest.SHA256, d).String(); got != entries[i].Digest {
				return nil, fmt.Errorf("file %q: content digest %s, TOC says %s", h.Name, got, entries[i].Digest)
			}
		}
		i++
	}
	if _, err := io.Copy(io.Discard, io.TeeReader(pr, countingHash{diff, &usize})); err != nil {
		return nil, fmt.Errorf("reading tar stream: %w", err)
	}
	if i != len(entries) {
		return nil, fmt.Errorf("TOC entry %q is missing from the tar stream", entries[i].Name)
	}
	if !sawTOC {
		return nil, errors.New("tar stream has no TOC entry")
	}
	return &Verified{DiffID: digest.NewDigest(digest.SHA256, diff), UncompressedSize: usize, Entries: len(toc.Entries), paths: filter.summary()}, nil
}

// copyChecked copies one range's decompressed bytes to w, checking the chunk
// digests that live in it.
func copyChecked(w io.Writer, r io.Reader, off int64, checks []check, buf []byte) error {
	var pos int64
	var cur hash.Hash
	ci := 0
	for {
		n, err := r.Read(buf)
		p := buf[:n]
		for len(p) > 0 {
			if ci >= len(checks) {
				break
			}
			c := checks[ci]
			if pos+int64(len(p)) <= c.inner {
				break
			}
			if cur == nil {
				cur = sha256.New()
			}
			from := max(c.inner-pos, 0)
			to := min(c.inner+c.n-pos, int64(len(p)))
			if from < to {
				cur.Write(p[from:to])
			}
			if c.inner+c.n > pos+int64(len(p)) {
				break
			}
			if got := digest.NewDigest(digest.SHA256, cur).String(); got != c.dgst {
				return fmt.Errorf("file %q: chunk at blob offset %d has digest %s, TOC says %s", c.name, off, got, c.dgst)
			}
			cur = nil
			ci++
		}
		pos += int64(n)
		if _, werr := w.Write(buf[:n]); werr != nil {
			return werr
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("decompressing at offset %d: %w", off, err)
		}
	}
	if ci < len(checks) {
		return fmt.Errorf("file %q: chunk at blob offset %d is truncated", checks[ci].name, off)
	}
	return nil
}

// check is a chunk digest to verify inside one decompressed range.
type check struct {
	inner, n int64
	dgst     string
	name     string
}

func sameEntry(e *estargz.TOCEntry, h *tar.Header) error {
	if cleanName(e.Name) != cleanName(h.Name) {
		return fmt.Errorf("tar entry %q where the TOC has %q", h.Name, e.Name)
	}
	want := map[byte]string{tar.TypeReg: "reg", tar.TypeDir: "dir", tar.TypeSymlink: "symlink",
		tar.TypeLink: "hardlink", tar.TypeChar: "char", tar.TypeBlock: "block", tar.TypeFifo: "fifo"}[h.Typeflag]
	switch {
	case want != e.Type:
		return fmt.Errorf("file %q: tar type %q, TOC type %q", h.Name, h.Typeflag, e.Type)
	case e.Type == "reg" && e.Size != h.Size:
		return fmt.Errorf("file %q: tar size %d, TOC size %d", h.Name, h.Size, e.Size)
	case e.Mode != h.Mode || e.UID != h.Uid || e.GID != h.Gid:
		return fmt.Errorf("file %q: tar mode/owner %o %d:%d, TOC %o %d:%d", h.Name, h.Mode, h.Uid, h.Gid, e.Mode, e.UID, e.GID)
	case (e.Type == "symlink" || e.Type == "hardlink") && e.LinkName != h.Linkname:
		return fmt.Errorf("file %q: tar link %q, TOC link %q", h.Name, h.Linkname, e.LinkName)
	}
	return nil
}

func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

type countingHash struct {
	h hash.Hash
	n *int64
}

func (c countingHash) Write(p []byte) (int, error) {
	*c.n += int64(len(p))
	return c.h.Write(p)
}

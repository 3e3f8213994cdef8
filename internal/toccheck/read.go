package toccheck

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// Decompressor is a TOC decompressor as stargz's metadata package has them
// (metadata.Decompressor satisfies it): it parses a footer and decompresses
// the TOC JSON.
type Decompressor interface {
	estargz.Decompressor
	// DecompressTOC returns a reader of the TOC JSON stored in r.
	DecompressTOC(r io.Reader) (io.ReadCloser, error)
}

// Span is a range of blob bytes Read has read.
type Span struct {
	Offset int64
	Data   []byte
}

// Found is the TOC Read found in a blob.
type Found struct {
	// TOC is the decoded TOC, not yet validated.
	TOC *estargz.JTOC
	// Blob locates the TOC in the blob.
	Blob Blob
	// Spans are the blob bytes Read read (the tail with the footer, and
	// the TOC), so that a reader opened next need not fetch them again.
	Spans []Span
}

// Read finds and decodes the TOC of the blob sr as stargz's estargz.Open
// does, so that it sees the very TOC the reader will use: the same
// decompressors in the same order (gzip, legacy gzip, then decs), the same
// tail of the blob (tocOffsetHint is the reader's TOC offset option, 0 when
// unknown), the same bytes decoded. Unlike estargz.Open it builds no tree,
// and it refuses, with an error matching ErrInvalid, what would make the
// reader panic or allocate without bound: a blob shorter than a footer, a
// TOC offset outside the blob (a TOC stored elsewhere included), a TOC or
// its JSON larger than the MaxTOCBytes limit, more array elements than
// MaxEntries. A panic of a decompressor is returned as an error.
func Read(sr *io.SectionReader, tocOffsetHint int64, decs []Decompressor, opts ...Option) (f *Found, err error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	defer func() {
		if r := recover(); r != nil {
			f, err = nil, tocError("reading the TOC: panic: %v", r)
		}
	}()
	size := sr.Size()
	all := append([]Decompressor{new(estargz.GzipDecompressor), new(estargz.LegacyGzipDecompressor)}, decs...)
	var fetch int64
	for _, d := range all {
		if s := d.FooterSize(); s > fetch && s <= size {
			fetch = s
		}
	}
	if tocOffsetHint > fetch {
		if tocOffsetHint > size {
			return nil, tocError("TOC offset option %d past the end of the blob of %d bytes", tocOffsetHint, size)
		}
		fetch = size - tocOffsetHint
	}
	if fetch > o.maxTOCBytes {
		return nil, tocError("TOC of %d bytes, more than the limit of %d", fetch, o.maxTOCBytes)
	}
	tail := make([]byte, fetch)
	tailOff := size - fetch
	if err := readAt(sr, tail, tailOff); err != nil {
		return nil, fmt.Errorf("reading the footer: %w", err)
	}
	found := &Found{Spans: []Span{{Offset: tailOff, Data: tail}}}

	var (
		errs   []error
		parsed Decompressor // the first decompressor whose footer parsed
	)
	for _, d := range all {
		fs := d.FooterSize()
		fo := int64(len(tail)) - fs
		if fo < 0 {
			// stargz would hand the decompressor a short footer, which
			// some index without checking.
			return nil, tocError("blob of %d bytes shorter than the %d-byte %T footer", size, fs, d)
		}
		_, tocOff, tocSize, err := d.ParseFooter(tail[fo:])
		if err != nil {
			errs = append(errs, fmt.Errorf("%T footer: %w", d, err))
			continue
		}
		if parsed != nil {
			// A real blob's TOC decodes with the first decompressor
			// that parses its footer; this one would be a second guess.
			return nil, tocError("footer parses as %T and %T; the first one's TOC does not decode: %v", parsed, d, errors.Join(errs...))
		}
		parsed = d
		if tocOff < 0 {
			return nil, tocError("%T footer puts the TOC at %d, outside the blob; external TOCs are not supported", d, tocOff)
		}
		if tocOff > size-fs {
			return nil, tocError("%T footer puts the TOC at %d, past the end of the blob of %d bytes", d, tocOff, size)
		}
		if tocSize <= 0 {
			tocSize = size - tocOff - fs
		}
		if tocSize > size-tocOff {
			return nil, tocError("%T footer gives a TOC of %d bytes at %d, past the end of the blob of %d bytes", d, tocSize, tocOff, size)
		}
		if tocSize > o.maxTOCBytes {
			return nil, tocError("TOC of %d bytes, more than the limit of %d", tocSize, o.maxTOCBytes)
		}
		// stargz first tries the bytes before the footer it already
		// holds, cut to the TOC's size, then reads the TOC at its offset.
		if maybe := tail[:fo]; len(maybe) > 0 {
			if tocSize < int64(len(maybe)) {
				maybe = maybe[:tocSize]
			}
			toc, err := decode(d, maybe, o)
			if err == nil {
				found.TOC, found.Blob = toc, Blob{Size: size, TOCOffset: tocOff}
				return found, nil
			}
			if errors.Is(err, ErrInvalid) {
				return nil, err
			}
		}
		var buf []byte
		if tocOff >= tailOff && tocOff+tocSize <= size {
			buf = tail[tocOff-tailOff : tocOff-tailOff+tocSize]
		} else {
			buf = make([]byte, tocSize)
			if err := readAt(sr, buf, tocOff); err != nil {
				// An I/O error (a registry failing), not a bad TOC.
				return nil, fmt.Errorf("reading %d-byte TOC at %d: %w", tocSize, tocOff, err)
			}
			found.Spans = append(found.Spans, Span{Offset: tocOff, Data: buf})
		}
		toc, err := decode(d, buf, o)
		if err != nil {
			if errors.Is(err, ErrInvalid) {
				return nil, err
			}
			errs = append(errs, fmt.Errorf("%T: %w", d, err))
			continue
		}
		found.TOC, found.Blob = toc, Blob{Size: size, TOCOffset: tocOff}
		return found, nil
	}
	return nil, tocError("no TOC found: %v", errors.Join(errs...))
}

// Check reads the TOC of sr with Read and validates it with Validate.
func Check(sr *io.SectionReader, tocOffsetHint int64, decs []Decompressor, opts ...Option) (*Found, error) {
	f, err := Read(sr, tocOffsetHint, decs, opts...)
	if err != nil {
		return nil, err
	}
	if err := Validate(f.TOC, f.Blob, opts...); err != nil {
		return nil, err
	}
	return f, nil
}

// Decode decodes TOC JSON from r as stargz does, refusing JSON larger than
// the MaxTOCBytes limit or with more array elements than MaxEntries.
func Decode(r io.Reader, opts ...Option) (*estargz.JTOC, error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	return decodeJSON(r, o)
}

func decode(d Decompressor, b []byte, o options) (*estargz.JTOC, error) {
	rc, err := d.DecompressTOC(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	toc, err := decodeJSON(rc, o)
	// stargz's gzip TOC reader fails when closing reports a broken stream.
	if cerr := rc.Close(); err == nil && cerr != nil {
		return nil, fmt.Errorf("closing TOC stream: %w", cerr)
	}
	return toc, err
}

// decodeJSON decodes the first JSON value of r into a TOC the way stargz
// does (a json.Decoder on the stream; "null" leaves no TOC), through a
// guard that stops the stream once it passes the size or element limits.
func decodeJSON(r io.Reader, o options) (*estargz.JTOC, error) {
	g := &guard{r: r, remaining: o.maxTOCBytes, maxElems: o.maxEntries}
	toc := new(estargz.JTOC)
	err := json.NewDecoder(g).Decode(&toc)
	if g.err != nil {
		return nil, g.err
	}
	if err != nil {
		return nil, fmt.Errorf("decoding TOC JSON: %w", err)
	}
	return toc, nil
}

// guard passes a JSON stream through while counting its bytes and an upper
// bound of the elements of the arrays that are values of the top-level
// object (where "entries" is): one per such array plus one per comma
// directly inside it. Decoding allocates per element, so the count stops
// the stream before the allocations would.
type guard struct {
	r         io.Reader
	remaining int64
	maxElems  int
	err       error

	elems    int
	depth    int
	inStr    bool
	esc      bool
	arrayAt2 bool
}

func (g *guard) Read(p []byte) (int, error) {
	if g.err != nil {
		return 0, g.err
	}
	n, err := g.r.Read(p)
	g.remaining -= int64(n)
	if g.remaining < 0 {
		g.err = tocError("TOC JSON larger than the limit")
		return 0, g.err
	}
	g.scan(p[:n])
	if g.elems > g.maxElems {
		g.err = tocError("TOC JSON with more than %d entries", g.maxElems)
		return 0, g.err
	}
	return n, err
}

func (g *guard) scan(b []byte) {
	for _, c := range b {
		if g.inStr {
			switch {
			case g.esc:
				g.esc = false
			case c == '\\':
				g.esc = true
			case c == '"':
				g.inStr = false
			}
			continue
		}
		switch c {
		case '"':
			g.inStr = true
		case '{', '[':
			g.depth++
			if g.depth == 2 {
				g.arrayAt2 = c == '['
				if g.arrayAt2 {
					g.elems++
				}
			}
		case '}', ']':
			g.depth--
		case ',':
			if g.depth == 2 && g.arrayAt2 {
				g.elems++
			}
		}
	}
}

func readAt(sr *io.SectionReader, p []byte, off int64) error {
	n, err := sr.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return err
}

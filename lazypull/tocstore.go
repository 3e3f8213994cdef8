package lazypull

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/metadata"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"

	"github.com/lazybase/lazybase/internal/cpuacct"
	"github.com/lazybase/lazybase/internal/toccheck"
)

// tocCheckOption makes the upstream filesystem check every eStargz TOC
// before its metadata reader sees it.
// The clones the store makes for background fetches stop their walk
// when bg declines the layer (bgfetch.go); bg may be nil.
func tocCheckOption(bg *backgroundFetch, opts ...toccheck.Option) stargzfs.Option {
	return stargzfs.WithMetadataStore(tocCheckingStore(memorymetadata.NewReader, tocCheck{opts: opts, background: bg}))
}

// tocCheck is how a checking store checks a TOC: the limits, and a hook
// for tests run before every full check (not before a Clone that only
// compares bytes).
type tocCheck struct {
	opts    []toccheck.Option
	onCheck func()
	// background, when set, decides whether the walk of a clone (a
	// layer's background fetch) goes on.
	background *backgroundFetch
}

// tocCheckingStore wraps the metadata store inner: before inner reads a
// blob, the blob's TOC is found, decoded and validated by toccheck, which
// builds no tree and bounds every size, and a blob whose TOC fails is
// refused with an error naming the entry at fault. stargz's reader trusts
// its TOC: a directory cycle overflows the Go stack, which kills the
// daemon and every lazy mount on the node with it.
//
// Every path to a metadata reader goes through the store: the mount of a
// layer, the pre-resolution of its neighbours, the re-mounts of a
// restarted daemon; readers the store returns check again before Clone,
// which opens the blob anew. The TOC bytes read for the check are served
// to inner from memory, so the check costs one more decode of the TOC,
// not one more fetch.
func tocCheckingStore(inner metadata.Store, c tocCheck) metadata.Store {
	return func(sr *io.SectionReader, mopts ...metadata.Option) (metadata.Reader, error) {
		// One unit of the CPU account: fetching, checking and decoding
		// the TOC.
		span := cpuacct.Default.Start(cpuacct.TOC)
		defer span.End()
		cached, err := c.check(sr, mopts)
		if err != nil {
			return nil, err
		}
		r, err := inner(cached.section(), mopts...)
		cached.release()
		if err != nil {
			return nil, err
		}
		return &checkedReader{Reader: r, mopts: mopts, check: c, checked: cached.checked, size: cached.size, demand: c.background}, nil
	}
}

// check checks the TOC of sr with the decompressors and TOC offset the
// metadata options carry, as stargz's reader will read it.
func (c tocCheck) check(sr *io.SectionReader, mopts []metadata.Option) (*spanReaderAt, error) {
	if c.onCheck != nil {
		c.onCheck()
	}
	var o metadata.Options
	for _, opt := range mopts {
		if err := opt(&o); err != nil {
			return nil, fmt.Errorf("metadata option: %w", err)
		}
	}
	decs := make([]toccheck.Decompressor, 0, len(o.Decompressors))
	for _, d := range o.Decompressors {
		decs = append(decs, d)
	}
	f, err := toccheck.Check(sr, o.TOCOffset, decs, c.opts...)
	if err != nil {
		log.L.WithError(err).WithField("blob_size", sr.Size()).Info("refusing eStargz layer before stargz reads its TOC")
		return nil, fmt.Errorf("checking eStargz TOC: %w", err)
	}
	return newSpanReaderAt(sr, f.Spans), nil
}

func newSpanReaderAt(sr *io.SectionReader, spans []toccheck.Span) *spanReaderAt {
	s := &spanReaderAt{r: sr, size: sr.Size(), checked: spans}
	s.spans.Store(&spans)
	return s
}

// sameTOC reports whether sr holds, where the check read them, the very
// bytes of a TOC that passed the check (footer and TOC alike), so a clone
// over it needs no second decode and validation.
func sameTOC(sr *io.SectionReader, size int64, checked []toccheck.Span) bool {
	if len(checked) == 0 || sr.Size() != size {
		return false
	}
	for _, sp := range checked {
		b := make([]byte, len(sp.Data))
		if n, err := sr.ReadAt(b, sp.Offset); n != len(b) || (err != nil && !errors.Is(err, io.EOF)) {
			return false
		}
		if !bytes.Equal(b, sp.Data) {
			return false
		}
	}
	return true
}

// isInvalidTOC reports whether err, returned by a mount, comes from a TOC
// the store refused. stargz flattens the store's error into text on the
// way (%v), so the text is what is left to recognise.
func isInvalidTOC(err error) bool {
	return err != nil && (errors.Is(err, toccheck.ErrInvalid) || strings.Contains(err.Error(), toccheck.ErrInvalid.Error()))
}

// checkedReader is a metadata reader whose Clone checks the TOC of the
// blob it is given first.
type checkedReader struct {
	metadata.Reader
	mopts []metadata.Option
	check tocCheck
	// checked are the blob ranges (footer and TOC) of the TOC that passed
	// the check, kept so that a Clone over the same bytes skips the check.
	checked []toccheck.Span
	size    int64
	// demand, set on the reader of a layer (not on its clones), counts
	// its file reads as the build's, which background fetches yield to.
	demand *backgroundFetch
}

// OpenFile opens a file; with demand set, its reads are counted.
func (r *checkedReader) OpenFile(id uint32) (metadata.File, error) {
	f, err := r.Reader.OpenFile(id)
	if err != nil || r.demand == nil {
		return f, err
	}
	return &demandFile{File: f, bg: r.demand}, nil
}

// OpenFileWithPreReader opens a file; with demand set, its reads are
// counted.
func (r *checkedReader) OpenFileWithPreReader(id uint32, preRead func(id uint32, chunkOffset, chunkSize int64, chunkDigest string, r io.Reader) error) (metadata.File, error) {
	f, err := r.Reader.OpenFileWithPreReader(id, preRead)
	if err != nil || r.demand == nil {
		return f, err
	}
	return &demandFile{File: f, bg: r.demand}, nil
}

// Clone clones the reader over sr after checking sr's TOC. stargz clones a
// layer's reader for its background fetch only (its prefetch walks the
// reader itself), over the same blob; the clone's walk stops when the
// background fetch is declined (backgroundReader). When sr holds the very
// footer and TOC bytes that passed the check, they are compared, not
// decoded and validated again.
func (r *checkedReader) Clone(sr *io.SectionReader) (metadata.Reader, error) {
	span := cpuacct.Default.Start(cpuacct.TOC)
	defer span.End()
	var cached *spanReaderAt
	if sameTOC(sr, r.size, r.checked) {
		cached = newSpanReaderAt(sr, r.checked)
	} else {
		var err error
		if cached, err = r.check.check(sr, r.mopts); err != nil {
			return nil, err
		}
	}
	c, err := r.Reader.Clone(cached.section())
	cached.release()
	if err != nil {
		return nil, err
	}
	cr := &checkedReader{Reader: c, mopts: r.mopts, check: r.check, checked: cached.checked, size: cached.size}
	if r.check.background != nil {
		r.check.background.times.started(c.TOCDigest(), time.Now())
		return &backgroundReader{checkedReader: cr, bg: r.check.background}, nil
	}
	return cr, nil
}

// spanReaderAt serves reads that fall inside the blob ranges the check
// already read from memory, until released, and passes the others on.
type spanReaderAt struct {
	r       io.ReaderAt
	size    int64
	spans   atomic.Pointer[[]toccheck.Span]
	checked []toccheck.Span // the spans, kept after release for Clone
}

func (s *spanReaderAt) section() *io.SectionReader { return io.NewSectionReader(s, 0, s.size) }

// release drops the cached ranges once the reader has read its TOC.
func (s *spanReaderAt) release() { s.spans.Store(nil) }

// ReadAt reads from the cached ranges when one holds all of p.
func (s *spanReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if spans := s.spans.Load(); spans != nil {
		for _, sp := range *spans {
			if off >= sp.Offset && off+int64(len(p)) <= sp.Offset+int64(len(sp.Data)) {
				return copy(p, sp.Data[off-sp.Offset:]), nil
			}
		}
	}
	return s.r.ReadAt(p, off)
}

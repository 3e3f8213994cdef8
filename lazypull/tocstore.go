package lazypull

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"

	"github.com/containerd/log"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/metadata"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"

	"github.com/lazybase/lazybase/internal/toccheck"
)

// tocCheckOption makes the upstream filesystem check every eStargz TOC
// before its metadata reader sees it.
func tocCheckOption(opts ...toccheck.Option) stargzfs.Option {
	return stargzfs.WithMetadataStore(tocCheckingStore(memorymetadata.NewReader, opts...))
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
func tocCheckingStore(inner metadata.Store, opts ...toccheck.Option) metadata.Store {
	return func(sr *io.SectionReader, mopts ...metadata.Option) (metadata.Reader, error) {
		cached, err := checkTOC(sr, mopts, opts)
		if err != nil {
			return nil, err
		}
		r, err := inner(cached.section(), mopts...)
		cached.release()
		if err != nil {
			return nil, err
		}
		return &checkedReader{Reader: r, mopts: mopts, opts: opts}, nil
	}
}

// checkTOC checks the TOC of sr with the decompressors and TOC offset the
// metadata options carry, as stargz's reader will read it.
func checkTOC(sr *io.SectionReader, mopts []metadata.Option, opts []toccheck.Option) (*spanReaderAt, error) {
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
	f, err := toccheck.Check(sr, o.TOCOffset, decs, opts...)
	if err != nil {
		log.L.WithError(err).WithField("blob_size", sr.Size()).Info("refusing eStargz layer before stargz reads its TOC")
		return nil, fmt.Errorf("checking eStargz TOC: %w", err)
	}
	s := &spanReaderAt{r: sr, size: sr.Size()}
	s.spans.Store(&f.Spans)
	return s, nil
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
	opts  []toccheck.Option
}

// Clone checks the TOC of sr and clones the reader over it.
func (r *checkedReader) Clone(sr *io.SectionReader) (metadata.Reader, error) {
	cached, err := checkTOC(sr, r.mopts, r.opts)
	if err != nil {
		return nil, err
	}
	c, err := r.Reader.Clone(cached.section())
	cached.release()
	if err != nil {
		return nil, err
	}
	return &checkedReader{Reader: c, mopts: r.mopts, opts: r.opts}, nil
}

// spanReaderAt serves reads that fall inside the blob ranges the check
// already read from memory, until released, and passes the others on.
type spanReaderAt struct {
	r     io.ReaderAt
	size  int64
	spans atomic.Pointer[[]toccheck.Span]
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

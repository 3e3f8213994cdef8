package job

import (
	"context"
	"sync"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

// streamer uploads each layer the job's converter rebuilds to the
// destination repository while the converter writes it (a convert.BlobTee),
// so that pushing overlaps converting. The uploaded blobs appear in the
// registry only when commit names their digests, after the whole
// conversion succeeded; abort drops them. A layer whose upload fails is
// pushed from the converter's file by the ordinary write, as without
// streaming.
type streamer struct {
	ctx    context.Context // the job's: bounds every upload
	client *imageio.Client
	dst    imageio.Ref

	mu      sync.Mutex // guards uploads, closed and each upload's fields
	uploads []*streamed
	closed  bool // commit or abort ran: no more uploads start
}

// streamed is one layer blob being streamed.
type streamed struct {
	s       *streamer
	up      *imageio.BlobUpload // nil when not started, or once committed or dropped
	w       *imageio.BlobUpload // the converter's side: set by its first Write
	started bool                // the converter wrote
	source  v1.Hash
	desc    v1.Descriptor // set when the layer was converted
	ok      bool          // converted and fully sent
}

var _ convert.BlobTee = (*streamer)(nil)

// Start registers the layer rebuilt from source; its upload starts with
// the first bytes the converter writes (a layer spooled for a prefetch
// list writes nothing for a while, and an idle upload could be cut).
func (s *streamer) Start(_ context.Context, source v1.Descriptor) convert.BlobTeeWriter {
	return &streamed{s: s, source: source.Digest}
}

// Write sends p on, starting the upload on the first call (the converter
// calls it from one goroutine).
func (st *streamed) Write(p []byte) (int, error) {
	if !st.started {
		st.started = true
		st.w = st.s.startUpload(st)
	}
	if st.w == nil {
		return len(p), nil
	}
	return st.w.Write(p)
}

// startUpload opens the upload of st, or returns nil when it cannot.
func (s *streamer) startUpload(st *streamed) *imageio.BlobUpload {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if closed {
		return nil
	}
	up, err := s.client.StartBlobUpload(s.ctx, s.dst)
	if err != nil {
		log.G(s.ctx).WithError(err).WithField("layer", st.source.String()).
			Debug("cannot stream the converted layer; it is pushed once converted")
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		up.Abort(s.ctx)
		return nil
	}
	st.up = up
	s.uploads = append(s.uploads, st)
	return up
}

// End finishes the upload of a converted layer (the registry then holds
// the bytes, not yet a blob) or drops that of a failed one.
func (st *streamed) End(desc v1.Descriptor, err error) {
	s := st.s
	if st.w == nil {
		return
	}
	if err != nil {
		st.w.Abort(s.ctx)
		s.mu.Lock()
		st.up = nil
		s.mu.Unlock()
		return
	}
	if ferr := st.w.Finish(); ferr != nil {
		log.G(s.ctx).WithError(ferr).WithField("layer", st.source.String()).Debug("streaming the converted layer broke off; it is pushed once converted")
	}
	s.mu.Lock()
	st.desc, st.ok = desc, true
	s.mu.Unlock()
}

// commit makes every fully streamed blob appear in the destination
// repository, the registry checking each against the digest the converter
// computed over the same bytes, and returns how many did. A blob that
// fails is left to the ordinary push.
func (s *streamer) commit(ctx context.Context) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	n := 0
	for _, st := range s.uploads {
		if st.up == nil || !st.ok {
			continue
		}
		if err := st.up.Commit(ctx, st.desc.Digest, st.desc.Size); err != nil {
			log.G(ctx).WithError(err).WithField("layer", st.source.String()).Warn("streamed layer not committed; pushing it from the converted file")
		} else {
			n++
		}
		st.up = nil
	}
	return n
}

// abort drops every upload not committed.
func (s *streamer) abort(ctx context.Context) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for _, st := range s.uploads {
		if st.up != nil {
			st.up.Abort(ctx)
			st.up = nil
		}
	}
}

package lazypull

import (
	"sync"
	"time"

	"github.com/opencontainers/go-digest"
)

// BackgroundFetchStatus tells when the background fetch of a lazily
// mounted layer ran (LayerStatus.BackgroundFetch), for timelines of a
// build: stargz's fetch of the whole layer into the cache, walking it
// file by file.
type BackgroundFetchStatus struct {
	// Started is when the fetch began its walk of the layer.
	Started time.Time `json:"started"`
	// LastRead is when its latest read (a chunk fetched and decompressed
	// into the cache) ended; zero when none did.
	LastRead time.Time `json:"last_read,omitzero"`
	// Finished is when the fetch ended: its walk was over (done, or
	// declined because the export guard holds the blob) and no read of
	// it was running; zero while it runs.
	Finished time.Time `json:"finished,omitzero"`
	// Reads counts its reads.
	Reads int64 `json:"reads"`
	// Declined is true when the walk stopped early because the export
	// guard holds the layer's blob.
	Declined bool `json:"declined,omitempty"`
}

// bgTimes records, per TOC digest, when background fetches ran. Its zero
// value is ready to use.
type bgTimes struct {
	mu    sync.Mutex
	spans map[digest.Digest]*bgSpan
}

type bgSpan struct {
	st       BackgroundFetchStatus
	walked   time.Time // when the walk of the root ended
	inFlight int
}

func (t *bgTimes) span(toc digest.Digest) *bgSpan {
	if t.spans == nil {
		t.spans = map[digest.Digest]*bgSpan{}
	}
	s := t.spans[toc]
	if s == nil {
		s = &bgSpan{}
		t.spans[toc] = s
	}
	return s
}

// started records that the background fetch of toc began at now; a later
// start of the same TOC (another mount of it) keeps the first.
func (t *bgTimes) started(toc digest.Digest, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if s := t.span(toc); s.st.Started.IsZero() {
		s.st.Started = now
	}
}

// readStarted and readDone bracket one read of the fetch of toc.
func (t *bgTimes) readStarted(toc digest.Digest) {
	t.mu.Lock()
	t.span(toc).inFlight++
	t.mu.Unlock()
}

func (t *bgTimes) readDone(toc digest.Digest, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.span(toc)
	s.inFlight--
	s.st.Reads++
	if now.After(s.st.LastRead) {
		s.st.LastRead = now
	}
}

// walked records that the walk of toc's layer ended at now.
func (t *bgTimes) walked(toc digest.Digest, now time.Time) {
	t.mu.Lock()
	t.span(toc).walked = now
	t.mu.Unlock()
}

// declined records that the walk of toc's layer stopped early.
func (t *bgTimes) declined(toc digest.Digest) {
	t.mu.Lock()
	t.span(toc).st.Declined = true
	t.mu.Unlock()
}

// status returns when the fetch of toc ran; nil when it never started.
func (t *bgTimes) status(toc digest.Digest) *BackgroundFetchStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	s, ok := t.spans[toc]
	if !ok || s.st.Started.IsZero() {
		return nil
	}
	st := s.st
	if !s.walked.IsZero() && s.inFlight == 0 {
		st.Finished = s.walked
		if st.LastRead.After(st.Finished) {
			st.Finished = st.LastRead
		}
	}
	return &st
}

// forget drops what was recorded of toc.
func (t *bgTimes) forget(toc digest.Digest) {
	t.mu.Lock()
	delete(t.spans, toc)
	t.mu.Unlock()
}

// fetchStatus returns when the background fetch of the layer mounted at
// mp ran; nil when it did not start or mp is unknown.
func (b *backgroundFetch) fetchStatus(mp string) *BackgroundFetchStatus {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	m, ok := b.mounts[mp]
	b.mu.Unlock()
	if !ok {
		return nil
	}
	return b.times.status(m.toc)
}

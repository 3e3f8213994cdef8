package exportguard

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/internal/cpuacct"
)

// PromoteAfterBytes is how many bytes of a layer's blob the lazy filesystem
// may fetch from the registry before a BlobSource promotes it (see
// Trigger.Promote): the guard stops waiting for its delay and materializes
// the blob at once. A first command's
// on-demand reads stay under it (`go version` on the golang-like image
// reads about 14 MB with passthrough), so its link is not shared with a
// whole-blob transfer; a build crosses it within seconds, and from then on
// the guard's single transfer serves the rest.
const PromoteAfterBytes = 24 << 20

// readBuffer is the size of the reads a local blob is served with.
const readBuffer = 1 << 20

// Sources of the bytes a BlobSource counts.
const (
	sourceLocal  = "local"  // read from a verified blob in the content store
	sourceRemote = "remote" // fetched from the registry
)

// BlobSource lets a lazy filesystem read a layer's blob from the local,
// verified copy the export guard committed to containerd's content store,
// so that each blob crosses the network at most once per builder: the
// guard's transfer also serves the filesystem's background fill and the
// on-demand reads that come after it.
//
// Only committed blobs are served locally. A transfer under way is neither
// verified (the digest is known only at the end) nor readable through
// containerd's content API (an ingest has no ReaderAt), so reads of a blob
// still streaming in go to the registry. A layer of a "lazy" image whose
// blob the filesystem starts fetching in earnest (PromoteAfterBytes) is
// handed to the guard at once instead of after guard.delay, which keeps
// those duplicate bytes small.
//
// A lazy filesystem's registry hosts are built before the export guard:
// the source starts with no local blobs, and the guard is attached to it
// when it starts (Attach). Its HTTP clients read through Transport.
type BlobSource struct {
	mu      sync.RWMutex
	local   BlobOpener
	promote func(digest.Digest)
	remote  map[digest.Digest]int64 // registry bytes per blob

	bytes    *prometheus.CounterVec
	requests *prometheus.CounterVec
}

// NewBlobSource returns a BlobSource with no local blobs.
func NewBlobSource() *BlobSource {
	return &BlobSource{
		remote: map[digest.Digest]int64{},
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazybase", Subsystem: "blobsource", Name: "bytes_total",
			Help: "Layer blob bytes the lazy filesystem read, by source: local (a verified blob the export guard committed to the content store) or remote (the registry).",
		}, []string{"source"}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazybase", Subsystem: "blobsource", Name: "requests_total",
			Help: "Layer blob requests of the lazy filesystem, by source (local or remote).",
		}, []string{"source"}),
	}
}

// Attach makes local (Trigger.LocalBlob) the source of local blobs and
// promote (Trigger.Promote) the hook for blobs the filesystem fetches in
// earnest (PromoteAfterBytes); it registers the metrics
// (lazybase_blobsource_bytes_total and _requests_total) on reg, once.
func (s *BlobSource) Attach(local BlobOpener, promote func(digest.Digest), reg prometheus.Registerer) error {
	if reg != nil {
		for _, c := range []prometheus.Collector{s.bytes, s.requests} {
			if err := reg.Register(c); err != nil {
				var are prometheus.AlreadyRegisteredError
				if !errors.As(err, &are) {
					return fmt.Errorf("registering blob source metrics: %w", err)
				}
			}
		}
	}
	s.mu.Lock()
	s.local, s.promote = local, promote
	s.remote = map[digest.Digest]int64{}
	s.mu.Unlock()
	return nil
}

// Detach stops serving local blobs.
func (s *BlobSource) Detach() {
	s.mu.Lock()
	s.local, s.promote = nil, nil
	s.mu.Unlock()
}

// Attached reports whether s serves local blobs (between Attach and
// Detach).
func (s *BlobSource) Attached() bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.local != nil
}

// open returns the local copy of dgst, if any.
func (s *BlobSource) open(ctx context.Context, dgst digest.Digest) (content.ReaderAt, bool) {
	s.mu.RLock()
	local := s.local
	s.mu.RUnlock()
	if local == nil {
		return nil, false
	}
	return local(ctx, dgst)
}

// fetched counts n bytes of dgst from the registry, and promotes dgst once
// PromoteAfterBytes of it came that way.
func (s *BlobSource) fetched(dgst digest.Digest, n int64) {
	s.bytes.WithLabelValues(sourceRemote).Add(float64(n))
	s.mu.Lock()
	before := s.remote[dgst]
	s.remote[dgst] = before + n
	fire := before < PromoteAfterBytes && before+n >= PromoteAfterBytes
	promote := s.promote
	s.mu.Unlock()
	if fire && promote != nil {
		promote(dgst)
	}
}

// Transport returns next with blob reads served from s's local copies
// (nil next is http.DefaultTransport). A transport that already is a
// BlobTransport is returned as it is: a blob read is counted and served
// once.
func (s *BlobSource) Transport(next http.RoundTripper) http.RoundTripper {
	if _, done := next.(*BlobTransport); done {
		return next
	}
	if next == nil {
		next = http.DefaultTransport
	}
	return &BlobTransport{Next: next, Source: s}
}

// BlobTransport answers GET and HEAD of /v2/<name>/blobs/<digest> from a
// local verified copy of the blob when there is one, as a registry would
// (200, or 206 for one range or multipart/byteranges for several), and
// sends every other request on.
type BlobTransport struct {
	// Next is where every request goes that Source does not answer.
	Next http.RoundTripper
	// Source holds the local blobs and counts the bytes read.
	Source *BlobSource
}

var _ http.RoundTripper = (*BlobTransport)(nil)

// RoundTrip implements http.RoundTripper.
func (t *BlobTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	dgst, ok := blobDigest(req.URL.Path)
	if !ok || (req.Method != http.MethodGet && req.Method != http.MethodHead) {
		return t.Next.RoundTrip(req)
	}
	if ra, ok := t.Source.open(req.Context(), dgst); ok {
		resp, err := t.serveLocal(req, dgst, ra)
		if err == nil {
			t.Source.requests.WithLabelValues(sourceLocal).Inc()
			return resp, nil
		}
		ra.Close()
		log.G(req.Context()).WithError(err).WithField("digest", dgst).Debug("blob source: local copy not used; asking the registry")
	}
	resp, err := t.Next.RoundTrip(req)
	if err != nil || req.Method != http.MethodGet {
		return resp, err
	}
	if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusPartialContent {
		t.Source.requests.WithLabelValues(sourceRemote).Inc()
		// The CPU account charges the bytes to the activity (TOC check,
		// on-demand read, background fetch) whose span made the request.
		act, inSpan := cpuacct.Default.Current()
		resp.Body = &countingBody{ReadCloser: resp.Body, count: func(n int64) {
			t.Source.fetched(dgst, n)
			if inSpan {
				cpuacct.Default.AddFetched(act, n)
			} else {
				cpuacct.Default.AddFetchedOther(n)
			}
		}}
	}
	return resp, nil
}

// blobDigest returns the digest of a blob URL path "/v2/<name>/blobs/<digest>".
func blobDigest(path string) (digest.Digest, bool) {
	i := strings.LastIndex(path, "/blobs/")
	if i < 0 || !strings.HasPrefix(path, "/v2/") {
		return "", false
	}
	d, err := digest.Parse(path[i+len("/blobs/"):])
	if err != nil {
		return "", false
	}
	return d, true
}

// byteRange is an inclusive range of bytes.
type byteRange struct{ first, last int64 }

func (r byteRange) len() int64 { return r.last - r.first + 1 }

// parseRanges parses a "bytes=a-b,c-,-n" Range header against a blob of
// size bytes. ok is false for a header it cannot satisfy exactly; the
// registry then answers.
func parseRanges(h string, size int64) (rs []byteRange, ok bool) {
	spec, found := strings.CutPrefix(strings.TrimSpace(h), "bytes=")
	if !found {
		return nil, false
	}
	for _, part := range strings.Split(spec, ",") {
		a, b, found := strings.Cut(strings.TrimSpace(part), "-")
		if !found {
			return nil, false
		}
		var r byteRange
		switch {
		case a == "": // suffix: the last b bytes
			n, err := strconv.ParseInt(b, 10, 64)
			if err != nil || n <= 0 {
				return nil, false
			}
			r = byteRange{max(size-n, 0), size - 1}
		default:
			first, err := strconv.ParseInt(a, 10, 64)
			if err != nil || first < 0 {
				return nil, false
			}
			last := size - 1
			if b != "" {
				if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
					return nil, false
				}
				last = min(last, size-1)
			}
			r = byteRange{first, last}
		}
		if r.first >= size || r.last < r.first {
			return nil, false
		}
		rs = append(rs, r)
	}
	return rs, len(rs) > 0
}

// serveLocal answers req from ra, which it closes with the response body.
func (t *BlobTransport) serveLocal(req *http.Request, dgst digest.Digest, ra content.ReaderAt) (*http.Response, error) {
	size := ra.Size()
	resp := &http.Response{
		Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
		Header:  http.Header{},
		Request: req,
	}
	resp.Header.Set("Docker-Content-Digest", dgst.String())
	resp.Header.Set("Accept-Ranges", "bytes")
	status := func(code int) {
		resp.StatusCode = code
		resp.Status = fmt.Sprintf("%d %s", code, http.StatusText(code))
	}
	count := func(n int64) { t.Source.bytes.WithLabelValues(sourceLocal).Add(float64(n)) }
	var ranges []byteRange
	if h := req.Header.Get("Range"); h != "" {
		var ok bool
		if ranges, ok = parseRanges(h, size); !ok {
			return nil, fmt.Errorf("range %q of %d bytes", h, size)
		}
	}
	switch {
	case req.Method == http.MethodHead || len(ranges) == 0:
		status(http.StatusOK)
		resp.Header.Set("Content-Type", "application/octet-stream")
		resp.ContentLength = size
		resp.Header.Set("Content-Length", strconv.FormatInt(size, 10))
		if req.Method == http.MethodHead {
			ra.Close()
			resp.Body = http.NoBody
			return resp, nil
		}
		resp.Body = &countingBody{ReadCloser: readerAtBody(ra, 0, size), count: count}
	case len(ranges) == 1:
		r := ranges[0]
		status(http.StatusPartialContent)
		resp.Header.Set("Content-Type", "application/octet-stream")
		resp.Header.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", r.first, r.last, size))
		resp.ContentLength = r.len()
		resp.Header.Set("Content-Length", strconv.FormatInt(r.len(), 10))
		resp.Body = &countingBody{ReadCloser: readerAtBody(ra, r.first, r.len()), count: count}
	default:
		status(http.StatusPartialContent)
		pr, pw := io.Pipe()
		mw := multipart.NewWriter(pw)
		resp.Header.Set("Content-Type", "multipart/byteranges; boundary="+mw.Boundary())
		resp.ContentLength = -1
		go func() {
			defer ra.Close()
			for _, r := range ranges {
				h := textproto.MIMEHeader{}
				h.Set("Content-Type", "application/octet-stream")
				h.Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", r.first, r.last, size))
				part, err := mw.CreatePart(h)
				if err != nil {
					pw.CloseWithError(err)
					return
				}
				n, err := io.CopyBuffer(part, io.NewSectionReader(ra, r.first, r.len()), make([]byte, min(r.len(), readBuffer)))
				count(n)
				if err != nil {
					pw.CloseWithError(fmt.Errorf("reading blob %s at %d: %w", dgst, r.first, err))
					return
				}
			}
			pw.CloseWithError(mw.Close())
		}()
		resp.Body = pr
	}
	return resp, nil
}

// readerAtBody is a response body reading n bytes of ra from off; closing
// it closes ra.
func readerAtBody(ra content.ReaderAt, off, n int64) io.ReadCloser {
	// Through a large buffer: each ReadAt of containerd's content proxy is
	// a gRPC call.
	return struct {
		io.Reader
		io.Closer
	}{bufio.NewReaderSize(io.NewSectionReader(ra, off, n), int(min(n, readBuffer))), ra}
}

// countingBody reports the bytes read through it.
type countingBody struct {
	io.ReadCloser
	count func(int64)
}

func (b *countingBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if n > 0 {
		b.count(int64(n))
	}
	return n, err
}

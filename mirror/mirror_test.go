package mirror

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
)

// server is an in-process registry behind a counting, fault-injecting
// handler.
type server struct {
	*httptest.Server
	host string

	mu        sync.Mutex
	blobGets  map[string]int // digest -> GETs
	manifests int            // GET/HEAD of manifests
	requests  int
	writes    int                          // PUT, POST, PATCH and DELETE requests
	fault     func(r *http.Request) string // "", "503", "429", "reset", "truncate", "corrupt"
	faulted   int
}

func newServer(t testing.TB, opts ...registry.Option) *server {
	t.Helper()
	s := &server{blobGets: map[string]int{}}
	inner := registry.New(append([]registry.Option{registry.Logger(log.New(io.Discard, "", 0))}, opts...)...)
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.requests++
		switch r.Method {
		case http.MethodPut, http.MethodPost, http.MethodPatch, http.MethodDelete:
			s.writes++
		}
		if i := strings.Index(r.URL.Path, "/blobs/sha256:"); i >= 0 && r.Method == http.MethodGet {
			s.blobGets[r.URL.Path[i+len("/blobs/"):]]++
		}
		if strings.Contains(r.URL.Path, "/manifests/") && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
			s.manifests++
		}
		var f string
		if s.fault != nil {
			f = s.fault(r)
		}
		if f != "" {
			s.faulted++
		}
		s.mu.Unlock()
		switch f {
		case "503":
			http.Error(w, "injected", http.StatusServiceUnavailable)
			return
		case "429":
			w.Header().Set("Retry-After", "1")
			http.Error(w, "injected", http.StatusTooManyRequests)
			return
		case "truncate":
			// Half the body, then the connection drops.
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, r)
			body := rec.Body.Bytes()
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.Header().Set("Content-Length", fmt.Sprint(len(body)))
			w.WriteHeader(rec.Code)
			w.Write(body[:len(body)/2])
			w.(http.Flusher).Flush()
			panic(http.ErrAbortHandler)
		case "corrupt":
			// The whole body, its last byte flipped.
			rec := httptest.NewRecorder()
			inner.ServeHTTP(rec, r)
			body := rec.Body.Bytes()
			if len(body) > 0 {
				body[len(body)-1] ^= 0xff
			}
			for k, v := range rec.Header() {
				w.Header()[k] = v
			}
			w.WriteHeader(rec.Code)
			w.Write(body)
			return
		case "reset":
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					c.Close()
					return
				}
			}
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(s.Close)
	s.host = strings.TrimPrefix(s.URL, "http://")
	return s
}

func (s *server) counts() (requests, manifests int, blobGets map[string]int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := map[string]int{}
	for k, v := range s.blobGets {
		m[k] = v
	}
	return s.requests, s.manifests, m
}

// puts returns how many write requests the server had.
func (s *server) puts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writes
}

func (s *server) reset() {
	s.mu.Lock()
	s.requests, s.manifests, s.writes, s.blobGets = 0, 0, 0, map[string]int{}
	s.mu.Unlock()
}

// imageSet pushes ten images to src: five tags in each of lib/a and lib/b.
// Every image holds the shared base layer; lib/b's images also hold a
// second shared layer; each has a small unique layer. It returns the
// distinct source layer digests.
func imageSet(t testing.TB, src *server, baseSize int) map[v1.Hash]bool {
	t.Helper()
	base, err := testimage.EntriesLayer(testimage.Files("usr/lib/base.bin", pseudoRandom(1, baseSize), "etc/os-release", "ID=test\n"))
	if err != nil {
		t.Fatal(err)
	}
	mid, err := testimage.EntriesLayer(testimage.Files("usr/lib/b/mid.txt", strings.Repeat("shared b\n", 2000)))
	if err != nil {
		t.Fatal(err)
	}
	layers := map[v1.Hash]bool{}
	for _, l := range []v1.Layer{base, mid} {
		d, _ := l.Digest()
		layers[d] = true
	}
	for i := range 10 {
		repo := "lib/a"
		ls := []v1.Layer{base}
		if i >= 5 {
			repo = "lib/b"
			ls = append(ls, mid)
		}
		u, err := testimage.EntriesLayer(testimage.Files("app/unique.txt", fmt.Sprintf("image %d\n", i)))
		if err != nil {
			t.Fatal(err)
		}
		d, _ := u.Digest()
		layers[d] = true
		ls = append(ls, u)
		img, err := testimage.Image(testimage.LinuxAMD64, ls...)
		if err != nil {
			t.Fatal(err)
		}
		ref, err := name.ParseReference(fmt.Sprintf("%s/%s:1.%d", src.host, repo, i%5))
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, img); err != nil {
			t.Fatal(err)
		}
	}
	return layers
}

// pseudoRandom returns n deterministic, poorly compressible bytes.
func pseudoRandom(seed uint64, n int) string {
	b := make([]byte, n)
	x := seed*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	return string(b)
}

func testConfig(t testing.TB, src, dst *server, extra string) *Config {
	t.Helper()
	doc := fmt.Sprintf(`
destination = "%s/mirror"
concurrency = 2
retry_initial = "5ms"
retry_max = "20ms"
%s
[[source]]
repository = "%s/lib/a"
[[source]]
repository = "%s/lib/b"
tags = ["1.*"]
`, dst.host, extra, src.host, src.host)
	c, err := ParseConfig([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// testToken is the serve token of test servers.
var testToken = []byte("test-serve-token-0123456789abcdef")

// testRecordKey is the record key of test mirrors.
var testRecordKey = []byte("test-record-key-0123456789abcdef")

func newMirror(t testing.TB, c *Config, opts ...Option) *Mirror {
	t.Helper()
	opts = append([]Option{
		WithKeychain(authn.NewMultiKeychain()),
		WithRecordKey(testRecordKey),
		WithOperationBackoff(remote.Backoff{Duration: 10 * time.Millisecond, Factor: 2, Steps: 3}),
	}, opts...)
	m, err := New(c, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func TestMirrorSharedLayersOnceThenSkip(t *testing.T) {
	ctx := context.Background()
	src, dst := newServer(t), newServer(t)
	layers := imageSet(t, src, 256<<10)
	src.reset()

	m := newMirror(t, testConfig(t, src, dst, ""))
	start := time.Now()
	rep, err := m.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("first run: %d images in %v", len(rep.Images), time.Since(start))
	if rep.Converted != 10 || !rep.OK() {
		t.Fatalf("first run: %+v", rep)
	}
	if got := m.Stats().Converted; got != int64(len(layers)) {
		t.Errorf("converter converted %d layers, want %d (each unique layer once)", got, len(layers))
	}
	if rep.Layers.Converted != int64(len(layers)) || rep.Layers.RecordWriteFailures != 0 {
		t.Errorf("layer counts %+v, want %d converted", rep.Layers, len(layers))
	}
	_, _, gets := src.counts()
	for d := range layers {
		if gets[d.String()] != 1 {
			t.Errorf("source blob %s read %d times, want 1", d, gets[d.String()])
		}
	}
	// Every destination is a valid image, byte-identical to what
	// convert.Image makes of the source.
	conv, err := convert.New()
	if err != nil {
		t.Fatal(err)
	}
	defer conv.Close()
	for _, ir := range rep.Images {
		dref, _ := name.ParseReference(ir.Destination)
		img, err := remote.Image(dref)
		if err != nil {
			t.Fatal(err)
		}
		if err := validate.Image(img); err != nil {
			t.Errorf("%s: %v", ir.Destination, err)
		}
		sref, _ := name.ParseReference(ir.Source)
		simg, err := remote.Image(sref)
		if err != nil {
			t.Fatal(err)
		}
		want, err := conv.Image(ctx, simg)
		if err != nil {
			t.Fatal(err)
		}
		if ir.Digest != want.Digest.String() {
			t.Errorf("%s: mirror wrote %s, convert.Image makes %s", ir.Source, ir.Digest, want.Digest)
		}
	}

	// Second run, as a new process: nothing converted, per image one
	// destination manifest request and one for the published prefetch
	// profiles (the referrers tag-schema fallback: this registry has no
	// referrers API).
	dst.reset()
	src.reset()
	m2 := newMirror(t, testConfig(t, src, dst, ""))
	start = time.Now()
	rep2, err := m2.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("second run: %d images skipped in %v", rep2.Skipped, time.Since(start))
	if rep2.Skipped != 10 || !rep2.OK() {
		t.Fatalf("second run: %+v", rep2)
	}
	if s := m2.Stats(); s.Converted != 0 || s.BlobReads != 0 {
		t.Errorf("second run converted: %+v", s)
	}
	reqs, manifests, _ := dst.counts()
	if manifests != 20 {
		t.Errorf("second run made %d destination manifest requests, want 20", manifests)
	}
	sreqs, smanifests, sgets := src.counts()
	t.Logf("second run requests: destination %d (%d manifests), source %d (%d manifests, %d blob GETs)", reqs, manifests, sreqs, smanifests, len(sgets))
	if len(sgets) != 0 {
		t.Errorf("second run read source blobs: %v", sgets)
	}
}

func TestMirrorRecordsResumeAfterKill(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	layers := imageSet(t, src, 64<<10)

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var once sync.Once
	c := testConfig(t, src, dst, "")
	c.Concurrency = 1
	m1 := newMirror(t, c, WithImageDone(func(ImageReport) { once.Do(cancel) }))
	rep1, err := m1.Run(ctx)
	if err == nil {
		t.Fatal("killed run reported no error")
	}
	if rep1.Converted < 1 || rep1.Converted == 10 {
		t.Fatalf("killed run converted %d images", rep1.Converted)
	}
	first := m1.Stats().Converted
	t.Logf("killed run: %d converted, %d failed, %d layers converted", rep1.Converted, rep1.Failed, first)

	// Tags of the killed run point only to complete images.
	for _, ir := range rep1.Images {
		dref, _ := name.ParseReference(ir.Destination)
		img, err := remote.Image(dref)
		if ir.Status != StatusConverted {
			if err == nil {
				t.Errorf("%s: tagged though not converted", ir.Destination)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if err := validate.Image(img); err != nil {
			t.Errorf("%s: %v", ir.Destination, err)
		}
	}

	m2 := newMirror(t, testConfig(t, src, dst, ""))
	rep2, err := m2.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !rep2.OK() || rep2.Converted+rep2.Skipped != 10 || rep2.Skipped != rep1.Converted {
		t.Fatalf("resumed run: %+v", rep2)
	}
	second := m2.Stats().Converted
	if first+second != int64(len(layers)) {
		t.Errorf("layers converted %d + %d, want %d in all (no duplicate work)", first, second, len(layers))
	}
	if rep2.Layers.FromRecords == 0 {
		t.Errorf("resumed run used no conversion records: %+v", rep2.Layers)
	}
}

func TestMirrorRecordsAcrossMachines(t *testing.T) {
	// A second worker mirroring other tags finds the shared layers'
	// records and converts only its own unique layers.
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 64<<10)
	ca := testConfig(t, src, dst, "")
	ca.Sources = ca.Sources[:1] // lib/a only
	ma := newMirror(t, ca)
	if rep, err := ma.Run(context.Background()); err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	cb := testConfig(t, src, dst, "")
	cb.Sources = cb.Sources[1:] // lib/b only
	mb := newMirror(t, cb)
	dst.reset()
	rep, err := mb.Run(context.Background())
	if err != nil || !rep.OK() || rep.Converted != 5 {
		t.Fatalf("%v %+v", err, rep)
	}
	// Reusing a record costs a manifest GET and a blob HEAD: no blob is
	// downloaded from the mirror.
	if _, _, gets := dst.counts(); len(gets) != 0 {
		t.Errorf("blobs downloaded from the mirror registry: %v", gets)
	}
	// lib/b converts its shared mid layer and five unique layers; the
	// base layer comes from lib/a's record.
	if got := mb.Stats().Converted; got != 6 {
		t.Errorf("second worker converted %d layers, want 6", got)
	}
	if rep.Layers.FromRecords != 1 {
		t.Errorf("second worker took %d layers from records, want 1", rep.Layers.FromRecords)
	}
}

func TestMirrorConvergesUnderFaults(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 64<<10)
	// The first request for each method+path fails, in turn with 503, 429
	// (Retry-After: 1) and a connection reset; a 429 is given at most
	// twice to keep the test short. PATCH (streamed uploads) is spared. On
	// the source, the first GET of each blob is cut off halfway through
	// its body instead, which fails the conversion and so the image's
	// attempt: the image is tried again.
	inject := func(truncate bool) func(r *http.Request) string {
		seen := map[string]bool{}
		n, n429 := 0, 0
		return func(r *http.Request) string {
			k := r.Method + " " + r.URL.Path
			if r.Method == http.MethodPatch || r.URL.Path == "/v2/" || seen[k] {
				return ""
			}
			seen[k] = true
			if truncate && r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
				return "truncate"
			}
			n++
			switch n % 3 {
			case 0:
				return "503"
			case 1:
				if n429 < 2 {
					n429++
					return "429"
				}
				return "503"
			}
			return "reset"
		}
	}
	src.mu.Lock()
	src.fault = inject(true)
	src.mu.Unlock()
	dst.mu.Lock()
	dst.fault = inject(false)
	dst.mu.Unlock()
	m := newMirror(t, testConfig(t, src, dst, "image_attempts = 5"))
	start := time.Now()
	rep, err := m.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() || rep.Converted != 10 {
		for _, ir := range rep.Images {
			t.Logf("%s: %s %s", ir.Source, ir.Status, ir.Reason)
		}
		t.Fatalf("run under faults: %+v", rep)
	}
	src.mu.Lock()
	sf := src.faulted
	src.mu.Unlock()
	dst.mu.Lock()
	df := dst.faulted
	dst.mu.Unlock()
	attempts := 0
	for _, ir := range rep.Images {
		attempts += ir.Attempts
	}
	t.Logf("converged in %v with %d HTTP retries and %d image attempts (%d source, %d destination faults)", time.Since(start), rep.Retries, attempts, sf, df)
	if attempts <= 10 {
		t.Errorf("truncated blobs caused no second attempt")
	}
	if got := m.Stats().Converted; got != rep.Layers.Converted || got != 12 {
		t.Errorf("converted %d layers (report %d), want 12: failed conversions are not counted and each layer succeeds once", got, rep.Layers.Converted)
	}
	if sf == 0 || df == 0 || rep.Retries == 0 {
		t.Errorf("faults %d/%d retries %d: injection did not happen", sf, df, rep.Retries)
	}
	dst.mu.Lock()
	dst.fault = nil
	dst.mu.Unlock()
	for _, ir := range rep.Images {
		dref, _ := name.ParseReference(ir.Destination)
		img, err := remote.Image(dref)
		if err != nil {
			t.Fatal(err)
		}
		if err := validate.Image(img); err != nil {
			t.Errorf("%s: %v", ir.Destination, err)
		}
	}
}

func TestMirrorOneFailureDoesNotStopOthers(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	// lib/a:1.2's manifest always fails.
	src.mu.Lock()
	src.fault = func(r *http.Request) string {
		if strings.HasSuffix(r.URL.Path, "/lib/a/manifests/1.2") {
			return "503"
		}
		return ""
	}
	src.mu.Unlock()
	c := testConfig(t, src, dst, "retries = 1\nimage_attempts = 1")
	m := newMirror(t, c, WithOperationBackoff(remote.Backoff{Duration: time.Millisecond, Steps: 1}))
	rep, err := m.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Failed != 1 || rep.Converted != 9 {
		t.Fatalf("%+v", rep)
	}
	for _, ir := range rep.Images {
		if ir.Status == StatusFailed && (!strings.HasSuffix(ir.Source, "lib/a:1.2") || ir.Reason == "") {
			t.Errorf("unexpected failure %+v", ir)
		}
	}
}

func TestShardsCoverEveryImageOnce(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 1024)
	const n = 3
	seen := map[string]int{}
	total := 0
	for i := range n {
		m := newMirror(t, testConfig(t, src, dst, ""), WithShard(Shard{Index: i, Count: n}))
		jobs, errs := m.Plan(context.Background())
		if len(errs) > 0 {
			t.Fatal(errs)
		}
		for _, j := range jobs {
			seen[j.Source]++
		}
		total += len(jobs)
	}
	if total != 10 || len(seen) != 10 {
		t.Fatalf("%d jobs over %d distinct images, want 10 and 10: %v", total, len(seen), seen)
	}
	for s, c := range seen {
		if c != 1 {
			t.Errorf("%s planned %d times", s, c)
		}
	}
}

func tinyImage(t testing.TB) v1.Image {
	t.Helper()
	l, err := testimage.EntriesLayer(testimage.Files("a", "b"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := testimage.Image(testimage.LinuxAMD64, l)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

package shaper

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/internal/eventually"
)

// setup starts an in-process registry holding one random image, and a proxy
// in front of it.
func setup(t *testing.T, opts ...Option) (*Proxy, v1.Image, name.Reference) {
	t.Helper()
	reg := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(reg.Close)
	p, err := New(reg.URL, opts...)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	img, err := random.Image(256<<10, 2)
	if err != nil {
		t.Fatal(err)
	}
	direct, err := name.ParseReference(strings.TrimPrefix(reg.URL, "http://") + "/test/img:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(direct, img); err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(p.Addr() + "/test/img:v1")
	if err != nil {
		t.Fatal(err)
	}
	return p, img, ref
}

func get(t *testing.T, url, rng string) []byte {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode/100 != 2 {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	return b
}

func TestCountsBlobsAndRanges(t *testing.T) {
	p, img, ref := setup(t)
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	dgst, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	url := fmt.Sprintf("http://%s/v2/test/img/blobs/%s", p.Addr(), dgst)

	// A pull through the proxy fetches the manifest, config and each layer once.
	pulled, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		pl, err := pulled.LayerByDigest(d)
		if err != nil {
			t.Fatal(err)
		}
		rc, err := pl.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(io.Discard, rc); err != nil {
			t.Fatal(err)
		}
		rc.Close()
	}
	st := p.Stats()
	if st.Manifests < 1 {
		t.Errorf("manifests = %d, want at least 1", st.Manifests)
	}
	for _, l := range layers {
		d, _ := l.Digest()
		sz, _ := l.Size()
		b := st.Blob(d.String())
		if b.GETs != 1 || b.FullGETs != 1 || b.Bytes != sz || b.Covered() != sz || b.Repeated() != 0 {
			t.Errorf("layer %s: %+v (covered %d), want one full GET of %d bytes", d, b, b.Covered(), sz)
		}
	}

	// Ranges: the first kilobyte, then an overlapping one, then the tail.
	m := p.Mark()
	p.SetPhase("ranges")
	if n := len(get(t, url, "bytes=0-1023")); n != 1024 {
		t.Fatalf("range body = %d bytes", n)
	}
	get(t, url, "bytes=512-2047")
	get(t, url, fmt.Sprintf("bytes=%d-%d", size-100, size-1))
	st = p.Since(m)
	b := st.Blob(dgst.String())
	if b.GETs != 3 || b.RangeGETs != 3 || b.FullGETs != 0 {
		t.Errorf("range GETs: %+v", b)
	}
	if b.Size != size {
		t.Errorf("size from Content-Range = %d, want %d", b.Size, size)
	}
	if want := int64(1024 + 1536 + 100); b.Bytes != want {
		t.Errorf("bytes = %d, want %d", b.Bytes, want)
	}
	if want := int64(2048 + 100); b.Covered() != want {
		t.Errorf("covered = %d, want %d", b.Covered(), want)
	}
	if got, want := st.Coverage(dgst.String(), size), float64(2148)/float64(size); got != want {
		t.Errorf("coverage = %v, want %v", got, want)
	}
	if got := p.StatsFor("ranges").Blob(dgst.String()).GETs; got != 3 {
		t.Errorf("phase ranges GETs = %d, want 3", got)
	}
	if got := len(p.Since(p.Mark()).Fetched()); got != 0 {
		t.Errorf("nothing fetched since a fresh mark, got %d blobs", got)
	}
	p.Reset()
	if st := p.Stats(); st.Requests != 0 {
		t.Errorf("after reset: %d requests", st.Requests)
	}
}

func TestBandwidthLimitsBlobDownloads(t *testing.T) {
	const rate = 1 << 20 // 1 MiB/s
	p, img, _ := setup(t, WithBandwidth(rate))
	layers, _ := img.Layers()
	dgst, _ := layers[0].Digest()
	size, _ := layers[0].Size()
	start := time.Now()
	get(t, fmt.Sprintf("http://%s/v2/test/img/blobs/%s", p.Addr(), dgst), "")
	took := time.Since(start)
	// The bucket starts full (64 KiB burst); the rest goes at the rate.
	want := time.Duration(float64(size-(64<<10)) / rate * float64(time.Second))
	if took < want*9/10 {
		t.Errorf("%d bytes at %d B/s took %s, want at least %s", size, rate, took, want)
	}
	if took > want*3 {
		t.Errorf("%d bytes at %d B/s took %s, want about %s", size, rate, took, want)
	}

	p.SetBandwidth(0)
	start = time.Now()
	get(t, fmt.Sprintf("http://%s/v2/test/img/blobs/%s", p.Addr(), dgst), "")
	if took := time.Since(start); took > want/2 {
		t.Errorf("unlimited fetch took %s", took)
	}
}

func TestRTTDelaysEveryRequest(t *testing.T) {
	const rtt = 80 * time.Millisecond
	p, _, ref := setup(t, WithRTT(rtt))
	start := time.Now()
	for range 3 {
		if _, err := remote.Head(ref); err != nil {
			t.Fatal(err)
		}
	}
	took := time.Since(start)
	if took < 3*rtt {
		t.Errorf("3 requests with %s RTT took %s", rtt, took)
	}
	for _, e := range p.Events() {
		if e.Duration < rtt {
			t.Errorf("%s %s took %s, less than the RTT", e.Method, e.Path, e.Duration)
		}
	}
	p.SetRTT(0)
	start = time.Now()
	if _, err := remote.Head(ref); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took >= rtt {
		t.Errorf("request without RTT took %s", took)
	}
}

func TestCancelledDownloadCountsSentBytes(t *testing.T) {
	p, img, _ := setup(t, WithBandwidth(256<<10))
	layers, _ := img.Layers()
	dgst, _ := layers[0].Digest()
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s/v2/test/img/blobs/%s", p.Addr(), dgst), nil)
	resp, err := http.DefaultClient.Do(req)
	if err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	// Wait for the proxy to record the aborted request.
	eventually.Require(t, 5*time.Second, "the proxy's record of the aborted GET", func() error {
		if b := p.Stats().Blob(dgst.String()); b.GETs == 0 {
			return fmt.Errorf("no GET of %s recorded: %+v", dgst, b)
		}
		return nil
	})
	b := p.Stats().Blob(dgst.String())
	size, _ := layers[0].Size()
	if b.GETs != 1 || b.Bytes <= 0 || b.Bytes >= size {
		t.Errorf("aborted GET: %+v, want 0 < bytes < %d", b, size)
	}
	if b.Covered() != b.Bytes {
		t.Errorf("covered %d != bytes %d", b.Covered(), b.Bytes)
	}
}

func TestParsePath(t *testing.T) {
	for _, c := range []struct {
		path string
		repo string
		kind Kind
		ref  string
	}{
		{"/v2/", "", KindOther, ""},
		{"/v2/library/golang/blobs/sha256:abc", "library/golang", KindBlob, "sha256:abc"},
		{"/v2/a/blobs/b/blobs/sha256:1", "a/blobs/b", KindBlob, "sha256:1"},
		{"/v2/debian/manifests/gzip", "debian", KindManifest, "gzip"},
		{"/v2/debian/blobs/uploads/5a7c", "", KindOther, ""},
		{"/v2/debian/tags/list", "", KindOther, ""},
	} {
		repo, kind, ref := parsePath(c.path)
		if repo != c.repo || kind != c.kind || ref != c.ref {
			t.Errorf("parsePath(%q) = %q %q %q, want %q %q %q", c.path, repo, kind, ref, c.repo, c.kind, c.ref)
		}
	}
}

func TestParseRange(t *testing.T) {
	for _, c := range []struct {
		h    string
		want string
	}{
		{"", "[]"},
		{"bytes=0-99", "[0-99]"},
		{"bytes=100-", "[100-]"},
		{"bytes=-50", "[-50-]"},
		{"bytes=0-1, 5-9", "[0-1 5-9]"},
		{"bytes=9-1", "[]"},
		{"items=0-1", "[]"},
	} {
		if got := fmt.Sprint(parseRange(c.h)); got != c.want {
			t.Errorf("parseRange(%q) = %s, want %s", c.h, got, c.want)
		}
	}
	r, size, ok := parseContentRange("bytes 10-19/100")
	if !ok || r != (Range{10, 19}) || size != 100 {
		t.Errorf("parseContentRange = %v %d %v", r, size, ok)
	}
	if _, size, ok := parseContentRange("bytes 0-0/*"); !ok || size != -1 {
		t.Errorf("unknown size: %d %v", size, ok)
	}
}

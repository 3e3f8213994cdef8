package exportguard

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// sourceEnv is a registry holding one random layer blob and a content
// store.
type sourceEnv struct {
	reg    *testRegistry
	ref    string
	data   []byte
	layer  digest.Digest
	stores *testStores
}

func newSourceEnv(t *testing.T, size int) *sourceEnv {
	t.Helper()
	tr := newTestRegistry(t)
	data, desc := tr.push(size)
	return &sourceEnv{reg: tr, ref: tr.ref, data: data, layer: desc.Digest, stores: newTestStores(t)}
}

// trigger returns a Trigger over the env's stores, attached to a new blob
// source; the metrics of both go to reg.
func (e *sourceEnv) trigger(t *testing.T, delay time.Duration, reg *prometheus.Registry) (*Trigger, *BlobSource) {
	t.Helper()
	g, err := NewTrigger(e.stores, &Remote{}, WithDelay(delay), WithTriggerRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	src := NewBlobSource()
	if err := src.Attach(g.LocalBlob, g.Promote, reg); err != nil {
		t.Fatal(err)
	}
	return g, src
}

func (e *sourceEnv) blobURL() string {
	return "http://" + e.reg.srv.Listener.Addr().String() + "/v2/test/img/blobs/" + e.layer.String()
}

func get(t *testing.T, c *http.Client, method, u, rng string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		t.Fatal(err)
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

func readAll(t *testing.T, r io.Reader) []byte {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestBlobTransportServesCommittedBlob: once the guard committed a blob,
// GET (whole, one range, a suffix, several ranges) and HEAD are answered
// from the content store, byte for byte as the registry would, and the
// registry sends nothing more; before, they go to the registry.
func TestBlobTransportServesCommittedBlob(t *testing.T) {
	e := newSourceEnv(t, 600_000)
	reg := prometheus.NewRegistry()
	g, src := e.trigger(t, time.Hour, reg)
	c := &http.Client{Transport: src.Transport(nil)}

	// Not materialized: the registry answers.
	resp := get(t, c, http.MethodGet, e.blobURL(), "bytes=0-999")
	if resp.StatusCode != http.StatusPartialContent || !bytes.Equal(readAll(t, resp.Body), e.data[:1000]) {
		t.Fatalf("remote range: %s", resp.Status)
	}
	if got := e.reg.servedBytes(); got != 1000 {
		t.Fatalf("registry sent %d bytes, want 1000", got)
	}
	if got := counterValue(t, src.bytes.WithLabelValues(sourceRemote)); got != 1000 {
		t.Errorf("remote bytes metric %v, want 1000", got)
	}

	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.Mounted(ctx, MountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: "export-base", When: WhenNow})
	waitState(t, g, "builder", e.layer, StateMaterialized)
	before := e.reg.servedBytes()
	if before != 1000+int64(len(e.data)) {
		t.Errorf("registry sent %d bytes after the guard's transfer, want 1000 + %d", before, len(e.data))
	}

	size := int64(len(e.data))
	resp = get(t, c, http.MethodGet, e.blobURL(), "")
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size || !bytes.Equal(readAll(t, resp.Body), e.data) {
		t.Errorf("local whole blob: %s, length %d", resp.Status, resp.ContentLength)
	}
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=100-199")
	if resp.StatusCode != http.StatusPartialContent || resp.Header.Get("Content-Range") != "bytes 100-199/600000" ||
		!bytes.Equal(readAll(t, resp.Body), e.data[100:200]) {
		t.Errorf("local range: %s %q", resp.Status, resp.Header.Get("Content-Range"))
	}
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=-10")
	if !bytes.Equal(readAll(t, resp.Body), e.data[size-10:]) || resp.Header.Get("Content-Range") != "bytes 599990-599999/600000" {
		t.Errorf("local suffix range: %s %q", resp.Status, resp.Header.Get("Content-Range"))
	}
	resp = get(t, c, http.MethodHead, e.blobURL(), "")
	if resp.StatusCode != http.StatusOK || resp.ContentLength != size || resp.Header.Get("Docker-Content-Digest") != e.layer.String() {
		t.Errorf("local HEAD: %s, length %d", resp.Status, resp.ContentLength)
	}

	// Several ranges: multipart/byteranges, one part per range.
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=0-9,5000-5999,599000-599999")
	mt, params, err := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/byteranges" {
		t.Fatalf("multi-range: %s %q %v", resp.Status, resp.Header.Get("Content-Type"), err)
	}
	mr := multipart.NewReader(resp.Body, params["boundary"])
	for _, want := range []struct {
		cr         string
		first, end int
	}{{"bytes 0-9/600000", 0, 10}, {"bytes 5000-5999/600000", 5000, 6000}, {"bytes 599000-599999/600000", 599000, 600000}} {
		part, err := mr.NextPart()
		if err != nil {
			t.Fatal(err)
		}
		if cr := part.Header.Get("Content-Range"); cr != want.cr || !bytes.Equal(readAll(t, part), e.data[want.first:want.end]) {
			t.Errorf("part %q, want %q with its bytes", cr, want.cr)
		}
	}
	if _, err := mr.NextPart(); err != io.EOF {
		t.Errorf("after the last part: %v", err)
	}

	if got := e.reg.servedBytes(); got != before {
		t.Errorf("registry sent %d more blob bytes after the commit", got-before)
	}
	wantLocal := float64(size + 100 + 10 + 10 + 1000 + 1000)
	if got := counterValue(t, src.bytes.WithLabelValues(sourceLocal)); got != wantLocal {
		t.Errorf("local bytes metric %v, want %v", got, wantLocal)
	}

	// A range the blob cannot satisfy goes to the registry, which says so.
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=700000-700010")
	if resp.StatusCode == http.StatusPartialContent || resp.StatusCode == http.StatusOK {
		t.Errorf("unsatisfiable range answered %s", resp.Status)
	}

	// Without the guard, the registry answers again.
	before = e.reg.servedBytes()
	src.Detach()
	resp = get(t, c, http.MethodGet, e.blobURL(), "bytes=0-99")
	readAll(t, resp.Body)
	if got := e.reg.servedBytes(); got != before+100 {
		t.Errorf("after detach the registry sent %d bytes, want 100", got-before)
	}
}

// TestBlobSourcePromotesLazyLayer: a lazy image's layer waits for
// guard.delay, unless the filesystem fetches PromoteAfterBytes of its blob
// from the registry first; then the guard materializes it at once.
func TestBlobSourcePromotesLazyLayer(t *testing.T) {
	e := newSourceEnv(t, PromoteAfterBytes+2<<20)
	reg := prometheus.NewRegistry()
	g, src := e.trigger(t, time.Hour, reg)
	c := &http.Client{Transport: src.Transport(nil)}
	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.Mounted(ctx, MountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: "lazy", When: WhenDelayed})
	waitState(t, g, "builder", e.layer, StateScheduled)

	// A small on-demand read does not promote it: the blob source promotes
	// as the bytes are read, so the count is final when the read returns.
	readAll(t, get(t, c, http.MethodGet, e.blobURL(), "bytes=0-65535").Body)
	if got := counterValue(t, g.promotions); got != 0 {
		t.Fatalf("promotions %v after a small read, want 0", got)
	}
	waitState(t, g, "builder", e.layer, StateScheduled)

	// A background fill does.
	fill := PromoteAfterBytes + 1<<20
	readAll(t, get(t, c, http.MethodGet, e.blobURL(), fmt.Sprintf("bytes=65536-%d", fill)).Body)
	waitState(t, g, "builder", e.layer, StateMaterialized)
	if got := counterValue(t, g.promotions); got != 1 {
		t.Errorf("promotions %v, want 1", got)
	}
	before := e.reg.servedBytes()
	resp := get(t, c, http.MethodGet, e.blobURL(), fmt.Sprintf("bytes=%d-%d", fill+1, len(e.data)-1))
	if !bytes.Equal(readAll(t, resp.Body), e.data[fill+1:]) {
		t.Error("rest of the blob differs")
	}
	if n := e.reg.servedBytes() - before; n != 0 {
		t.Errorf("registry sent %d bytes after the promoted commit", n)
	}
}

// TestParseRanges: Range headers a local blob can answer exactly, and
// those it leaves to the registry.
func TestParseRanges(t *testing.T) {
	const size = 1000
	for h, want := range map[string][]byteRange{
		"bytes=0-99":        {{0, 99}},
		"bytes=900-":        {{900, 999}},
		"bytes=-10":         {{990, 999}},
		"bytes=-5000":       {{0, 999}},
		"bytes=990-5000":    {{990, 999}},
		"bytes=0-0, 10-19":  {{0, 0}, {10, 19}},
		" bytes=5-5 ":       {{5, 5}},
		"bytes=1000-1001":   nil, // starts past the end
		"bytes=10-5":        nil,
		"bytes=-0":          nil,
		"bytes=a-b":         nil,
		"bytes=5":           nil,
		"items=0-1":         nil,
		"bytes=":            nil,
		"bytes=0-1,2000-":   nil, // one range unsatisfiable: the registry answers
		"bytes=-1-2":        nil,
		"bytes=0-99999999x": nil,
	} {
		got, ok := parseRanges(h, size)
		if ok != (want != nil) || fmt.Sprint(got) != fmt.Sprint(want) && want != nil {
			t.Errorf("parseRanges(%q) = %v, %v; want %v", h, got, ok, want)
		}
	}
}

func TestBlobDigest(t *testing.T) {
	d := digest.FromString("x")
	for path, ok := range map[string]bool{
		"/v2/a/b/blobs/" + d.String():   true,
		"/v2/a/blobs/" + d.String():     true,
		"/v2/a/manifests/" + d.String(): false,
		"/a/blobs/" + d.String():        false,
		"/v2/a/blobs/sha256:nothex":     false,
		"/v2/a/blobs/":                  false,
	} {
		got, found := blobDigest(path)
		if found != ok || (ok && got != d) {
			t.Errorf("blobDigest(%q) = %s, %v; want %v", path, got, found, ok)
		}
	}
}

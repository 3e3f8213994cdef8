package imageio

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

var quickRetry = WithRetryBackoff(remote.Backoff{Duration: time.Millisecond, Factor: 1, Steps: 1})

func newClient(t *testing.T, opts ...Option) *Client {
	t.Helper()
	// Keep the host's docker config (and its credentials) out of tests.
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	c, err := New(append([]Option{quickRetry, WithUserAgent("lazybase/test")}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func newRegistry(t *testing.T, wrap func(http.Handler) http.Handler) string {
	t.Helper()
	var h http.Handler = registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	if wrap != nil {
		h = wrap(h)
	}
	s := httptest.NewServer(h)
	t.Cleanup(s.Close)
	return strings.TrimPrefix(s.URL, "http://")
}

func mustRef(t *testing.T, c *Client, s string) Ref {
	t.Helper()
	r, err := c.ParseRef(s)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestAllowsPlainHTTP(t *testing.T) {
	for _, tc := range []struct {
		host  string
		plain bool
		want  bool
	}{
		{"localhost", false, true},
		{"localhost:5000", false, true},
		{"reg.localhost:5000", false, true},
		{"127.0.0.1:5000", false, true},
		{"127.3.4.5", false, true},
		{"[::1]:5000", false, true},
		{"::1", false, true},
		{"10.0.0.5:5000", false, false},
		{"172.16.1.1", false, false},
		{"192.168.1.10:443", false, false},
		{"0.0.0.0:5000", false, false},
		{"registry.example.com", false, false},
		{"localhost.example.com", false, false},
		{"10.0.0.5:5000", true, true},
		{"registry.example.com", true, true},
	} {
		if got := AllowsPlainHTTP(tc.host, tc.plain); got != tc.want {
			t.Errorf("AllowsPlainHTTP(%q, %v) = %v, want %v", tc.host, tc.plain, got, tc.want)
		}
		want := []string{"https"}
		if tc.want {
			want = append(want, "http")
		}
		if got := Scheme(tc.host, tc.plain); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("Scheme(%q, %v) = %v, want %v", tc.host, tc.plain, got, want)
		}
	}
}

// recorder answers no request: it records the URLs the client tried, so the
// policy is tested without sending traffic anywhere.
type recorder struct {
	mu   sync.Mutex
	urls []string
}

func (r *recorder) RoundTrip(req *http.Request) (*http.Response, error) {
	r.mu.Lock()
	r.urls = append(r.urls, req.URL.Scheme+"://"+req.URL.Host+req.URL.Path)
	r.mu.Unlock()
	return nil, errors.New("recorder: no network in tests")
}

func (r *recorder) schemes() map[string]bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	m := map[string]bool{}
	for _, u := range r.urls {
		m[strings.SplitN(u, ":", 2)[0]] = true
	}
	return m
}

func TestTransportPolicy(t *testing.T) {
	for _, tc := range []struct {
		ref       string
		plainHTTP bool
		wantHTTP  bool
	}{
		// go-containerregistry alone would use http for RFC 1918.
		{"10.1.2.3:5000/app:1", false, false},
		{"192.168.0.7/app:1", false, false},
		{"registry.example.com/app:1", false, false},
		{"10.1.2.3:5000/app:1", true, true},
		{"127.0.0.1:5000/app:1", false, true},
		{"127.9.9.9:5000/app:1", false, true},
		{"localhost:5000/app:1", false, true},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			rec := &recorder{}
			c := newClient(t, WithTransport(rec), WithPlainHTTP(tc.plainHTTP))
			ref := mustRef(t, c, tc.ref)
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := c.Open(ctx, ref); err == nil {
				t.Fatal("Open succeeded without a network")
			}
			s := rec.schemes()
			if !s["https"] {
				t.Errorf("https not attempted: %v", rec.urls)
			}
			if s["http"] != tc.wantHTTP {
				t.Errorf("plain http attempted = %v, want %v: %v", s["http"], tc.wantHTTP, rec.urls)
			}
		})
	}
	// The transport also upgrades URLs built elsewhere (redirects, realms).
	rec := &recorder{}
	pt := &policyTransport{inner: rec}
	req, _ := http.NewRequest(http.MethodGet, "http://10.0.0.1/token", nil)
	_, _ = pt.RoundTrip(req)
	req, _ = http.NewRequest(http.MethodGet, "http://127.0.0.1:1/v2/", nil)
	_, _ = pt.RoundTrip(req)
	if fmt.Sprint(rec.urls) != "[https://10.0.0.1/token http://127.0.0.1:1/v2/]" {
		t.Errorf("policy transport sent %v", rec.urls)
	}
}

func TestParseRef(t *testing.T) {
	c := newClient(t)
	for _, tc := range []struct {
		in, path, tag, reg string
	}{
		{in: "oci:dir", path: "dir"},
		{in: "oci:./out/dir:v1", path: "out/dir", tag: "v1"},
		{in: "oci:/tmp/a:b/c", path: "/tmp/a:b/c"},
		{in: "oci:/tmp/x:latest", path: "/tmp/x", tag: "latest"},
		{in: "127.0.0.1:5000/app", reg: "127.0.0.1:5000/app:latest"},
		{in: "example.com/a/b:t", reg: "example.com/a/b:t"},
	} {
		r, err := c.ParseRef(tc.in)
		if err != nil {
			t.Errorf("%s: %v", tc.in, err)
			continue
		}
		if tc.reg != "" {
			if r.IsLayout() || r.Registry.Name() != tc.reg {
				t.Errorf("%s: got %+v, want registry %s", tc.in, r, tc.reg)
			}
			continue
		}
		if !r.IsLayout() || r.Path != tc.path || r.Tag != tc.tag {
			t.Errorf("%s: got path %q tag %q, want %q %q", tc.in, r.Path, r.Tag, tc.path, tc.tag)
		}
	}
	for _, bad := range []string{"oci:", "oci:dir:", "UPPER/case:x", "a@sha256:xyz"} {
		if _, err := c.ParseRef(bad); err == nil {
			t.Errorf("%s: parsed", bad)
		}
	}
}

func TestRegistryRoundTrip(t *testing.T) {
	ctx := context.Background()
	host := newRegistry(t, nil)
	c := newClient(t)
	img, err := random.Image(4096, 3)
	if err != nil {
		t.Fatal(err)
	}
	ref := mustRef(t, c, host+"/a/img:v1")
	desc, err := c.Write(ctx, ref, img, nil)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := img.Digest()
	if desc.Digest != want {
		t.Fatalf("written digest %s, want %s", desc.Digest, want)
	}
	src, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if src.Image == nil || src.Descriptor.Digest != want {
		t.Fatalf("opened %+v", src.Descriptor)
	}
	if err := validate.Image(src.Image); err != nil {
		t.Fatal(err)
	}

	idx, err := random.Index(1024, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	iref := mustRef(t, c, host+"/a/idx:v1")
	if _, err := c.Write(ctx, iref, idx, nil); err != nil {
		t.Fatal(err)
	}
	src, err = c.Open(ctx, iref)
	if err != nil {
		t.Fatal(err)
	}
	if src.Index == nil {
		t.Fatal("index opened as image")
	}
	if err := validate.Index(src.Index); err != nil {
		t.Fatal(err)
	}

	// A digest is no destination.
	dref := mustRef(t, c, host+"/a/img@"+want.String())
	if _, err := c.Write(ctx, dref, img, nil); err == nil || !strings.Contains(err.Error(), "must be a tag") {
		t.Fatalf("write to digest: %v", err)
	}
}

func TestLayoutRoundTrip(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	dir := filepath.Join(t.TempDir(), "fresh", "layout")
	idx, err := random.Index(1024, 2, 2)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(ctx, mustRef(t, c, "oci:"+dir+":multi"), idx, nil); err != nil {
		t.Fatal(err)
	}
	// Exactly one manifest: no tag needed.
	src, err := c.Open(ctx, mustRef(t, c, "oci:"+dir))
	if err != nil {
		t.Fatal(err)
	}
	wantIdx, _ := idx.Digest()
	if src.Index == nil || src.Descriptor.Digest != wantIdx {
		t.Fatalf("opened %+v", src.Descriptor)
	}
	if err := validate.Index(src.Index); err != nil {
		t.Fatal(err)
	}

	img, err := random.Image(2048, 2)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "arm64"
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	plat := &v1.Platform{OS: "linux", Architecture: "arm64"}
	if _, err := c.Write(ctx, mustRef(t, c, "oci:"+dir+":single"), img, plat); err != nil {
		t.Fatal(err)
	}
	// go-containerregistry reads what we wrote.
	p, err := layout.FromPath(dir)
	if err != nil {
		t.Fatal(err)
	}
	ii, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(ii); err != nil {
		t.Fatal(err)
	}
	im, _ := ii.IndexManifest()
	if len(im.Manifests) != 2 || im.Manifests[1].Platform == nil || im.Manifests[1].Platform.Architecture != "arm64" {
		t.Fatalf("index.json: %+v", im.Manifests)
	}

	// Two manifests: no tag is ambiguous, and the error lists them.
	_, err = c.Open(ctx, mustRef(t, c, "oci:"+dir))
	wantImg, _ := img.Digest()
	if err == nil || !strings.Contains(err.Error(), wantImg.String()) || !strings.Contains(err.Error(), "tag multi") {
		t.Fatalf("ambiguous open: %v", err)
	}
	src, err = c.Open(ctx, mustRef(t, c, "oci:"+dir+":single"))
	if err != nil {
		t.Fatal(err)
	}
	if src.Image == nil || src.Descriptor.Digest != wantImg {
		t.Fatalf("opened %+v", src.Descriptor)
	}
	if _, err := c.Open(ctx, mustRef(t, c, "oci:"+dir+":nope")); err == nil || !strings.Contains(err.Error(), `no manifest tagged "nope"`) {
		t.Fatalf("missing tag: %v", err)
	}
	// Re-tagging replaces the entry.
	if _, err := c.Write(ctx, mustRef(t, c, "oci:"+dir+":single"), idx, nil); err != nil {
		t.Fatal(err)
	}
	src, err = c.Open(ctx, mustRef(t, c, "oci:"+dir+":single"))
	if err != nil || src.Index == nil {
		t.Fatalf("retagged: %v", err)
	}
	if _, err := c.Open(ctx, mustRef(t, c, "oci:"+t.TempDir())); err == nil || !strings.Contains(err.Error(), "not an OCI image layout") {
		t.Fatalf("empty dir: %v", err)
	}
}

// badLayer serves bytes that end in an error halfway, or that do not match
// its digest.
type badLayer struct {
	v1.Layer
	corrupt bool
}

func (l badLayer) Compressed() (io.ReadCloser, error) {
	rc, err := l.Layer.Compressed()
	if err != nil {
		return nil, err
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		return nil, err
	}
	if l.corrupt {
		b[len(b)/2] ^= 0xff
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	return io.NopCloser(io.MultiReader(bytes.NewReader(b[:len(b)/2]), errReader{})), nil
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("source went away") }

func brokenImage(t *testing.T, corrupt bool) v1.Image {
	t.Helper()
	good, err := random.Layer(8192, types.DockerLayer)
	if err != nil {
		t.Fatal(err)
	}
	l, err := random.Layer(8192, types.DockerLayer)
	if err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.AppendLayers(img, good, badLayer{Layer: l, corrupt: corrupt})
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func TestLayoutFailedWriteKeepsIndex(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	dir := t.TempDir()
	old, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	ref := mustRef(t, c, "oci:"+dir+":v1")
	if _, err := c.Write(ctx, ref, old, nil); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, corrupt := range []bool{false, true} {
		_, err := c.Write(ctx, ref, brokenImage(t, corrupt), nil)
		if err == nil {
			t.Fatalf("corrupt=%v: write succeeded", corrupt)
		}
		if !strings.Contains(err.Error(), "layer sha256:") {
			t.Errorf("error names no layer: %v", err)
		}
		after, _ := os.ReadFile(filepath.Join(dir, "index.json"))
		if !bytes.Equal(before, after) {
			t.Fatalf("corrupt=%v: index.json changed:\n%s", corrupt, after)
		}
	}
	// Cancelled before it starts: nothing named either.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	img, _ := random.Image(1024, 2)
	if _, err := c.Write(cctx, ref, img, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled write: %v", err)
	}
	after, _ := os.ReadFile(filepath.Join(dir, "index.json"))
	if !bytes.Equal(before, after) {
		t.Fatal("index.json changed by a cancelled write")
	}
	// No temporary files left behind.
	err = filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && strings.HasPrefix(fi.Name(), ".") {
			t.Errorf("left behind: %s", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestRegistryFailedWriteLeavesNoTag(t *testing.T) {
	ctx := context.Background()
	host := newRegistry(t, nil)
	c := newClient(t)
	for _, corrupt := range []bool{false, true} {
		tag := fmt.Sprintf("%s/broken:%v", host, corrupt)
		if _, err := c.Write(ctx, mustRef(t, c, tag), brokenImage(t, corrupt), nil); err == nil {
			t.Fatalf("%s: write succeeded", tag)
		}
		r, err := name.ParseReference(tag)
		if err != nil {
			t.Fatal(err)
		}
		_, err = remote.Head(r)
		var re *RegistryError
		if err == nil || !errors.As(classify(err), &re) || re.StatusCode != http.StatusNotFound {
			t.Fatalf("%s: tag after failed write: %v", tag, err)
		}
	}
}

// TestRegistryCredentialsFromDockerConfig: a write to a registry that wants
// credentials fails as unauthorized, naming the image; with credentials in
// $DOCKER_CONFIG it succeeds, and no later error shows the password.
// (Other statuses: TestRegistryErrorKindsMatchWithErrorsIs.)
func TestRegistryCredentialsFromDockerConfig(t *testing.T) {
	ctx := context.Background()
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t)

	// 401, then the same registry with credentials from the docker config.
	const user, pass = "lazy", "s3cret-pa55"
	hostAuth := newRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
				w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
				http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	ref := mustRef(t, c, hostAuth+"/private:v1")
	_, err = c.Write(ctx, ref, img, nil)
	if err == nil || !strings.Contains(err.Error(), "writing "+hostAuth+"/private:v1: unauthorized: ") {
		t.Errorf("401: %v", err)
	}
	cfg := t.TempDir()
	t.Setenv("DOCKER_CONFIG", cfg)
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(filepath.Join(cfg, "config.json"), []byte(`{"auths":{"`+hostAuth+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	c2, err := New(quickRetry)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Write(ctx, ref, img, nil); err != nil {
		t.Fatalf("with credentials: %v", err)
	}
	src, err := c2.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(src.Image); err != nil {
		t.Fatal(err)
	}
	_, err = c2.Open(ctx, mustRef(t, c2, hostAuth+"/private:missing"))
	if err == nil || strings.Contains(err.Error(), pass) || strings.Contains(err.Error(), auth) {
		t.Errorf("missing tag with credentials: %v", err)
	}
}

func TestUserAgent(t *testing.T) {
	var mu sync.Mutex
	var agents []string
	host := newRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			agents = append(agents, r.UserAgent())
			mu.Unlock()
			h.ServeHTTP(w, r)
		})
	})
	c := newClient(t)
	_, _ = c.Open(context.Background(), mustRef(t, c, host+"/x:y"))
	mu.Lock()
	defer mu.Unlock()
	if len(agents) == 0 {
		t.Fatal("no request")
	}
	for _, a := range agents {
		if !strings.HasPrefix(a, "lazybase/test") {
			t.Errorf("User-Agent %q", a)
		}
	}
}

func TestWriteProgress(t *testing.T) {
	ctx := context.Background()
	host := newRegistry(t, nil)
	c := newClient(t)
	img, err := random.Image(100_000, 3)
	if err != nil {
		t.Fatal(err)
	}
	layers, _ := img.Layers()
	var layerBytes int64
	for _, l := range layers {
		n, _ := l.Size()
		layerBytes += n
	}
	for _, dst := range []string{host + "/p/img:v1", "oci:" + t.TempDir() + ":v1"} {
		var mu sync.Mutex
		var last, lastTotal int64
		calls := 0
		_, err := c.Write(ctx, mustRef(t, c, dst), img, nil, WithWriteProgress(func(complete, total int64) {
			mu.Lock()
			defer mu.Unlock()
			if complete < last {
				t.Errorf("%s: progress went back from %d to %d", dst, last, complete)
			}
			last, lastTotal = complete, total
			calls++
		}))
		if err != nil {
			t.Fatal(err)
		}
		mu.Lock()
		if calls == 0 || last < layerBytes || last != lastTotal {
			t.Errorf("%s: %d calls, last %d of %d, layers hold %d bytes", dst, calls, last, lastTotal, layerBytes)
		}
		mu.Unlock()
	}
}

func TestCheckDestination(t *testing.T) {
	c := newClient(t)
	for s, ok := range map[string]bool{
		"oci:x":            true,
		"oci:x:v1":         true,
		"example.com/a:v1": true,
		"example.com/a@sha256:" + strings.Repeat("0", 64): false,
	} {
		if err := CheckDestination(mustRef(t, c, s)); (err == nil) != ok {
			t.Errorf("%s: %v", s, err)
		}
	}
}

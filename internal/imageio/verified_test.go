package imageio

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/internal/tmpsweep"
)

// tamperer serves other bytes (one byte flipped, same length) for GETs of
// the manifests and blobs it is told to tamper with.
type tamperer struct {
	next http.Handler
	mu   sync.Mutex
	bad  string
}

func (t *tamperer) set(d v1.Hash) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.bad = d.String()
}

func (t *tamperer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	t.mu.Lock()
	bad := t.bad
	t.mu.Unlock()
	if r.Method != http.MethodGet || bad == "" || !strings.HasSuffix(r.URL.Path, "/"+bad) {
		t.next.ServeHTTP(w, r)
		return
	}
	rec := httptest.NewRecorder()
	t.next.ServeHTTP(rec, r)
	body := rec.Body.Bytes()
	if len(body) > 0 {
		body[len(body)/2] ^= 0x01
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(body)
}

// testIndex is an index holding one image, with the digests a test tampers
// with.
type testIndex struct {
	idx                   v1.ImageIndex
	img                   v1.Image
	idxDigest, imgDigest  v1.Hash
	cfgDigest, cfgDigest2 v1.Hash
}

func newTestIndex(t *testing.T) testIndex {
	t.Helper()
	img, err := random.Image(512, 1)
	if err != nil {
		t.Fatal(err)
	}
	idx := mutate.AppendManifests(empty.Index, mutate.IndexAddendum{Add: img})
	ti := testIndex{idx: idx, img: img}
	ti.idxDigest, _ = idx.Digest()
	ti.imgDigest, _ = img.Digest()
	ti.cfgDigest, _ = img.ConfigName()
	return ti
}

// openAll opens src and every child of an index, and returns the first
// error.
func openAll(ctx context.Context, c *Client, ref Ref) error {
	src, err := c.Open(ctx, ref)
	if err != nil {
		return err
	}
	if src.Image != nil {
		return validate.Image(src.Image, validate.Fast)
	}
	im, err := src.Index.IndexManifest()
	if err != nil {
		return err
	}
	for _, d := range im.Manifests {
		img, err := src.Index.Image(d.Digest)
		if err != nil {
			return err
		}
		if _, err := img.ConfigFile(); err != nil {
			return err
		}
	}
	return validate.Index(src.Index, validate.Fast)
}

// TestSourceBlobsVerified tampers with a manifest or a config of a layout
// or registry source: opening it (or the image of the index holding it)
// fails, naming the blob; the untampered source opens.
func TestSourceBlobsVerified(t *testing.T) {
	ctx := context.Background()
	ti := newTestIndex(t)
	type victim func(ti testIndex) v1.Hash
	cases := []struct {
		name     string
		index    bool // the source is the index (else the image)
		victim   victim
		remove   bool // layout only: delete the blob instead
		mention  string
		registry bool // also run against a registry
	}{
		{name: "image-config-tampered", victim: func(ti testIndex) v1.Hash { return ti.cfgDigest }, mention: "digest mismatch", registry: true},
		{name: "image-manifest-tampered", victim: func(ti testIndex) v1.Hash { return ti.imgDigest }, mention: "digest mismatch"},
		{name: "image-config-missing", victim: func(ti testIndex) v1.Hash { return ti.cfgDigest }, remove: true, mention: "missing"},
		{name: "index-tampered", index: true, victim: func(ti testIndex) v1.Hash { return ti.idxDigest }, mention: "digest mismatch"},
		{name: "index-child-manifest-tampered", index: true, victim: func(ti testIndex) v1.Hash { return ti.imgDigest }, mention: "digest mismatch", registry: true},
		{name: "index-child-config-tampered", index: true, victim: func(ti testIndex) v1.Hash { return ti.cfgDigest }, mention: "digest mismatch", registry: true},
	}
	for _, tc := range cases {
		var a Artifact = ti.img
		if tc.index {
			a = ti.idx
		}
		bad := tc.victim(ti)
		t.Run("layout/"+tc.name, func(t *testing.T) {
			c := newClient(t)
			dir := t.TempDir()
			ref := mustRef(t, c, "oci:"+dir+":v1")
			if _, err := c.Write(ctx, ref, a, nil); err != nil {
				t.Fatal(err)
			}
			if err := openAll(ctx, c, ref); err != nil {
				t.Fatalf("untampered source: %v", err)
			}
			p := filepath.Join(dir, "blobs", bad.Algorithm, bad.Hex)
			if tc.remove {
				if err := os.Remove(p); err != nil {
					t.Fatal(err)
				}
			} else {
				b, err := os.ReadFile(p)
				if err != nil {
					t.Fatal(err)
				}
				b[len(b)/2] ^= 0x01
				if err := os.WriteFile(p, b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			checkTamperError(t, openAll(ctx, c, ref), bad, tc.mention, tc.index && bad != ti.idxDigest, ref)
		})
		if !tc.registry {
			continue
		}
		t.Run("registry/"+tc.name, func(t *testing.T) {
			tp := &tamperer{}
			host := newRegistry(t, func(h http.Handler) http.Handler { tp.next = h; return tp })
			c := newClient(t)
			ref := mustRef(t, c, host+"/tamper/"+tc.name+":v1")
			if _, err := c.Write(ctx, ref, a, nil); err != nil {
				t.Fatal(err)
			}
			if err := openAll(ctx, c, ref); err != nil {
				t.Fatalf("untampered source: %v", err)
			}
			tp.set(bad)
			// A registry image's config is fetched (and checked) when it is
			// used, after Open: the caller names the source then.
			checkTamperError(t, openAll(ctx, c, ref), bad, tc.mention, tc.index || bad == ti.cfgDigest, ref)
		})
	}
}

// checkTamperError asserts err names the tampered blob, and the source
// when Open is what failed.
func checkTamperError(t *testing.T, err error, bad v1.Hash, mention string, child bool, ref Ref) {
	t.Helper()
	if err == nil {
		t.Fatalf("tampered blob %s was not noticed", bad)
	}
	msg := err.Error()
	t.Logf("error: %s", msg)
	if !strings.Contains(msg, bad.String()) {
		t.Errorf("error does not name the blob %s", bad)
	}
	// go-containerregistry's remote package reports its own check as
	// "error verifying sha256 checksum" or "does not match requested digest".
	if !strings.Contains(msg, mention) && !strings.Contains(msg, "verifying sha256 checksum") && !strings.Contains(msg, "does not match requested digest") {
		t.Errorf("error does not say %q", mention)
	}
	if !child && !strings.Contains(msg, ref.String()) {
		t.Errorf("error does not name the source %s", ref)
	}
}

// TestCheckBlob is the table of the digest check every manifest and config
// read from a source goes through.
func TestCheckBlob(t *testing.T) {
	b := []byte(`{"schemaVersion":2}`)
	d, _, _ := v1.SHA256(bytes.NewReader(b))
	for _, tc := range []struct {
		name string
		b    []byte
		desc v1.Descriptor
		want string // "" when the blob matches
	}{
		{"match", b, v1.Descriptor{Digest: d, Size: int64(len(b))}, ""},
		{"match-size-unknown", b, v1.Descriptor{Digest: d}, ""},
		{"other-bytes", append([]byte(nil), b[:len(b)-1]...), v1.Descriptor{Digest: d, Size: int64(len(b))}, "digest mismatch"},
		{"size-lie", b, v1.Descriptor{Digest: d, Size: 3}, "size mismatch"},
		{"sha512", b, v1.Descriptor{Digest: v1.Hash{Algorithm: "sha512", Hex: strings.Repeat("a", 128)}}, "unsupported digest algorithm"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkBlob(tc.b, tc.desc, "config")
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("matching blob refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error saying %q", err, tc.want)
			case err != nil && !strings.Contains(err.Error(), tc.desc.Digest.String()):
				t.Errorf("error does not name the blob: %v", err)
			}
		})
	}
}

// TestLayoutReplacesWrongBlobs writes an image into a layout whose blobs
// are already there but wrong (same size with a byte flipped, truncated, a
// symlink elsewhere): every wrong blob is replaced, a right one is kept as
// it is, and the result validates.
func TestLayoutReplacesWrongBlobs(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	img, err := random.Image(4096, 4)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	if _, err := c.Write(ctx, mustRef(t, c, "oci:"+dir+":first"), img, nil); err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	blobPath := func(d v1.Hash) string { return filepath.Join(dir, "blobs", d.Algorithm, d.Hex) }
	digests := make([]v1.Hash, len(layers))
	for i, l := range layers {
		digests[i], _ = l.Digest()
	}
	cfg, _ := img.ConfigName()
	// Same size, one byte flipped.
	b, err := os.ReadFile(blobPath(digests[0]))
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(blobPath(digests[0]), b, 0o644); err != nil {
		t.Fatal(err)
	}
	// Truncated.
	if err := os.Truncate(blobPath(digests[1]), 10); err != nil {
		t.Fatal(err)
	}
	// A symlink to a file of the right size and other content.
	other := filepath.Join(t.TempDir(), "other")
	fi, err := os.Stat(blobPath(digests[2]))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(other, make([]byte, fi.Size()), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(blobPath(digests[2])); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(other, blobPath(digests[2])); err != nil {
		t.Fatal(err)
	}
	// The config, same size, tampered.
	cb, err := os.ReadFile(blobPath(cfg))
	if err != nil {
		t.Fatal(err)
	}
	cb[len(cb)/2] ^= 0x01
	if err := os.WriteFile(blobPath(cfg), cb, 0o644); err != nil {
		t.Fatal(err)
	}
	// The fourth layer stays right: it must be kept, not rewritten.
	before, err := os.Stat(blobPath(digests[3]))
	if err != nil {
		t.Fatal(err)
	}

	ref := mustRef(t, c, "oci:"+dir+":second")
	if _, err := c.Write(ctx, ref, img, nil); err != nil {
		t.Fatal(err)
	}
	for _, d := range append(digests, cfg) {
		fi, err := os.Lstat(blobPath(d))
		if err != nil {
			t.Fatal(err)
		}
		if !fi.Mode().IsRegular() {
			t.Errorf("blob %s is still a %s", d, fi.Mode().Type())
			continue
		}
		b, err := os.ReadFile(blobPath(d))
		if err != nil {
			t.Fatal(err)
		}
		if got, _, _ := v1.SHA256(bytes.NewReader(b)); got != d {
			t.Errorf("blob %s holds %s after the write", d, got)
		}
	}
	after, err := os.Stat(blobPath(digests[3]))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) {
		t.Errorf("right blob %s was rewritten", digests[3])
	}
	src, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(src.Image); err != nil {
		t.Fatalf("result does not validate: %v", err)
	}
}

func TestOverwritesOnlyWhenDestinationIsTheSource(t *testing.T) {
	c := newClient(t)
	dir := t.TempDir()
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(dir, link); err != nil {
		t.Fatal(err)
	}
	tagged := &v1.Descriptor{Annotations: map[string]string{AnnotationRefName: "only"}}
	for _, tc := range []struct {
		dst, src string
		resolved *v1.Descriptor
		want     bool
	}{
		{"reg.example/a/b:v1", "reg.example/a/b:v1", nil, true},
		{"reg.example/a/b", "reg.example/a/b:latest", nil, true},
		{"docker.io/library/x:1", "x:1", nil, true},
		{"reg.example/a/b:v2", "reg.example/a/b:v1", nil, false},
		{"reg.example/a/c:v1", "reg.example/a/b:v1", nil, false},
		{"other.example/a/b:v1", "reg.example/a/b:v1", nil, false},
		{"reg.example/a/b:v1", "reg.example/a/b@sha256:" + strings.Repeat("a", 64), nil, false},
		{"oci:" + dir + ":v1", "oci:" + dir + ":v1", nil, true},
		{"oci:" + link + ":v1", "oci:" + dir + ":v1", nil, true},
		{"oci:" + dir, "oci:" + dir, nil, true},
		{"oci:" + dir + ":v2", "oci:" + dir + ":v1", nil, false},
		{"oci:" + dir + ":only", "oci:" + dir, tagged, true},
		{"oci:" + dir + ":other", "oci:" + dir, tagged, false},
		{"oci:" + dir + "/sub:v1", "oci:" + dir + ":v1", nil, false},
		{"oci:" + dir + ":v1", "reg.example/a/b:v1", nil, false},
	} {
		got := Overwrites(mustRef(t, c, tc.dst), mustRef(t, c, tc.src), tc.resolved)
		if got != tc.want {
			t.Errorf("Overwrites(%s, %s) = %v, want %v", tc.dst, tc.src, got, tc.want)
		}
	}
}

// TestParseRefRepositoryPath rejects registry references whose repository
// has an empty, "." or ".." component, before any request.
func TestParseRefRepositoryPath(t *testing.T) {
	var requests int
	host := newRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { requests++; h.ServeHTTP(w, r) })
	})
	c := newClient(t)
	for _, tc := range []struct {
		in, want string // want: "" when the reference is fine
	}{
		{host + "/a/b:v1", ""},
		{host + "/a.b/c..d/e_f:v1", ""},
		{host + "/a/../b:v1", `".." path component`},
		{host + "/../b:v1", `".." path component`},
		{host + "/a/..:v1", `".." path component`},
		{host + "/a/./b:v1", `"." path component`},
		{host + "/a//b:v1", "empty path component"},
		{host + "/a/b/:v1", "empty path component"},
		{host + "//a:v1", "empty path component"},
		{host + "/a/../b@sha256:" + strings.Repeat("a", 64), `".." path component`},
	} {
		_, err := c.ParseRef(tc.in)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.in, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.in)):
			t.Errorf("%s: %v, want an error naming it and saying %s", tc.in, err, tc.want)
		}
	}
	if requests != 0 {
		t.Errorf("%d requests made while parsing references", requests)
	}
}

// TestLayoutSweepsLeftovers leaves temporary files of killed writers in a
// layout (a half-written blob, a half-written index.json), one of a live
// writer, and a fresh one: writing to the layout removes the killed
// writers' files only.
func TestLayoutSweepsLeftovers(t *testing.T) {
	ctx := context.Background()
	c := newClient(t)
	dir := t.TempDir()
	blobs := filepath.Join(dir, "blobs", "sha256")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-2 * tmpsweep.MinAge)
	mk := func(p string, aged bool) string {
		if err := os.WriteFile(p, []byte("half"), 0o644); err != nil {
			t.Fatal(err)
		}
		if aged {
			if err := os.Chtimes(p, past, past); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}
	deadBlob := mk(filepath.Join(blobs, ".tmp-0123456789ab-111"), true)
	deadIndex := mk(filepath.Join(dir, ".index.json.tmp-222"), true)
	liveBlob := mk(filepath.Join(blobs, ".tmp-0123456789ab-333"), true)
	freshBlob := mk(filepath.Join(blobs, ".tmp-0123456789ab-444"), false)
	f, err := os.Open(liveBlob)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := tmpsweep.Lock(f); err != nil {
		t.Fatal(err)
	}
	img, err := random.Image(256, 1)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write(ctx, mustRef(t, c, "oci:"+dir+":v1"), img, nil); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{deadBlob: false, deadIndex: false, liveBlob: true, freshBlob: true} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", filepath.Base(p), err == nil, want)
		}
	}
}

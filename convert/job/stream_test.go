package job_test

import (
	"bytes"
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
)

// streamSeedDigest is the converted manifest digest of SeedImage(6) with
// the default options, as the job wrote it before layers were streamed
// (commit 0719926): streaming must not change a byte.
const streamSeedDigest = "sha256:7ac1684d6e2a06ce7dcc08ba96c614f610dc31bd6bf53b0c4c1259212dcd0dca"

// countingRegistry is an in-process registry that counts the requests of
// each method made to blob upload sessions.
type countingRegistry struct {
	host string
	mu   sync.Mutex
	n    map[string]int
}

func newCountingRegistry(t *testing.T) *countingRegistry {
	r := &countingRegistry{n: map[string]int{}}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if strings.Contains(req.URL.Path, "/blobs/uploads") {
			r.mu.Lock()
			r.n[req.Method]++
			r.mu.Unlock()
		}
		inner.ServeHTTP(w, req)
	}))
	t.Cleanup(srv.Close)
	r.host = strings.TrimPrefix(srv.URL, "http://")
	return r
}

func (r *countingRegistry) count(method string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[method]
}

// TestRunStreamsLayersByteIdentical converts registry to registry: every
// rebuilt layer is streamed to the destination while it is written (one
// PATCH each, no second upload by the push), and the result is byte for
// byte what the job writes to an OCI layout (no streaming) and what
// Converter.Image makes, with the digest the job gave before streaming.
func TestRunStreamsLayersByteIdentical(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	src := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(6, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	srcRef := src.Host + "/s/app:v1"
	testimage.PushRef(t, srcRef, img)
	dst := newCountingRegistry(t)

	rep := mustRun(ctx, t, srcRef, dst.host+"/s/app:estargz")
	if rep.Totals.Streamed != 2 || rep.Totals.Layers != 2 {
		t.Errorf("%d of %d layers streamed, want 2 of 2", rep.Totals.Streamed, rep.Totals.Layers)
	}
	// One PATCH per layer, streamed while converted, and one for the
	// config: the push uploads no layer a second time.
	if n := dst.count(http.MethodPatch); n != 3 {
		t.Errorf("%d PATCH requests, want 3 (each layer once, while converted, and the config)", n)
	}
	if rep.Digest != streamSeedDigest {
		t.Errorf("streamed conversion is %s, before streaming it was %s", rep.Digest, streamSeedDigest)
	}

	dir := t.TempDir()
	lrep := mustRun(ctx, t, srcRef, "oci:"+dir+":v1")
	if lrep.Totals.Streamed != 0 || lrep.Digest != rep.Digest {
		t.Errorf("layout conversion: %s (%d streamed), registry conversion %s", lrep.Digest, lrep.Totals.Streamed, rep.Digest)
	}
	c, err := convert.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	res, err := c.Image(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	if res.Digest.String() != rep.Digest {
		t.Errorf("Converter.Image made %s, the job pushed %s", res.Digest, rep.Digest)
	}
	for _, l := range rep.Images[0].Layers {
		h, _ := v1.NewHash(l.Digest)
		want, err := os.ReadFile(filepath.Join(dir, "blobs", h.Algorithm, h.Hex))
		if err != nil {
			t.Fatal(err)
		}
		if got := testimage.BlobAt(t, dst.host, "s/app", h); !bytes.Equal(got, want) {
			t.Errorf("layer %s: registry holds %d bytes that differ from the layout's %d", h, len(got), len(want))
		}
	}
	verify(ctx, t, dst.host, dst.host+"/s/app:estargz", rep)
}

// TestRunCorruptLayerStreamsNothing converts an image one of whose source
// blobs is corrupt to a registry: the job fails naming the source and the
// layer, writes no tag, commits no upload, and the destination holds none
// of the converted blobs, not even those of the good layer it streamed.
func TestRunCorruptLayerStreamsNothing(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	src := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(6, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	srcRef := src.Host + "/s/app:v1"
	testimage.PushRef(t, srcRef, img)
	dir := t.TempDir()
	good := mustRun(ctx, t, srcRef, "oci:"+dir+":v1")

	layers, _ := img.Layers()
	for i, l := range layers {
		bad, _ := l.Digest()
		t.Run(bad.String(), func(t *testing.T) {
			dst := newCountingRegistry(t)
			dstRef := dst.host + "/s/app:estargz"
			src.Corrupt(bad)
			defer src.Corrupt(v1.Hash{})
			_, err := run(ctx, t, srcRef, dstRef)
			if err == nil || !strings.Contains(err.Error(), srcRef) || !strings.Contains(err.Error(), bad.String()) {
				t.Fatalf("layer %d corrupt: %v, want an error naming %s and %s", i, err, srcRef, bad)
			}
			if testimage.TagExists(t, dstRef) {
				t.Fatal("destination tag written after a failed conversion")
			}
			if n := dst.count(http.MethodPut); n != 0 {
				t.Errorf("%d uploads committed after a failed conversion", n)
			}
			for _, l := range good.Images[0].Layers {
				h, _ := v1.NewHash(l.Digest)
				if testimage.BlobAt(t, dst.host, "s/app", h) != nil {
					t.Errorf("converted layer %s is in the destination after a failed conversion", h)
				}
			}
		})
	}
}

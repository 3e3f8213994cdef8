package convert

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/internal/testimage"
)

// recordingTee keeps what a BlobTee receives, per source layer.
type recordingTee struct {
	mu   sync.Mutex
	got  map[v1.Hash]*teeCopy
	fail bool // the copies' Write returns an error
}

type teeCopy struct {
	t     *recordingTee
	buf   bytes.Buffer
	ends  int
	desc  v1.Descriptor
	err   error
	ended bool
}

func (r *recordingTee) Start(_ context.Context, src v1.Descriptor) BlobTeeWriter {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := &teeCopy{t: r}
	r.got[src.Digest] = c
	return c
}

func (c *teeCopy) Write(p []byte) (int, error) {
	c.buf.Write(p)
	if c.t.fail {
		return 0, fmt.Errorf("tee refuses")
	}
	return len(p), nil
}

func (c *teeCopy) End(d v1.Descriptor, err error) { c.ends++; c.desc, c.err = d, err }

// TestBlobTeeGetsEachBlob converts an image with a BlobTee: each rebuilt
// layer's copy is its blob byte for byte, ended once with its descriptor;
// a tee whose writes fail changes nothing; a layer that fails ends its copy
// with the error.
func TestBlobTeeGetsEachBlob(t *testing.T) {
	ctx := context.Background()
	img, err := testimage.SeedImage(3, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	plain, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	want, err := plain.Image(ctx, img)
	if err != nil {
		t.Fatal(err)
	}
	for _, fail := range []bool{false, true} {
		tee := &recordingTee{got: map[v1.Hash]*teeCopy{}, fail: fail}
		c, err := New(WithBlobTee(tee))
		if err != nil {
			t.Fatal(err)
		}
		res, err := c.Image(ctx, img)
		if err != nil {
			t.Fatal(err)
		}
		if res.Digest != want.Digest {
			t.Errorf("failing tee %v: converted %s, without a tee %s", fail, res.Digest, want.Digest)
		}
		if len(tee.got) != len(res.Layers) {
			t.Errorf("tee got %d layers, image has %d", len(tee.got), len(res.Layers))
		}
		for _, l := range res.Layers {
			cp := tee.got[l.Source.Digest]
			if cp == nil {
				t.Fatalf("tee got nothing for layer %s", l.Source.Digest)
			}
			sum := fmt.Sprintf("sha256:%x", sha256.Sum256(cp.buf.Bytes()))
			if cp.ends != 1 || cp.err != nil || cp.desc.Digest != l.Output.Digest || sum != l.Output.Digest.String() || int64(cp.buf.Len()) != l.Output.Size {
				t.Errorf("layer %s: copy %s (%d bytes), ended %d times with %v %v; blob is %s (%d bytes)",
					l.Source.Digest, sum, cp.buf.Len(), cp.ends, cp.desc.Digest, cp.err, l.Output.Digest, l.Output.Size)
			}
		}
		c.Close()
	}

	// A layer whose gzip stream is damaged in the middle: the rebuild has
	// started (and the tee with it) when it fails.
	layers, _ := img.Layers()
	rc, err := layers[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	diffID, _ := layers[0].DiffID()
	bad := &rawLayer{b: b, mt: types.OCILayer}
	tee := &recordingTee{got: map[v1.Hash]*teeCopy{}}
	c, err := New(WithBlobTee(tee))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Layer(ctx, bad, diffID); err == nil {
		t.Fatal("converting a corrupt layer succeeded")
	}
	d, _ := bad.Digest()
	if cp := tee.got[d]; cp == nil || cp.ends != 1 || cp.err == nil {
		t.Errorf("corrupt layer's copy: %+v, want one End with an error", cp)
	}
}

// rawLayer is a layer made of the bytes b, with media type mt.
type rawLayer struct {
	b  []byte
	mt types.MediaType
}

func (l *rawLayer) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(l.b))
	return h, err
}
func (l *rawLayer) DiffID() (v1.Hash, error) { return v1.Hash{}, fmt.Errorf("unknown") }
func (l *rawLayer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.b)), nil
}
func (l *rawLayer) Uncompressed() (io.ReadCloser, error) { return nil, fmt.Errorf("unknown") }
func (l *rawLayer) Size() (int64, error)                 { return int64(len(l.b)), nil }
func (l *rawLayer) MediaType() (types.MediaType, error)  { return l.mt, nil }

package toccheck_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/internal/toccheck"
)

// checkLayers runs Check on every layer of img.
func checkLayers(t *testing.T, img v1.Image) int {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		d, _ := l.Digest()
		rc, err := l.Compressed()
		if err != nil {
			t.Fatal(err)
		}
		raw, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := toccheck.Check(io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw))), 0, decs); err != nil {
			t.Errorf("layer %s: %v", d, err)
		}
	}
	return len(ls)
}

// TestCheckAcceptsConverterOutput checks that what lazybase's own
// converter writes, in both formats, passes the check.
func TestCheckAcceptsConverterOutput(t *testing.T) {
	src, err := testimage.SeedImage(11, v1.Platform{OS: "linux", Architecture: "amd64"})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []convert.Format{convert.FormatEStargz, convert.FormatZstdChunked} {
		t.Run(string(f), func(t *testing.T) {
			c, err := convert.New(convert.WithFormat(f), convert.WithTempDir(t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			res, err := c.Image(context.Background(), src)
			if err != nil {
				t.Fatal(err)
			}
			checkLayers(t, res.Image)
		})
	}
}

// TestCheckAcceptsCachedReferenceImages checks the converted reference
// images the e2e tests cache, when they are there.
func TestCheckAcceptsCachedReferenceImages(t *testing.T) {
	dir := os.Getenv("LAZYBASE_CACHE")
	if dir == "" {
		t.Skip("LAZYBASE_CACHE not set")
	}
	paths, _ := filepath.Glob(filepath.Join(dir, "e2e", "estargz", "*"))
	if len(paths) == 0 {
		t.Skipf("no cached reference images under %s", dir)
	}
	for _, p := range paths {
		t.Run(filepath.Base(p), func(t *testing.T) {
			idx, err := layout.ImageIndexFromPath(p)
			if err != nil {
				t.Fatal(err)
			}
			m, err := idx.IndexManifest()
			if err != nil {
				t.Fatal(err)
			}
			for _, d := range m.Manifests {
				img, err := idx.Image(d.Digest)
				if err != nil {
					t.Fatal(err)
				}
				t.Logf("%d layers checked", checkLayers(t, img))
			}
		})
	}
}

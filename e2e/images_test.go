//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/refimage"
)

// Repositories and tags the reference images are published under.
const (
	repoDebian = "ref/debian"
	repoGolang = "ref/golang"
	tagGzip    = "gzip"
	tagEStargz = "estargz"
)

// refImage is one reference image in both forms.
type refImage struct {
	kind    refimage.Kind
	gzip    v1.Image
	estargz v1.Image
}

var refs struct {
	once      sync.Once
	err       error
	conv      *convert.Converter
	debian    *refImage
	golang    *refImage
	buildTime time.Duration
	convTime  time.Duration
}

// referenceImages builds (or finds cached) the debian-like and golang-like
// reference images and converts them to eStargz, once per test process.
func referenceImages(t testing.TB) (debian, golang *refImage) {
	t.Helper()
	refs.once.Do(func() {
		ctx := context.Background()
		start := time.Now()
		var imgs [2]*refimage.Image
		for i, k := range []refimage.Kind{refimage.Debian, refimage.Golang} {
			img, err := refimage.Build(ctx, k)
			if err != nil {
				refs.err = fmt.Errorf("reference image %s: %w", k, err)
				return
			}
			imgs[i] = img
		}
		refs.buildTime = time.Since(start)
		start = time.Now()
		c, err := convert.New()
		if err != nil {
			refs.err = fmt.Errorf("converter: %w", err)
			return
		}
		refs.conv = c
		var out [2]*refImage
		for i, img := range imgs {
			res, err := c.Image(ctx, img.Image)
			if err != nil {
				refs.err = fmt.Errorf("converting %s: %w", img.Kind, err)
				return
			}
			out[i] = &refImage{kind: img.Kind, gzip: img.Image, estargz: res.Image}
		}
		refs.convTime = time.Since(start)
		refs.debian, refs.golang = out[0], out[1]
	})
	if refs.err != nil {
		t.Fatal(refs.err)
	}
	record(t, "refimage-build", refs.buildTime)
	record(t, "estargz-convert", refs.convTime)
	return refs.debian, refs.golang
}

func cleanupImages() {
	if refs.conv != nil {
		refs.conv.Close()
	}
}

// publish pushes img to the Stack's registry directly (not through the
// shaping proxy) and returns its manifest digest.
func publish(ctx context.Context, t testing.TB, s *harness.Stack, repo, tag string, img v1.Image) v1.Hash {
	t.Helper()
	ref, err := name.ParseReference(s.Registry.DirectRef(repo, tag))
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, img, remote.WithContext(ctx), remote.WithJobs(4)); err != nil {
		t.Fatalf("publishing %s: %v", ref, err)
	}
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d
}

// publishAll pushes both reference images in both forms.
func publishAll(ctx context.Context, t testing.TB, s *harness.Stack) (debian, golang *refImage) {
	t.Helper()
	debian, golang = referenceImages(t)
	start := time.Now()
	for _, p := range []struct {
		repo string
		img  *refImage
	}{{repoDebian, debian}, {repoGolang, golang}} {
		publish(ctx, t, s, p.repo, tagGzip, p.img.gzip)
		publish(ctx, t, s, p.repo, tagEStargz, p.img.estargz)
	}
	record(t, "publish", time.Since(start))
	return debian, golang
}

// layerDigests returns the digests of img's layers.
func layerDigests(t testing.TB, img v1.Image) []string {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, l := range m.Layers {
		out = append(out, l.Digest.String())
	}
	return out
}

// layerSizes returns the compressed sizes of img's layers by digest.
func layerSizes(t testing.TB, img v1.Image) map[string]int64 {
	t.Helper()
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, l := range m.Layers {
		out[l.Digest.String()] = l.Size
	}
	return out
}

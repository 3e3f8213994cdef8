//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
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
// reference images and their eStargz forms, once per test process.
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
		var out [2]*refImage
		for i, img := range imgs {
			esgz, err := converted(ctx, img)
			if err != nil {
				refs.err = fmt.Errorf("converting %s: %w", img.Kind, err)
				return
			}
			out[i] = &refImage{kind: img.Kind, gzip: img.Image, estargz: esgz}
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

// converted returns the eStargz form of a reference image from the cache
// (CacheDir/e2e/estargz), converting it on a miss. The cache key covers the
// source manifest digest, the convert package's source and go.sum, so a
// change to the converter or its dependencies converts anew.
func converted(ctx context.Context, img *refimage.Image) (v1.Image, error) {
	root, err := harness.RepoRoot()
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	fmt.Fprintf(h, "estargz-cache v1\n%s\n", img.Digest)
	files, _ := filepath.Glob(filepath.Join(root, "convert", "*.go"))
	files = append(files, filepath.Join(root, "go.sum"))
	sort.Strings(files)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, err
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	key := hex.EncodeToString(h.Sum(nil))[:16]
	cacheDir := filepath.Join(harness.CacheDir(root), "e2e", "estargz")
	dir := filepath.Join(cacheDir, string(img.Kind)+"-"+key)
	if esgz, err := openLayout(dir); err == nil {
		return esgz, nil
	}
	if refs.conv == nil {
		c, err := convert.New()
		if err != nil {
			return nil, fmt.Errorf("converter: %w", err)
		}
		refs.conv = c
	}
	res, err := refs.conv.Image(ctx, img.Image)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		return nil, err
	}
	tmp, err := os.MkdirTemp(cacheDir, ".tmp-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	lp, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return nil, err
	}
	if err := lp.AppendImage(res.Image); err != nil {
		return nil, fmt.Errorf("caching %s: %w", dir, err)
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return nil, err
	}
	return openLayout(dir)
}

// openLayout opens the one image of an OCI layout directory.
func openLayout(dir string) (v1.Image, error) {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, err
	}
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	if len(m.Manifests) != 1 {
		return nil, fmt.Errorf("layout %s: %d manifests, want 1", dir, len(m.Manifests))
	}
	return idx.Image(m.Manifests[0].Digest)
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

// convertedWith converts img to eStargz with opts, now (no cache). The
// result's layers live in the converter's spool, closed when the test
// ends.
func convertedWith(ctx context.Context, t testing.TB, img v1.Image, opts ...convert.Option) v1.Image {
	t.Helper()
	c, err := convert.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	start := time.Now()
	res, err := c.Image(ctx, img)
	if err != nil {
		t.Fatalf("converting with %d options: %v", len(opts), err)
	}
	t.Logf("convert (%d options): %s", len(opts), time.Since(start).Round(time.Millisecond))
	return res.Image
}

// requirePushedOnBase reads the image pushed as ref and checks that its
// layers are base's, in order, and one more (the build's own).
func requirePushedOnBase(ctx context.Context, t testing.TB, ref string, base []string) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r, remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	pushed := layerDigests(t, img)
	if len(pushed) != len(base)+1 {
		t.Fatalf("pushed image has layers %v, want the %d base layers and one more", pushed, len(base))
	}
	for i, d := range base {
		if pushed[i] != d {
			t.Errorf("pushed layer %d is %s, want the lazy base's %s", i, pushed[i], d)
		}
	}
}

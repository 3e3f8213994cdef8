package prefetch_test

import (
	"archive/tar"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// convertWith converts one gzip layer with src as prefetch source and returns
// the converted layer's regular files and landmarks in tar order.
func convertWith(t *testing.T, layer *testimage.Layer, src prefetch.Source) ([]string, convert.LayerResult) {
	t.Helper()
	opts := []convert.Option{convert.WithTempDir(t.TempDir())}
	if src != nil {
		opts = append(opts, convert.WithPrefetch(src))
	}
	c, err := convert.New(opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	l, err := c.Layer(context.Background(), layer, v1.Hash{})
	if err != nil {
		t.Fatalf("converting: %v", err)
	}
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	zr, err := gzip.NewReader(rc) // reads every gzip member of the eStargz blob
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("reading the converted layer: %v", err)
		}
		if h.Typeflag == tar.TypeReg && h.Name != estargz.TOCTarName {
			names = append(names, strings.TrimPrefix(h.Name, "./"))
		}
	}
	return names, l.Result()
}

func TestConvertWithProfile(t *testing.T) {
	tarball := testimage.MustTar(testimage.Files(
		"etc/os-release", "ID=test\n",
		"usr/bin/tool", "#!/bin/sh\necho tool\n",
		"lib/a.so", strings.Repeat("a", 5000),
		"lib/b.so", strings.Repeat("b", 3000),
		"doc/readme.md", "read me\n",
	))
	layer := testimage.GzipLayer(tarball)
	dgst, err := layer.Digest()
	if err != nil {
		t.Fatal(err)
	}
	const img = "registry.example/tool:1"
	p := &prefetch.Profile{
		Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Image: img,
		Rules: prefetch.Rules{Exclude: []string{"**/*.md"}},
		Layers: []prefetch.Layer{{Digest: dgst.String(), Runs: 2, Files: []prefetch.File{
			{Path: "/lib/b.so", Size: 3000, Count: 2, RankSum: 0},
			{Path: "usr/bin/tool", Size: 20, Count: 2, RankSum: 2},
			{Path: "missing/file", Size: 1, Count: 1, RankSum: 2},
			{Path: "doc/readme.md", Size: 8, Count: 2, RankSum: 6},
		}}},
	}
	// Through the file format, as lazybase convert --prefetch reads it.
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	src, err := prefetch.Parse(b)
	if err != nil {
		t.Fatal(err)
	}

	names, res := convertWith(t, layer, src)
	i := slices.Index(names, estargz.PrefetchLandmark)
	if i < 0 {
		t.Fatalf("no %s in the converted layer: %q", estargz.PrefetchLandmark, names)
	}
	if got, want := names[:i], []string{"lib/b.so", "usr/bin/tool"}; !slices.Equal(got, want) {
		t.Errorf("files before the landmark %q, want %q", got, want)
	}
	if res.Prefetch != 2 || !slices.Equal(res.MissingPrefetch, []string{"missing/file"}) {
		t.Errorf("result prefetch %d missing %q, want 2 and [missing/file]", res.Prefetch, res.MissingPrefetch)
	}
	for _, f := range []string{"etc/os-release", "lib/a.so", "doc/readme.md"} {
		if j := slices.Index(names, f); j < i {
			t.Errorf("%s at %d, want it after the landmark at %d", f, j, i)
		}
	}

	// The same profile, for another image: the caller gets nothing to use
	// and converts without a profile.
	if s, ok := p.ForImage("registry.example/other:1", v1.Hash{}); ok || s != nil {
		t.Fatalf("ForImage(other image) = %v, %v", s, ok)
	}
	s, ok := p.ForImage(img, v1.Hash{})
	if !ok {
		t.Fatal("ForImage(its own image) not ok")
	}
	if names2, _ := convertWith(t, layer, s); !slices.Equal(names2, names) {
		t.Errorf("converting through ForImage gave %q, want %q", names2, names)
	}

	// A profile of other layers leaves this one unprioritized.
	other := *p
	other.Layers = []prefetch.Layer{{Digest: testimage.SHA256([]byte("other")).String(), Runs: 1, Files: []prefetch.File{{Path: "lib/b.so", Count: 1}}}}
	names, res = convertWith(t, layer, &other)
	if len(names) == 0 || names[0] != estargz.NoPrefetchLandmark || res.Prefetch != 0 {
		t.Errorf("with a profile of other layers: entries %q, prefetch %d; want %s first and none", names, res.Prefetch, estargz.NoPrefetchLandmark)
	}
}

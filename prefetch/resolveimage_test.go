package prefetch

import (
	"context"
	"io"
	stdlog "log"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// remoteSource is a ManifestSource over go-containerregistry's remote
// package, as a plain registry client reads manifests.
type remoteSource struct{}

func (remoteSource) Manifest(ctx context.Context, ref string) (RawManifest, error) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return RawManifest{}, err
	}
	d, err := remote.Get(r, remote.WithContext(ctx))
	if err != nil {
		return RawManifest{}, err
	}
	return RawManifest{MediaType: d.MediaType, Digest: d.Digest, Body: d.Manifest}, nil
}

// lyingSource passes what src reads through change.
type lyingSource struct {
	src    ManifestSource
	change func(ref string, m *RawManifest)
}

func (s lyingSource) Manifest(ctx context.Context, ref string) (RawManifest, error) {
	m, err := s.src.Manifest(ctx, ref)
	if err == nil {
		s.change(ref, &m)
	}
	return m, err
}

// annotatedImage returns an image of one layer annotated as the converter
// annotates converted layers (source layer, uncompressed size 4096) and
// manifests (source manifest), and the layer's digest.
func annotatedImage(t *testing.T) (v1.Image, v1.Hash) {
	t.Helper()
	l, err := random.Layer(2000, types.OCILayer)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.Append(mutate.MediaType(empty.Image, types.OCIManifestSchema1), mutate.Addendum{
		Layer: l, MediaType: types.OCILayer,
		Annotations: map[string]string{annotationSourceLayer: diffA, annotationUncompressedSize: "4096"},
	})
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.Annotations(img, map[string]string{annotationSourceManifest: digestC}).(v1.Image)
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return img, d
}

// TestResolveImage reads an image, and an index holding it, from an
// in-process registry and fills in the profile from the converter's
// annotations; for the index, the digest is the platform manifest's.
func TestResolveImage(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "http://")
	img, layer := annotatedImage(t)
	other, err := random.Image(1000, 1)
	if err != nil {
		t.Fatal(err)
	}
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}})
	imgRef, idxRef := host+"/pf/app:img", host+"/pf/app:idx"
	for ref, write := range map[string]func(name.Reference) error{
		imgRef: func(r name.Reference) error { return remote.Write(r, img) },
		idxRef: func(r name.Reference) error { return remote.WriteIndex(r, idx) },
	} {
		r, err := name.ParseReference(ref)
		if err != nil {
			t.Fatal(err)
		}
		if err := write(r); err != nil {
			t.Fatal(err)
		}
	}
	imgDigest, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, ref := range []string{imgRef, idxRef} {
		t.Run(ref[strings.LastIndexByte(ref, ':')+1:], func(t *testing.T) {
			p := run(ref, layer.String(), "bin/sh")
			if err := ResolveImage(ctx, p, remoteSource{}); err != nil {
				t.Fatal(err)
			}
			if p.Digest != imgDigest.String() || p.SourceDigest != digestC {
				t.Errorf("profile digest %s source %s, want %s and %s", p.Digest, p.SourceDigest, imgDigest, digestC)
			}
			if l := p.Layers[0]; l.SourceDigest != diffA || l.Size != 4096 {
				t.Errorf("layer %+v, want source %s and size 4096", l, diffA)
			}
		})
	}

	// What a registry or a profile gets wrong fails, naming the image or
	// the manifest.
	for _, tc := range []struct {
		name, ref, layer, want string
		change                 func(ref string, m *RawManifest)
	}{
		{"no image", "", layer.String(), "names no image", nil},
		{"bad reference", "Not A Ref//x", layer.String(), "Not A Ref//x", nil},
		{"foreign layers", imgRef, digestA, "none of the 1 recorded layers", nil},
		{"no such tag", host + "/pf/app:nope", layer.String(), "pf/app:nope", nil},
		{"body not of its digest", imgRef, layer.String(), "registry sent content with digest",
			func(_ string, m *RawManifest) { m.Body = append(m.Body, ' ') }},
		{"child of another digest", idxRef, layer.String(), "registry named digest",
			func(ref string, m *RawManifest) {
				if strings.Contains(ref, "@") {
					m.Digest = hash(t, digestB)
				}
			}},
		{"not sha256", imgRef, layer.String(), "not a sha256 digest",
			func(_ string, m *RawManifest) { m.Digest = v1.Hash{Algorithm: "sha512", Hex: strings.Repeat("a", 128)} }},
		{"a config, not a manifest", imgRef, layer.String(), "not an image manifest or index",
			func(_ string, m *RawManifest) { m.MediaType = types.OCIConfigJSON }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var src ManifestSource = remoteSource{}
			if tc.change != nil {
				src = lyingSource{src, tc.change}
			}
			p := run(tc.ref, tc.layer, "bin/sh")
			err := ResolveImage(ctx, p, src)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ResolveImage: %v, want an error containing %q", err, tc.want)
			}
			if p.Digest != "" {
				t.Errorf("profile digest %s set by a failed resolve", p.Digest)
			}
		})
	}
}

func TestRepository(t *testing.T) {
	for in, want := range map[string]string{
		"ubuntu":                           "ubuntu",
		"ubuntu:22.04":                     "ubuntu",
		"localhost:5000/app":               "localhost:5000/app",
		"localhost:5000/app:v1":            "localhost:5000/app",
		"mirror.example/a/b:v1@" + digestA: "mirror.example/a/b",
		"mirror.example/a/b@" + digestA:    "mirror.example/a/b",
	} {
		if got := repository(in); got != want {
			t.Errorf("repository(%q) = %q, want %q", in, got, want)
		}
	}
}

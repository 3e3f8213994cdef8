package prefetch

import (
	"slices"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
)

func TestAnnotationsMatchTheConverter(t *testing.T) {
	for got, want := range map[string]string{
		annotationSourceManifest:   convert.AnnotationSourceManifest,
		annotationSourceLayer:      convert.AnnotationSourceLayer,
		annotationUncompressedSize: convert.AnnotationUncompressedSize,
	} {
		if got != want {
			t.Errorf("annotation %q, the converter writes %q", got, want)
		}
	}
}

func TestResolveFillsSourceDigestsFromConverterAnnotations(t *testing.T) {
	const srcA, srcManifest = diffA, digestC
	m := &v1.Manifest{
		Annotations: map[string]string{annotationSourceManifest: srcManifest},
		Layers: []v1.Descriptor{
			{Digest: hash(t, digestA), Annotations: map[string]string{annotationSourceLayer: srcA, annotationUncompressedSize: "4096"}},
			{Digest: hash(t, digestB), Annotations: map[string]string{annotationSourceLayer: "not a digest", annotationUncompressedSize: "-3"}},
		},
	}
	p := run("registry.example/app:lazy", digestA, "bin/sh", "etc/passwd")
	other := run("", digestB, "lib/x.so").Layers[0]
	p.Layers = append(p.Layers, other)
	if n := p.Resolve(hash(t, imgDgst), m); n != 2 {
		t.Fatalf("Resolve matched %d layers, want 2", n)
	}
	if p.Digest != imgDgst || p.SourceDigest != srcManifest {
		t.Errorf("digest %s source %s", p.Digest, p.SourceDigest)
	}
	if l := p.Layers[0]; l.SourceDigest != srcA || l.Size != 4096 {
		t.Errorf("layer A %+v", l)
	}
	if l := p.Layers[1]; l.SourceDigest != "" || l.Size != 0 {
		t.Errorf("layer B with bad annotations %+v: want nothing filled in", l)
	}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	// The source layer's digest now selects the layer, and the source
	// manifest's digest the image.
	if got := p.PrefetchFiles(v1.Hash{}, hash(t, srcA)); !slices.Equal(got, []string{"bin/sh", "etc/passwd"}) {
		t.Errorf("PrefetchFiles(source digest) = %q", got)
	}
	if _, ok := p.ForImage("registry.example/app:v1", hash(t, srcManifest)); !ok {
		t.Error("ForImage(source manifest) not ok")
	}
	if _, ok := p.ForImage("registry.example/app:lazy", hash(t, digestB)); ok {
		t.Error("ForImage(another digest) ok")
	}
	// A manifest without the recorded layers changes nothing.
	q := run("", digestA, "a")
	if n := q.Resolve(hash(t, imgDgst), &v1.Manifest{Layers: []v1.Descriptor{{Digest: hash(t, digestB)}}}); n != 0 || q.Digest != "" {
		t.Errorf("Resolve of an unrelated manifest: %d, digest %q", n, q.Digest)
	}
	// Merging keeps the resolved fields and refuses another source.
	m2, err := Merge(run("", digestA, "x"), p)
	if err != nil || m2.SourceDigest != srcManifest || m2.Layers[0].SourceDigest != srcA {
		t.Fatalf("Merge: %+v, %v", m2, err)
	}
	r := run("", digestA, "x")
	r.SourceDigest = imgDgst
	if _, err := Merge(p, r); err == nil {
		t.Error("merging profiles of two source images succeeded")
	}
}

package prefetch

import (
	"strconv"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Annotations the converter writes on converted manifests and layers (the
// values of convert.AnnotationSourceManifest, convert.AnnotationSourceLayer
// and convert.AnnotationUncompressedSize; prefetch does not import convert).
const (
	annotationSourceManifest   = "dev.lazybase.source.manifest.digest"
	annotationSourceLayer      = "dev.lazybase.source.layer.digest"
	annotationUncompressedSize = "io.containers.estargz.uncompressed-size"
)

// Resolve fills in what the manifest m, whose digest is digest, tells about
// the profile's layers: for each layer of m that the profile recorded (by
// digest), the digest of the layer it was converted from and its
// uncompressed size, and, when any matched, the profile's manifest digest
// and source manifest digest where they are unset. It returns how many of
// the profile's layers matched. Call it with each manifest of an index to
// resolve a profile recorded on one of its platforms.
func (p *Profile) Resolve(digest v1.Hash, m *v1.Manifest) int {
	n := 0
	for _, d := range m.Layers {
		i := layerByDigest(p.Layers, d.Digest.String())
		if i < 0 {
			continue
		}
		n++
		l := &p.Layers[i]
		if src, err := v1.NewHash(d.Annotations[annotationSourceLayer]); err == nil && l.SourceDigest == "" {
			l.SourceDigest = src.String()
		}
		if size, err := strconv.ParseInt(d.Annotations[annotationUncompressedSize], 10, 64); err == nil && size > 0 && size <= maxSize && l.Size == 0 {
			l.Size = size
		}
	}
	if n == 0 {
		return 0
	}
	if p.Digest == "" && digest != (v1.Hash{}) {
		p.Digest = digest.String()
	}
	if src, err := v1.NewHash(m.Annotations[annotationSourceManifest]); err == nil && p.SourceDigest == "" {
		p.SourceDigest = src.String()
	}
	return n
}

func layerByDigest(layers []Layer, digest string) int {
	for i, l := range layers {
		if l.Digest == digest {
			return i
		}
	}
	return -1
}

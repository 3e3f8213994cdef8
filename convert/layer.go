package convert

import (
	"io"
	"os"

	"github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Layer is a converted layer. Its blob lives in a temporary file owned by the
// Converter that made it; it stays readable until the Converter is closed.
type Layer struct {
	path   string
	desc   v1.Descriptor
	diffID v1.Hash
	result LayerResult
	lpaths *layerPaths // for the cross-layer check of images
}

var _ v1.Layer = (*Layer)(nil)

// Digest returns the digest of the converted blob.
func (l *Layer) Digest() (v1.Hash, error) { return l.desc.Digest, nil }

// DiffID returns the digest of the converted blob's uncompressed tar.
func (l *Layer) DiffID() (v1.Hash, error) { return l.diffID, nil }

// Size returns the size of the converted blob.
func (l *Layer) Size() (int64, error) { return l.desc.Size, nil }

// MediaType returns the OCI media type of the converted blob.
func (l *Layer) MediaType() (types.MediaType, error) { return l.desc.MediaType, nil }

// Compressed opens the converted blob.
func (l *Layer) Compressed() (io.ReadCloser, error) { return os.Open(l.path) }

// Uncompressed opens the converted blob and decompresses it.
func (l *Layer) Uncompressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, err
	}
	return decompressed(f, l.desc.MediaType)
}

// Descriptor returns the layer's descriptor with its annotations, as it
// appears in the converted manifest.
func (l *Layer) Descriptor() (*v1.Descriptor, error) {
	d := l.desc
	d.Annotations = copyMap(l.desc.Annotations)
	return &d, nil
}

// Result describes how the layer was made.
func (l *Layer) Result() LayerResult {
	r := l.result
	r.MissingPrefetch = append([]string(nil), l.result.MissingPrefetch...)
	return r
}

func (l *Layer) paths() *layerPaths { return l.lpaths }

// Path returns the file holding the converted blob.
func (l *Layer) Path() string { return l.path }

func copyMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

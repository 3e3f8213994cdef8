package testimage

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/zstd"
)

// Layer is a v1.Layer over bytes held in memory. Unlike layers from
// go-containerregistry's tarball package, it reports whatever digest, diffID,
// media type and annotations it was given, so tests can make layers that lie
// about their bytes. Zero fields are computed honestly.
type Layer struct {
	// Blob is the compressed blob.
	Blob []byte
	// Type is the media type; empty means OCI gzip.
	Type types.MediaType
	// Hash, if set, is reported as the digest instead of the blob's sha256.
	Hash *v1.Hash
	// Diff, if set, is reported as the diffID instead of the sha256 of the
	// decompressed blob.
	Diff *v1.Hash
	// Length, if set, is reported as the size instead of len(Blob).
	Length *int64
	// Annotations go into the layer's descriptor.
	Annotations map[string]string
}

var (
	_ v1.Layer = (*Layer)(nil)
	// descriptor lets partial.Descriptor and converters see the annotations.
	_ interface {
		Descriptor() (*v1.Descriptor, error)
	} = (*Layer)(nil)
)

// NewLayer returns a Layer over blob with honest digest and diffID.
func NewLayer(blob []byte, mt types.MediaType) *Layer {
	return &Layer{Blob: blob, Type: mt}
}

// GzipLayer gzips a tar stream and returns it as an OCI gzip layer.
func GzipLayer(tarball []byte) *Layer { return NewLayer(Gzip(tarball), types.OCILayer) }

// EntriesLayer is GzipLayer of Tar(entries).
func EntriesLayer(entries []Entry) (*Layer, error) {
	t, err := Tar(entries)
	if err != nil {
		return nil, err
	}
	return GzipLayer(t), nil
}

// ZstdLayer compresses a tar stream with zstd and returns it as an OCI zstd
// layer.
func ZstdLayer(tarball []byte) *Layer { return NewLayer(Zstd(tarball), types.OCILayerZStd) }

// Zstd compresses b with zstd at the default level, single-threaded, so the
// output is deterministic.
func Zstd(b []byte) []byte {
	zw, err := zstd.NewWriter(nil, zstd.WithEncoderConcurrency(1))
	if err != nil {
		panic(err) // only bad options fail
	}
	defer zw.Close()
	return zw.EncodeAll(b, nil)
}

// SHA256 returns the sha256 hash of b.
func SHA256(b []byte) v1.Hash {
	s := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(s[:])}
}

// Digest returns Hash, or the sha256 of Blob.
func (l *Layer) Digest() (v1.Hash, error) {
	if l.Hash != nil {
		return *l.Hash, nil
	}
	return SHA256(l.Blob), nil
}

// DiffID returns Diff, or the sha256 of the decompressed blob.
func (l *Layer) DiffID() (v1.Hash, error) {
	if l.Diff != nil {
		return *l.Diff, nil
	}
	rc, err := l.Uncompressed()
	if err != nil {
		return v1.Hash{}, err
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return v1.Hash{}, fmt.Errorf("decompressing: %w", err)
	}
	return SHA256(b), nil
}

// Compressed returns the blob.
func (l *Layer) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(l.Blob)), nil
}

// Uncompressed decompresses the blob according to its leading magic bytes
// (gzip, zstd, or none).
func (l *Layer) Uncompressed() (io.ReadCloser, error) {
	return Decompress(l.Blob)
}

// Size returns Length, or the blob's length.
func (l *Layer) Size() (int64, error) {
	if l.Length != nil {
		return *l.Length, nil
	}
	return int64(len(l.Blob)), nil
}

// MediaType returns Type, or the OCI gzip layer type.
func (l *Layer) MediaType() (types.MediaType, error) {
	if l.Type == "" {
		return types.OCILayer, nil
	}
	return l.Type, nil
}

// Descriptor returns the layer's descriptor with its annotations.
func (l *Layer) Descriptor() (*v1.Descriptor, error) {
	d, err := l.Digest()
	if err != nil {
		return nil, err
	}
	mt, _ := l.MediaType()
	var ann map[string]string
	if len(l.Annotations) > 0 {
		ann = make(map[string]string, len(l.Annotations))
		for k, v := range l.Annotations {
			ann[k] = v
		}
	}
	size, _ := l.Size()
	return &v1.Descriptor{MediaType: mt, Size: size, Digest: d, Annotations: ann}, nil
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// Decompress opens b as gzip or zstd by its magic bytes, or returns it as is.
func Decompress(b []byte) (io.ReadCloser, error) {
	switch {
	case bytes.HasPrefix(b, gzipMagic):
		zr, err := gzip.NewReader(bytes.NewReader(b))
		if err != nil {
			return nil, err
		}
		return zr, nil
	case bytes.HasPrefix(b, zstdMagic):
		zr, err := zstd.NewReader(bytes.NewReader(b))
		if err != nil {
			return nil, err
		}
		return zr.IOReadCloser(), nil
	}
	return io.NopCloser(bytes.NewReader(b)), nil
}

// ReadAll decompresses b completely (see Decompress).
func ReadAll(b []byte) ([]byte, error) {
	rc, err := Decompress(b)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	return io.ReadAll(rc)
}

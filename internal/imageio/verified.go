package imageio

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// maxMetadataSize bounds the manifests and configs read whole into memory.
const maxMetadataSize = 32 << 20

// checkBlob checks b against the descriptor that names it. what says what
// the blob is ("manifest", "config").
func checkBlob(b []byte, d v1.Descriptor, what string) error {
	if d.Digest.Algorithm != "sha256" {
		return fmt.Errorf("%s %s: unsupported digest algorithm %q", what, d.Digest, d.Digest.Algorithm)
	}
	got, _, err := v1.SHA256(bytes.NewReader(b))
	if err != nil {
		return err
	}
	if got != d.Digest {
		return fmt.Errorf("%s %s: digest mismatch: content is %s (%d bytes)", what, d.Digest, got, len(b))
	}
	if d.Size != 0 && int64(len(b)) != d.Size {
		return fmt.Errorf("%s %s: size mismatch: %d bytes, descriptor says %d", what, d.Digest, len(b), d.Size)
	}
	return nil
}

// readLayoutBlob reads the layout blob that d names, whole, and checks it
// against d.
func readLayoutBlob(p layout.Path, d v1.Descriptor, what string) ([]byte, error) {
	if d.Size <= 0 || d.Size > maxMetadataSize {
		return nil, fmt.Errorf("%s %s: size %d is out of range (1 to %d bytes)", what, d.Digest, d.Size, maxMetadataSize)
	}
	rc, err := p.Blob(d.Digest)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("%s %s: blob missing from the layout", what, d.Digest)
		}
		return nil, fmt.Errorf("%s %s: %w", what, d.Digest, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, d.Size+1))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, d.Digest, err)
	}
	if err := checkBlob(b, d, what); err != nil {
		return nil, err
	}
	return b, nil
}

// layoutIndex is an index of an OCI layout whose manifest was checked
// against its digest. Its children are checked when they are opened.
type layoutIndex struct {
	path layout.Path
	desc v1.Descriptor
	raw  []byte
	im   *v1.IndexManifest
}

var _ v1.ImageIndex = (*layoutIndex)(nil)

func openLayoutIndex(p layout.Path, d v1.Descriptor) (*layoutIndex, error) {
	raw, err := readLayoutBlob(p, d, "index")
	if err != nil {
		return nil, err
	}
	im, err := v1.ParseIndexManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", d.Digest, err)
	}
	return &layoutIndex{path: p, desc: d, raw: raw, im: im}, nil
}

func (i *layoutIndex) MediaType() (types.MediaType, error) { return i.desc.MediaType, nil }
func (i *layoutIndex) Digest() (v1.Hash, error)            { return i.desc.Digest, nil }
func (i *layoutIndex) Size() (int64, error)                { return int64(len(i.raw)), nil }
func (i *layoutIndex) RawManifest() ([]byte, error)        { return i.raw, nil }

// IndexManifest returns a copy of the parsed index.
func (i *layoutIndex) IndexManifest() (*v1.IndexManifest, error) {
	return i.im.DeepCopy(), nil
}

func (i *layoutIndex) child(h v1.Hash) (v1.Descriptor, error) {
	for _, d := range i.im.Manifests {
		if d.Digest == h {
			return d, nil
		}
	}
	return v1.Descriptor{}, fmt.Errorf("index %s has no manifest %s", i.desc.Digest, h)
}

// Image opens the child image h.
func (i *layoutIndex) Image(h v1.Hash) (v1.Image, error) {
	d, err := i.child(h)
	if err != nil {
		return nil, err
	}
	if !d.MediaType.IsImage() {
		return nil, fmt.Errorf("manifest %s: media type %q is not an image", h, d.MediaType)
	}
	return openLayoutImage(i.path, d)
}

// ImageIndex opens the child index h.
func (i *layoutIndex) ImageIndex(h v1.Hash) (v1.ImageIndex, error) {
	d, err := i.child(h)
	if err != nil {
		return nil, err
	}
	if !d.MediaType.IsIndex() {
		return nil, fmt.Errorf("manifest %s: media type %q is not an index", h, d.MediaType)
	}
	return openLayoutIndex(i.path, d)
}

// layoutImage is an image of an OCI layout whose manifest and config were
// checked against their digests when it was opened; it serves those bytes
// and never reads them again. Layer blobs are read when asked for; the
// converter checks them against their digests as it reads them.
type layoutImage struct {
	path     layout.Path
	desc     v1.Descriptor
	manifest []byte
	m        *v1.Manifest
	config   []byte
}

var _ partial.CompressedImageCore = (*layoutImage)(nil)

func openLayoutImage(p layout.Path, d v1.Descriptor) (v1.Image, error) {
	raw, err := readLayoutBlob(p, d, "manifest")
	if err != nil {
		return nil, err
	}
	m, err := v1.ParseManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", d.Digest, err)
	}
	cfg, err := readLayoutBlob(p, m.Config, "config")
	if err != nil {
		return nil, fmt.Errorf("manifest %s: %w", d.Digest, err)
	}
	return partial.CompressedToImage(&layoutImage{path: p, desc: d, manifest: raw, m: m, config: cfg})
}

func (li *layoutImage) MediaType() (types.MediaType, error) { return li.desc.MediaType, nil }
func (li *layoutImage) RawManifest() ([]byte, error)        { return li.manifest, nil }
func (li *layoutImage) RawConfigFile() ([]byte, error)      { return li.config, nil }

// LayerByDigest returns the layer (or config) blob h of the manifest.
func (li *layoutImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if h == li.m.Config.Digest {
		return &layoutBlob{path: li.path, desc: li.m.Config}, nil
	}
	for _, d := range li.m.Layers {
		if d.Digest == h {
			return &layoutBlob{path: li.path, desc: d}, nil
		}
	}
	return nil, fmt.Errorf("manifest %s has no blob %s", li.desc.Digest, h)
}

// layoutBlob is a blob of an OCI layout named by a checked manifest.
type layoutBlob struct {
	path layout.Path
	desc v1.Descriptor
}

func (b *layoutBlob) Digest() (v1.Hash, error)            { return b.desc.Digest, nil }
func (b *layoutBlob) Size() (int64, error)                { return b.desc.Size, nil }
func (b *layoutBlob) MediaType() (types.MediaType, error) { return b.desc.MediaType, nil }
func (b *layoutBlob) Compressed() (io.ReadCloser, error)  { return b.path.Blob(b.desc.Digest) }

// Descriptor returns the blob's descriptor with its annotations.
func (b *layoutBlob) Descriptor() (*v1.Descriptor, error) {
	d := b.desc
	return &d, nil
}

// checkedIndex checks every child manifest it opens against the digest
// that names it. go-containerregistry's remote
// package verifies what it fetches by digest already; this makes the check
// independent of how the index was read.
type checkedIndex struct {
	idx v1.ImageIndex
}

var _ v1.ImageIndex = checkedIndex{}

func (c checkedIndex) MediaType() (types.MediaType, error)       { return c.idx.MediaType() }
func (c checkedIndex) Digest() (v1.Hash, error)                  { return c.idx.Digest() }
func (c checkedIndex) Size() (int64, error)                      { return c.idx.Size() }
func (c checkedIndex) IndexManifest() (*v1.IndexManifest, error) { return c.idx.IndexManifest() }
func (c checkedIndex) RawManifest() ([]byte, error)              { return c.idx.RawManifest() }

// Descriptor returns the wrapped index's descriptor.
func (c checkedIndex) Descriptor() (*v1.Descriptor, error) { return partial.Descriptor(c.idx) }

// Image opens the child image h and checks it.
func (c checkedIndex) Image(h v1.Hash) (v1.Image, error) {
	img, err := c.idx.Image(h)
	if err != nil {
		return nil, err
	}
	if err := checkImage(img, h); err != nil {
		return nil, err
	}
	return img, nil
}

// ImageIndex opens the child index h and checks it.
func (c checkedIndex) ImageIndex(h v1.Hash) (v1.ImageIndex, error) {
	idx, err := c.idx.ImageIndex(h)
	if err != nil {
		return nil, err
	}
	raw, err := idx.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", h, err)
	}
	if err := checkBlob(raw, v1.Descriptor{Digest: h}, "index"); err != nil {
		return nil, err
	}
	return checkedIndex{idx}, nil
}

// checkImage checks img's manifest against want. Its config is not read
// here: a remote image fetches it by digest, through go-containerregistry's
// verifying reader, only when it is used (an up-to-date check or a mirror
// record needs no config).
func checkImage(img v1.Image, want v1.Hash) error {
	raw, err := img.RawManifest()
	if err != nil {
		return fmt.Errorf("manifest %s: %w", want, err)
	}
	return checkBlob(raw, v1.Descriptor{Digest: want}, "manifest")
}

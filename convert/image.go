package convert

import (
	"context"
	"errors"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ImageResult is a converted image.
type ImageResult struct {
	// Image is the converted image (OCI manifest and config media types).
	Image v1.Image
	// Source is the digest of the source manifest.
	Source v1.Hash
	// Digest is the digest of the converted manifest.
	Digest v1.Hash
	// Platform is the image's platform, from its config.
	Platform *v1.Platform
	// Layers describes each layer, in manifest order.
	Layers []LayerResult
}

// IndexResult is a converted index.
type IndexResult struct {
	// Index is the converted index.
	Index v1.ImageIndex
	// Source is the digest of the source index.
	Source v1.Hash
	// Digest is the digest of the converted index.
	Digest v1.Hash
	// Images are the converted images, in index order.
	Images []*ImageResult
	// Skipped lists the source manifests left out (other platforms,
	// attestations), with the reason.
	Skipped []Skipped
}

// Skipped is a manifest of an index that was not converted.
type Skipped struct {
	Digest v1.Hash `json:"digest"`
	Reason string  `json:"reason"`
}

// Image converts every layer of img and returns the converted image: OCI media
// types, rootfs.diff_ids updated, history, config, labels and annotations
// kept, and the source manifest digest recorded in AnnotationSourceManifest.
func (c *Converter) Image(ctx context.Context, img v1.Image) (*ImageResult, error) {
	return nil, errors.New("not implemented")
}

// Index converts the images of a multi-platform index (all platforms unless
// WithPlatforms selects some) and returns the converted index.
func (c *Converter) Index(ctx context.Context, idx v1.ImageIndex) (*IndexResult, error) {
	return nil, errors.New("not implemented")
}

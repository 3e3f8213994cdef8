package imageio

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Artifact is what Write writes: a v1.Image or a v1.ImageIndex.
type Artifact interface {
	partial.Describable
	RawManifest() ([]byte, error)
}

// Write writes an image or an index to ref and returns the descriptor it was
// named with. Every blob and child manifest is written first and the name
// last: for a registry the tag is PUT after everything it refers to is there;
// for an OCI layout index.json is replaced atomically after every blob is in
// place. platform, when not nil, is recorded in the layout's descriptor.
func (c *Client) Write(ctx context.Context, ref Ref, a Artifact, platform *v1.Platform) (v1.Descriptor, error) {
	switch a.(type) {
	case v1.Image, v1.ImageIndex:
	default:
		return v1.Descriptor{}, fmt.Errorf("writing %s: %T is neither an image nor an index", ref, a)
	}
	d, err := partial.Descriptor(a)
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("writing %s: %w", ref, err)
	}
	desc := *d
	if _, ok := a.(v1.Image); ok && platform != nil {
		p := *platform
		desc.Platform = &p
	}
	if ref.IsLayout() {
		err = c.writeLayout(ctx, ref, a, desc)
	} else {
		err = c.writeRemote(ctx, ref, a, desc)
	}
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("writing %s: %w", ref, err)
	}
	return desc, nil
}

func (c *Client) writeRemote(ctx context.Context, ref Ref, a Artifact, desc v1.Descriptor) error {
	tag, ok := ref.Registry.(name.Tag)
	if !ok {
		return errors.New("the destination must be a tag, not a digest")
	}
	t, ok := a.(remote.Taggable)
	if !ok {
		return fmt.Errorf("%T cannot be pushed", a)
	}
	opts := c.remoteOptions(remote.WithContext(ctx))
	// Blobs, child manifests and the manifest itself, by digest.
	byDigest := tag.Context().Digest(desc.Digest.String())
	if err := remote.Push(byDigest, t, opts...); err != nil {
		return classify(err)
	}
	// The tag, last.
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := remote.Tag(tag, t, opts...); err != nil {
		return fmt.Errorf("tagging %s: %w", desc.Digest, classify(err))
	}
	return nil
}

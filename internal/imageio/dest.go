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

// WriteOption configures one Write.
type WriteOption func(*writeOptions)

type writeOptions struct {
	progress func(complete, total int64)
}

// WithWriteProgress calls fn as bytes are written, with the bytes written so
// far and the total known so far. fn is called from one goroutine at a time.
func WithWriteProgress(fn func(complete, total int64)) WriteOption {
	return func(o *writeOptions) { o.progress = fn }
}

// Write writes an image or an index to ref and returns the descriptor it was
// named with. Every blob and child manifest is written first and the name
// last: for a registry the tag is PUT after everything it refers to is there;
// for an OCI layout index.json is replaced atomically after every blob is in
// place. platform, when not nil, is recorded in the layout's descriptor.
func (c *Client) Write(ctx context.Context, ref Ref, a Artifact, platform *v1.Platform, opts ...WriteOption) (v1.Descriptor, error) {
	var wo writeOptions
	for _, o := range opts {
		o(&wo)
	}
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
		err = c.writeLayout(ctx, ref, a, desc, wo)
	} else {
		err = c.writeRemote(ctx, ref, a, desc, wo)
	}
	if err != nil {
		return v1.Descriptor{}, fmt.Errorf("writing %s: %w", ref, err)
	}
	return desc, nil
}

// CheckDestination tells early whether ref can be written: a registry
// destination must be a tag.
func CheckDestination(ref Ref) error {
	if ref.IsLayout() {
		return nil
	}
	if _, ok := ref.Registry.(name.Tag); !ok {
		return fmt.Errorf("destination %s: must be a tag, not a digest", ref)
	}
	return nil
}

func (c *Client) writeRemote(ctx context.Context, ref Ref, a Artifact, desc v1.Descriptor, wo writeOptions) error {
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
	pushOpts := opts
	var done chan struct{}
	if wo.progress != nil {
		// go-containerregistry closes the channel when Push returns.
		updates := make(chan v1.Update, 64)
		done = make(chan struct{})
		go func() {
			defer close(done)
			for u := range updates {
				if u.Error == nil {
					wo.progress(u.Complete, u.Total)
				}
			}
		}()
		pushOpts = append(append([]remote.Option(nil), opts...), remote.WithProgress(updates))
	}
	err := remote.Push(byDigest, t, pushOpts...)
	if done != nil {
		<-done
	}
	if err != nil {
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

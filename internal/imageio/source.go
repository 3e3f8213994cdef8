package imageio

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// AnnotationRefName names a manifest in an OCI layout's index.json.
const AnnotationRefName = "org.opencontainers.image.ref.name"

// Source is an opened source: an image or an index.
type Source struct {
	Ref Ref
	// Descriptor is the source manifest's descriptor.
	Descriptor v1.Descriptor
	// Image is set when the source is an image manifest.
	Image v1.Image
	// Index is set when the source is an index.
	Index v1.ImageIndex
}

// Open resolves ref and returns the image or index it names.
func (c *Client) Open(ctx context.Context, ref Ref) (*Source, error) {
	var (
		src *Source
		err error
	)
	if ref.IsLayout() {
		src, err = c.openLayout(ref)
	} else {
		src, err = c.openRemote(ctx, ref)
	}
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", ref, err)
	}
	return src, nil
}

func (c *Client) openRemote(ctx context.Context, ref Ref) (*Source, error) {
	desc, err := remote.Get(ref.Registry, c.remoteOptions(remote.WithContext(ctx))...)
	if err != nil {
		return nil, classify(err)
	}
	src := &Source{Ref: ref, Descriptor: desc.Descriptor}
	// go-containerregistry checks what it fetches by digest (child
	// manifests, configs, layers) as it reads it; the manifest checks here
	// make that explicit and name the blob at fault.
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, classify(err)
		}
		if err := checkBlob(desc.Manifest, v1.Descriptor{Digest: desc.Digest}, "index"); err != nil {
			return nil, err
		}
		src.Index = checkedIndex{idx}
	case desc.MediaType.IsImage():
		img, err := desc.Image()
		if err != nil {
			return nil, classify(err)
		}
		if err := checkImage(img, desc.Digest); err != nil {
			return nil, classify(err)
		}
		src.Image = img
	default:
		return nil, fmt.Errorf("manifest %s: unsupported media type %q", desc.Digest, desc.MediaType)
	}
	return src, nil
}

func (c *Client) openLayout(ref Ref) (*Source, error) {
	if _, err := os.Stat(filepath.Join(ref.Path, "index.json")); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("not an OCI image layout (no index.json in %s)", ref.Path)
		}
		return nil, err
	}
	p, err := layout.FromPath(ref.Path)
	if err != nil {
		return nil, err
	}
	ii, err := p.ImageIndex()
	if err != nil {
		return nil, err
	}
	im, err := ii.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("index.json: %w", err)
	}
	var found []v1.Descriptor
	for _, d := range im.Manifests {
		if ref.Tag == "" || d.Annotations[AnnotationRefName] == ref.Tag {
			found = append(found, d)
		}
	}
	switch {
	case len(found) == 0 && ref.Tag != "":
		return nil, fmt.Errorf("no manifest tagged %q; the layout holds: %s", ref.Tag, listManifests(im.Manifests))
	case len(found) == 0:
		return nil, errors.New("the layout holds no manifest")
	case len(found) > 1 && ref.Tag == "":
		return nil, fmt.Errorf("the layout holds %d manifests, name one with oci:PATH:TAG: %s", len(found), listManifests(found))
	case len(found) > 1:
		return nil, fmt.Errorf("%d manifests are tagged %q: %s", len(found), ref.Tag, listManifests(found))
	}
	d := found[0]
	src := &Source{Ref: ref, Descriptor: d}
	// Every manifest and config is read once and checked against the
	// digest that names it; go-containerregistry's layout package reads
	// them by name and would not notice a tampered blob.
	switch {
	case d.MediaType.IsIndex():
		src.Index, err = openLayoutIndex(p, d)
	case d.MediaType.IsImage():
		src.Image, err = openLayoutImage(p, d)
	default:
		return nil, fmt.Errorf("manifest %s: unsupported media type %q", d.Digest, d.MediaType)
	}
	if err != nil {
		return nil, err
	}
	return src, nil
}

func listManifests(ds []v1.Descriptor) string {
	var parts []string
	for _, d := range ds {
		s := d.Digest.String() + " (" + string(d.MediaType)
		if n := d.Annotations[AnnotationRefName]; n != "" {
			s += ", tag " + n
		} else {
			s += ", untagged"
		}
		if d.Platform != nil {
			s += ", " + d.Platform.String()
		}
		parts = append(parts, s+")")
	}
	if len(parts) == 0 {
		return "nothing"
	}
	return strings.Join(parts, ", ")
}

// Manifest returns the manifest or index ref names in its registry, as
// the registry sent it, with its descriptor. A layout reference is refused.
func (c *Client) Manifest(ctx context.Context, ref Ref) (v1.Descriptor, []byte, error) {
	if ref.IsLayout() {
		return v1.Descriptor{}, nil, fmt.Errorf("reading %s: not a registry reference", ref)
	}
	desc, err := remote.Get(ref.Registry, c.remoteOptions(remote.WithContext(ctx))...)
	if err != nil {
		return v1.Descriptor{}, nil, fmt.Errorf("reading %s: %w", ref, classify(err))
	}
	return desc.Descriptor, desc.Manifest, nil
}

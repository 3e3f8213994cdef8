package prefetch

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// RawManifest is a manifest or an index as a registry sent it.
type RawManifest struct {
	// MediaType is the media type the registry named.
	MediaType types.MediaType
	// Digest is the digest the registry named for a tag, or the one the
	// reference named.
	Digest v1.Hash
	// Body is the manifest's bytes.
	Body []byte
}

// ManifestSource reads manifests and indexes from registries. The daemon's
// registry configuration (mirrors, hosts.toml, credentials) or a plain
// registry client stand behind it; this package does not reach registries
// itself.
type ManifestSource interface {
	// Manifest returns the manifest or index that ref names, by tag or
	// by digest (REPOSITORY@sha256:…).
	Manifest(ctx context.Context, ref string) (RawManifest, error)
}

// ResolveImage reads the manifest of p.Image from src and fills in what it
// tells about the profile's layers (see Resolve); for an index, what each
// of its image manifests tells, each read from src by digest. Every
// manifest is checked against its digest. It fails when the image holds
// none of the recorded layers, and logs a warning when it holds only some.
func ResolveImage(ctx context.Context, p *Profile, src ManifestSource) error {
	if p.Image == "" {
		return errors.New("the profile names no image")
	}
	if _, err := name.ParseReference(p.Image); err != nil {
		return fmt.Errorf("image %q: %w", p.Image, err)
	}
	top, err := readManifest(ctx, src, p.Image, v1.Hash{})
	if err != nil {
		return err
	}
	var n int
	switch {
	case top.MediaType.IsImage():
		m, err := v1.ParseManifest(bytes.NewReader(top.Body))
		if err != nil {
			return fmt.Errorf("manifest %s of %s: %w", top.Digest, p.Image, err)
		}
		n = p.Resolve(top.Digest, m)
	case top.MediaType.IsIndex():
		idx, err := v1.ParseIndexManifest(bytes.NewReader(top.Body))
		if err != nil {
			return fmt.Errorf("index %s of %s: %w", top.Digest, p.Image, err)
		}
		repo := repository(p.Image)
		for _, d := range idx.Manifests {
			if !d.MediaType.IsImage() {
				continue
			}
			child, err := readManifest(ctx, src, repo+"@"+d.Digest.String(), d.Digest)
			if err != nil {
				return fmt.Errorf("index %s of %s: %w", top.Digest, p.Image, err)
			}
			m, err := v1.ParseManifest(bytes.NewReader(child.Body))
			if err != nil {
				return fmt.Errorf("manifest %s of %s: %w", d.Digest, p.Image, err)
			}
			n += p.Resolve(d.Digest, m)
		}
	default:
		return fmt.Errorf("%s of %s is a %q, not an image manifest or index", top.Digest, p.Image, top.MediaType)
	}
	if n == 0 {
		return fmt.Errorf("%s holds none of the %d recorded layers", p.Image, len(p.Layers))
	}
	if n < len(p.Layers) {
		log.G(ctx).WithField("image", p.Image).Warnf("%d of %d recorded layers are not in the image", len(p.Layers)-n, len(p.Layers))
	}
	return nil
}

// readManifest reads ref from src and checks its bytes against want, when
// set, and against the digest src names.
func readManifest(ctx context.Context, src ManifestSource, ref string, want v1.Hash) (RawManifest, error) {
	m, err := src.Manifest(ctx, ref)
	if err != nil {
		return RawManifest{}, fmt.Errorf("reading manifest of %s: %w", ref, err)
	}
	if want != (v1.Hash{}) && m.Digest != want {
		return RawManifest{}, fmt.Errorf("manifest of %s: registry named digest %s", ref, m.Digest)
	}
	if m.Digest.Algorithm != "sha256" {
		return RawManifest{}, fmt.Errorf("manifest of %s: digest %q: not a sha256 digest", ref, m.Digest)
	}
	got, _, err := v1.SHA256(bytes.NewReader(m.Body))
	if err != nil {
		return RawManifest{}, fmt.Errorf("manifest of %s: %w", ref, err)
	}
	if got != m.Digest {
		return RawManifest{}, fmt.Errorf("manifest of %s: registry sent content with digest %s, not %s", ref, got, m.Digest)
	}
	return m, nil
}

// repository returns ref without its tag or digest, spelled as given, so
// that a source resolves it as it resolves ref (docker.io short names
// stay short).
func repository(ref string) string {
	if i := strings.IndexByte(ref, '@'); i >= 0 {
		ref = ref[:i]
	}
	if i := strings.LastIndexByte(ref, ':'); i > strings.LastIndexByte(ref, '/') {
		ref = ref[:i]
	}
	return ref
}

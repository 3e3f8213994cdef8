package prefetch

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// emptyJSON is the content of the OCI empty descriptor, the config of a
// published profile's manifest.
var emptyJSON = []byte("{}")

// BuildArtifact returns the OCI artifact that publishes p as the profile of the
// image manifest subject (see artifact.go for the format), ready for a
// registry client to push by digest to the subject's repository, and the
// profile it carries: p cut to at most maxFiles files (0: no bound) and so
// that its JSON fits MaxArtifactBytes (see Cut).
//
// The subject must be an image manifest (not an index) with a digest and a
// size; p must be valid, hold at least one file and carry the time of its
// latest record (LastRecord), which becomes the manifest's
// AnnotationCreated. The same arguments always give the same bytes.
func BuildArtifact(subject v1.Descriptor, p *Profile, maxFiles int) (v1.Image, *Profile, error) {
	if !subject.MediaType.IsImage() {
		return nil, nil, fmt.Errorf("subject %s: media type %q is not an image manifest", subject.Digest, subject.MediaType)
	}
	if subject.Digest.Algorithm != "sha256" || len(subject.Digest.Hex) != 64 {
		return nil, nil, fmt.Errorf("subject digest %q: not a sha256 digest", subject.Digest)
	}
	if subject.Size <= 0 {
		return nil, nil, fmt.Errorf("subject %s: size %d", subject.Digest, subject.Size)
	}
	if p.LastRecord.IsZero() {
		return nil, nil, errors.New("the profile carries no record time (lastRecord)")
	}
	cp, body, err := Cut(p, maxFiles, MaxArtifactBytes)
	if err != nil {
		return nil, nil, err
	}
	if fileCount(cp) == 0 {
		return nil, nil, errors.New("the profile holds no file")
	}
	img, err := NewArtifact(subject, body, cp.LastRecord, nil)
	if err != nil {
		return nil, nil, err
	}
	return img, cp, nil
}

// Cut returns p with at most maxFiles files (0: no bound) whose JSON
// (Profile.Marshal) has at most maxBytes bytes, and that JSON. The files
// kept are the first ones of each layer, taken layer by layer in turns
// (each layer's first file, then each layer's second, ...), as many as fit;
// layers left with no file are dropped. The same arguments always give the
// same result. It fails when not even the profile without files fits.
func Cut(p *Profile, maxFiles int, maxBytes int) (*Profile, []byte, error) {
	if err := p.Validate(); err != nil {
		return nil, nil, err
	}
	total := fileCount(p)
	keep := total
	if maxFiles > 0 && keep > maxFiles {
		keep = maxFiles
	}
	try := func(k int) (*Profile, []byte, error) {
		cp := firstFiles(p, k)
		b, err := cp.Marshal()
		return cp, b, err
	}
	cp, b, err := try(keep)
	if err != nil {
		return nil, nil, err
	}
	if len(b) <= maxBytes {
		return cp, b, nil
	}
	// The largest k whose JSON fits: the JSON grows with k.
	lo, hi := 0, keep-1 // lo fits unless nothing does; hi+1 does not fit
	cp, b, err = try(0)
	if err != nil {
		return nil, nil, err
	}
	if len(b) > maxBytes {
		return nil, nil, fmt.Errorf("the profile without files takes %d bytes, more than %d", len(b), maxBytes)
	}
	for lo < hi {
		mid := lo + (hi-lo+1)/2
		if _, mb, err := try(mid); err != nil {
			return nil, nil, err
		} else if len(mb) <= maxBytes {
			lo = mid
		} else {
			hi = mid - 1
		}
	}
	return try(lo)
}

// fileCount returns how many files p lists.
func fileCount(p *Profile) int {
	n := 0
	for _, l := range p.Layers {
		n += len(l.Files)
	}
	return n
}

// firstFiles returns a copy of p with its first k files, taken from the
// layers in turns, and without the layers left empty.
func firstFiles(p *Profile, k int) *Profile {
	n := make([]int, len(p.Layers))
	for round := 0; k > 0; round++ {
		took := false
		for i, l := range p.Layers {
			if k > 0 && round < len(l.Files) {
				n[i]++
				k--
				took = true
			}
		}
		if !took {
			break
		}
	}
	cp := *p
	cp.Layers = []Layer{}
	for i, l := range p.Layers {
		if n[i] == 0 {
			continue
		}
		l.Files = append([]File(nil), l.Files[:n[i]]...)
		cp.Layers = append(cp.Layers, l)
	}
	return &cp
}

// NewArtifact returns the artifact of a published profile whose JSON is
// body (at most MaxArtifactBytes), as the wire format above describes:
// subject is the image manifest it refers to, created the time of the
// profile's latest record (AnnotationCreated), annotations more manifest
// annotations (they may not replace AnnotationCreated). The same
// arguments give the same digest.
func NewArtifact(subject v1.Descriptor, body []byte, created time.Time, annotations map[string]string) (v1.Image, error) {
	if len(body) > MaxArtifactBytes {
		return nil, fmt.Errorf("profile of %d bytes: over the %d-byte limit of a published profile", len(body), MaxArtifactBytes)
	}
	bh, bn, err := v1.SHA256(bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	ch, cn, err := v1.SHA256(bytes.NewReader(emptyJSON))
	if err != nil {
		return nil, err
	}
	ann := map[string]string{}
	for k, v := range annotations {
		ann[k] = v
	}
	ann[AnnotationCreated] = created.UTC().Format(time.RFC3339Nano)
	m := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		ArtifactType:  ArtifactType,
		Config:        v1.Descriptor{MediaType: types.OCIEmptyJSON, Digest: ch, Size: cn},
		Layers:        []v1.Descriptor{{MediaType: ArtifactType, Digest: bh, Size: bn}},
		Subject:       &v1.Descriptor{MediaType: subject.MediaType, Digest: subject.Digest, Size: subject.Size},
		Annotations:   ann,
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("encoding the artifact manifest: %w", err)
	}
	return partial.CompressedToImage(&artifactImage{manifest: raw, body: body, bodyDigest: bh})
}

// artifactImage is a published profile as go-containerregistry's
// partial.CompressedImageCore: an empty config and one layer, the
// profile's JSON.
type artifactImage struct {
	manifest   []byte
	body       []byte
	bodyDigest v1.Hash
}

func (a *artifactImage) RawConfigFile() ([]byte, error) { return emptyJSON, nil }

func (a *artifactImage) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

func (a *artifactImage) RawManifest() ([]byte, error) { return a.manifest, nil }

func (a *artifactImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if h != a.bodyDigest {
		return nil, fmt.Errorf("published profile has no blob %s", h)
	}
	return artifactBlob{a}, nil
}

// artifactBlob is the profile's JSON, the artifact's one layer.
type artifactBlob struct{ a *artifactImage }

func (b artifactBlob) Digest() (v1.Hash, error) { return b.a.bodyDigest, nil }

func (b artifactBlob) Compressed() (io.ReadCloser, error) {
	return io.NopCloser(bytes.NewReader(b.a.body)), nil
}

func (b artifactBlob) Size() (int64, error) { return int64(len(b.a.body)), nil }

func (b artifactBlob) MediaType() (types.MediaType, error) { return ArtifactType, nil }

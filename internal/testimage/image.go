package testimage

import (
	"fmt"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Platforms used by the generated images.
var (
	LinuxAMD64 = v1.Platform{OS: "linux", Architecture: "amd64"}
	LinuxARM64 = v1.Platform{OS: "linux", Architecture: "arm64", Variant: "v8"}
)

// Image returns an OCI image (OCI manifest and config media types) of the
// given layers for platform p, with one history entry per layer, a label, a
// manifest annotation, and the layers' own annotations in the manifest.
func Image(p v1.Platform, layers ...v1.Layer) (v1.Image, error) {
	cfg := &v1.ConfigFile{
		Created:      v1.Time{Time: Epoch},
		OS:           p.OS,
		Architecture: p.Architecture,
		Variant:      p.Variant,
		Config: v1.Config{
			Env:    []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
			Cmd:    []string{"/bin/sh"},
			Labels: map[string]string{"org.example.testimage": "yes"},
		},
		RootFS: v1.RootFS{Type: "layers"},
	}
	base, err := mutate.ConfigFile(empty.Image, cfg)
	if err != nil {
		return nil, err
	}
	base = mutate.MediaType(base, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	adds := make([]mutate.Addendum, 0, len(layers))
	for i, l := range layers {
		a := mutate.Addendum{
			Layer:   l,
			History: v1.History{Created: v1.Time{Time: Epoch}, CreatedBy: fmt.Sprintf("testimage layer %d", i), Comment: "synthetic"},
		}
		if d, ok := l.(interface {
			Descriptor() (*v1.Descriptor, error)
		}); ok {
			desc, err := d.Descriptor()
			if err != nil {
				return nil, err
			}
			a.Annotations = desc.Annotations
		}
		adds = append(adds, a)
	}
	img, err := mutate.Append(base, adds...)
	if err != nil {
		return nil, err
	}
	img = mutate.Annotations(img, map[string]string{"org.opencontainers.image.title": "testimage"}).(v1.Image)
	return img, nil
}

// SeedImage returns a two-layer image for platform p: the full entry set of
// Entries(seed, opts...) and a small second layer.
func SeedImage(seed uint64, p v1.Platform, opts ...Option) (v1.Image, error) {
	l1, err := EntriesLayer(Entries(seed, opts...))
	if err != nil {
		return nil, err
	}
	l2, err := EntriesLayer(Files(
		"etc/hostname", fmt.Sprintf("seed-%d-%s\n", seed, p.Architecture),
		"usr/share/doc/README", "second layer\n",
	))
	if err != nil {
		return nil, err
	}
	return Image(p, l1, l2)
}

// Index returns an OCI index of images, each described with the platform of
// its config.
func Index(imgs ...v1.Image) (v1.ImageIndex, error) {
	idx := mutate.IndexMediaType(empty.Index, types.OCIImageIndex)
	adds := make([]mutate.IndexAddendum, 0, len(imgs))
	for _, img := range imgs {
		cf, err := img.ConfigFile()
		if err != nil {
			return nil, err
		}
		p := cf.Platform()
		if p == nil {
			return nil, fmt.Errorf("image without platform")
		}
		mt, err := img.MediaType()
		if err != nil {
			return nil, err
		}
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{MediaType: mt, Platform: p}})
	}
	return mutate.AppendManifests(idx, adds...), nil
}

// SeedIndex returns an index of SeedImage for linux/amd64 and linux/arm64,
// sharing nothing but the seed.
func SeedIndex(seed uint64, opts ...Option) (v1.ImageIndex, error) {
	amd, err := SeedImage(seed, LinuxAMD64, opts...)
	if err != nil {
		return nil, err
	}
	arm, err := SeedImage(seed+1, LinuxARM64, opts...)
	if err != nil {
		return nil, err
	}
	return Index(amd, arm)
}

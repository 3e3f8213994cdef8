package refimage

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

// goPrefix is where the Go toolchain lives in the golang-like image.
const goPrefix = "usr/local/go"

// buildGolang writes the golang-like image to layoutDir: the debian-like
// image's layer (built or taken from the cache) plus the Go toolchain tree.
func (b *builder) buildGolang(ctx context.Context, in *inputs, key, layoutDir string) error {
	deb, err := b.build(ctx, Debian)
	if err != nil {
		return err
	}
	debLayers, err := deb.Image.Layers()
	if err != nil {
		return fmt.Errorf("debian image %s: %w", deb.Digest, err)
	}
	if len(debLayers) != 1 {
		return fmt.Errorf("debian image %s has %d layers, want 1", deb.Digest, len(debLayers))
	}
	blobs := filepath.Join(layoutDir, "blobs", "sha256")
	debLayer, err := linkLayer(deb, debLayers[0], blobs)
	if err != nil {
		return err
	}
	goLayer, err := writeLayer(blobs, Epoch, func(p *packer) error { return p.addTree(ctx, in.GoRoot, goPrefix) })
	if err != nil {
		return fmt.Errorf("packing %s: %w", in.GoRoot, err)
	}
	total := debLayer.stats.Bytes + goLayer.stats.Bytes
	files := debLayer.stats.Files + goLayer.stats.Files
	if total < minGolangBytes || files < minGolangFiles {
		return fmt.Errorf("golang-like image too small: %d bytes uncompressed and %d files, want at least %d bytes and %d files",
			total, files, minGolangBytes, minGolangFiles)
	}
	cfg := baseConfig(in.Arch)
	cfg.Config.Env = []string{
		"PATH=/usr/local/go/bin:" + defaultPath,
		"GOROOT=/" + goPrefix,
		"GOLANG_VERSION=" + strings.TrimPrefix(in.GoVersion, "go"),
		"GOTOOLCHAIN=local",
	}
	debIn := *in
	debIn.Kind = Debian
	adds := debianAddenda(&debIn, debLayer)
	adds = append(adds, mutate.Addendum{
		Layer: goLayer,
		History: v1.History{
			Created:   v1.Time{Time: Epoch},
			CreatedBy: fmt.Sprintf("COPY %s /%s # %s", in.GoRoot, goPrefix, in.GoVersion),
			Comment:   "lazybase refimage",
		},
	}, mutate.Addendum{
		History: v1.History{
			Created:    v1.Time{Time: Epoch},
			CreatedBy:  "/bin/sh -c #(nop) ENV PATH=/usr/local/go/bin:$PATH GOROOT=/usr/local/go GOTOOLCHAIN=local",
			EmptyLayer: true,
		},
	}, mutate.Addendum{
		History: v1.History{Created: v1.Time{Time: Epoch}, CreatedBy: `/bin/sh -c #(nop) CMD ["bash"]`, EmptyLayer: true},
	})
	_, err = assemble(layoutDir, Golang, key, cfg, adds)
	return err
}

// linkLayer puts the blob of a cached layer into blobs and returns it with
// its statistics, read from the cached manifest's annotations.
func linkLayer(img *Image, l v1.Layer, blobs string) (*fileLayer, error) {
	dgst, err := l.Digest()
	if err != nil {
		return nil, err
	}
	diffID, err := l.DiffID()
	if err != nil {
		return nil, err
	}
	size, err := l.Size()
	if err != nil {
		return nil, err
	}
	m, err := img.Image.Manifest()
	if err != nil {
		return nil, err
	}
	fl := &fileLayer{path: filepath.Join(blobs, dgst.Hex), digest: dgst, diffID: diffID, size: size}
	if _, err := fmt.Sscan(m.Annotations[AnnotationUncompressedSize], &fl.stats.Bytes); err != nil {
		return nil, fmt.Errorf("debian image %s: annotation %s: %w", img.Digest, AnnotationUncompressedSize, err)
	}
	if _, err := fmt.Sscan(m.Annotations[AnnotationFiles], &fl.stats.Files); err != nil {
		return nil, fmt.Errorf("debian image %s: annotation %s: %w", img.Digest, AnnotationFiles, err)
	}
	if err := linkOrCopy(blobPath(img.Dir, dgst), fl.path); err != nil {
		return nil, fmt.Errorf("layer %s: %w", dgst, err)
	}
	return fl, nil
}

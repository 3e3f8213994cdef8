package convert

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sync/errgroup"
)

// ImageResult is a converted image.
type ImageResult struct {
	// Image is the converted image (OCI manifest and config media types).
	Image v1.Image `json:"-"`
	// Source is the digest of the source manifest.
	Source v1.Hash `json:"source"`
	// Digest is the digest of the converted manifest.
	Digest v1.Hash `json:"digest"`
	// Platform is the image's platform, from its config.
	Platform *v1.Platform `json:"platform,omitempty"`
	// Layers describes each layer, in manifest order.
	Layers []LayerResult `json:"layers"`
}

// IndexResult is a converted index.
type IndexResult struct {
	// Index is the converted index.
	Index v1.ImageIndex `json:"-"`
	// Source is the digest of the source index.
	Source v1.Hash `json:"source"`
	// Digest is the digest of the converted index.
	Digest v1.Hash `json:"digest"`
	// Images are the converted images, in index order.
	Images []*ImageResult `json:"images"`
	// Skipped lists the source manifests left out (other platforms,
	// attestations), with the reason.
	Skipped []Skipped `json:"skipped,omitempty"`
}

// Skipped is a manifest of an index that was not converted.
type Skipped struct {
	Digest v1.Hash `json:"digest"`
	Reason string  `json:"reason"`
}

// FormatAnnotation returns the AnnotationFormat value for a format, level and
// chunk size; zero level and chunk size stand for the defaults. It names
// everything that shapes the output bytes, so a manifest carrying it and the
// source digest is known to be up to date.
func FormatAnnotation(f Format, level, chunk int) string {
	if level == 0 {
		level = DefaultGzipLevel
		if f == FormatZstdChunked {
			level = DefaultZstdLevel
		}
	}
	if chunk == 0 {
		chunk = DefaultChunkSize
	}
	return fmt.Sprintf("%s;level=%d;chunk=%d", f, level, chunk)
}

// FormatAnnotation returns the AnnotationFormat value of this Converter's
// output.
func (c *Converter) FormatAnnotation() string {
	return FormatAnnotation(c.opts.format, c.opts.level, c.opts.chunkSize)
}

// ConvertedLayer is a converted layer as an assembled image uses it: the
// layer with its manifest descriptor (annotations included). *Layer is one;
// so is a layer found in a conversion record elsewhere.
type ConvertedLayer interface {
	v1.Layer
	Descriptor() (*v1.Descriptor, error)
}

// LayerFunc returns the converted form of the source layer desc of an image;
// diffID is the layer's diffID from the source config.
type LayerFunc func(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash) (ConvertedLayer, error)

// LayerFunc returns the Converter's own LayerFunc for Assemble and
// AssembleIndex: Layer, with the manifest's descriptor (and its annotations)
// carried along with the source layer. Converter.Image is Assemble with it.
func (c *Converter) LayerFunc() LayerFunc { return c.convertedLayer }

func (c *Converter) convertedLayer(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash) (ConvertedLayer, error) {
	return c.Layer(ctx, describedLayer{Layer: src, desc: desc}, diffID)
}

// describedLayer carries the manifest's descriptor (with its annotations)
// along with a layer, whatever the image implementation returns.
type describedLayer struct {
	v1.Layer
	desc v1.Descriptor
}

func (l describedLayer) Descriptor() (*v1.Descriptor, error) { d := l.desc; return &d, nil }
func (l describedLayer) MediaType() (types.MediaType, error) { return l.desc.MediaType, nil }

// Image converts every layer of img and returns the converted image: OCI media
// types, rootfs.diff_ids updated, history, config, labels and annotations
// kept, and the source manifest digest recorded in AnnotationSourceManifest.
func (c *Converter) Image(ctx context.Context, img v1.Image) (*ImageResult, error) {
	if c.closed.Load() {
		return nil, errClosed
	}
	srcDigest, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	res, err := assemble(ctx, img, srcDigest, c.FormatAnnotation(), c.convertedLayer)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", srcDigest, err)
	}
	return res, nil
}

// Assemble builds the converted form of img from the layers fn returns:
// rootfs.diff_ids updated, config, history, labels and annotations kept, OCI
// media types, and format and the source manifest digest recorded in
// annotations. The image's Layers are the values fn returned, so layers that
// know how to be mounted from another repository stay mountable. Converter.Image
// is Assemble with the Converter's own layers.
func Assemble(ctx context.Context, img v1.Image, format string, fn LayerFunc) (*ImageResult, error) {
	srcDigest, err := img.Digest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	res, err := assemble(ctx, img, srcDigest, format, fn)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", srcDigest, err)
	}
	return res, nil
}

func assemble(ctx context.Context, img v1.Image, srcDigest v1.Hash, format string, fn LayerFunc) (*ImageResult, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	if mt := m.MediaType; mt != "" && !mt.IsImage() {
		return nil, fmt.Errorf("unsupported manifest media type %q", mt)
	}
	if mt, err := img.MediaType(); err == nil && mt.IsSchema1() {
		return nil, fmt.Errorf("unsupported manifest media type %q (schema 1)", mt)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading config %s: %w", m.Config.Digest, err)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, fmt.Errorf("parsing config %s: %w", m.Config.Digest, err)
	}
	if n, d := len(m.Layers), len(cfg.RootFS.DiffIDs); n != d {
		return nil, fmt.Errorf("manifest has %d layers but config %s has %d diff_ids", n, m.Config.Digest, d)
	}

	layers := make([]ConvertedLayer, len(m.Layers))
	g, gctx := errgroup.WithContext(ctx)
	for i, desc := range m.Layers {
		g.Go(func() error {
			if _, err := sourceCompression(desc.MediaType); err != nil {
				return fmt.Errorf("layer %s: %w", desc.Digest, err)
			}
			l, err := img.LayerByDigest(desc.Digest)
			if err != nil {
				return fmt.Errorf("layer %s: %w", desc.Digest, err)
			}
			out, err := fn(gctx, l, desc, cfg.RootFS.DiffIDs[i])
			if err != nil {
				return err
			}
			layers[i] = out
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	srcDigests := make([]string, len(m.Layers))
	for i, d := range m.Layers {
		srcDigests[i] = d.Digest.String()
	}
	if err := checkLowerSymlinks(layers, srcDigests); err != nil {
		return nil, err
	}

	diffIDs := make([]v1.Hash, len(layers))
	descs := make([]v1.Descriptor, len(layers))
	results := make([]LayerResult, len(layers))
	for i, l := range layers {
		d, err := l.Descriptor()
		if err != nil {
			return nil, fmt.Errorf("layer %s: converted descriptor: %w", m.Layers[i].Digest, err)
		}
		if diffIDs[i], err = l.DiffID(); err != nil {
			return nil, fmt.Errorf("layer %s: converted diffID: %w", m.Layers[i].Digest, err)
		}
		descs[i] = *d
		descs[i].Annotations = copyMap(d.Annotations)
		results[i] = resultOf(l, m.Layers[i], descs[i], diffIDs[i])
	}
	newCfg, err := replaceDiffIDs(rawCfg, diffIDs)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	cfgDesc := v1.Descriptor{
		MediaType: types.OCIConfigJSON,
		Size:      int64(len(newCfg)),
		Digest:    sha256Hash(newCfg),
	}
	if m.Config.MediaType != "" && m.Config.MediaType != types.DockerConfigJSON && m.Config.MediaType != types.OCIConfigJSON {
		return nil, fmt.Errorf("unsupported config media type %q", m.Config.MediaType)
	}
	ann := copyMap(m.Annotations)
	if ann == nil {
		ann = map[string]string{}
	}
	ann[AnnotationSourceManifest] = srcDigest.String()
	ann[AnnotationFormat] = format
	out := &v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config:        cfgDesc,
		Layers:        descs,
		Annotations:   ann,
		Subject:       m.Subject,
	}
	rawManifest, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encoding manifest: %w", err)
	}
	core := &image{manifest: rawManifest, config: newCfg, layers: map[v1.Hash]ConvertedLayer{}}
	for i, l := range layers {
		core.layers[descs[i].Digest] = l
	}
	base, err := partial.CompressedToImage(core)
	if err != nil {
		return nil, err
	}
	conv := &assembled{Image: base, layers: layers, byDigest: core.layers}
	var plat *v1.Platform
	if cfg.OS != "" || cfg.Architecture != "" {
		plat = &v1.Platform{OS: cfg.OS, Architecture: cfg.Architecture, Variant: cfg.Variant, OSVersion: cfg.OSVersion}
	}
	return &ImageResult{
		Image:    conv,
		Source:   srcDigest,
		Digest:   sha256Hash(rawManifest),
		Platform: plat,
		Layers:   results,
	}, nil
}

// replaceDiffIDs rewrites rootfs.diff_ids of a raw config and keeps every
// other field, known or not.
func replaceDiffIDs(raw []byte, diffIDs []v1.Hash) ([]byte, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		return nil, fmt.Errorf("decoding config: %w", err)
	}
	var rootfs map[string]json.RawMessage
	if r, ok := fields["rootfs"]; ok {
		if err := json.Unmarshal(r, &rootfs); err != nil {
			return nil, fmt.Errorf("decoding rootfs: %w", err)
		}
	}
	if rootfs == nil {
		rootfs = map[string]json.RawMessage{}
	}
	ids := make([]string, len(diffIDs))
	for i, d := range diffIDs {
		ids[i] = d.String()
	}
	var err error
	if rootfs["diff_ids"], err = json.Marshal(ids); err != nil {
		return nil, err
	}
	rootfs["type"] = json.RawMessage(strconv.Quote("layers"))
	if fields["rootfs"], err = json.Marshal(rootfs); err != nil {
		return nil, err
	}
	return json.Marshal(fields)
}

func sha256Hash(b []byte) v1.Hash {
	h, _, _ := v1.SHA256(bytes.NewReader(b))
	return h
}

// resultOf returns a layer's LayerResult: its own when it has one, else what
// the descriptors tell.
func resultOf(l ConvertedLayer, src, out v1.Descriptor, diffID v1.Hash) LayerResult {
	if r, ok := l.(interface{ Result() LayerResult }); ok {
		return r.Result()
	}
	size, _ := strconv.ParseInt(out.Annotations[AnnotationUncompressedSize], 10, 64)
	return LayerResult{
		Source:           v1.Descriptor{MediaType: src.MediaType, Size: src.Size, Digest: src.Digest},
		Output:           out,
		DiffID:           diffID,
		TOCDigest:        out.Annotations[AnnotationTOCDigest],
		UncompressedSize: size,
		Reused:           src.Digest == out.Digest,
	}
}

// assembled hands out the converted layers themselves (partial's wrappers
// would hide what they are, e.g. mountable from another repository).
type assembled struct {
	v1.Image
	layers   []ConvertedLayer
	byDigest map[v1.Hash]ConvertedLayer
}

func (a *assembled) Layers() ([]v1.Layer, error) {
	out := make([]v1.Layer, len(a.layers))
	for i, l := range a.layers {
		out[i] = l
	}
	return out, nil
}

func (a *assembled) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	if l, ok := a.byDigest[h]; ok {
		return l, nil
	}
	return a.Image.LayerByDigest(h)
}

// image is the converted image's core.
type image struct {
	manifest []byte
	config   []byte
	layers   map[v1.Hash]ConvertedLayer
}

var _ partial.CompressedImageCore = (*image)(nil)

func (i *image) RawConfigFile() ([]byte, error)      { return i.config, nil }
func (i *image) RawManifest() ([]byte, error)        { return i.manifest, nil }
func (i *image) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }
func (i *image) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if l, ok := i.layers[h]; ok {
		return l, nil
	}
	return nil, fmt.Errorf("converted image has no layer %s", h)
}

// Index converts the images of a multi-platform index (all platforms unless
// WithPlatforms selects some) and returns the converted index.
func (c *Converter) Index(ctx context.Context, idx v1.ImageIndex) (*IndexResult, error) {
	if c.closed.Load() {
		return nil, errClosed
	}
	srcDigest, err := idx.Digest()
	if err != nil {
		return nil, fmt.Errorf("reading index: %w", err)
	}
	res, err := assembleIndex(ctx, idx, srcDigest, c.FormatAnnotation(), c.opts.platforms, c.convertedLayer)
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", srcDigest, err)
	}
	return res, nil
}

// AssembleIndex is Assemble for every image of idx on the given platforms
// (all when none are given); attestations and other non-image manifests are
// left out and listed in Skipped.
func AssembleIndex(ctx context.Context, idx v1.ImageIndex, format string, platforms []v1.Platform, fn LayerFunc) (*IndexResult, error) {
	srcDigest, err := idx.Digest()
	if err != nil {
		return nil, fmt.Errorf("reading index: %w", err)
	}
	res, err := assembleIndex(ctx, idx, srcDigest, format, platforms, fn)
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", srcDigest, err)
	}
	return res, nil
}

func selected(platforms []v1.Platform, p *v1.Platform) bool {
	if len(platforms) == 0 {
		return true
	}
	if p == nil {
		return false
	}
	for _, want := range platforms {
		if p.Satisfies(want) {
			return true
		}
	}
	return false
}

func assembleIndex(ctx context.Context, idx v1.ImageIndex, srcDigest v1.Hash, format string, platforms []v1.Platform, fn LayerFunc) (*IndexResult, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("reading index manifest: %w", err)
	}
	res := &IndexResult{Source: srcDigest}
	type job struct {
		desc v1.Descriptor
		res  *ImageResult
	}
	var jobs []*job
	for _, d := range im.Manifests {
		switch {
		case d.Annotations["vnd.docker.reference.type"] == "attestation-manifest":
			res.Skipped = append(res.Skipped, Skipped{d.Digest, "attestation manifest of the source image"})
		case !d.MediaType.IsImage():
			res.Skipped = append(res.Skipped, Skipped{d.Digest, fmt.Sprintf("media type %q is not an image", d.MediaType)})
		case !selected(platforms, d.Platform):
			res.Skipped = append(res.Skipped, Skipped{d.Digest, fmt.Sprintf("platform %s not selected", platformString(d.Platform))})
		default:
			jobs = append(jobs, &job{desc: d})
		}
	}
	if len(jobs) == 0 {
		return nil, errors.New("no image in the index matches the selected platforms")
	}
	g, gctx := errgroup.WithContext(ctx)
	for _, j := range jobs {
		g.Go(func() error {
			img, err := idx.Image(j.desc.Digest)
			if err != nil {
				return fmt.Errorf("image %s: %w", j.desc.Digest, err)
			}
			r, err := assemble(gctx, img, j.desc.Digest, format, fn)
			if err != nil {
				return fmt.Errorf("image %s (%s): %w", j.desc.Digest, platformString(j.desc.Platform), err)
			}
			j.res = r
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	out := &v1.IndexManifest{
		SchemaVersion: 2,
		MediaType:     types.OCIImageIndex,
		Annotations:   copyMap(im.Annotations),
	}
	if out.Annotations == nil {
		out.Annotations = map[string]string{}
	}
	out.Annotations[AnnotationSourceManifest] = srcDigest.String()
	out.Annotations[AnnotationFormat] = format
	images := map[v1.Hash]v1.Image{}
	for _, j := range jobs {
		raw, err := j.res.Image.RawManifest()
		if err != nil {
			return nil, err
		}
		out.Manifests = append(out.Manifests, v1.Descriptor{
			MediaType:   types.OCIManifestSchema1,
			Size:        int64(len(raw)),
			Digest:      j.res.Digest,
			Platform:    j.desc.Platform,
			Annotations: copyMap(j.desc.Annotations),
		})
		images[j.res.Digest] = j.res.Image
		res.Images = append(res.Images, j.res)
	}
	raw, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encoding index: %w", err)
	}
	res.Digest = sha256Hash(raw)
	res.Index = &index{raw: raw, manifest: out, images: images}
	return res, nil
}

func platformString(p *v1.Platform) string {
	if p == nil {
		return "unknown"
	}
	return p.String()
}

// index is a converted index.
type index struct {
	raw      []byte
	manifest *v1.IndexManifest
	images   map[v1.Hash]v1.Image
}

var _ v1.ImageIndex = (*index)(nil)

func (i *index) MediaType() (types.MediaType, error)       { return types.OCIImageIndex, nil }
func (i *index) Digest() (v1.Hash, error)                  { return sha256Hash(i.raw), nil }
func (i *index) Size() (int64, error)                      { return int64(len(i.raw)), nil }
func (i *index) IndexManifest() (*v1.IndexManifest, error) { return i.manifest.DeepCopy(), nil }
func (i *index) RawManifest() ([]byte, error)              { return i.raw, nil }
func (i *index) ImageIndex(h v1.Hash) (v1.ImageIndex, error) {
	return nil, fmt.Errorf("no index %s", h)
}
func (i *index) Image(h v1.Hash) (v1.Image, error) {
	if img, ok := i.images[h]; ok {
		return img, nil
	}
	return nil, fmt.Errorf("converted index has no image %s", h)
}

package mirror

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

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/prefetch"
)

// The functions below assemble converted images and indexes the way
// convert.(*Converter).Image and Index do (a test checks the output is
// byte-identical), but from layers that may come from conversion records
// instead of the converter.

// layerOut is a converted layer as an image uses it.
type layerOut struct {
	layer  v1.Layer      // *remote.MountableLayer naming the records repository
	desc   v1.Descriptor // as in the converted manifest, with annotations
	diffID v1.Hash
}

// describedLayer carries a manifest descriptor along with a layer.
type describedLayer struct {
	v1.Layer
	desc v1.Descriptor
}

func (l describedLayer) Descriptor() (*v1.Descriptor, error) { d := l.desc; return &d, nil }
func (l describedLayer) MediaType() (types.MediaType, error) { return l.desc.MediaType, nil }

func (m *Mirror) buildImage(ctx context.Context, img v1.Image, srcDigest v1.Hash, list *prefetch.List, st *imageStats) (v1.Image, error) {
	man, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	if mt := man.MediaType; mt != "" && !mt.IsImage() {
		return nil, fmt.Errorf("unsupported manifest media type %q", mt)
	}
	if mt, err := img.MediaType(); err == nil && mt.IsSchema1() {
		return nil, fmt.Errorf("unsupported manifest media type %q (schema 1)", mt)
	}
	if mt := man.Config.MediaType; mt != "" && mt != types.DockerConfigJSON && mt != types.OCIConfigJSON {
		return nil, fmt.Errorf("unsupported config media type %q", mt)
	}
	rawCfg, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("reading config %s: %w", man.Config.Digest, err)
	}
	cfg, err := v1.ParseConfigFile(bytes.NewReader(rawCfg))
	if err != nil {
		return nil, fmt.Errorf("parsing config %s: %w", man.Config.Digest, err)
	}
	if n, d := len(man.Layers), len(cfg.RootFS.DiffIDs); n != d {
		return nil, fmt.Errorf("manifest has %d layers but config %s has %d diff_ids", n, man.Config.Digest, d)
	}
	outs := make([]*layerOut, len(man.Layers))
	g, gctx := errgroup.WithContext(ctx)
	for i, desc := range man.Layers {
		g.Go(func() error {
			l, err := img.LayerByDigest(desc.Digest)
			if err != nil {
				return fmt.Errorf("layer %s: %w", desc.Digest, err)
			}
			diffID := cfg.RootFS.DiffIDs[i]
			files := list.PrefetchFiles(diffID, desc.Digest)
			out, err := m.layer(gctx, describedLayer{Layer: l, desc: desc}, desc, diffID, files, st)
			if err != nil {
				return err
			}
			outs[i] = out
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	diffIDs := make([]v1.Hash, len(outs))
	descs := make([]v1.Descriptor, len(outs))
	layers := make([]v1.Layer, len(outs))
	for i, o := range outs {
		diffIDs[i] = o.diffID
		descs[i] = o.desc
		layers[i] = o.layer
		st.bytes.Add(o.desc.Size)
	}
	newCfg, err := replaceDiffIDs(rawCfg, diffIDs)
	if err != nil {
		return nil, fmt.Errorf("config %s: %w", man.Config.Digest, err)
	}
	ann := map[string]string{}
	for k, v := range man.Annotations {
		ann[k] = v
	}
	ann[convert.AnnotationSourceManifest] = srcDigest.String()
	ann[convert.AnnotationFormat] = m.format
	out := &v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config:        v1.Descriptor{MediaType: types.OCIConfigJSON, Size: int64(len(newCfg)), Digest: sha256Of(newCfg)},
		Layers:        descs,
		Annotations:   ann,
		Subject:       man.Subject,
	}
	raw, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encoding manifest: %w", err)
	}
	core := &rawImage{manifest: raw, config: newCfg, layers: map[v1.Hash]partial.CompressedLayer{}}
	byDigest := map[v1.Hash]v1.Layer{}
	for i, l := range layers {
		core.layers[descs[i].Digest] = l
		byDigest[descs[i].Digest] = l
	}
	base, err := partial.CompressedToImage(core)
	if err != nil {
		return nil, err
	}
	return &mountingImage{Image: base, layers: layers, byDigest: byDigest}, nil
}

// mountingImage hands go-containerregistry's pusher the layers as
// *remote.MountableLayer values (partial's wrappers would hide them), so the
// push mounts blobs from the records repository instead of uploading them.
type mountingImage struct {
	v1.Image
	layers   []v1.Layer
	byDigest map[v1.Hash]v1.Layer
}

func (i *mountingImage) Layers() ([]v1.Layer, error) { return i.layers, nil }
func (i *mountingImage) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	if l, ok := i.byDigest[h]; ok {
		return l, nil
	}
	return i.Image.LayerByDigest(h)
}

func (m *Mirror) selected(want []v1.Platform, p *v1.Platform) bool {
	if len(want) == 0 {
		return true
	}
	if p == nil {
		return false
	}
	for _, w := range want {
		if p.Satisfies(w) {
			return true
		}
	}
	return false
}

func (m *Mirror) buildIndex(ctx context.Context, idx v1.ImageIndex, srcDigest v1.Hash, plats []v1.Platform, list *prefetch.List, st *imageStats) (v1.ImageIndex, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("reading index manifest: %w", err)
	}
	var jobs []v1.Descriptor
	for _, d := range im.Manifests {
		if d.Annotations["vnd.docker.reference.type"] == "attestation-manifest" || !d.MediaType.IsImage() || !m.selected(plats, d.Platform) {
			continue
		}
		jobs = append(jobs, d)
	}
	if len(jobs) == 0 {
		return nil, errors.New("no image in the index matches the selected platforms")
	}
	imgs := make([]v1.Image, len(jobs))
	g, gctx := errgroup.WithContext(ctx)
	for i, d := range jobs {
		g.Go(func() error {
			child, err := idx.Image(d.Digest)
			if err != nil {
				return fmt.Errorf("image %s: %w", d.Digest, err)
			}
			out, err := m.buildImage(gctx, child, d.Digest, list, st)
			if err != nil {
				return fmt.Errorf("image %s (%s): %w", d.Digest, platformString(d.Platform), err)
			}
			imgs[i] = out
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	out := &v1.IndexManifest{SchemaVersion: 2, MediaType: types.OCIImageIndex, Annotations: map[string]string{}}
	for k, v := range im.Annotations {
		out.Annotations[k] = v
	}
	out.Annotations[convert.AnnotationSourceManifest] = srcDigest.String()
	out.Annotations[convert.AnnotationFormat] = m.format
	children := map[v1.Hash]v1.Image{}
	for i, d := range jobs {
		raw, err := imgs[i].RawManifest()
		if err != nil {
			return nil, err
		}
		dg := sha256Of(raw)
		var ann map[string]string
		if d.Annotations != nil {
			ann = map[string]string{}
			for k, v := range d.Annotations {
				ann[k] = v
			}
		}
		out.Manifests = append(out.Manifests, v1.Descriptor{
			MediaType: types.OCIManifestSchema1, Size: int64(len(raw)), Digest: dg,
			Platform: d.Platform, Annotations: ann,
		})
		children[dg] = imgs[i]
	}
	raw, err := json.Marshal(out)
	if err != nil {
		return nil, fmt.Errorf("encoding index: %w", err)
	}
	return &index{raw: raw, manifest: out, images: children}, nil
}

func platformString(p *v1.Platform) string {
	if p == nil {
		return "unknown"
	}
	return p.String()
}

// replaceDiffIDs rewrites rootfs.diff_ids of a raw config and keeps every
// other field, as convert does.
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

// index is a converted index.
type index struct {
	raw      []byte
	manifest *v1.IndexManifest
	images   map[v1.Hash]v1.Image
}

var _ v1.ImageIndex = (*index)(nil)

func (i *index) MediaType() (types.MediaType, error)       { return types.OCIImageIndex, nil }
func (i *index) Digest() (v1.Hash, error)                  { return sha256Of(i.raw), nil }
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

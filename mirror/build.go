package mirror

import (
	"context"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/prefetch"
)

// recordedLayer is a converted layer found in a conversion record: the
// record's blob with the descriptor and diffID of the converted layer.
type recordedLayer struct {
	v1.Layer
	desc   v1.Descriptor
	diffID v1.Hash
}

func (l recordedLayer) Descriptor() (*v1.Descriptor, error) { d := l.desc; return &d, nil }
func (l recordedLayer) DiffID() (v1.Hash, error)            { return l.diffID, nil }

// layerFunc gives convert.Assemble the mirror's layers: from this session,
// from a conversion record, or converted now.
func (m *Mirror) layerFunc(list prefetch.Source, st *imageStats) convert.LayerFunc {
	return func(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash) (convert.ConvertedLayer, error) {
		var files []string
		if list != nil {
			files = list.PrefetchFiles(diffID, desc.Digest)
		}
		l, err := m.layer(ctx, src, desc, diffID, files, st)
		if err != nil {
			return nil, err
		}
		if d, err := l.Descriptor(); err == nil {
			st.bytes.Add(d.Size)
		}
		return l, nil
	}
}

func (m *Mirror) buildImage(ctx context.Context, img v1.Image, list prefetch.Source, st *imageStats) (v1.Image, error) {
	res, err := convert.Assemble(ctx, img, m.format, m.layerFunc(list, st))
	if err != nil {
		return nil, err
	}
	return res.Image, nil
}

func (m *Mirror) buildIndex(ctx context.Context, idx v1.ImageIndex, plats []v1.Platform, list prefetch.Source, st *imageStats) (v1.ImageIndex, error) {
	res, err := convert.AssembleIndex(ctx, idx, m.format, plats, m.layerFunc(list, st))
	if err != nil {
		return nil, err
	}
	return res.Index, nil
}

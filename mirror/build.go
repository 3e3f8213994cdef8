package mirror

import (
	"context"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
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

// layerFunc gives the convert job the mirror's layers: from this session,
// from a conversion record, or converted now.
func (m *Mirror) layerFunc(st *imageStats) job.LayerFunc {
	return func(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash, files []string) (convert.ConvertedLayer, error) {
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

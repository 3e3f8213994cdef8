package mirror

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

// Conversion record format (see the package documentation).
const (
	// RecordArtifactType is the artifactType of a conversion record manifest.
	RecordArtifactType = "application/vnd.lazybase.conversion-record.v1"
	// RecordVersion is the record format version, in AnnotationRecordVersion.
	RecordVersion = "1"
	// AnnotationRecordVersion holds RecordVersion.
	AnnotationRecordVersion = "dev.lazybase.record.version"
	// AnnotationRecordPrefetch holds the fingerprint of the prefetch file
	// list the layer was converted with ("none" without one).
	AnnotationRecordPrefetch = "dev.lazybase.record.prefetch"
	// AnnotationRecordDiffID holds the converted layer's diffID.
	AnnotationRecordDiffID = "dev.lazybase.record.diffid"
	// AnnotationRecordMAC holds the record's MAC: "hmac-sha256:" and the
	// hex HMAC-SHA256 of RecordMAC's message under the record key.
	AnnotationRecordMAC = "dev.lazybase.record.mac"
	// RecordTagPrefix starts every record tag.
	RecordTagPrefix = "rec-"
)

// PrefetchFingerprint names a prefetch file list: "none" for no files, else
// "sha256:" and the hex sha256 of the files joined by newlines.
func PrefetchFingerprint(files []string) string {
	if len(files) == 0 {
		return "none"
	}
	h := sha256.Sum256([]byte(strings.Join(files, "\n")))
	return "sha256:" + hex.EncodeToString(h[:])
}

// RecordKey returns the tag of the conversion record of source layer src
// converted with the given format annotation and prefetch fingerprint:
// "rec-" and the hex sha256 of "lazybase-record/v1", src, format and
// prefetch, each followed by a newline.
func RecordKey(src v1.Hash, format, prefetch string) string {
	h := sha256.New()
	fmt.Fprintf(h, "lazybase-record/v1\n%s\n%s\n%s\n", src, format, prefetch)
	return RecordTagPrefix + hex.EncodeToString(h.Sum(nil))
}

// FormatAnnotation returns the AnnotationFormat value convert writes for a
// format, level and chunk size (level and chunk size 0 mean the defaults).
func FormatAnnotation(f convert.Format, level, chunk int) string {
	return convert.FormatAnnotation(f, level, chunk)
}

// RecordMAC returns the MAC of a conversion record under key: "hmac-sha256:"
// and the hex HMAC-SHA256 of a message naming the source layer digest, the
// format annotation, the prefetch fingerprint, the converted layer's
// diffID and its descriptor (media type, digest, size and every
// annotation, the TOC digest among them, in key order), each on its own
// line with strings quoted.
func RecordMAC(key []byte, src v1.Hash, format, prefetch string, diffID v1.Hash, desc v1.Descriptor) string {
	h := hmac.New(sha256.New, key)
	fmt.Fprintf(h, "lazybase-record-mac/v1\nsource %q\nformat %q\nprefetch %q\ndiffid %q\nmediatype %q\ndigest %q\nsize %d\n",
		src.String(), format, prefetch, diffID.String(), string(desc.MediaType), desc.Digest.String(), desc.Size)
	keys := make([]string, 0, len(desc.Annotations))
	for k := range desc.Annotations {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "annotation %q %q\n", k, desc.Annotations[k])
	}
	return "hmac-sha256:" + hex.EncodeToString(h.Sum(nil))
}

// recordsEnabled reports whether records are read and written: only with a
// record key.
func (m *Mirror) recordsEnabled() bool { return m.o.recordKey != nil }

// recordImage is a conversion record: an OCI image manifest with the empty
// config, one layer (the converted blob) and the record annotations, the
// MAC under key among them.
func recordImage(key []byte, layer v1.Layer, desc v1.Descriptor, src v1.Hash, format, prefetch string, diffID v1.Hash) (v1.Image, error) {
	m := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		ArtifactType:  RecordArtifactType,
		Config: v1.Descriptor{
			MediaType: types.OCIEmptyJSON,
			Size:      2,
			Digest:    sha256Of([]byte("{}")),
		},
		Layers: []v1.Descriptor{desc},
		Annotations: map[string]string{
			AnnotationRecordVersion:       RecordVersion,
			convert.AnnotationSourceLayer: src.String(),
			convert.AnnotationFormat:      format,
			AnnotationRecordPrefetch:      prefetch,
			AnnotationRecordDiffID:        diffID.String(),
			AnnotationRecordMAC:           RecordMAC(key, src, format, prefetch, diffID, desc),
		},
	}
	raw, err := json.Marshal(m)
	if err != nil {
		return nil, err
	}
	return partial.CompressedToImage(&rawImage{manifest: raw, config: []byte("{}"), layers: map[v1.Hash]partial.CompressedLayer{desc.Digest: layer}})
}

// lookupRecord reads the record key and returns the converted layer it
// names, or nil when there is no usable record.
func (m *Mirror) lookupRecord(ctx context.Context, key string, src v1.Hash, prefetch string) (convert.ConvertedLayer, error) {
	return m.lookupRecordCounting(ctx, key, src, prefetch, true)
}

// lookupRecordCounting is lookupRecord; count false leaves a record
// without a valid MAC uncounted and unlogged (a second look at a record
// already rejected once).
func (m *Mirror) lookupRecordCounting(ctx context.Context, key string, src v1.Hash, prefetch string, count bool) (convert.ConvertedLayer, error) {
	ref, err := m.client.ParseRef(m.cfg.RecordsRepository + ":" + key)
	if err != nil {
		return nil, err
	}
	rec, err := m.client.Open(ctx, ref)
	if err != nil {
		if errors.Is(err, imageio.ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	if rec.Image == nil {
		return nil, fmt.Errorf("record %s is not an image manifest", key)
	}
	man, err := rec.Image.Manifest()
	if err != nil {
		return nil, fmt.Errorf("record %s: %w", key, err)
	}
	a := man.Annotations
	if man.ArtifactType != RecordArtifactType || a[AnnotationRecordVersion] != RecordVersion ||
		a[convert.AnnotationSourceLayer] != src.String() || a[convert.AnnotationFormat] != m.format ||
		a[AnnotationRecordPrefetch] != prefetch || len(man.Layers) != 1 {
		log.G(ctx).WithField("record", key).Warn("conversion record does not match its key; converting again")
		return nil, nil
	}
	diffID, err := v1.NewHash(a[AnnotationRecordDiffID])
	if err != nil {
		return nil, fmt.Errorf("record %s: diffID: %w", key, err)
	}
	desc := man.Layers[0]
	want := RecordMAC(m.o.recordKey, src, m.format, prefetch, diffID, desc)
	if !hmac.Equal([]byte(a[AnnotationRecordMAC]), []byte(want)) {
		if !count {
			return nil, nil
		}
		m.recordsRejected.Add(1)
		log.G(ctx).WithField("record", key).WithField("layer", src).Warn("conversion record has no valid MAC (written without this record key, or forged); converting again and rewriting it")
		return nil, nil
	}
	l, err := rec.Image.LayerByDigest(desc.Digest)
	if err != nil {
		return nil, fmt.Errorf("record %s: %w", key, err)
	}
	// The blob must still be there (a registry GC or a failed upload may
	// have lost it): one HEAD.
	if ok, err := partial.Exists(l); err != nil || !ok {
		log.G(ctx).WithField("record", key).WithError(err).Warn("conversion record's blob is missing; converting again")
		return nil, nil
	}
	return &remote.MountableLayer{
		Layer:     recordedLayer{Layer: l, desc: desc, diffID: diffID},
		Reference: m.records.Digest(desc.Digest.String()),
	}, nil
}

// writeRecord stores the record of a freshly converted layer: the blob
// first, the record tag last.
func (m *Mirror) writeRecord(ctx context.Context, key string, src v1.Hash, prefetch string, l *convert.Layer) error {
	desc, err := l.Descriptor()
	if err != nil {
		return err
	}
	diffID, _ := l.DiffID()
	img, err := recordImage(m.o.recordKey, l, *desc, src, m.format, prefetch, diffID)
	if err != nil {
		return err
	}
	ref, err := m.client.ParseRef(m.cfg.RecordsRepository + ":" + key)
	if err != nil {
		return err
	}
	_, err = m.client.Write(ctx, ref, img, nil)
	return err
}

func sha256Of(b []byte) v1.Hash {
	s := sha256.Sum256(b)
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(s[:])}
}

// rawImage is an image core over a raw manifest and config.
type rawImage struct {
	manifest []byte
	config   []byte
	layers   map[v1.Hash]partial.CompressedLayer
}

var _ partial.CompressedImageCore = (*rawImage)(nil)

func (i *rawImage) RawConfigFile() ([]byte, error)      { return i.config, nil }
func (i *rawImage) RawManifest() ([]byte, error)        { return i.manifest, nil }
func (i *rawImage) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }
func (i *rawImage) LayerByDigest(h v1.Hash) (partial.CompressedLayer, error) {
	if l, ok := i.layers[h]; ok {
		return l, nil
	}
	return nil, fmt.Errorf("no layer %s", h)
}

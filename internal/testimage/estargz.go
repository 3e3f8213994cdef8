package testimage

import (
	"bytes"
	"fmt"
	"io"
	"strconv"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations an eStargz layer descriptor carries.
const (
	AnnotationTOCDigest        = estargz.TOCJSONDigestAnnotation
	AnnotationUncompressedSize = estargz.StoreUncompressedSizeAnnotation
)

// EStargz builds a real eStargz blob from a tar stream with estargz.Build and
// returns it as an OCI gzip layer whose descriptor carries the TOC digest and
// uncompressed size annotations, as converters write them.
func EStargz(tarball []byte, opts ...estargz.Option) (*Layer, error) {
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tarball), 0, int64(len(tarball))), opts...)
	if err != nil {
		return nil, fmt.Errorf("building eStargz: %w", err)
	}
	defer blob.Close()
	b, err := io.ReadAll(blob)
	if err != nil {
		return nil, fmt.Errorf("reading eStargz blob: %w", err)
	}
	size, err := blob.UncompressedSize()
	if err != nil {
		return nil, err
	}
	diff, err := v1.NewHash(blob.DiffID().String())
	if err != nil {
		return nil, err
	}
	return &Layer{
		Blob: b,
		Type: types.OCILayer,
		Diff: &diff,
		Annotations: map[string]string{
			AnnotationTOCDigest:        blob.TOCDigest().String(),
			AnnotationUncompressedSize: strconv.FormatInt(size, 10),
		},
	}, nil
}

// Clone returns a deep copy of l.
func (l *Layer) Clone() *Layer {
	c := *l
	c.Blob = append([]byte(nil), l.Blob...)
	if l.Hash != nil {
		h := *l.Hash
		c.Hash = &h
	}
	if l.Diff != nil {
		h := *l.Diff
		c.Diff = &h
	}
	if l.Length != nil {
		n := *l.Length
		c.Length = &n
	}
	if l.Annotations != nil {
		c.Annotations = map[string]string{}
		for k, v := range l.Annotations {
			c.Annotations[k] = v
		}
	}
	return &c
}

// DamageFooter returns a copy of an eStargz layer whose footer no longer
// parses: the "STARGZ" magic in the footer's gzip extra field is changed. The
// blob still decompresses as gzip; its digest is honest.
func (l *Layer) DamageFooter() *Layer {
	c := l.Clone()
	i := bytes.LastIndex(c.Blob, []byte("STARGZ"))
	if i < 0 || i < len(c.Blob)-estargz.FooterSize {
		panic("testimage: no eStargz footer magic found")
	}
	c.Blob[i+5] = 'X'
	return c
}

// WrongTOCDigest returns a copy of an eStargz layer whose TOC digest
// annotation names other bytes.
func (l *Layer) WrongTOCDigest() *Layer {
	c := l.Clone()
	c.Annotations[AnnotationTOCDigest] = SHA256([]byte("not the TOC")).String()
	return c
}

// FlipPayloadByte returns a copy of an eStargz layer with one byte flipped in
// the compressed payload of the named regular file; the digest is honest
// (recomputed), the TOC and footer are intact.
func (l *Layer) FlipPayloadByte(name string) (*Layer, error) {
	r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))))
	if err != nil {
		return nil, fmt.Errorf("opening eStargz: %w", err)
	}
	e, ok := r.Lookup(name)
	if !ok || e.Type != "reg" || e.Size == 0 {
		return nil, fmt.Errorf("no non-empty regular file %q", name)
	}
	end := e.NextOffset()
	if end <= e.Offset+20 {
		return nil, fmt.Errorf("payload of %q too small to damage", name)
	}
	c := l.Clone()
	c.Blob[(e.Offset+end)/2] ^= 0x55
	return c, nil
}

package convert

import (
	"bytes"
	"fmt"
	"hash"
	"io"
	"sync"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

// memberCodec compresses one independent member (a gzip member or a zstd
// frame) and writes a format's TOC and footer. Implementations are safe for
// concurrent use and deterministic: the same input gives the same bytes.
type memberCodec interface {
	// compress appends the compressed member of src to dst.
	compress(dst *bytes.Buffer, src []byte) error
	// writeTOCAndFooter writes the TOC and footer at offset off. diffHash
	// receives the uncompressed bytes that belong to the layer's tar stream.
	writeTOCAndFooter(w io.Writer, off int64, toc *estargz.JTOC, diffHash hash.Hash) (tocDigest digest.Digest, annotations map[string]string, err error)
	// trailer reports whether the tar end-of-archive blocks belong in the
	// payload (true) or in the TOC member (false).
	trailer() bool
}

// GzipCompressor is an estargz.Compressor on github.com/klauspost/compress
// with pooled writers. Its members and TOC are byte-compatible with every
// eStargz reader (it passes estargz's CompressionTestSuite).
type GzipCompressor struct {
	level int
	pool  sync.Pool
}

var _ estargz.Compressor = (*GzipCompressor)(nil)

// NewGzipCompressor returns a pooled gzip compressor at the given level (1-9).
func NewGzipCompressor(level int) (*GzipCompressor, error) {
	if level < kgzip.BestSpeed || level > kgzip.BestCompression {
		return nil, fmt.Errorf("gzip compression level must be 1-9, got %d", level)
	}
	return &GzipCompressor{level: level}, nil
}

func (g *GzipCompressor) get(w io.Writer) *kgzip.Writer {
	if zw, ok := g.pool.Get().(*kgzip.Writer); ok {
		zw.Reset(w)
		return zw
	}
	zw, _ := kgzip.NewWriterLevel(w, g.level) // level checked in NewGzipCompressor
	return zw
}

type pooledGzip struct {
	*kgzip.Writer
	g *GzipCompressor
}

func (p *pooledGzip) Close() error {
	err := p.Writer.Close()
	if err == nil {
		p.g.pool.Put(p.Writer)
	}
	return err
}

// Writer returns a gzip writer that returns itself to the pool on Close.
func (g *GzipCompressor) Writer(w io.Writer) (estargz.WriteFlushCloser, error) {
	return &pooledGzip{Writer: g.get(w), g: g}, nil
}

// WriteTOCAndFooter writes the TOC tar as a gzip member and the eStargz footer.
func (g *GzipCompressor) WriteTOCAndFooter(w io.Writer, off int64, toc *estargz.JTOC, diffHash hash.Hash) (digest.Digest, error) {
	// The TOC is small; estargz's own writer keeps its layout exact.
	return estargz.NewGzipCompressorWithLevel(g.level).WriteTOCAndFooter(w, off, toc, diffHash)
}

func (g *GzipCompressor) compress(dst *bytes.Buffer, src []byte) error {
	zw := g.get(dst)
	if _, err := zw.Write(src); err != nil {
		return err
	}
	if err := zw.Close(); err != nil {
		return err
	}
	g.pool.Put(zw)
	return nil
}

func (g *GzipCompressor) writeTOCAndFooter(w io.Writer, off int64, toc *estargz.JTOC, diffHash hash.Hash) (digest.Digest, map[string]string, error) {
	d, err := g.WriteTOCAndFooter(w, off, toc, diffHash)
	return d, nil, err
}

func (g *GzipCompressor) trailer() bool { return false }

// zstdCodec writes zstd:chunked: one zstd frame per member and the TOC in a
// skippable frame, as estargz's zstdchunked package lays it out.
type zstdCodec struct {
	level zstd.EncoderLevel
	enc   *zstd.Encoder
}

func newZstdCodec(level, workers int) (*zstdCodec, error) {
	l := zstd.EncoderLevelFromZstd(level)
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(l), zstd.WithEncoderConcurrency(workers),
		zstd.WithZeroFrames(true), zstd.WithEncoderCRC(true))
	if err != nil {
		return nil, fmt.Errorf("creating zstd encoder: %w", err)
	}
	return &zstdCodec{level: l, enc: enc}, nil
}

func (z *zstdCodec) compress(dst *bytes.Buffer, src []byte) error {
	out := z.enc.EncodeAll(src, dst.AvailableBuffer())
	dst.Write(out)
	return nil
}

func (z *zstdCodec) writeTOCAndFooter(w io.Writer, off int64, toc *estargz.JTOC, diffHash hash.Hash) (digest.Digest, map[string]string, error) {
	meta := map[string]string{}
	c := &zstdchunked.Compressor{CompressionLevel: z.level, Metadata: meta}
	d, err := c.WriteTOCAndFooter(w, off, toc, diffHash)
	return d, meta, err
}

func (z *zstdCodec) trailer() bool { return true }

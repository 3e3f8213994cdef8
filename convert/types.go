package convert

import (
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Annotations and labels written on converted layers and manifests.
const (
	// AnnotationTOCDigest is the digest of a layer's uncompressed TOC JSON, as
	// the stargz snapshotter reads it.
	AnnotationTOCDigest = "containerd.io/snapshot/stargz/toc.digest"
	// AnnotationUncompressedSize is the size of a layer's uncompressed tar.
	AnnotationUncompressedSize = "io.containers.estargz.uncompressed-size"
	// AnnotationSourceManifest records the digest of the manifest a converted
	// manifest was made from.
	AnnotationSourceManifest = "dev.lazybase.source.manifest.digest"
	// AnnotationSourceLayer records the digest of the layer a converted layer
	// was made from.
	AnnotationSourceLayer = "dev.lazybase.source.layer.digest"
	// AnnotationFormat records the output format and level of a converted
	// manifest, so a later run can tell whether it matches its options.
	AnnotationFormat = "dev.lazybase.convert.format"
	// AnnotationZstdChunkedManifestChecksum and
	// AnnotationZstdChunkedManifestPosition locate the TOC of a zstd:chunked
	// layer.
	AnnotationZstdChunkedManifestChecksum = "io.containers.zstd-chunked.manifest-checksum"
	AnnotationZstdChunkedManifestPosition = "io.containers.zstd-chunked.manifest-position"
)

// EventKind says what an Event reports.
type EventKind int

const (
	// LayerStarted: a layer's conversion began; Total is the source size.
	LayerStarted EventKind = iota
	// LayerProgress: Complete bytes of the source blob were read.
	LayerProgress
	// LayerDone: the layer finished; Result is set.
	LayerDone
	// LayerFailed: the layer failed; Err is set.
	LayerFailed
)

// Event is a progress report about one source layer.
type Event struct {
	Kind     EventKind
	Layer    v1.Hash // source layer digest
	Total    int64   // source blob size
	Complete int64   // source bytes read so far
	Result   *LayerResult
	Err      error
}

// LayerResult describes one converted layer.
type LayerResult struct {
	// Source is the digest, size and media type of the source blob.
	Source v1.Descriptor `json:"source"`
	// Output is the descriptor of the converted blob, with its annotations.
	Output v1.Descriptor `json:"output"`
	// DiffID is the digest of the output's uncompressed tar.
	DiffID v1.Hash `json:"diffID"`
	// TOCDigest is the digest of the output's TOC JSON.
	TOCDigest string `json:"tocDigest"`
	// UncompressedSize is the size of the output's uncompressed tar.
	UncompressedSize int64 `json:"uncompressedSize"`
	// SourceUncompressedSize is the size of the source's uncompressed tar.
	SourceUncompressedSize int64 `json:"sourceUncompressedSize"`
	// Reused is true when the source already was valid output and was kept.
	Reused bool `json:"reused"`
	// Prefetch is how many files were placed before the prefetch landmark.
	Prefetch int `json:"prefetchFiles"`
	// MissingPrefetch lists prefetch entries that the layer does not hold.
	MissingPrefetch []string `json:"missingPrefetch,omitempty"`
	// SpoolExceeded is set when the layer had a prefetch list but exceeded
	// the spool limits (WithSpoolLimit), so it was converted in source order.
	SpoolExceeded bool `json:"spoolExceeded,omitempty"`
	// Seconds is the wall time the conversion of this layer took.
	Seconds float64 `json:"seconds"`
}

func (r *LayerResult) setDuration(d time.Duration) { r.Seconds = d.Seconds() }

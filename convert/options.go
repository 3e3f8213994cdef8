package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Format is an output layer format.
type Format string

const (
	// FormatEStargz is gzip-compressed eStargz, readable by every stargz
	// snapshotter and by any runtime as a plain gzip tar layer.
	FormatEStargz Format = "estargz"
	// FormatZstdChunked is zstd:chunked, as read by containers/storage and by
	// the stargz snapshotter.
	FormatZstdChunked Format = "zstd-chunked"
)

// ParseFormat parses a format name as given on the command line.
func ParseFormat(s string) (Format, error) {
	switch Format(s) {
	case FormatEStargz, FormatZstdChunked:
		return Format(s), nil
	case "zstd:chunked", "zstdchunked":
		return FormatZstdChunked, nil
	}
	return "", fmt.Errorf("unknown format %q (want %q or %q)", s, FormatEStargz, FormatZstdChunked)
}

// DefaultGzipLevel is the default compression level for eStargz output. With
// github.com/klauspost/compress it produces output within about 1% of the size
// of estargz.Build's default (compress/gzip at BestCompression), an order of
// magnitude faster.
const DefaultGzipLevel = 6

// DefaultZstdLevel is the default zstd level for zstd:chunked output
// (klauspost's SpeedDefault).
const DefaultZstdLevel = 3

// DefaultChunkSize is the largest piece of a regular file compressed as one
// independent stream, as in estargz.
const DefaultChunkSize = 4 << 20

// PrefetchSource tells which files of a layer should be placed before the
// prefetch landmark, in the order they should be fetched. diffID and digest
// identify the source layer; an implementation may match either. It returns
// nil when it has nothing for the layer.
type PrefetchSource interface {
	PrefetchFiles(diffID, digest v1.Hash) []string
}

// DefaultSpoolLimit is the most uncompressed bytes of one layer a Converter
// spools to a temporary file to reorder it for a prefetch list.
const DefaultSpoolLimit = 4 << 30

// DefaultSpoolEntries is the most entries of one layer a Converter holds in
// memory while it spools the layer.
const DefaultSpoolEntries = 1 << 20

type options struct {
	format    Format
	level     int
	levelSet  bool
	chunkSize int
	jobs      int
	workers   int
	prefetch  PrefetchSource
	force     bool
	platforms []v1.Platform
	progress  func(Event)
	tempDir   string
	tee       BlobTee

	spoolBytes   int64
	spoolEntries int
}

// Option configures a Converter.
type Option func(*options) error

// WithFormat selects the output format. The default is FormatEStargz.
func WithFormat(f Format) Option {
	return func(o *options) error {
		if _, err := ParseFormat(string(f)); err != nil {
			return err
		}
		o.format = f
		return nil
	}
}

// WithCompressionLevel sets the gzip (1-9) or zstd (1-22) level of the output.
func WithCompressionLevel(level int) Option {
	return func(o *options) error {
		o.level = level
		o.levelSet = true
		return nil
	}
}

// WithChunkSize sets the largest number of bytes of one regular file that are
// compressed as one stream. The default is DefaultChunkSize.
func WithChunkSize(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("chunk size must be positive, got %d", n)
		}
		o.chunkSize = n
		return nil
	}
}

// WithJobs sets how many layers are converted at the same time. The default is
// GOMAXPROCS. Output does not depend on it.
func WithJobs(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("jobs must be positive, got %d", n)
		}
		o.jobs = n
		return nil
	}
}

// WithWorkers sets how many compressors run in parallel, shared by all layers
// of a Converter. The default is GOMAXPROCS. Output does not depend on it.
func WithWorkers(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("workers must be positive, got %d", n)
		}
		o.workers = n
		return nil
	}
}

// WithPrefetch sets the source of per-layer prefetch file lists.
func WithPrefetch(p PrefetchSource) Option {
	return func(o *options) error {
		o.prefetch = p
		return nil
	}
}

// WithSpoolLimit bounds what a Converter keeps of one layer to reorder it
// for a prefetch list: its uncompressed tar is spooled to a file in the
// temporary directory (at most maxBytes, plus one tar header) and the
// headers of its entries are kept in memory (at most maxEntries). A layer
// that exceeds either bound is converted in source order, as without a
// prefetch list (the output starts with .no.prefetch.landmark), with a
// warning naming it. The defaults are DefaultSpoolLimit and
// DefaultSpoolEntries.
func WithSpoolLimit(maxBytes int64, maxEntries int) Option {
	return func(o *options) error {
		if maxBytes <= 0 || maxEntries <= 0 {
			return fmt.Errorf("spool limits must be positive, got %d bytes and %d entries", maxBytes, maxEntries)
		}
		o.spoolBytes, o.spoolEntries = maxBytes, maxEntries
		return nil
	}
}

// WithForce rebuilds layers that already are valid eStargz instead of reusing
// them.
func WithForce(force bool) Option {
	return func(o *options) error {
		o.force = force
		return nil
	}
}

// WithPlatforms limits index conversion to the given platforms. The default is
// every platform of the index.
func WithPlatforms(p ...v1.Platform) Option {
	return func(o *options) error {
		o.platforms = append(o.platforms, p...)
		return nil
	}
}

// BlobTee receives a copy of each layer blob a Converter builds, while it
// is written: Start is called when a source layer's rebuild starts (not
// for a layer kept as it is), and what it returns gets the output bytes in
// order, then End once, with the converted layer's descriptor or with the
// error that failed the layer. The copy cannot change or fail the
// conversion: errors of the writer are ignored, and the Converter's own
// blob is written as without a tee. A slow writer slows the conversion.
type BlobTee interface {
	Start(ctx context.Context, source v1.Descriptor) BlobTeeWriter
}

// BlobTeeWriter is the copy of one layer blob a BlobTee receives.
type BlobTeeWriter interface {
	io.Writer
	// End tells that the blob is complete and is desc (err nil), or that
	// the layer failed with err.
	End(desc v1.Descriptor, err error)
}

// WithBlobTee sends a copy of each rebuilt layer blob to t as it is
// written, e.g. to upload it while it is produced.
func WithBlobTee(t BlobTee) Option {
	return func(o *options) error { o.tee = t; return nil }
}

// WithProgress registers a function that receives progress events. It is
// called from conversion goroutines and must not block.
func WithProgress(fn func(Event)) Option {
	return func(o *options) error {
		o.progress = fn
		return nil
	}
}

// WithTempDir sets the directory for temporary files (converted layers and
// spooled source tars). The default is os.TempDir().
func WithTempDir(dir string) Option {
	return func(o *options) error {
		o.tempDir = dir
		return nil
	}
}

func makeOptions(opts ...Option) (*options, error) {
	o := &options{
		format:    FormatEStargz,
		chunkSize: DefaultChunkSize,
		jobs:      runtime.GOMAXPROCS(0),
		workers:   runtime.GOMAXPROCS(0),
		tempDir:   os.TempDir(),

		spoolBytes:   DefaultSpoolLimit,
		spoolEntries: DefaultSpoolEntries,
	}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(o); err != nil {
			return nil, err
		}
	}
	switch o.format {
	case FormatEStargz:
		if !o.levelSet {
			o.level = DefaultGzipLevel
		}
		if o.level < 1 || o.level > 9 {
			return nil, fmt.Errorf("gzip compression level must be 1-9, got %d", o.level)
		}
	case FormatZstdChunked:
		if !o.levelSet {
			o.level = DefaultZstdLevel
		}
		if o.level < 1 || o.level > 22 {
			return nil, fmt.Errorf("zstd compression level must be 1-22, got %d", o.level)
		}
	}
	if o.progress == nil {
		o.progress = func(Event) {}
	}
	if o.tempDir == "" {
		return nil, errors.New("temporary directory must not be empty")
	}
	return o, nil
}

package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	stdlog "log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/progress"
)

// ConvertFunc converts the image src to dst (both registry references)
// and says what it wrote. The demo's caller passes the code of 'lazybase
// convert'.
type ConvertFunc func(ctx context.Context, src, dst string) (*Conversion, error)

// Conversion is what a ConvertFunc reports.
type Conversion struct {
	// Digest is the digest of the manifest written to dst.
	Digest v1.Hash
	// Layers are the converted image's layers, in order.
	Layers []ConvertedLayer
	// ConvertSeconds and WriteSeconds are the time spent converting and
	// writing to the registry.
	ConvertSeconds, WriteSeconds float64
}

// ConvertedLayer is one layer of a Conversion.
type ConvertedLayer struct {
	SourceDigest           v1.Hash
	SourceSize             int64
	SourceUncompressedSize int64
	Digest                 v1.Hash
	Size                   int64
	TOCDigest              string
	Seconds                float64
	Reused                 bool
}

// Stage names a step of Run reported to WithNotify's function.
type Stage int

const (
	// StageRegistry: the registry listens; Report.Registry is set.
	StageRegistry Stage = iota + 1
	// StagePublished: the sample image is in the registry; Report.Source,
	// Report.Sample and Report.BuildSeconds are set.
	StagePublished
)

// Option configures Run.
type Option func(*options) error

type options struct {
	source   string
	maxBytes int64
	small    bool
	format   convert.Format
	convert  ConvertFunc
	notify   func(Stage, *Report)
}

// WithSource makes the second layer from the files under dir (default: the
// Go toolchain's src directory).
func WithSource(dir string) Option {
	return func(o *options) error { o.source = dir; return nil }
}

// WithMaxBytes stops adding files to the second layer after n bytes of file
// content (default 100,000,000).
func WithMaxBytes(n int64) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("max bytes %d: must be positive", n)
		}
		o.maxBytes = n
		return nil
	}
}

// WithSmall makes the second layer from a few generated files instead of a
// directory: a quick run.
func WithSmall(b bool) Option {
	return func(o *options) error { o.small = b; return nil }
}

// WithFormat names the output format the conversion step writes (default
// eStargz); it names the destination tag and decides which checks apply.
func WithFormat(f convert.Format) Option {
	return func(o *options) error { o.format = f; return nil }
}

// WithConvert sets the conversion step. Required.
func WithConvert(fn ConvertFunc) Option {
	return func(o *options) error { o.convert = fn; return nil }
}

// WithNotify calls fn with the report so far as each Stage completes.
func WithNotify(fn func(Stage, *Report)) Option {
	return func(o *options) error { o.notify = fn; return nil }
}

// Run publishes the sample image to a registry on loopback, converts it
// with the conversion step and verifies the result. The registry and its
// files are gone when Run returns.
func Run(ctx context.Context, opts ...Option) (*Report, error) {
	o := options{maxBytes: 100_000_000, format: convert.FormatEStargz, notify: func(Stage, *Report) {}}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if o.convert == nil {
		return nil, errors.New("demo: no conversion step (WithConvert)")
	}
	if o.small && o.source != "" {
		return nil, errors.New("demo: a small run makes no layer from a source directory")
	}
	tmp, err := os.MkdirTemp("", "lazybase-demo-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	host, stop, err := serveRegistry(filepath.Join(tmp, "registry"))
	if err != nil {
		return nil, err
	}
	defer stop()
	rep := &Report{Registry: host, Format: o.format}
	o.notify(StageRegistry, rep)
	client, err := imageio.New(imageio.WithUserAgent("lazybase-demo"))
	if err != nil {
		return nil, err
	}
	if err := publish(ctx, client, tmp, o, rep); err != nil {
		return nil, err
	}
	o.notify(StagePublished, rep)
	rep.Destination = host + "/demo/sample:" + strings.ReplaceAll(string(o.format), "-", "")
	conv, err := o.convert(ctx, rep.Source, rep.Destination)
	if err != nil {
		return nil, err
	}
	rep.fill(conv)
	if err := verify(ctx, client, rep); err != nil {
		return nil, fmt.Errorf("verifying %s: %w", rep.Destination, err)
	}
	return rep, nil
}

// Verify checks the image ref, converted as c reports, as the registry at
// host (reached over plain HTTP) holds it, with the checks Run makes, and
// returns the report's layers. ref names a repository of that registry.
func Verify(ctx context.Context, client *imageio.Client, host, ref string, c *Conversion) (*Report, error) {
	rep := &Report{Registry: host, Destination: ref}
	rep.fill(c)
	if err := verify(ctx, client, rep); err != nil {
		return nil, fmt.Errorf("verifying %s: %w", ref, err)
	}
	return rep, nil
}

// serveRegistry starts a registry on 127.0.0.1 with its blobs under dir.
func serveRegistry(dir string) (host string, stop func(), err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, fmt.Errorf("starting registry: %w", err)
	}
	srv := &http.Server{
		Handler: registry.New(
			registry.Logger(stdlog.New(io.Discard, "", 0)),
			registry.WithBlobHandler(registry.NewDiskBlobHandler(dir)),
		),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = srv.Serve(ln) }()
	return ln.Addr().String(), func() { _ = srv.Close() }, nil
}

// publish builds the sample image in dir and pushes it to the registry.
func publish(ctx context.Context, client *imageio.Client, dir string, o options, rep *Report) error {
	t0 := time.Now()
	img, info, err := sampleImage(dir, o)
	if err != nil {
		return fmt.Errorf("building the sample image: %w", err)
	}
	rep.Source = rep.Registry + "/demo/sample:gzip"
	ref, err := client.ParseRef(rep.Source)
	if err != nil {
		return err
	}
	if _, err := client.Write(ctx, ref, img, nil); err != nil {
		return fmt.Errorf("publishing the sample image: %w", err)
	}
	rep.Sample, rep.BuildSeconds = info, time.Since(t0).Seconds()
	return nil
}

// Report is what Run did and found.
type Report struct {
	// Registry is the registry's host:port on loopback.
	Registry string
	// Source and Destination are the sample image's and the converted
	// image's references; Digest is the converted manifest's digest.
	Source, Destination string
	Digest              v1.Hash
	Format              convert.Format
	// Sample describes the sample image; BuildSeconds is the time taken
	// to build and publish it.
	Sample       Sample
	BuildSeconds float64
	// Layers are the converted image's layers, in order, with what the
	// verification found.
	Layers []Layer
	// Totals sum the layers.
	Totals Totals
}

// Sample describes the sample image.
type Sample struct {
	Layers, Files    int
	UncompressedSize int64 // of the layers' tar streams
	CompressedSize   int64 // of the gzip blobs
	// SourceDir is the directory the second layer was made from; "" for
	// generated files.
	SourceDir string
}

// String is a one-line description, as the demo prints it.
func (s Sample) String() string {
	out := fmt.Sprintf("%d layers, %d files, %s uncompressed, %s gzip", s.Layers, s.Files,
		progress.Bytes(s.UncompressedSize), progress.Bytes(s.CompressedSize))
	if s.SourceDir != "" {
		out += " (second layer from " + s.SourceDir + ")"
	}
	return out
}

// Layer is one converted layer: what the conversion reported and what
// the verification found.
type Layer struct {
	SourceDigest           v1.Hash
	SourceSize             int64
	SourceUncompressedSize int64
	Digest                 v1.Hash
	Size                   int64
	// Ratio is Size over SourceSize.
	Ratio float64
	// Seconds is the conversion time; MBPerSecond the uncompressed
	// source MB (10^6 bytes) per second of it.
	Seconds, MBPerSecond float64
	Reused               bool
	TOCDigest            digest.Digest
	// OpenRequests and OpenBytes are the HTTP range requests and bytes
	// estargz.Open took to open the layer lazily.
	OpenRequests int
	OpenBytes    int64
	// Entries counts the TOC's entries below the root (files,
	// directories, links, landmarks).
	Entries int
	// Landmark is estargz.PrefetchLandmark or estargz.NoPrefetchLandmark,
	// whichever the layer holds.
	Landmark string
	// EStargzVerified says convert.VerifyEStargz checked every chunk and
	// the tar stream of the whole blob (gzip eStargz layers only; zstd
	// layers are checked by digest and diffID).
	EStargzVerified bool
}

// Totals sum a report's layers.
type Totals struct {
	SourceBytes, OutputBytes, SourceUncompressedSize int64
	ConvertSeconds, WriteSeconds                     float64
	// MBPerSecond is uncompressed source MB (10^6 bytes) per second of
	// conversion.
	MBPerSecond float64
}

// fill copies what the conversion reported into r.
func (r *Report) fill(c *Conversion) {
	r.Digest = c.Digest
	r.Totals.ConvertSeconds, r.Totals.WriteSeconds = c.ConvertSeconds, c.WriteSeconds
	for _, l := range c.Layers {
		out := Layer{
			SourceDigest: l.SourceDigest, SourceSize: l.SourceSize, SourceUncompressedSize: l.SourceUncompressedSize,
			Digest: l.Digest, Size: l.Size, Seconds: l.Seconds, Reused: l.Reused, TOCDigest: digest.Digest(l.TOCDigest),
			Ratio: float64(l.Size) / float64(max(l.SourceSize, 1)),
		}
		if l.Seconds > 0 {
			out.MBPerSecond = float64(l.SourceUncompressedSize) / 1e6 / l.Seconds
		}
		r.Layers = append(r.Layers, out)
		r.Totals.SourceBytes += l.SourceSize
		r.Totals.OutputBytes += l.Size
		r.Totals.SourceUncompressedSize += l.SourceUncompressedSize
	}
	if c.ConvertSeconds > 0 {
		r.Totals.MBPerSecond = float64(r.Totals.SourceUncompressedSize) / 1e6 / c.ConvertSeconds
	}
}

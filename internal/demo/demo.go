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

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/progress"
)

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
	jobs     int
	request  func(*job.Request)
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

// WithFormat names the output format (default eStargz); it names the
// destination tag and decides which checks apply.
func WithFormat(f convert.Format) Option {
	return func(o *options) error { o.format = f; return nil }
}

// WithJobs bounds the layers converted and blobs transferred at the same
// time (default: number of CPUs).
func WithJobs(n int) Option {
	return func(o *options) error {
		if n < 0 {
			return fmt.Errorf("jobs %d: must not be negative", n)
		}
		o.jobs = n
		return nil
	}
}

// WithRequest lets fn complete the convert job's request before it runs:
// its progress hooks, say.
func WithRequest(fn func(*job.Request)) Option {
	return func(o *options) error { o.request = fn; return nil }
}

// WithNotify calls fn with the report so far as each Stage completes.
func WithNotify(fn func(Stage, *Report)) Option {
	return func(o *options) error { o.notify = fn; return nil }
}

// Run publishes the sample image to a registry on loopback, converts it
// with the convert job of 'lazybase convert' (package convert/job) and
// verifies the result. The registry and its
// files are gone when Run returns.
func Run(ctx context.Context, opts ...Option) (*Report, error) {
	o := options{maxBytes: 100_000_000, format: convert.FormatEStargz, notify: func(Stage, *Report) {}, request: func(*job.Request) {}}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
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
	req := job.Request{Source: rep.Source, Destination: rep.Destination, Client: client, Format: o.format, Jobs: o.jobs}
	o.request(&req)
	conv, err := job.Run(ctx, req)
	if err != nil {
		return nil, err
	}
	if err := rep.fill(conv); err != nil {
		return nil, err
	}
	if err := verify(ctx, client, rep); err != nil {
		return nil, fmt.Errorf("verifying %s: %w", rep.Destination, err)
	}
	return rep, nil
}

// Verify checks the image ref, converted as c reports, as the registry at
// host (reached over plain HTTP) holds it, with the checks Run makes, and
// returns the report's layers. ref names a repository of that registry.
func Verify(ctx context.Context, client *imageio.Client, host, ref string, c *job.Report) (*Report, error) {
	rep := &Report{Registry: host, Destination: ref}
	if err := rep.fill(c); err != nil {
		return nil, err
	}
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
	// Conversion is the convert job's report; its Totals sum the layers.
	Conversion *job.Report
	// Layers are the converted image's layers, in order, with what the
	// verification found.
	Layers []Layer
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
	// LayerReport is what the convert job reported.
	job.LayerReport
	// Ratio is Size over SourceSize.
	Ratio float64
	// MBPerSecond is the uncompressed source MB (10^6 bytes) per second
	// of the layer's conversion.
	MBPerSecond float64
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

// fill takes the converted image's digest and layers from the convert
// job's report, which must be of one image.
func (r *Report) fill(c *job.Report) error {
	d, err := v1.NewHash(c.Digest)
	if err != nil {
		return fmt.Errorf("convert report: digest: %w", err)
	}
	if len(c.Images) != 1 {
		return fmt.Errorf("convert report: %d images, want 1", len(c.Images))
	}
	r.Digest, r.Conversion, r.Layers = d, c, nil
	for _, l := range c.Images[0].Layers {
		out := Layer{LayerReport: l, Ratio: float64(l.Size) / float64(max(l.SourceSize, 1))}
		if l.Seconds > 0 {
			out.MBPerSecond = float64(l.SourceUncompressedSize) / 1e6 / l.Seconds
		}
		r.Layers = append(r.Layers, out)
	}
	return nil
}

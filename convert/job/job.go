package job

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/prefetch"
)

// ErrOverwritesSource is returned (wrapped, naming the destination) when a
// job's destination names its source and Request.Overwrite is false.
var ErrOverwritesSource = errors.New("writing it would move the source's tag to the converted image")

// LayerFunc gives the converted form of one source layer of a job, in place
// of the job's own converter. files are the prefetch files the job's bound
// prefetch source names for the layer (nil without one).
type LayerFunc func(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash, files []string) (convert.ConvertedLayer, error)

// UpToDateFunc tells, once the source is open, whether dst already holds
// its conversion; if so it returns the digest dst points to and the job
// writes nothing.
type UpToDateFunc func(ctx context.Context, dst imageio.Ref, src *imageio.Source) (digest string, ok bool, err error)

// Request is one conversion job: Source converted to Destination.
type Request struct {
	// Source and Destination are registry references
	// (registry.example/repo:tag) or OCI image layout directories written
	// oci:PATH[:TAG]. Destination must name a tag.
	Source, Destination string
	// Client reads the source and writes the destination; nil means a
	// client with imageio's defaults.
	Client *imageio.Client
	// Format is the output format (default eStargz). Level and ChunkSize
	// are the compression level and chunk size (0: the format's
	// defaults); Jobs bounds the layers converted at once (0: GOMAXPROCS).
	Format           convert.Format
	Level, ChunkSize int
	Jobs             int
	// Platforms selects the platforms of an index (all when empty); a
	// single image must be for one of them unless AnyImagePlatform.
	Platforms        []v1.Platform
	AnyImagePlatform bool
	// Prefetch names the files to place first in each layer; it is bound
	// to the source once open (prefetch.For), so a profile recorded for
	// another image is ignored with a warning.
	Prefetch prefetch.Source
	// Force rebuilds layers that already are valid eStargz instead of
	// reusing them (the job's own converter only).
	Force bool
	// Overwrite allows Destination to name Source: the source's tag is
	// moved to the converted image. Without it the job fails with
	// ErrOverwritesSource before converting anything.
	Overwrite bool
	// ConvertOptions are further options of the job's own converter
	// (convert.WithTempDir, convert.WithSpoolLimit…).
	ConvertOptions []convert.Option
	// Layer, when set, converts each layer in place of the job's own
	// converter.
	Layer LayerFunc
	// UpToDate, when set, is asked before converting whether the
	// destination already holds the conversion.
	UpToDate UpToDateFunc
	// Progress receives the converter's layer events (job's own converter
	// only); Writing is called once before the destination is written,
	// WriteProgress as it is written.
	Progress      func(convert.Event)
	Writing       func(dst string)
	WriteProgress func(complete, total int64)
}

// job is a request being run.
type job struct {
	req      Request
	client   *imageio.Client
	src, dst imageio.Ref
	rep      *Report
	// conv is the job's own converter (nil with Request.Layer); bound is
	// its prefetch source.
	conv  *convert.Converter
	bound *boundPrefetch
	// stream uploads the layers the job's converter rebuilds while they
	// are written (registry destinations only).
	stream *streamer
}

// Run runs the request and reports what it converted and wrote. On error
// the report is still returned with what was known (the references, and the
// source digest once the source was read); the error names the source, and
// the converter's errors name the image and layer at fault.
func Run(ctx context.Context, req Request) (*Report, error) {
	start := time.Now()
	j, err := newJob(req)
	if err != nil {
		return &Report{Source: req.Source, Destination: req.Destination, Format: string(req.Format)}, err
	}
	if j.conv != nil {
		defer j.conv.Close()
	}
	err = j.run(ctx)
	j.rep.Totals.Seconds = time.Since(start).Seconds()
	return j.rep, err
}

// newJob checks the request and parses its references.
func newJob(req Request) (*job, error) {
	if req.Format == "" {
		req.Format = convert.FormatEStargz
	}
	if _, err := convert.ParseFormat(string(req.Format)); err != nil {
		return nil, err
	}
	if req.Jobs < 0 {
		return nil, fmt.Errorf("jobs must be positive, got %d", req.Jobs)
	}
	j := &job{req: req, client: req.Client, bound: &boundPrefetch{}}
	if j.client == nil {
		c, err := imageio.New()
		if err != nil {
			return nil, err
		}
		j.client = c
	}
	var err error
	if j.src, err = j.client.ParseRef(req.Source); err != nil {
		return nil, err
	}
	if j.dst, err = j.client.ParseRef(req.Destination); err != nil {
		return nil, err
	}
	if err := imageio.CheckDestination(j.dst); err != nil {
		return nil, err
	}
	j.rep = &Report{Source: j.src.String(), Destination: j.dst.String(), Format: string(req.Format)}
	if !req.Overwrite && imageio.Overwrites(j.dst, j.src, nil) {
		return nil, j.overwriteError()
	}
	if req.Layer == nil {
		opts := j.converterOptions()
		if !j.dst.IsLayout() {
			j.stream = &streamer{client: j.client, dst: j.dst}
			opts = append(opts, convert.WithBlobTee(j.stream))
		}
		// Before any I/O: bad converter options fail the job at once.
		if j.conv, err = convert.New(opts...); err != nil {
			return nil, err
		}
	}
	return j, nil
}

func (j *job) overwriteError() error {
	return fmt.Errorf("destination %s is the source: %w", j.dst, ErrOverwritesSource)
}

// run opens the source, converts it and writes the destination.
func (j *job) run(ctx context.Context) (retErr error) {
	if j.stream != nil {
		j.stream.ctx = ctx
		defer func() {
			if retErr != nil {
				j.stream.abort(ctx)
			}
		}()
	}
	source, err := j.client.Open(ctx, j.src)
	if err != nil {
		return err
	}
	j.rep.SourceDigest = source.Descriptor.Digest.String()
	if !j.req.Overwrite && imageio.Overwrites(j.dst, j.src, &source.Descriptor) {
		return j.overwriteError()
	}
	if j.req.UpToDate != nil {
		dgst, ok, err := j.req.UpToDate(ctx, j.dst, source)
		if err != nil {
			return fmt.Errorf("checking %s: %w", j.dst, err)
		}
		if ok {
			j.rep.Digest, j.rep.UpToDate = dgst, true
			return nil
		}
	}
	log.G(ctx).WithField("source", j.src.String()).WithField("digest", j.rep.SourceDigest).Debug("converting")
	out, platform, err := j.convert(ctx, source)
	if err != nil {
		return err
	}
	return j.write(ctx, out, platform)
}

// convert converts the opened source and reports its images.
func (j *job) convert(ctx context.Context, source *imageio.Source) (imageio.Artifact, *v1.Platform, error) {
	fn, format := j.layerFunc(ctx, source)
	start := time.Now()
	defer func() { j.rep.Totals.ConvertSeconds = time.Since(start).Seconds() }()
	if source.Image != nil {
		if err := j.checkPlatform(source.Image); err != nil {
			return nil, nil, fmt.Errorf("converting %s: %w", j.src, err)
		}
		res, err := convert.Assemble(ctx, source.Image, format, fn)
		if err != nil {
			return nil, nil, j.convertError(err)
		}
		j.rep.addImages([]*convert.ImageResult{res})
		return res.Image, res.Platform, nil
	}
	res, err := convert.AssembleIndex(ctx, source.Index, format, j.req.Platforms, fn)
	if err != nil {
		return nil, nil, j.convertError(err)
	}
	j.rep.Skipped = res.Skipped
	j.rep.addImages(res.Images)
	return res.Index, nil, nil
}

// convertError names the source of a failed conversion (the converter
// names the image and layer) and says what a registry refusal was.
func (j *job) convertError(err error) error {
	return fmt.Errorf("converting %s: %w", j.src, imageio.Classify(err))
}

// write writes the converted artifact to the destination, tag last.
func (j *job) write(ctx context.Context, out imageio.Artifact, platform *v1.Platform) error {
	if j.req.Writing != nil {
		j.req.Writing(j.dst.String())
	}
	var opts []imageio.WriteOption
	if j.req.WriteProgress != nil {
		opts = append(opts, imageio.WithWriteProgress(j.req.WriteProgress))
	}
	start := time.Now()
	if j.stream != nil {
		// The blobs streamed while converting; Write finds them there.
		j.rep.Totals.Streamed = j.stream.commit(ctx)
	}
	desc, err := j.client.Write(ctx, j.dst, out, platform, opts...)
	j.rep.Totals.WriteSeconds = time.Since(start).Seconds()
	if err != nil {
		return err
	}
	j.rep.Digest, j.rep.MediaType = desc.Digest.String(), string(desc.MediaType)
	if s := j.rep.Totals.ConvertSeconds; s > 0 {
		j.rep.Totals.MBPerSecond = float64(j.rep.Totals.SourceUncompressedSize) / 1e6 / s
	}
	return nil
}

// layerFunc returns how the job converts a layer and the format
// annotation the converted manifests carry, with the prefetch source bound
// to the opened source.
func (j *job) layerFunc(ctx context.Context, source *imageio.Source) (convert.LayerFunc, string) {
	if j.req.Prefetch != nil {
		j.bound.s = prefetch.For(ctx, j.req.Prefetch, j.src.String(), source.Descriptor.Digest)
	}
	if j.conv != nil {
		return j.conv.LayerFunc(), j.conv.FormatAnnotation()
	}
	fn := j.req.Layer
	return func(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash) (convert.ConvertedLayer, error) {
		return fn(ctx, src, desc, diffID, j.bound.PrefetchFiles(diffID, desc.Digest))
	}, convert.FormatAnnotation(j.req.Format, j.req.Level, j.req.ChunkSize)
}

// boundPrefetch is the job's prefetch source, bound to the source once it
// is open (a profile may be for another image).
type boundPrefetch struct{ s prefetch.Source }

// PrefetchFiles returns the bound source's files for a layer.
func (b *boundPrefetch) PrefetchFiles(diffID, digest v1.Hash) []string {
	if b.s == nil {
		return nil
	}
	return b.s.PrefetchFiles(diffID, digest)
}

// converterOptions are the options of the job's own converter.
func (j *job) converterOptions() []convert.Option {
	r := j.req
	opts := []convert.Option{convert.WithFormat(r.Format), convert.WithForce(r.Force)}
	if r.Level != 0 {
		opts = append(opts, convert.WithCompressionLevel(r.Level))
	}
	if r.ChunkSize != 0 {
		opts = append(opts, convert.WithChunkSize(r.ChunkSize))
	}
	if r.Jobs > 0 {
		opts = append(opts, convert.WithJobs(r.Jobs))
	}
	if len(r.Platforms) > 0 {
		opts = append(opts, convert.WithPlatforms(r.Platforms...))
	}
	if r.Prefetch != nil {
		opts = append(opts, convert.WithPrefetch(j.bound))
	}
	if r.Progress != nil {
		opts = append(opts, convert.WithProgress(r.Progress))
	}
	return append(opts, r.ConvertOptions...)
}

// checkPlatform rejects a single image whose platform is not among the
// selected ones.
func (j *job) checkPlatform(img v1.Image) error {
	platforms := j.req.Platforms
	if len(platforms) == 0 || j.req.AnyImagePlatform {
		return nil
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("reading config: %w", err)
	}
	p := cfg.Platform()
	if p == nil {
		return errors.New("the image's config names no platform, and platforms were selected")
	}
	var want []string
	for _, spec := range platforms {
		if p.Satisfies(spec) {
			return nil
		}
		want = append(want, spec.String())
	}
	return fmt.Errorf("the image is for %s, not %s", p, strings.Join(want, ", "))
}

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/progress"
	"github.com/lazybase/lazybase/prefetch"
)

// convertOptions are the flags of the convert verb.
type convertOptions struct {
	format    string
	platforms []string
	prefetch  string
	level     int // 0: the format's default
	jobs      int // 0: GOMAXPROCS
	force     bool
	plainHTTP bool
	insecure  bool
	timeouts  imageio.Timeouts // zero: the defaults
	// terminal forces the live display on (1) or off (-1); 0 detects it.
	terminal int
}

func newConvertCmd() *cobra.Command {
	var (
		o       convertOptions
		asJSON  bool
		levelFl int
	)
	cmd := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Convert an image or index to eStargz (or zstd:chunked)",
		Long: `Convert an image or a multi-platform index to eStargz (or zstd:chunked).

SRC and DST are registry references (registry.example/repo:tag) or OCI image
layout directories written oci:PATH[:TAG]. An index is converted whole unless
--platform selects some of its platforms.

Registries on loopback addresses are reached over plain HTTP; any other
registry needs --plain-http for that. --insecure skips TLS certificate
verification. Credentials come from the docker config and credential helpers.
Every phase of a registry request is bounded (--connect-timeout,
--tls-timeout, --response-timeout, --idle-timeout), never a whole transfer:
a registry that stops answering fails the conversion with an error naming
the host.

The destination tag is written last: a failed or interrupted conversion leaves
the destination as it was. A DST that names SRC (same repository and tag, or
same layout and tag) is refused unless --force.

Manifests and configs are checked against their digests, layers as they are
converted. Layers whose lazy view would differ from containerd's unpack
(hardlinks to directories, entries under a symbolic link of the same layer)
are refused, naming the layer and the entry.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkTimeoutFlags(o.timeouts); err != nil {
				return err
			}
			if cmd.Flags().Changed("compression-level") {
				o.level = levelFl
				if levelFl <= 0 {
					return fmt.Errorf("--compression-level must be positive, got %d", levelFl)
				}
			}
			rep, err := runConvert(cmd.Context(), cmd.ErrOrStderr(), args[0], args[1], o)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(rep)
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.format, "format", string(convert.FormatEStargz), "output format: estargz or zstd-chunked")
	f.StringSliceVar(&o.platforms, "platform", nil, "convert only these platforms of an index (os/arch[/variant]; repeatable or comma-separated)")
	f.StringVar(&o.prefetch, "prefetch", "", "prefetch list or profile (JSON) naming the files to place first in each layer")
	f.IntVar(&levelFl, "compression-level", 0, fmt.Sprintf("compression level (default %d for estargz, %d for zstd-chunked)", convert.DefaultGzipLevel, convert.DefaultZstdLevel))
	f.IntVar(&o.jobs, "jobs", 0, "layers converted and blobs transferred at the same time (default: number of CPUs)")
	f.BoolVar(&o.force, "force", false, "rebuild layers that already are valid eStargz instead of reusing them, and allow DST to be SRC (its tag is moved to the converted image)")
	f.BoolVar(&asJSON, "json", false, "print a JSON report on stdout")
	f.BoolVar(&o.plainHTTP, "plain-http", false, "allow plain HTTP to registries that are not on a loopback address")
	f.BoolVar(&o.insecure, "insecure", false, "skip TLS certificate verification")
	addTimeoutFlags(cmd, &o.timeouts)
	return cmd
}

// boundPrefetch is the converter's prefetch source, bound to the source
// image once it is open (a profile may be for another image).
type boundPrefetch struct{ s prefetch.Source }

func (b *boundPrefetch) PrefetchFiles(diffID, digest v1.Hash) []string {
	if b.s == nil {
		return nil
	}
	return b.s.PrefetchFiles(diffID, digest)
}

// convertReport is the --json report.
type convertReport struct {
	Source       string            `json:"source"`
	Destination  string            `json:"destination"`
	Format       string            `json:"format"`
	SourceDigest string            `json:"sourceDigest"`
	Digest       string            `json:"digest"`
	MediaType    string            `json:"mediaType"`
	Images       []imageReport     `json:"images"`
	Skipped      []convert.Skipped `json:"skipped,omitempty"`
	Totals       totalsReport      `json:"totals"`
}

type imageReport struct {
	Platform     string        `json:"platform,omitempty"`
	SourceDigest string        `json:"sourceDigest"`
	Digest       string        `json:"digest"`
	Layers       []layerReport `json:"layers"`
}

type layerReport struct {
	SourceDigest           string  `json:"sourceDigest"`
	SourceMediaType        string  `json:"sourceMediaType"`
	SourceSize             int64   `json:"sourceSize"`
	SourceUncompressedSize int64   `json:"sourceUncompressedSize"`
	Digest                 string  `json:"digest"`
	MediaType              string  `json:"mediaType"`
	Size                   int64   `json:"size"`
	UncompressedSize       int64   `json:"uncompressedSize"`
	TOCDigest              string  `json:"tocDigest"`
	PrefetchFiles          int     `json:"prefetchFiles"`
	Seconds                float64 `json:"seconds"`
	Reused                 bool    `json:"reused"`
}

// totalsReport counts each distinct source layer once.
type totalsReport struct {
	Images                 int     `json:"images"`
	Layers                 int     `json:"layers"`
	Reused                 int     `json:"reused"`
	SourceBytes            int64   `json:"sourceBytes"`
	OutputBytes            int64   `json:"outputBytes"`
	SourceUncompressedSize int64   `json:"sourceUncompressedBytes"`
	ConvertSeconds         float64 `json:"convertSeconds"`
	WriteSeconds           float64 `json:"writeSeconds"`
	Seconds                float64 `json:"seconds"`
	// MBPerSecond is uncompressed source MB (10^6 bytes) per second of
	// conversion.
	MBPerSecond float64 `json:"mbPerSecond"`
}

// runConvert converts src to dst, showing progress on stderr, and returns
// the report. The demo verb uses it too.
func runConvert(ctx context.Context, stderr io.Writer, src, dst string, o convertOptions) (*convertReport, error) {
	start := time.Now()
	format, err := convert.ParseFormat(o.format)
	if err != nil {
		return nil, fmt.Errorf("--format: %w", err)
	}
	platforms, err := parsePlatforms(o.platforms)
	if err != nil {
		return nil, err
	}
	copts := []imageio.Option{
		imageio.WithPlainHTTP(o.plainHTTP),
		imageio.WithInsecure(o.insecure),
		imageio.WithUserAgent("lazybase/" + version),
		imageio.WithTimeouts(o.timeouts),
	}
	if o.jobs < 0 {
		return nil, fmt.Errorf("--jobs must be positive, got %d", o.jobs)
	}
	if o.jobs > 0 {
		copts = append(copts, imageio.WithJobs(o.jobs))
	}
	client, err := imageio.New(copts...)
	if err != nil {
		return nil, err
	}
	srcRef, err := client.ParseRef(src)
	if err != nil {
		return nil, err
	}
	dstRef, err := client.ParseRef(dst)
	if err != nil {
		return nil, err
	}
	if err := imageio.CheckDestination(dstRef); err != nil {
		return nil, err
	}
	if !o.force && imageio.Overwrites(dstRef, srcRef, nil) {
		return nil, overwriteError(dstRef)
	}

	opts := []convert.Option{convert.WithFormat(format), convert.WithForce(o.force)}
	if o.level != 0 {
		opts = append(opts, convert.WithCompressionLevel(o.level))
	}
	if o.jobs > 0 {
		opts = append(opts, convert.WithJobs(o.jobs))
	}
	if len(platforms) > 0 {
		opts = append(opts, convert.WithPlatforms(platforms...))
	}
	var pf prefetch.Source
	bound := &boundPrefetch{}
	if o.prefetch != "" {
		if pf, err = prefetch.Load(o.prefetch); err != nil {
			return nil, fmt.Errorf("--prefetch: %w", err)
		}
		opts = append(opts, convert.WithPrefetch(bound))
	}
	disp := progress.New(stderr, progress.WithTerminal(isTerminal(stderr, o.terminal)))
	opts = append(opts, convert.WithProgress(disp.Handle))
	// Log lines share stderr with the display: send them through it.
	logOut := log.L.Logger.Out
	log.L.Logger.SetOutput(disp)
	defer log.L.Logger.SetOutput(logOut)
	conv, err := convert.New(opts...)
	if err != nil {
		return nil, err
	}
	defer conv.Close()

	source, err := client.Open(ctx, srcRef)
	if err != nil {
		return nil, err
	}
	if !o.force && imageio.Overwrites(dstRef, srcRef, &source.Descriptor) {
		return nil, overwriteError(dstRef)
	}
	if pf != nil {
		// A profile recorded for another image is ignored with a warning.
		bound.s = prefetch.For(ctx, pf, srcRef.String(), source.Descriptor.Digest)
	}
	log.G(ctx).WithField("source", srcRef.String()).WithField("digest", source.Descriptor.Digest.String()).Debug("converting")

	rep := &convertReport{
		Source:       srcRef.String(),
		Destination:  dstRef.String(),
		Format:       string(format),
		SourceDigest: source.Descriptor.Digest.String(),
	}
	var (
		out      imageio.Artifact
		platform *v1.Platform
		images   []*convert.ImageResult
	)
	disp.Start()
	convStart := time.Now()
	if source.Image != nil {
		if err := checkPlatform(source.Image, platforms); err != nil {
			disp.Stop()
			return nil, fmt.Errorf("converting %s: %w", srcRef, err)
		}
		res, err := conv.Image(ctx, source.Image)
		if err != nil {
			disp.Stop()
			return nil, convertError(srcRef, err)
		}
		out, platform, images = res.Image, res.Platform, []*convert.ImageResult{res}
	} else {
		res, err := conv.Index(ctx, source.Index)
		if err != nil {
			disp.Stop()
			return nil, convertError(srcRef, err)
		}
		if len(res.Images) == 0 {
			disp.Stop()
			return nil, fmt.Errorf("converting %s: no image of the index matches --platform %s", srcRef, strings.Join(o.platforms, ","))
		}
		out, images, rep.Skipped = res.Index, res.Images, res.Skipped
	}
	convSeconds := time.Since(convStart).Seconds()
	disp.Printf("writing %s", dstRef)
	writeStart := time.Now()
	desc, err := client.Write(ctx, dstRef, out, platform, imageio.WithWriteProgress(func(complete, total int64) {
		rate := ""
		if el := time.Since(writeStart).Seconds(); el > 0 {
			rate = progress.Rate(float64(complete) / el)
		}
		disp.Status(fmt.Sprintf("written %s / %s  %s", progress.Bytes(complete), progress.Bytes(total), rate))
	}))
	disp.Status("")
	disp.Stop()
	if err != nil {
		return nil, err
	}
	rep.Digest = desc.Digest.String()
	rep.MediaType = string(desc.MediaType)
	fillReport(rep, images)
	rep.Totals.ConvertSeconds = convSeconds
	rep.Totals.WriteSeconds = time.Since(writeStart).Seconds()
	rep.Totals.Seconds = time.Since(start).Seconds()
	if convSeconds > 0 {
		rep.Totals.MBPerSecond = float64(rep.Totals.SourceUncompressedSize) / 1e6 / convSeconds
	}
	t := rep.Totals
	fmt.Fprintf(stderr, "converted %s -> %s@%s: %d image(s), %d layer(s) (%d reused), %s -> %s, %s uncompressed in %.2fs (%.1f MB/s), written in %.2fs\n",
		rep.Source, rep.Destination, progress.Short(desc.Digest), t.Images, t.Layers, t.Reused,
		progress.Bytes(t.SourceBytes), progress.Bytes(t.OutputBytes), progress.Bytes(t.SourceUncompressedSize),
		t.ConvertSeconds, t.MBPerSecond, t.WriteSeconds)
	return rep, nil
}

// overwriteError refuses a destination that names the source.
func overwriteError(dst imageio.Ref) error {
	return fmt.Errorf("destination %s is the source: writing it would move the source's tag to the converted image; use another destination, or --force to overwrite the source", dst)
}

// convertError names the source of a failed conversion (the converter
// names the image and layer) and says what a registry refusal was.
func convertError(src imageio.Ref, err error) error {
	return fmt.Errorf("converting %s: %w", src, imageio.Classify(err))
}

func fillReport(rep *convertReport, images []*convert.ImageResult) {
	seen := map[v1.Hash]bool{}
	for _, img := range images {
		ir := imageReport{SourceDigest: img.Source.String(), Digest: img.Digest.String(), Layers: []layerReport{}}
		if img.Platform != nil {
			ir.Platform = img.Platform.String()
		}
		for _, l := range img.Layers {
			ir.Layers = append(ir.Layers, layerReport{
				SourceDigest:           l.Source.Digest.String(),
				SourceMediaType:        string(l.Source.MediaType),
				SourceSize:             l.Source.Size,
				SourceUncompressedSize: l.SourceUncompressedSize,
				Digest:                 l.Output.Digest.String(),
				MediaType:              string(l.Output.MediaType),
				Size:                   l.Output.Size,
				UncompressedSize:       l.UncompressedSize,
				TOCDigest:              l.TOCDigest,
				PrefetchFiles:          l.Prefetch,
				Seconds:                l.Seconds,
				Reused:                 l.Reused,
			})
			if seen[l.Source.Digest] {
				continue
			}
			seen[l.Source.Digest] = true
			rep.Totals.Layers++
			if l.Reused {
				rep.Totals.Reused++
			}
			rep.Totals.SourceBytes += l.Source.Size
			rep.Totals.OutputBytes += l.Output.Size
			rep.Totals.SourceUncompressedSize += l.SourceUncompressedSize
		}
		rep.Images = append(rep.Images, ir)
	}
	rep.Totals.Images = len(images)
}

func parsePlatforms(specs []string) ([]v1.Platform, error) {
	var out []v1.Platform
	for _, s := range specs {
		for _, part := range strings.Split(s, ",") {
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			p, err := v1.ParsePlatform(part)
			if err != nil {
				return nil, fmt.Errorf("--platform %q: %w", part, err)
			}
			if p.OS == "" || p.Architecture == "" {
				return nil, fmt.Errorf("--platform %q: want os/arch[/variant]", part)
			}
			out = append(out, *p)
		}
	}
	return out, nil
}

// checkPlatform rejects a single image whose platform is not among the
// selected ones.
func checkPlatform(img v1.Image, platforms []v1.Platform) error {
	if len(platforms) == 0 {
		return nil
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return fmt.Errorf("reading config: %w", err)
	}
	p := cfg.Platform()
	if p == nil {
		return errors.New("the image's config names no platform, and --platform was given")
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

// isTerminal reports whether w is a terminal; force overrides the check.
func isTerminal(w io.Writer, force int) bool {
	switch {
	case force > 0:
		return true
	case force < 0:
		return false
	}
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

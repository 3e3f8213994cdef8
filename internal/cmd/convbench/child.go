package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"runtime/pprof"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
)

// childResult is what a child process reports about one lazybase conversion.
type childResult struct {
	Seconds float64 `json:"seconds"`
	Digest  string  `json:"digest"`
	// OutputSizes are the converted layers' blob sizes, from the converted
	// manifest's descriptors, in manifest order.
	OutputSizes []int64 `json:"outputSizes"`
	// LayerSeconds are the per-layer times the converter reports.
	LayerSeconds []float64 `json:"layerSeconds"`
	// SourceUncompressed is the uncompressed size of the source layers as
	// the converter counted it.
	SourceUncompressed int64 `json:"sourceUncompressed"`
}

// runChild converts the image with the given digest in the OCI layout dir
// and writes a childResult as JSON to w.
// With profile set, it writes a CPU profile of the conversion there.
func runChild(ctx context.Context, dir, digest, profile string, w io.Writer) error {
	h, err := v1.NewHash(digest)
	if err != nil {
		return fmt.Errorf("child: digest %q: %w", digest, err)
	}
	img, err := layout.Path(dir).Image(h)
	if err != nil {
		return fmt.Errorf("child: image %s in %s: %w", h, dir, err)
	}
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			return fmt.Errorf("child: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("child: cpu profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	start := time.Now()
	c, err := convert.New()
	if err != nil {
		return err
	}
	defer c.Close()
	res, err := c.Image(ctx, img)
	if err != nil {
		return fmt.Errorf("child: converting %s: %w", h, err)
	}
	m, err := res.Image.Manifest()
	if err != nil {
		return fmt.Errorf("child: converted manifest: %w", err)
	}
	out := childResult{Digest: res.Digest.String()}
	for _, l := range m.Layers {
		out.OutputSizes = append(out.OutputSizes, l.Size)
	}
	out.Seconds = time.Since(start).Seconds()
	for _, l := range res.Layers {
		out.LayerSeconds = append(out.LayerSeconds, l.Seconds)
		out.SourceUncompressed += l.SourceUncompressedSize
	}
	return json.NewEncoder(w).Encode(out)
}

// jobResult is what a child process reports about one registry-to-registry
// conversion (convert/job, as 'lazybase convert' runs it).
type jobResult struct {
	Seconds float64 `json:"seconds"`
	// Digest is the manifest digest the destination tag points to.
	Digest string `json:"digest"`
	// ConvertSeconds and WriteSeconds are the job's own split.
	ConvertSeconds float64 `json:"convertSeconds"`
	WriteSeconds   float64 `json:"writeSeconds"`
	OutputBytes    int64   `json:"outputBytes"`
	// Streamed is how many layers were uploaded while they were written.
	Streamed int `json:"streamed"`
}

// runChildJob converts the registry image src to the registry tag dst with
// convert/job as 'lazybase convert SRC DST' does (default client: loopback
// registries over plain HTTP) and writes a jobResult as JSON to w.
func runChildJob(ctx context.Context, src, dst, profile string, w io.Writer) error {
	if profile != "" {
		f, err := os.Create(profile)
		if err != nil {
			return fmt.Errorf("child: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("child: cpu profile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	start := time.Now()
	rep, err := job.Run(ctx, job.Request{Source: src, Destination: dst})
	if err != nil {
		return fmt.Errorf("child: converting %s to %s: %w", src, dst, err)
	}
	return json.NewEncoder(w).Encode(jobResult{
		Seconds:        time.Since(start).Seconds(),
		Digest:         rep.Digest,
		ConvertSeconds: rep.Totals.ConvertSeconds,
		WriteSeconds:   rep.Totals.WriteSeconds,
		OutputBytes:    rep.Totals.OutputBytes,
		Streamed:       rep.Totals.Streamed,
	})
}

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"text/tabwriter"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/demo"
	"github.com/lazybase/lazybase/internal/progress"
)

// demoOptions are the flags of the demo verb.
type demoOptions struct {
	source   string // directory for the second layer; "" means GOROOT/src
	maxBytes int64  // cap on the file bytes of the second layer
	small    bool   // generated files only, for a quick run
	format   string
	jobs     int
	terminal int // as convertOptions.terminal
}

func newDemoCmd() *cobra.Command {
	var o demoOptions
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Convert a sample image in an in-process registry and verify it",
		Long: `Start a registry on 127.0.0.1, publish a sample image built from local files
(a small generated base layer and a layer of the Go toolchain's source tree),
convert it to eStargz with the same code as 'lazybase convert', verify the
result, and print a before/after report. Needs no root and no network.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDemo(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.source, "source", "", "directory whose files make the second layer (default: the Go toolchain's src tree)")
	f.Int64Var(&o.maxBytes, "max-bytes", 100_000_000, "stop adding files to the second layer after this many bytes")
	f.BoolVar(&o.small, "small", false, "use a few generated files instead of a directory (quick)")
	f.StringVar(&o.format, "format", string(convert.FormatEStargz), "output format: estargz or zstd-chunked")
	f.IntVar(&o.jobs, "jobs", 0, "layers converted and blobs transferred at the same time (default: number of CPUs)")
	return cmd
}

// runDemo runs the demo, converting with the convert verb's job and
// display, and prints its report.
func runDemo(ctx context.Context, stdout, stderr io.Writer, o demoOptions) error {
	if o.small && o.source != "" {
		return errors.New("--small and --source exclude each other: --small makes the second layer from generated files")
	}
	if o.maxBytes <= 0 {
		return fmt.Errorf("--max-bytes must be positive, got %d", o.maxBytes)
	}
	format, err := convert.ParseFormat(o.format)
	if err != nil {
		return fmt.Errorf("--format: %w", err)
	}
	if o.jobs < 0 {
		return fmt.Errorf("--jobs must be positive, got %d", o.jobs)
	}
	disp, stop := startDisplay(stderr, o.terminal)
	rep, err := demo.Run(ctx, demo.WithSource(o.source), demo.WithMaxBytes(o.maxBytes), demo.WithSmall(o.small),
		demo.WithFormat(format), demo.WithJobs(o.jobs), demo.WithNotify(demoNotifier(stdout)),
		demo.WithRequest(func(r *job.Request) { watchConvert(r, disp) }))
	stop()
	if err != nil {
		return err
	}
	printConvertSummary(stderr, rep.Conversion)
	printDemoReport(stdout, rep)
	return nil
}

// demoNotifier prints the demo's stages as they complete.
func demoNotifier(stdout io.Writer) func(demo.Stage, *demo.Report) {
	return func(s demo.Stage, r *demo.Report) {
		switch s {
		case demo.StageRegistry:
			fmt.Fprintf(stdout, "lazybase demo: registry at http://%s (in-process, loopback)\n", r.Registry)
		case demo.StagePublished:
			fmt.Fprintf(stdout, "published %s: %s, built and pushed in %.1fs\n", r.Source, r.Sample, r.BuildSeconds)
		}
	}
}

// printDemoReport prints the before/after table and what was verified.
func printDemoReport(w io.Writer, rep *demo.Report) {
	fmt.Fprintf(w, "\nconverted %s\n       -> %s@%s (%s)\n\n", rep.Source, rep.Destination, rep.Digest, rep.Format)
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "layer\tsource (gzip)\tsize\t->\toutput\tsize\tratio\tseconds\tMB/s\tTOC digest")
	for i, l := range rep.Layers {
		state := ""
		if l.Reused {
			state = " (reused)"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t->\t%s\t%s\t%.1f%%\t%.2f\t%.0f\t%s%s\n", i+1,
			shortDigest(l.SourceDigest), progress.Bytes(l.SourceSize), shortDigest(l.Digest), progress.Bytes(l.Size),
			l.Ratio*100, l.Seconds, l.MBPerSecond, l.TOCDigest, state)
	}
	t := rep.Conversion.Totals
	fmt.Fprintf(tw, "total\t\t%s\t->\t\t%s\t%.1f%%\t%.2f\t%.0f\t\n", progress.Bytes(t.SourceBytes), progress.Bytes(t.OutputBytes),
		float64(t.OutputBytes)/float64(max(t.SourceBytes, 1))*100, t.ConvertSeconds, t.MBPerSecond)
	tw.Flush()
	fmt.Fprintf(w, "\n%s uncompressed converted in %.2fs (%.0f MB/s); pushed in %.2fs\n",
		progress.Bytes(t.SourceUncompressedSize), t.ConvertSeconds, t.MBPerSecond, t.WriteSeconds)
	fmt.Fprintln(w, "verified: validate.Image passes on the pushed image")
	for i, l := range rep.Layers {
		full := ""
		if l.EStargzVerified {
			full = ", VerifyEStargz ok"
		}
		fmt.Fprintf(w, "verified: layer %d %s opens with estargz.Open over %d range request(s), %s of %s (%.2f%%), VerifyTOC ok%s, %d entries, %s\n",
			i+1, shortDigest(l.Digest), l.OpenRequests, progress.Bytes(l.OpenBytes), progress.Bytes(l.Size),
			float64(l.OpenBytes)/float64(max(l.Size, 1))*100, full, l.Entries, landmarkName(l.Landmark))
	}
	fmt.Fprintf(w, "ready for lazy pull: %s@%s\n", rep.Destination, rep.Digest)
}

// landmarkName names a landmark file as the report prints it.
func landmarkName(file string) string {
	switch file {
	case estargz.PrefetchLandmark:
		return "prefetch landmark"
	case estargz.NoPrefetchLandmark:
		return "no-prefetch landmark"
	}
	return file
}

// shortDigest abbreviates a digest as the progress display does.
func shortDigest(s string) string {
	h, err := v1.NewHash(s)
	if err != nil {
		return s
	}
	return progress.Short(h)
}

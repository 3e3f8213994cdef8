package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
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

const convertLong = `Convert an image or a multi-platform index to eStargz (or zstd:chunked).

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
are refused, naming the layer and the entry.`

func newConvertCmd() *cobra.Command {
	var (
		o      convertOptions
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "convert SRC DST",
		Short: "Convert an image or index to eStargz (or zstd:chunked)",
		Long:  convertLong,
		Args:  cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkConvertFlags(cmd, &o); err != nil {
				return err
			}
			rep, err := runConvert(cmd.Context(), cmd.ErrOrStderr(), args[0], args[1], o)
			if err != nil || !asJSON {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(rep)
		},
	}
	addConvertFlags(cmd, &o)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print a JSON report on stdout")
	return cmd
}

// addConvertFlags defines the convert verb's flags in o.
func addConvertFlags(cmd *cobra.Command, o *convertOptions) {
	f := cmd.Flags()
	f.StringVar(&o.format, "format", string(convert.FormatEStargz), "output format: estargz or zstd-chunked")
	f.StringSliceVar(&o.platforms, "platform", nil, "convert only these platforms of an index (os/arch[/variant]; repeatable or comma-separated)")
	f.StringVar(&o.prefetch, "prefetch", "", "prefetch list or profile (JSON) naming the files to place first in each layer")
	f.IntVar(&o.level, "compression-level", 0, fmt.Sprintf("compression level (default %d for estargz, %d for zstd-chunked)", convert.DefaultGzipLevel, convert.DefaultZstdLevel))
	f.IntVar(&o.jobs, "jobs", 0, "layers converted and blobs transferred at the same time (default: number of CPUs)")
	f.BoolVar(&o.force, "force", false, "rebuild layers that already are valid eStargz instead of reusing them, and allow DST to be SRC (its tag is moved to the converted image)")
	f.BoolVar(&o.plainHTTP, "plain-http", false, "allow plain HTTP to registries that are not on a loopback address")
	f.BoolVar(&o.insecure, "insecure", false, "skip TLS certificate verification")
	addTimeoutFlags(cmd, &o.timeouts)
}

// checkConvertFlags checks the flags that need no I/O.
func checkConvertFlags(cmd *cobra.Command, o *convertOptions) error {
	if err := checkTimeoutFlags(o.timeouts); err != nil {
		return err
	}
	if cmd.Flags().Changed("compression-level") && o.level <= 0 {
		return fmt.Errorf("--compression-level must be positive, got %d", o.level)
	}
	if o.jobs < 0 {
		return fmt.Errorf("--jobs must be positive, got %d", o.jobs)
	}
	return nil
}

// convertRequest builds the library request the flags describe.
func convertRequest(src, dst string, o convertOptions) (job.Request, error) {
	req := job.Request{Source: src, Destination: dst, Level: o.level, Jobs: o.jobs, Force: o.force, Overwrite: o.force}
	format, err := convert.ParseFormat(o.format)
	if err != nil {
		return req, fmt.Errorf("--format: %w", err)
	}
	req.Format = format
	if req.Platforms, err = job.ParsePlatforms(o.platforms...); err != nil {
		return req, fmt.Errorf("--platform: %w", err)
	}
	if o.prefetch != "" {
		if req.Prefetch, err = prefetch.Load(o.prefetch); err != nil {
			return req, fmt.Errorf("--prefetch: %w", err)
		}
	}
	copts := []imageio.Option{
		imageio.WithPlainHTTP(o.plainHTTP),
		imageio.WithInsecure(o.insecure),
		imageio.WithUserAgent("lazybase/" + version),
		imageio.WithTimeouts(o.timeouts),
	}
	if o.jobs > 0 {
		copts = append(copts, imageio.WithJobs(o.jobs))
	}
	req.Client, err = imageio.New(copts...)
	return req, err
}

// runConvert converts src to dst with the library's job, showing progress
// on stderr, and returns the report. The demo verb uses it too.
func runConvert(ctx context.Context, stderr io.Writer, src, dst string, o convertOptions) (*job.Report, error) {
	req, err := convertRequest(src, dst, o)
	if err != nil {
		return nil, err
	}
	disp, stop := startDisplay(stderr, o.terminal)
	watchConvert(&req, disp)
	rep, err := job.Run(ctx, req)
	stop()
	if errors.Is(err, job.ErrOverwritesSource) {
		return nil, fmt.Errorf("%w; use another destination, or --force to overwrite the source", err)
	}
	if err != nil {
		return nil, err
	}
	printConvertSummary(stderr, rep)
	return rep, nil
}

// startDisplay starts a progress display on stderr that log lines go
// through (they share stderr), and returns it with the function that stops
// it and gives the log its output back.
func startDisplay(stderr io.Writer, terminal int) (*progress.Display, func()) {
	disp := progress.New(stderr, progress.WithTerminal(isTerminal(stderr, terminal)))
	logOut := log.L.Logger.Out
	log.L.Logger.SetOutput(disp)
	disp.Start()
	return disp, func() {
		disp.Status("")
		disp.Stop()
		log.L.Logger.SetOutput(logOut)
	}
}

// watchConvert shows the job's progress on disp.
func watchConvert(req *job.Request, disp *progress.Display) {
	var writeStart time.Time
	req.Progress = disp.Handle
	req.Writing = func(dst string) {
		writeStart = time.Now()
		disp.Printf("writing %s", dst)
	}
	req.WriteProgress = func(complete, total int64) {
		rate := ""
		if el := time.Since(writeStart).Seconds(); el > 0 {
			rate = progress.Rate(float64(complete) / el)
		}
		disp.Status(fmt.Sprintf("written %s / %s  %s", progress.Bytes(complete), progress.Bytes(total), rate))
	}
}

// printConvertSummary prints the one-line summary of a finished job.
func printConvertSummary(w io.Writer, rep *job.Report) {
	t := rep.Totals
	fmt.Fprintf(w, "converted %s -> %s@%s: %d image(s), %d layer(s) (%d reused), %s -> %s, %s uncompressed in %.2fs (%.1f MB/s), written in %.2fs\n",
		rep.Source, rep.Destination, shortDigest(rep.Digest), t.Images, t.Layers, t.Reused,
		progress.Bytes(t.SourceBytes), progress.Bytes(t.OutputBytes), progress.Bytes(t.SourceUncompressedSize),
		t.ConvertSeconds, t.MBPerSecond, t.WriteSeconds)
}

// isTerminal reports whether w is a terminal; force overrides the check
// (1: a terminal, -1: not one).
func isTerminal(w io.Writer, force int) bool {
	if force != 0 {
		return force > 0
	}
	return progress.IsTerminal(w)
}

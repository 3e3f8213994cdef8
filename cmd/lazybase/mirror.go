package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"

	"github.com/containerd/log"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/internal/progress"
	"github.com/lazybase/lazybase/mirror"
)

// mirrorFlags are the flags of the mirror verb.
type mirrorFlags struct {
	config string
	shard  string
	report string
	asJSON bool
	force  bool
	dryRun bool
	// extra options appended after the flags' (tests use them).
	opts []mirror.Option
	// terminal forces the live display on (1) or off (-1); 0 detects it.
	terminal int
}

func newMirrorCmd() *cobra.Command {
	var o mirrorFlags
	cmd := &cobra.Command{
		Use:   "mirror --config mirror.toml",
		Short: "Keep a mirror registry full of eStargz conversions of base images",
		Long: `Convert the images a mirror.toml names into a mirror registry.

An image whose converted form is already at its destination (same source
digest, same format) is skipped after one manifest request. Layers shared by
several images are converted once and recorded in the mirror registry (the
records repository), so later runs and other workers reuse them.

--shard I/N mirrors only the images whose source reference hashes to shard I
of N; run N of them (a Kubernetes Indexed Job passes $(JOB_COMPLETION_INDEX))
to split the work. The exit status is non-zero when any image failed.
See the mirror package documentation for the config keys and their defaults.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runMirror(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.config, "config", "", "mirror config file (TOML)")
	f.StringVar(&o.shard, "shard", "", "mirror only shard I of N (I/N, 0 <= I < N)")
	f.StringVar(&o.report, "report", "", "write the JSON report to this file")
	f.BoolVar(&o.asJSON, "json", false, "print the JSON report on stdout")
	f.BoolVar(&o.force, "force", false, "convert again even when the destination is up to date, and ignore conversion records")
	f.BoolVar(&o.dryRun, "dry-run", false, "list the images this shard would mirror (JSON on stdout) and stop")
	_ = cmd.MarkFlagRequired("config")
	cmd.AddCommand(newMirrorServeCmd())
	return cmd
}

func newMirror(cfgFile string, extra []mirror.Option) (*mirror.Mirror, *mirror.Config, error) {
	cfg, err := mirror.LoadConfig(cfgFile)
	if err != nil {
		return nil, nil, err
	}
	m, err := mirror.New(cfg, append([]mirror.Option{mirror.WithUserAgent("lazybase/" + version)}, extra...)...)
	if err != nil {
		return nil, nil, err
	}
	return m, cfg, nil
}

func runMirror(ctx context.Context, stdout, stderr io.Writer, o mirrorFlags) error {
	var opts []mirror.Option
	if o.shard != "" {
		s, err := mirror.ParseShard(o.shard)
		if err != nil {
			return fmt.Errorf("--shard: %w", err)
		}
		opts = append(opts, mirror.WithShard(s))
	}
	opts = append(opts, mirror.WithForce(o.force))
	tty := isTerminal(stderr, o.terminal)
	var disp *progress.Display
	if tty {
		disp = progress.New(stderr, progress.WithTerminal(true))
		opts = append(opts, mirror.WithLayerProgress(disp.Handle))
	}
	opts = append(opts, mirror.WithImageDone(func(r mirror.ImageReport) {
		line := summaryLine(r)
		if disp != nil {
			disp.Printf("%s", line)
		} else {
			fmt.Fprintln(stderr, line)
		}
	}))
	m, _, err := newMirror(o.config, append(opts, o.opts...))
	if err != nil {
		return err
	}
	defer m.Close()
	if o.dryRun {
		jobs, errs := m.Plan(ctx)
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if jobs == nil {
			jobs = []mirror.Job{}
		}
		if err := enc.Encode(jobs); err != nil {
			return err
		}
		for _, e := range errs {
			fmt.Fprintf(stderr, "mirror: %s\n", e)
		}
		if len(errs) > 0 {
			return fmt.Errorf("mirror: %d source(s) could not be listed", len(errs))
		}
		return nil
	}
	if disp != nil {
		disp.Start()
	}
	rep, runErr := m.Run(ctx)
	if disp != nil {
		disp.Stop()
	}
	fmt.Fprintf(stderr, "mirror: %d converted, %d skipped, %d failed in %.1fs (%d layers converted, %d from records, %d HTTP retries)\n",
		rep.Converted, rep.Skipped, rep.Failed, rep.Seconds, rep.Layers.Converted, rep.Layers.FromRecords, rep.Retries)
	for _, e := range rep.Errors {
		fmt.Fprintf(stderr, "mirror: %s\n", e)
	}
	b, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	b = append(b, '\n')
	if o.report != "" {
		if err := os.WriteFile(o.report, b, 0o644); err != nil {
			return fmt.Errorf("--report: %w", err)
		}
	}
	if o.asJSON {
		if _, err := stdout.Write(b); err != nil {
			return err
		}
	}
	if runErr != nil {
		return fmt.Errorf("mirror interrupted: %w", runErr)
	}
	if !rep.OK() {
		return fmt.Errorf("mirror: %d image(s) failed, %d other error(s)", rep.Failed, len(rep.Errors))
	}
	return nil
}

func summaryLine(r mirror.ImageReport) string {
	switch r.Status {
	case mirror.StatusFailed:
		return fmt.Sprintf("failed    %s -> %s after %d attempt(s) in %.1fs: %s", r.Source, r.Destination, r.Attempts, r.Seconds, r.Reason)
	case mirror.StatusSkipped:
		return fmt.Sprintf("skipped   %s -> %s (up to date, %s) in %.2fs", r.Source, r.Destination, r.Digest, r.Seconds)
	}
	return fmt.Sprintf("converted %s -> %s %s in %.1fs: layers %d converted, %d from records, %d shared; %s",
		r.Source, r.Destination, r.Digest, r.Seconds, r.LayersConverted, r.LayersFromRecords, r.LayersShared, progress.Bytes(r.Bytes))
}

func newMirrorServeCmd() *cobra.Command {
	var (
		config  string
		listen  string
		queue   int
		workers int
	)
	cmd := &cobra.Command{
		Use:   "serve --config mirror.toml",
		Short: "Convert images named by registry push notifications",
		Long: `Accept registry push notifications and convert the pushed images that
match a source of the config.

POST /events (or /webhook) takes distribution's notification envelope
(application/vnd.docker.distribution.events.v1+json) or Harbor's webhook
payload. GET /healthz answers "ok"; GET /metrics serves Prometheus metrics.
Jobs wait in a bounded queue (--queue); a push already waiting is not queued
twice; a full queue answers 503 with Retry-After so the registry retries.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			m, cfg, err := newMirror(config, nil)
			if err != nil {
				return err
			}
			defer m.Close()
			if workers <= 0 {
				workers = cfg.Concurrency
			}
			return serveMirror(cmd.Context(), cmd.ErrOrStderr(), m, listen, queue, workers)
		},
	}
	f := cmd.Flags()
	f.StringVar(&config, "config", "", "mirror config file (TOML)")
	f.StringVar(&listen, "listen", "127.0.0.1:8080", "address to listen on")
	f.IntVar(&queue, "queue", 256, "jobs that may wait in the queue")
	f.IntVar(&workers, "workers", 0, "images converted at once (default: the config's concurrency)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

func serveMirror(ctx context.Context, stderr io.Writer, m *mirror.Mirror, listen string, queue, workers int) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	s := mirror.NewServer(m, queue, workers)
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
	fmt.Fprintf(stderr, "mirror serve: listening on %s\n", ln.Addr())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = hs.Shutdown(sctx)
	<-done
	log.G(ctx).Info("mirror serve stopped")
	return nil
}

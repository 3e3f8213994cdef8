package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"

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
to split the work. Shards started together claim each layer before
converting it (claim_ttl), so a layer shared across shards is converted once.

An image that fails the same way on quarantine_after consecutive runs
(default 2) is quarantined: reported as known bad and not tried again until
its source digest changes. The exit status is non-zero when an image failed
anew (or a source could not be listed); known-bad images alone exit 0. The
JSON report counts them apart ("failed", "quarantined"), as does mirror
serve's lazybase_mirror_images_total{status="quarantined"}.
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
	f.BoolVar(&o.force, "force", false, "convert again even when the destination is up to date, and ignore conversion records, claims and quarantine")
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
	opts, disp, err := mirrorOptions(o, stderr)
	if err != nil {
		return err
	}
	m, _, err := newMirror(o.config, opts)
	if err != nil {
		return err
	}
	defer m.Close()
	if o.dryRun {
		return printMirrorPlan(ctx, stdout, stderr, m)
	}
	if disp != nil {
		disp.Start()
	}
	rep, runErr := m.Run(ctx)
	if disp != nil {
		disp.Stop()
	}
	fmt.Fprintf(stderr, "mirror: %s\n", rep.Summary())
	for _, e := range rep.Errors {
		fmt.Fprintf(stderr, "mirror: %s\n", e)
	}
	if err := writeMirrorReport(stdout, rep, o); err != nil {
		return err
	}
	if runErr != nil {
		return fmt.Errorf("mirror interrupted: %w", runErr)
	}
	if err := rep.Err(); err != nil {
		return fmt.Errorf("mirror: %w", err)
	}
	return nil
}

// mirrorOptions turns the flags into mirror options. On a terminal it
// returns the live display the layer progress goes to; each image's
// summary line goes to the display or, without one, to stderr.
func mirrorOptions(o mirrorFlags, stderr io.Writer) ([]mirror.Option, *progress.Display, error) {
	opts := []mirror.Option{mirror.WithForce(o.force)}
	if o.shard != "" {
		s, err := mirror.ParseShard(o.shard)
		if err != nil {
			return nil, nil, fmt.Errorf("--shard: %w", err)
		}
		opts = append(opts, mirror.WithShard(s))
	}
	var disp *progress.Display
	if isTerminal(stderr, 0) {
		disp = progress.New(stderr, progress.WithTerminal(true))
		opts = append(opts, mirror.WithLayerProgress(disp.Handle))
	}
	opts = append(opts, mirror.WithImageDone(func(r mirror.ImageReport) {
		if disp != nil {
			disp.Printf("%s", r.Summary())
		} else {
			fmt.Fprintln(stderr, r.Summary())
		}
	}))
	return opts, disp, nil
}

// printMirrorPlan prints the jobs of --dry-run as JSON on stdout and the
// sources that could not be listed on stderr.
func printMirrorPlan(ctx context.Context, stdout, stderr io.Writer, m *mirror.Mirror) error {
	jobs, errs := m.Plan(ctx)
	if jobs == nil {
		jobs = []mirror.Job{}
	}
	enc := json.NewEncoder(stdout)
	enc.SetIndent("", "  ")
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

// writeMirrorReport writes the JSON report to --report and, with --json,
// to stdout.
func writeMirrorReport(stdout io.Writer, rep *mirror.Report, o mirrorFlags) error {
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
	return nil
}

// mirrorServeFlags are the flags of the mirror serve verb.
type mirrorServeFlags struct {
	config, listen string
	queue, workers int
}

func newMirrorServeCmd() *cobra.Command {
	var f mirrorServeFlags
	cmd := &cobra.Command{
		Use:   "serve --config mirror.toml",
		Short: "Convert images named by registry push notifications",
		Long: `Accept registry push notifications and convert the pushed images that
match a source of the config.

POST /events (or /webhook) takes distribution's notification envelope
(application/vnd.docker.distribution.events.v1+json) or Harbor's webhook
payload, and requires the shared secret of [serve] token_file or token_env:
"Authorization: Bearer TOKEN" (distribution's endpoint headers),
"Authorization: TOKEN" (Harbor's auth header) or an X-Lazybase-Signature-256
HMAC of the body; anything else is answered 401. [serve] no_auth = true
turns this off, on a loopback --listen address only. GET /healthz answers
"ok" and GET /metrics serves Prometheus metrics, both without
authentication.

Repositories and tags are checked against the reference grammar first;
untagged pushes are ignored. A request may name up to [serve] max_events
push events (413 beyond). Jobs wait in a bounded queue (--queue, [serve]
queue) with a share per source repository ([serve] queue_per_repository),
served in turn; a push already waiting is not queued twice; a full share
answers 429, a full queue 503, both with Retry-After so the registry
retries.

On SIGTERM or SIGINT the server stops accepting notifications and lets the
queued and running jobs go on for [serve] grace_period (default 30s); jobs
not done by then are saved to [serve] state_file, which the next start
queues again, or logged by name without one.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runMirrorServe(cmd.Context(), f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.config, "config", "", "mirror config file (TOML)")
	fl.StringVar(&f.listen, "listen", "127.0.0.1:8080", "address to listen on")
	fl.IntVar(&f.queue, "queue", 0, "jobs that may wait in the queue (default: [serve] queue, 256)")
	fl.IntVar(&f.workers, "workers", 0, "images converted at once (default: the config's concurrency)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

// runMirrorServe builds the server the config and flags describe and
// serves on --listen until ctx ends (mirror.Server.Serve drains, saves
// and logs what is left).
func runMirrorServe(ctx context.Context, f mirrorServeFlags) error {
	m, cfg, err := newMirror(f.config, nil)
	if err != nil {
		return err
	}
	defer m.Close()
	opts, err := mirror.ServeOptions(&cfg.Serve)
	if err != nil {
		return err
	}
	if f.queue > 0 {
		opts = append(opts, mirror.WithQueue(f.queue, min(f.queue, cfg.Serve.QueuePerRepository)))
	}
	if f.workers > 0 {
		opts = append(opts, mirror.WithWorkers(f.workers))
	}
	s, err := mirror.NewServer(m, opts...)
	if err != nil {
		return err
	}
	_, err = s.ListenAndServe(ctx, f.listen)
	return err
}

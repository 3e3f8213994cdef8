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
			m, cfg, err := newMirror(config, nil)
			if err != nil {
				return err
			}
			defer m.Close()
			if cfg.Serve.NoAuth && !mirror.IsLoopback(listen) {
				return fmt.Errorf("serve.no_auth: refused with --listen %s, which is not a loopback address; configure serve.token_file or serve.token_env", listen)
			}
			opts, err := mirror.ServeOptions(&cfg.Serve)
			if err != nil {
				return err
			}
			if queue > 0 {
				opts = append(opts, mirror.WithQueue(queue, min(queue, cfg.Serve.QueuePerRepository)))
			}
			if workers > 0 {
				opts = append(opts, mirror.WithWorkers(workers))
			}
			s, err := mirror.NewServer(m, opts...)
			if err != nil {
				return err
			}
			return serveMirror(cmd.Context(), cmd.ErrOrStderr(), s, listen, cfg.Serve.Grace())
		},
	}
	f := cmd.Flags()
	f.StringVar(&config, "config", "", "mirror config file (TOML)")
	f.StringVar(&listen, "listen", "127.0.0.1:8080", "address to listen on")
	f.IntVar(&queue, "queue", 0, "jobs that may wait in the queue (default: [serve] queue, 256)")
	f.IntVar(&workers, "workers", 0, "images converted at once (default: the config's concurrency)")
	_ = cmd.MarkFlagRequired("config")
	return cmd
}

// serveMirror serves s on listen until ctx ends, then drains: new
// notifications are refused, the queue runs for up to grace, and the jobs
// not done are saved (or logged) by name.
func serveMirror(ctx context.Context, stderr io.Writer, s *mirror.Server, listen string, grace time.Duration) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	if n, err := s.LoadState(ctx); err != nil {
		ln.Close()
		return err
	} else if n > 0 {
		fmt.Fprintf(stderr, "mirror serve: %d saved job(s) queued again\n", n)
	}
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: 2 * time.Minute}
	fmt.Fprintf(stderr, "mirror serve: listening on %s\n", ln.Addr())
	// The jobs outlive ctx (the signal) by the grace period.
	workCtx, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	done := make(chan struct{})
	go func() { s.Run(workCtx); close(done) }()
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	var serveErr error
	select {
	case <-ctx.Done():
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			serveErr = err
		}
	}
	log.G(ctx).WithField("grace_period", grace).Info("mirror serve: stopping; draining the queue")
	s.Close()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	_ = hs.Shutdown(sctx)
	cancel()
	timer := time.NewTimer(grace)
	select {
	case <-done:
		timer.Stop()
	case <-timer.C:
		log.G(ctx).Warn("mirror serve: grace period over; interrupting the images in progress")
		cancelWork()
		<-done
	}
	left := s.Unfinished()
	if err := s.SaveState(ctx, left); err != nil {
		for _, j := range left {
			log.G(ctx).WithField("image", j.Source).Error("job not finished and not saved")
		}
		return errors.Join(serveErr, err)
	}
	log.G(ctx).WithField("unfinished", len(left)).Info("mirror serve stopped")
	return serveErr
}

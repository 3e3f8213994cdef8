package mirror

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/containerd/log"

	"github.com/lazybase/lazybase/internal/tmpsweep"
)

// ServeResult is what a Serve call did.
type ServeResult struct {
	// Requeued is how many jobs of the state file were queued again at
	// start.
	Requeued int
	// GraceExpired reports whether the grace period ran out before the
	// queue was drained, so the images in progress were interrupted.
	GraceExpired bool
	// Unfinished are the jobs answered 202 that were not done when Serve
	// returned: saved to the state file when there is one (Saved), logged
	// by name otherwise.
	Unfinished []Job
	// Saved reports whether Unfinished was written to the state file.
	Saved bool
}

// ListenAndServe listens on the TCP address listen and calls Serve. It
// refuses to listen without authentication (WithoutAuth) on an address
// that is not loopback.
func (s *Server) ListenAndServe(ctx context.Context, listen string) (ServeResult, error) {
	if s.o.noAuth && !IsLoopback(listen) {
		return ServeResult{}, errNoAuthNotLoopback(listen)
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return ServeResult{}, fmt.Errorf("listening on %s: %w", listen, err)
	}
	return s.Serve(ctx, ln)
}

func errNoAuthNotLoopback(addr string) error {
	return fmt.Errorf("serve.no_auth: refused on %s, which is not a loopback address; configure serve.token_file or serve.token_env", addr)
}

// Serve queues the jobs of the state file again, then serves the handler
// on ln and converts queued jobs until ctx ends or ln fails. It then
// drains: new notifications are refused (Close), the queued and running
// jobs go on for the grace period (WithGracePeriod), and the jobs not done
// by then are interrupted and saved to the state file (SaveState), or
// logged by name without one. Serve closes ln. It refuses to serve
// without authentication (WithoutAuth) on a listener that is not loopback.
// The error is the listener's or the state file's; the result is valid
// either way.
func (s *Server) Serve(ctx context.Context, ln net.Listener) (ServeResult, error) {
	var res ServeResult
	if s.o.noAuth && !IsLoopback(ln.Addr().String()) {
		ln.Close()
		return res, errNoAuthNotLoopback(ln.Addr().String())
	}
	s.m.sweep(ctx)
	if s.o.stateFile != "" {
		// A state file write interrupted by a kill leaves its temporary.
		_, _ = tmpsweep.Sweep(ctx, filepath.Dir(s.o.stateFile), ".mirror-state-*", tmpsweep.MinAge)
	}
	n, err := s.LoadState(ctx)
	if err != nil {
		ln.Close()
		return res, err
	}
	res.Requeued = n
	log.G(ctx).WithFields(log.Fields{"address": ln.Addr().String(), "requeued": n}).Info("mirror serve: listening")
	hs := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, IdleTimeout: 2 * time.Minute}
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
			serveErr = fmt.Errorf("serving on %s: %w", ln.Addr(), err)
		}
	}
	res.GraceExpired = s.drain(ctx, hs, done, cancelWork)
	res.Unfinished = s.Unfinished()
	if err := s.SaveState(ctx, res.Unfinished); err != nil {
		for _, j := range res.Unfinished {
			log.G(ctx).WithField("image", j.Source).Error("job not finished and not saved")
		}
		return res, errors.Join(serveErr, err)
	}
	res.Saved = s.o.stateFile != "" && len(res.Unfinished) > 0
	log.G(ctx).WithField("unfinished", len(res.Unfinished)).Info("mirror serve stopped")
	return res, serveErr
}

// drain stops accepting notifications and shuts hs down, then waits for
// Run (done) for up to the grace period; past it, it interrupts the images
// in progress (cancelWork), waits for Run and reports true.
func (s *Server) drain(ctx context.Context, hs *http.Server, done <-chan struct{}, cancelWork context.CancelFunc) bool {
	log.G(ctx).WithField("grace_period", s.o.grace).Info("mirror serve: stopping; draining the queue")
	s.Close()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	_ = hs.Shutdown(sctx)
	cancel()
	timer := time.NewTimer(s.o.grace)
	defer timer.Stop()
	select {
	case <-done:
		return false
	case <-timer.C:
		log.G(ctx).Warn("mirror serve: grace period over; interrupting the images in progress")
		cancelWork()
		<-done
		return true
	}
}

package exportguard

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazybase/lazybase/internal/cpuacct"
)

// Labels the Guard sets on the blobs it commits.
const (
	// LabelRef names the image reference a blob was fetched for.
	LabelRef = "dev.lazybase.exportguard.ref"
	// LabelVerified holds the time (RFC 3339) a blob was verified and committed.
	LabelVerified = "dev.lazybase.exportguard.verified"
	// labelLegacy is the label ("true") lazybase daemons put, besides
	// LabelRef, on the blobs their guard committed before every lazybase
	// label moved under dev.lazybase. It is read, never written.
	labelLegacy = "lazybase.io/exportguard"
	// labelGCRoot is containerd's GC root label.
	labelGCRoot = "containerd.io/gc.root"
	// ingestPrefix starts the ingest ref of every transfer; the digest follows.
	ingestPrefix = "exportguard-"
	// reportEvery is how many bytes pass between two progress reports.
	reportEvery = 1 << 20
)

// Fetcher opens blobs of an image reference.
type Fetcher interface {
	// FetchRange returns the bytes of the blob desc of the image ref, from
	// offset to its end. An error that retrying cannot fix is marked with
	// Permanent.
	FetchRange(ctx context.Context, ref string, desc ocispec.Descriptor, offset int64) (io.ReadCloser, error)
}

// Phase is where a blob stands in a Progress report.
type Phase string

// Phases of a blob.
const (
	PhasePresent   Phase = "present"   // already in the content store, nothing fetched
	PhaseFetching  Phase = "fetching"  // bytes are streaming in
	PhaseCommitted Phase = "committed" // verified and committed
	PhaseFailed    Phase = "failed"    // given up on; Err says why
)

// Progress reports the state of one blob.
type Progress struct {
	Ref    string
	Digest digest.Digest
	Phase  Phase
	Done   int64 // bytes in the content store's ingest, resumed bytes included
	Total  int64
	Err    error
}

// Guard materializes blobs into a content store. Its methods may be called
// from any goroutine.
type Guard struct {
	store   content.Store
	fetcher Fetcher
	o       options
	m       *metrics
	sem     chan struct{}

	mu      sync.Mutex
	flights map[digest.Digest]*flight
	closed  bool
	wg      sync.WaitGroup

	leaseMu    sync.Mutex
	leaseReady bool

	// ret is the retention budget (WithRetention); nil without it.
	ret *retention
}

// flight is one transfer shared by every Ensure call waiting for its digest.
type flight struct {
	done    chan struct{}
	err     error
	waiters int
	cancel  context.CancelFunc
	// abandoned is set when the last waiter left: the transfer is stopping
	// and a new caller starts a new flight after it.
	abandoned bool
}

// New returns a Guard that writes into store what fetcher reads.
func New(store content.Store, fetcher Fetcher, opts ...Option) (*Guard, error) {
	if store == nil || fetcher == nil {
		return nil, errors.New("exportguard needs a content store and a fetcher")
	}
	o := defaults()
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	if o.retain != "" && (o.leaseID != "" || o.gcRoot) {
		return nil, errors.New("exportguard: WithRetention conflicts with WithLease and WithGCRoot")
	}
	g := &Guard{
		store:   store,
		fetcher: fetcher,
		o:       o,
		m:       newMetrics(),
		sem:     make(chan struct{}, o.parallelism),
		flights: map[digest.Digest]*flight{},
	}
	if o.retain != "" {
		g.ret = newRetention(store, o.leases, o.retain, o.maxBytes)
	}
	if o.registerer != nil {
		if err := g.m.register(o.registerer); err != nil {
			return nil, err
		}
	}
	return g, nil
}

// Ensure returns when every blob of descs is in the content store, verified,
// or when one cannot be: the error then names the image reference and the
// digest of each blob at fault. Blobs already present are not fetched. A blob
// another call is fetching is waited for, not fetched again. When ctx ends,
// Ensure returns at once; a transfer no other call waits for stops, and
// keeps its partial ingest for the next attempt to resume.
func (g *Guard) Ensure(ctx context.Context, ref string, descs ...ocispec.Descriptor) error {
	type waiting struct {
		desc ocispec.Descriptor
		f    *flight
	}
	var (
		waits []waiting
		errs  []error
		seen  = map[digest.Digest]bool{}
	)
	leave := func(from int) {
		for _, w := range waits[from:] {
			g.leave(w.desc.Digest, w.f)
		}
	}
	for _, desc := range descs {
		if seen[desc.Digest] {
			continue
		}
		seen[desc.Digest] = true
		if err := desc.Digest.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("image %s layer %q: %w", ref, desc.Digest, err))
			continue
		}
		if desc.Size < 0 {
			errs = append(errs, fmt.Errorf("image %s layer %s: negative size %d", ref, desc.Digest, desc.Size))
			continue
		}
		if _, err := g.store.Info(ctx, desc.Digest); err == nil {
			g.m.present.Inc()
			g.report(Progress{Ref: ref, Digest: desc.Digest, Phase: PhasePresent, Done: desc.Size, Total: desc.Size})
			if err := g.hold(ctx, desc.Digest, desc.Size, true); err != nil {
				errs = append(errs, fmt.Errorf("image %s layer %s: %w", ref, desc.Digest, err))
			}
			continue
		} else if !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("image %s layer %s: %w", ref, desc.Digest, err))
			continue
		}
		f, err := g.join(ctx, ref, desc)
		if err != nil {
			errs = append(errs, fmt.Errorf("image %s layer %s: %w", ref, desc.Digest, err))
			continue
		}
		waits = append(waits, waiting{desc: desc, f: f})
	}
	for i, w := range waits {
		select {
		case <-w.f.done:
		case <-ctx.Done():
			leave(i)
			errs = append(errs, fmt.Errorf("image %s: %w", ref, ctx.Err()))
			return errors.Join(errs...)
		}
		g.leave(w.desc.Digest, w.f)
		if w.f.err != nil {
			errs = append(errs, fmt.Errorf("image %s layer %s: %w", ref, w.desc.Digest, w.f.err))
			continue
		}
		if err := g.hold(ctx, w.desc.Digest, w.desc.Size, false); err != nil {
			errs = append(errs, fmt.Errorf("image %s layer %s: %w", ref, w.desc.Digest, err))
		}
	}
	return errors.Join(errs...)
}

// Close stops every transfer and waits for them to end. Ensure fails with
// ErrClosed afterwards.
func (g *Guard) Close() error {
	g.mu.Lock()
	g.closed = true
	for _, f := range g.flights {
		f.cancel()
	}
	g.mu.Unlock()
	g.wg.Wait()
	return nil
}

// join returns the flight for desc, starting it if none runs.
func (g *Guard) join(ctx context.Context, ref string, desc ocispec.Descriptor) (*flight, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil, ErrClosed
	}
	prev, ok := g.flights[desc.Digest]
	if ok && !prev.abandoned {
		prev.waiters++
		return prev, nil
	}
	// The transfer outlives the call that started it as long as another
	// call waits for it; it keeps the values (namespace, lease) of ctx.
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	f := &flight{done: make(chan struct{}), waiters: 1, cancel: cancel}
	g.flights[desc.Digest] = f
	g.wg.Add(1)
	go g.run(fctx, ref, desc, f, prev)
	return f, nil
}

// leave drops one waiter of f and stops f when none is left.
func (g *Guard) leave(dgst digest.Digest, f *flight) {
	g.mu.Lock()
	defer g.mu.Unlock()
	f.waiters--
	if f.waiters == 0 {
		f.abandoned = true
		f.cancel()
	}
}

// run runs flight f, after prev (an abandoned flight of the same digest, or
// nil) has stopped.
func (g *Guard) run(ctx context.Context, ref string, desc ocispec.Descriptor, f, prev *flight) {
	defer g.wg.Done()
	defer f.cancel()
	var err error
	if prev != nil {
		select {
		case <-prev.done:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	if err == nil {
		err = g.materialize(ctx, ref, desc)
	}
	if err != nil {
		g.report(Progress{Ref: ref, Digest: desc.Digest, Phase: PhaseFailed, Total: desc.Size, Err: err})
		l := log.G(ctx).WithError(err).WithField("ref", ref).WithField("digest", desc.Digest)
		if errors.Is(err, context.Canceled) {
			l.Debug("exportguard: transfer stopped, no caller waits for it")
		} else {
			g.m.failures.Inc()
			l.Warn("exportguard: blob not materialized")
		}
	}
	g.mu.Lock()
	if g.flights[desc.Digest] == f {
		delete(g.flights, desc.Digest)
	}
	f.err = err
	close(f.done)
	g.mu.Unlock()
}

// materialize runs the attempts of one blob's transfer.
func (g *Guard) materialize(ctx context.Context, ref string, desc ocispec.Descriptor) (retErr error) {
	select {
	case g.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-g.sem }()
	g.m.inflight.Inc()
	defer g.m.inflight.Dec()

	if g.o.leaseID != "" {
		if err := g.ensureLease(ctx); err != nil {
			return err
		}
		ctx = leases.WithLease(ctx, g.o.leaseID)
	}
	if g.ret != nil {
		tctx, done, err := transferLease(ctx, g.o.leases, desc.Digest)
		if err != nil {
			return err
		}
		// A transfer that failed keeps its lease, which expires, while
		// the lease holds a partial ingest: the next attempt resumes it.
		defer func() {
			if retErr == nil {
				done(true)
			} else if _, err := g.store.Status(context.WithoutCancel(tctx), ingestRef(desc.Digest)); errdefs.IsNotFound(err) {
				done(false)
			}
		}()
		ctx = tctx
	}
	start := g.o.now()
	restarted := false
	backoff := g.o.backoff
	for attempt := 1; ; attempt++ {
		err := g.attempt(ctx, ref, desc, &restarted)
		if err == nil {
			g.m.duration.Observe(g.o.now().Sub(start).Seconds())
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if !retryable(err) {
			return err
		}
		if attempt >= g.o.attempts {
			return fmt.Errorf("giving up after %d attempts: %w", attempt, err)
		}
		log.G(ctx).WithError(err).WithField("ref", ref).WithField("digest", desc.Digest).
			WithField("attempt", attempt).Debug("exportguard: retrying transfer")
		g.m.retries.Inc()
		t := time.NewTimer(backoff)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
		backoff = min(2*backoff, g.o.maxBackoff)
	}
}

// attempt opens the blob's ingest, fetches what it lacks, verifies and
// commits. A verification failure removes the ingest; other failures keep
// it for the next attempt to resume. restarted records that a failed
// verification of a resumed ingest already made the transfer start over.
func (g *Guard) attempt(ctx context.Context, ref string, desc ocispec.Descriptor, restarted *bool) (retErr error) {
	ingest := ingestRef(desc.Digest)
	cw, err := content.OpenWriter(ctx, g.store, content.WithRef(ingest), content.WithDescriptor(desc))
	if errdefs.IsAlreadyExists(err) {
		return nil // committed by someone else meanwhile
	}
	if err != nil {
		return fmt.Errorf("opening ingest %s: %w", ingest, err)
	}
	var offset int64
	defer func() {
		cw.Close()
		// Bad bytes go at once; an empty ingest is not worth keeping.
		if retErr != nil && (errors.Is(retErr, ErrVerify) || offset == 0) {
			g.abort(ctx, ingest)
		}
	}()
	st, err := cw.Status()
	if err != nil {
		return fmt.Errorf("ingest %s status: %w", ingest, err)
	}
	offset = st.Offset
	if offset > desc.Size {
		if err := cw.Truncate(0); err != nil {
			return fmt.Errorf("truncating ingest %s: %w", ingest, err)
		}
		offset = 0
	}
	resumed := offset > 0
	if offset < desc.Size {
		if resumed {
			log.G(ctx).WithField("digest", desc.Digest).WithField("offset", offset).Debug("exportguard: resuming transfer")
		}
		rc, err := g.fetcher.FetchRange(ctx, ref, desc, offset)
		if err != nil {
			return err
		}
		n, err := g.copy(ctx, cw, rc, ref, desc, offset)
		rc.Close()
		offset += n
		if offset > desc.Size {
			g.m.verifyFailures.Inc()
			return fmt.Errorf("received more than %d bytes: %w", desc.Size, ErrSizeMismatch)
		}
		if err != nil {
			return fmt.Errorf("reading blob at offset %d of %d: %w", offset, desc.Size, err)
		}
		if offset < desc.Size {
			return fmt.Errorf("blob ended at %d of %d bytes: %w", offset, desc.Size, io.ErrUnexpectedEOF)
		}
	}
	if got := cw.Digest(); got != desc.Digest {
		g.m.verifyFailures.Inc()
		if resumed && !*restarted {
			// The bytes of an earlier transfer may be the bad ones: start
			// over once, from nothing.
			*restarted = true
			cw.Close()
			g.abort(ctx, ingest)
			return fmt.Errorf("resumed ingest has digest %s, starting over", got)
		}
		return fmt.Errorf("got %s: %w", got, ErrDigestMismatch)
	}
	if err := cw.Commit(ctx, desc.Size, desc.Digest, content.WithLabels(g.commitLabels(ref))); err != nil {
		if errdefs.IsAlreadyExists(err) {
			return nil
		}
		if errdefs.IsFailedPrecondition(err) {
			g.m.verifyFailures.Inc()
			return fmt.Errorf("commit refused: %v: %w", err, ErrDigestMismatch)
		}
		return fmt.Errorf("committing: %w", err)
	}
	g.m.materialized.Inc()
	g.report(Progress{Ref: ref, Digest: desc.Digest, Phase: PhaseCommitted, Done: desc.Size, Total: desc.Size})
	return nil
}

// copy streams r into w, at most one byte more than the blob has left, and
// reports progress.
func (g *Guard) copy(ctx context.Context, w io.Writer, r io.Reader, ref string, desc ocispec.Descriptor, offset int64) (int64, error) {
	buf := make([]byte, 256<<10)
	lr := io.LimitReader(r, desc.Size-offset+1)
	var n, reported int64
	g.report(Progress{Ref: ref, Digest: desc.Digest, Phase: PhaseFetching, Done: offset, Total: desc.Size})
	for {
		// Each chunk, read and written, is one unit of the CPU account.
		span := cpuacct.Default.Start(cpuacct.Guard)
		m, rerr := lr.Read(buf)
		if m > 0 {
			_, werr := w.Write(buf[:m])
			span.End()
			if werr != nil {
				return n, fmt.Errorf("writing ingest: %w", werr)
			}
			cpuacct.Default.AddFetched(cpuacct.Guard, int64(m))
			cpuacct.Default.AddWritten(cpuacct.Guard, int64(m))
			n += int64(m)
			g.m.bytes.Add(float64(m))
			if n-reported >= reportEvery {
				reported = n
				g.report(Progress{Ref: ref, Digest: desc.Digest, Phase: PhaseFetching, Done: offset + n, Total: desc.Size})
			}
		} else {
			span.End()
		}
		if rerr == io.EOF {
			return n, nil
		}
		if rerr != nil {
			return n, rerr
		}
	}
}

func (g *Guard) abort(ctx context.Context, ingest string) {
	if err := g.store.Abort(ctx, ingest); err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("ref", ingest).Warn("exportguard: removing ingest")
	}
}

// commitLabels are the labels of a blob committed for ref.
func (g *Guard) commitLabels(ref string) map[string]string {
	l := map[string]string{
		LabelRef:      ref,
		LabelVerified: g.o.now().UTC().Format(time.RFC3339),
	}
	if k, v, ok := distributionSource(ref); ok {
		l[k] = v
	}
	if g.o.gcRoot {
		l[labelGCRoot] = g.o.now().UTC().Format(time.RFC3339)
	}
	for k, v := range g.o.labels {
		l[k] = v
	}
	return l
}

// distributionSource returns containerd's distribution source label for
// ref, which lets a push mount the blob from its repository.
func distributionSource(ref string) (string, string, bool) {
	r, err := name.ParseReference(ref)
	if err != nil {
		return "", "", false
	}
	host := r.Context().RegistryStr()
	if host == name.DefaultRegistry {
		host = "docker.io"
	}
	return labels.LabelDistributionSource + "." + host, r.Context().RepositoryStr(), true
}

// hold keeps a blob from garbage collection: in the Guard's lease, in the
// lease of ctx, with a GC root label when asked, and within the retention
// budget (WithRetention). present says the blob was found rather than
// committed by the Guard.
func (g *Guard) hold(ctx context.Context, dgst digest.Digest, size int64, present bool) error {
	res := leases.Resource{ID: dgst.String(), Type: "content"}
	if g.ret != nil {
		if err := g.ret.use(ctx, dgst, size); err != nil {
			return err
		}
	}
	if g.o.leaseID != "" {
		if err := g.ensureLease(ctx); err != nil {
			return err
		}
		if err := g.o.leases.AddResource(ctx, leases.Lease{ID: g.o.leaseID}, res); err != nil {
			return fmt.Errorf("adding to lease %s: %w", g.o.leaseID, err)
		}
	}
	if id, ok := leases.FromContext(ctx); ok && g.o.leases != nil && id != g.o.leaseID {
		if err := g.o.leases.AddResource(ctx, leases.Lease{ID: id}, res); err != nil {
			return fmt.Errorf("adding to lease %s: %w", id, err)
		}
	}
	if present && g.o.gcRoot {
		info := content.Info{Digest: dgst, Labels: map[string]string{labelGCRoot: g.o.now().UTC().Format(time.RFC3339)}}
		if _, err := g.store.Update(ctx, info, "labels."+labelGCRoot); err != nil {
			return fmt.Errorf("labelling as GC root: %w", err)
		}
	}
	return nil
}

// ensureLease creates the Guard's lease once.
func (g *Guard) ensureLease(ctx context.Context) error {
	g.leaseMu.Lock()
	defer g.leaseMu.Unlock()
	if g.leaseReady {
		return nil
	}
	opts := append([]leases.Opt{leases.WithID(g.o.leaseID)}, g.o.leaseOpts...)
	if _, err := g.o.leases.Create(ctx, opts...); err != nil && !errdefs.IsAlreadyExists(err) {
		return fmt.Errorf("creating lease %s: %w", g.o.leaseID, err)
	}
	g.leaseReady = true
	return nil
}

func (g *Guard) report(p Progress) {
	if g.o.progress != nil {
		g.o.progress(p)
	}
}

// ingestRef returns the ingest ref a Guard uses for dgst.
func ingestRef(dgst digest.Digest) string { return ingestPrefix + dgst.String() }

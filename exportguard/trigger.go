package exportguard

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
)

// LeaseID is the containerd lease, in each namespace a Trigger guards
// blobs for, that keeps the most recently used materialized blobs within
// the Trigger's retention budget (WithMaxBytes). Earlier lazybase versions
// held every blob in it for ever; the same budget now applies to those.
const LeaseID = "lazybase-exportguard"

// Stores gives a Trigger containerd's content store and lease manager.
// The namespace travels in each call's context, put there by
// WithNamespace (containerd's namespaces.WithNamespace, for a store reached
// over containerd's API).
type Stores interface {
	// Open returns the content store and a lease manager, which may be
	// nil. A Trigger calls it for each namespace's Guard, retrying while
	// it fails (containerd not up yet), and for each LocalBlob.
	Open(ctx context.Context) (content.Store, leases.Manager, error)
	// WithNamespace returns ctx for calls in containerd namespace ns.
	WithNamespace(ctx context.Context, ns string) context.Context
}

// Registry is what a Trigger asks the registries: the bytes of a blob
// (Fetcher), its size, and the layers of an image. Remote is one.
type Registry interface {
	Fetcher
	// BlobSize returns the size of the blob dgst of the image ref.
	BlobSize(ctx context.Context, ref string, dgst digest.Digest) (int64, error)
	// ImageLayers returns the layer digests of the image ref, for the
	// running platform when ref names an index.
	ImageLayers(ctx context.Context, ref string) ([]digest.Digest, error)
}

// MountEvent is a layer mounted lazily.
type MountEvent struct {
	// Namespace is the containerd namespace whose content store gets the
	// blob.
	Namespace string
	// Ref is the image reference the layer was mounted for; a trailing
	// "@sha256:…" after a tag (as BuildKit names images) is dropped when
	// the registry is asked.
	Ref   string
	Layer digest.Digest
	// Mode names the policy that decided When, for status and metrics.
	Mode string
	When When
}

// Trigger hands lazily mounted layers to a Guard per containerd namespace,
// at the time each layer's When says, and keeps their state: it serves the
// status of every layer, waits on barriers until the layers of images are
// materialized, opens committed blobs for local readers (LocalBlob) and
// tells subscribers (OnCommit) when a blob is committed. Its methods may be
// called from any goroutine.
type Trigger struct {
	stores Stores
	reg    Registry
	o      triggerOptions

	triggers   *prometheus.CounterVec
	promotions prometheus.Counter

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	guards map[string]*Guard   // by namespace
	layers map[layerKey]*layer // by namespace and digest
	// transfers holds, by digest, a channel closed when the namespace
	// that claimed the blob (claim) is done with it.
	transfers map[digest.Digest]chan struct{}
	closed    bool
	// changed is closed, and replaced, whenever a layer's state changes
	// and when the Trigger closes: barriers wait on it.
	changed  chan struct{}
	onCommit []func(LayerStatus)
}

type layerKey struct {
	ns     string
	digest digest.Digest
}

// TriggerOption configures a Trigger.
type TriggerOption func(*triggerOptions) error

type triggerOptions struct {
	delay      time.Duration
	guardOpts  []Option
	registerer prometheus.Registerer
	storeName  string
	maxBytes   int64
}

// WithMaxBytes sets how many bytes of materialized blobs each namespace's
// Guard keeps in LeaseID, least recently used released first, beyond the
// blobs that snapshots (LabelSnapshotRef), images or BuildKit records
// reference themselves (0 unless given: none).
func WithMaxBytes(n int64) TriggerOption {
	return func(o *triggerOptions) error {
		if n < 0 {
			return fmt.Errorf("max bytes must not be negative, got %d", n)
		}
		o.maxBytes = n
		return nil
	}
}

// WithDelay sets how long a layer mounted WhenDelayed waits before its
// blob is materialized (0 unless given: at once).
func WithDelay(d time.Duration) TriggerOption {
	return func(o *triggerOptions) error {
		if d < 0 {
			return fmt.Errorf("delay must not be negative, got %s", d)
		}
		o.delay = d
		return nil
	}
}

// WithGuardOptions adds opts to those of every Guard the Trigger makes, one
// per namespace. The Trigger itself gives each Guard WithRetention
// (LeaseID and the WithMaxBytes budget, when Stores returns a lease
// manager) and, with WithTriggerRegisterer, WithRegisterer labelled by
// namespace.
func WithGuardOptions(opts ...Option) TriggerOption {
	return func(o *triggerOptions) error {
		o.guardOpts = append(o.guardOpts, opts...)
		return nil
	}
}

// WithTriggerRegisterer registers the Trigger's metrics
// (lazybase_guard_triggers_total, lazybase_guard_promotions_total) and
// those of its Guards, labelled by namespace, on r.
func WithTriggerRegisterer(r prometheus.Registerer) TriggerOption {
	return func(o *triggerOptions) error { o.registerer = r; return nil }
}

// WithStoreName names the content store in errors ("containerd at NAME"),
// for example by containerd's socket address.
func WithStoreName(name string) TriggerOption {
	return func(o *triggerOptions) error { o.storeName = name; return nil }
}

// NewTrigger returns a Trigger that materializes blobs read from reg into
// the content stores stores opens.
func NewTrigger(stores Stores, reg Registry, opts ...TriggerOption) (*Trigger, error) {
	if stores == nil || reg == nil {
		return nil, errors.New("export guard trigger needs content stores and a registry")
	}
	o := triggerOptions{storeName: "the content store"}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	check := defaults()
	for _, opt := range o.guardOpts {
		if opt == nil {
			continue
		}
		if err := opt(&check); err != nil {
			return nil, fmt.Errorf("guard option: %w", err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	t := &Trigger{
		stores: stores, reg: reg, o: o,
		ctx: ctx, cancel: cancel,
		guards:    map[string]*Guard{},
		layers:    map[layerKey]*layer{},
		transfers: map[digest.Digest]chan struct{}{},
		changed:   make(chan struct{}),
		promotions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "lazybase", Subsystem: "guard", Name: "promotions_total",
			Help: "Layers of lazy images materialized before guard.delay ended because the lazy filesystem started fetching their blob in earnest.",
		}),
		triggers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazybase", Subsystem: "guard", Name: "triggers_total",
			Help: "Lazily mounted layers handed to the export guard, by policy mode and action (now, delayed, skipped).",
		}, []string{"mode", "action"}),
	}
	if o.registerer != nil {
		if err := errors.Join(o.registerer.Register(t.triggers), o.registerer.Register(t.promotions)); err != nil {
			cancel()
			return nil, fmt.Errorf("registering guard metrics: %w", err)
		}
	}
	return t, nil
}

// OnCommit calls fn, from the transfer's goroutine, each time a layer's
// blob is materialized (found present or committed). fn must not block for
// long.
func (t *Trigger) OnCommit(fn func(LayerStatus)) {
	t.mu.Lock()
	t.onCommit = append(t.onCommit, fn)
	t.mu.Unlock()
}

// Mounted is told about each layer mounted lazily. It never blocks on the
// network: the transfer, if any, runs in the background.
func (t *Trigger) Mounted(ctx context.Context, ev MountEvent) {
	lg := log.G(ctx).WithFields(log.Fields{"image": ev.Ref, "layer": ev.Layer, "mode": ev.Mode, "namespace": ev.Namespace})
	var delay time.Duration
	switch ev.When {
	case WhenNow, WhenNever:
	case WhenDelayed:
		delay = t.o.delay
	default:
		lg.WithField("when", int(ev.When)).Warn("export guard: unknown When; layer ignored")
		return
	}
	key := layerKey{ev.Namespace, ev.Layer}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return
	}
	if l, ok := t.layers[key]; ok && l.state == StateMaterialized {
		// The blob lives as long as something uses it: after a prune it
		// may be gone, and this mount needs it again.
		t.wg.Add(1)
		t.mu.Unlock()
		go t.recheck(ctx, ev, l)
		return
	}
	if l, ok := t.layers[key]; ok && l.state != StateFailed && (l.state != StateSkipped || ev.When == WhenNever) {
		t.mu.Unlock()
		return // already handled for this namespace
	}
	l := &layer{ns: ev.Namespace, image: ev.Ref, digest: ev.Layer, mode: ev.Mode, when: ev.When, size: -1, updated: time.Now()}
	t.layers[key] = l
	t.triggers.WithLabelValues(ev.Mode, ev.When.action()).Inc()
	if ev.When == WhenNever {
		l.state = StateSkipped
		t.notifyLocked()
		t.mu.Unlock()
		lg.Debug("export guard: lazy-only image, blob not materialized")
		return
	}
	l.state = StateScheduled
	wake := make(chan struct{})
	l.wake = wake
	t.notifyLocked()
	t.wg.Add(1)
	t.mu.Unlock()
	lg.WithField("delay", delay).Info("export guard: materializing blob")
	go func() {
		defer t.wg.Done()
		// A blob already in the namespace's content store (committed
		// before a restart of the daemon, or pulled) is taken at once,
		// without waiting and without asking the registry.
		if delay > 0 && !t.inStore(t.ctx, l) {
			timer := time.NewTimer(delay)
			defer timer.Stop()
			select {
			case <-timer.C:
			case <-wake:
			case <-t.ctx.Done():
				return
			}
		}
		t.mu.Lock()
		if l.wake == wake {
			l.wake = nil
		}
		t.mu.Unlock()
		t.materialize(l)
	}()
}

// recheck hands ev to Mounted again when the blob that l, materialized
// earlier, stood for is no longer in the namespace's content store.
func (t *Trigger) recheck(ctx context.Context, ev MountEvent, l *layer) {
	defer t.wg.Done()
	sctx := t.stores.WithNamespace(t.ctx, ev.Namespace)
	store, _, err := t.stores.Open(sctx)
	if err != nil {
		return
	}
	if _, err := store.Info(sctx, ev.Layer); !errdefs.IsNotFound(err) {
		return
	}
	key := layerKey{ev.Namespace, ev.Layer}
	t.mu.Lock()
	if t.layers[key] != l || l.state != StateMaterialized || t.closed {
		t.mu.Unlock()
		return
	}
	delete(t.layers, key)
	t.mu.Unlock()
	log.G(ctx).WithFields(log.Fields{"image": ev.Ref, "layer": ev.Layer, "namespace": ev.Namespace}).
		Info("export guard: blob materialized earlier was released; materializing it again")
	t.Mounted(ctx, ev)
}

// notifyLocked wakes every barrier waiting for a change. t.mu is held.
func (t *Trigger) notifyLocked() {
	close(t.changed)
	t.changed = make(chan struct{})
}

// set changes l under the lock and wakes the barriers; when l became
// materialized, the OnCommit subscribers are told, outside the lock.
func (t *Trigger) set(l *layer, f func(*layer)) {
	t.mu.Lock()
	f(l)
	l.updated = time.Now()
	t.notifyLocked()
	var subs []func(LayerStatus)
	st := l.status()
	if l.state == StateMaterialized {
		subs = append(subs, t.onCommit...)
	}
	t.mu.Unlock()
	for _, fn := range subs {
		fn(st)
	}
}

func (t *Trigger) materialize(l *layer) {
	ctx := t.stores.WithNamespace(t.ctx, l.ns)
	lg := log.G(ctx).WithFields(log.Fields{"image": l.image, "layer": l.digest, "namespace": l.ns})
	t.set(l, func(l *layer) { l.state = StateMaterializing })
	fail := func(err error) {
		if t.ctx.Err() != nil {
			return
		}
		t.set(l, func(l *layer) {
			l.state, l.err = StateFailed, err.Error()
			if !l.transferStarted.IsZero() {
				l.transferFinished = time.Now()
			}
		})
		lg.WithError(err).Warn("export guard: blob not materialized; an export of this image fetches it")
	}
	ref := stripDigest(l.image)
	guard, err := t.guard(ctx, l.ns)
	if err != nil {
		fail(err)
		return
	}
	// containerd's namespaces share one content store: a blob another
	// namespace's Guard is fetching is waited for, then committed in this
	// namespace from the shared store, with no second transfer.
	release, err := t.claim(ctx, l.digest)
	if err != nil {
		fail(err)
		return
	}
	defer release()
	// A blob the content store holds already (the guard committed it
	// before the daemon restarted) is taken as it is: its size comes from
	// the store, and the registry is not asked anything; nor is it for a
	// blob another namespace materialized.
	var size int64
	info, err := guard.store.Info(ctx, l.digest)
	inStore := err == nil
	if inStore {
		size = info.Size
	} else if s, ok := t.materializedSize(l.digest); ok {
		size = s
	} else if size, err = t.reg.BlobSize(ctx, ref, l.digest); err != nil {
		fail(fmt.Errorf("size of layer %s: %w", l.digest, err))
		return
	}
	// A blob found in the store is readable locally from now on, before
	// Ensure holds it.
	start := time.Now()
	t.set(l, func(l *layer) {
		l.size, l.checked, l.inStore = size, true, inStore
		l.transferStarted, l.transferFinished = start, time.Time{}
	})
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: l.digest, Size: size}
	if err := guard.Ensure(ctx, ref, desc); err != nil {
		fail(err)
		return
	}
	t.set(l, func(l *layer) {
		l.state, l.present, l.err = StateMaterialized, true, ""
		l.transferFinished = time.Now()
	})
	lg.WithFields(log.Fields{"size": size, "duration": time.Since(start)}).Info("export guard: blob materialized")
}

// claim returns once no other namespace's transfer of blob dgst runs,
// and makes the caller's the one that runs; release ends it. It fails
// only when ctx ends.
func (t *Trigger) claim(ctx context.Context, dgst digest.Digest) (release func(), err error) {
	for {
		t.mu.Lock()
		busy, ok := t.transfers[dgst]
		if !ok {
			done := make(chan struct{})
			t.transfers[dgst] = done
			t.mu.Unlock()
			return func() {
				t.mu.Lock()
				delete(t.transfers, dgst)
				t.mu.Unlock()
				close(done)
			}, nil
		}
		t.mu.Unlock()
		select {
		case <-busy:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// materializedSize returns the size of blob dgst when a namespace holds
// it materialized.
func (t *Trigger) materializedSize(dgst digest.Digest) (int64, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, l := range t.layers {
		if k.digest == dgst && l.present && l.size > 0 {
			return l.size, true
		}
	}
	return 0, false
}

// inStore reports whether the blob of l is in the content store of its
// namespace, asking the store once (no retry: containerd may not be up
// yet), and records that the store was asked. It sets l's size when the
// blob is there.
func (t *Trigger) inStore(ctx context.Context, l *layer) bool {
	size, ok := t.storeSize(ctx, l.ns, l.digest)
	t.mu.Lock()
	l.checked = true
	if ok {
		l.size, l.inStore = size, true
	}
	t.mu.Unlock()
	return ok
}

// storeSize returns the size of blob dgst in the content store of
// namespace ns; ok is false when it is not there or the store cannot be
// reached.
func (t *Trigger) storeSize(ctx context.Context, ns string, dgst digest.Digest) (size int64, ok bool) {
	store, _, err := t.stores.Open(ctx)
	if err != nil {
		return 0, false
	}
	info, err := store.Info(t.stores.WithNamespace(ctx, ns), dgst)
	if err != nil {
		return 0, false
	}
	return info.Size, true
}

// guard returns the namespace's Guard, opening the stores first, retrying
// while they are not reachable.
func (t *Trigger) guard(ctx context.Context, ns string) (*Guard, error) {
	t.mu.Lock()
	gd, ok := t.guards[ns]
	t.mu.Unlock()
	if ok {
		return gd, nil
	}
	var (
		store content.Store
		lm    leases.Manager
		err   error
	)
	for wait := 200 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		if store, lm, err = t.stores.Open(ctx); err == nil {
			break
		}
		log.G(ctx).WithError(err).Debug("export guard: containerd not reachable yet; retrying")
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("containerd at %s: %w", t.o.storeName, err)
		case <-time.After(wait):
		}
	}
	if sl, ok := t.stores.(SnapshotLabeler); ok && lm != nil {
		if err := sl.LabelSnapshots(ctx); err != nil {
			log.G(ctx).WithError(err).WithField("namespace", ns).
				Warn("export guard: labelling the lazy snapshots of earlier versions; their blobs may be released while they exist")
		}
	}
	opts := append([]Option(nil), t.o.guardOpts...)
	if lm != nil {
		opts = append(opts, WithRetention(lm, LeaseID, t.o.maxBytes))
	}
	if t.o.registerer != nil {
		opts = append(opts, WithRegisterer(prometheus.WrapRegistererWith(prometheus.Labels{"namespace": ns}, t.o.registerer)))
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if gd, ok := t.guards[ns]; ok {
		return gd, nil
	}
	gd, err = New(store, t.reg, opts...)
	if err != nil {
		return nil, fmt.Errorf("export guard for namespace %s: %w", ns, err)
	}
	t.guards[ns] = gd
	return gd, nil
}

// Status returns the state of every layer the Trigger was told about,
// sorted by namespace and layer.
func (t *Trigger) Status() *Status {
	t.mu.Lock()
	defer t.mu.Unlock()
	st := &Status{Layers: make([]LayerStatus, 0, len(t.layers))}
	for _, l := range t.layers {
		st.Layers = append(st.Layers, l.status())
	}
	sort.Slice(st.Layers, func(i, j int) bool {
		a, b := st.Layers[i], st.Layers[j]
		if a.Namespace != b.Namespace {
			return a.Namespace < b.Namespace
		}
		return a.Layer < b.Layer
	})
	return st
}

// Close stops pending and running transfers, releases the barriers and
// closes every Guard.
func (t *Trigger) Close() error {
	t.mu.Lock()
	if !t.closed {
		t.closed = true
		t.notifyLocked()
	}
	t.mu.Unlock()
	t.cancel()
	t.wg.Wait()
	var errs []error
	for ns, gd := range t.guards {
		if err := gd.Close(); err != nil {
			errs = append(errs, fmt.Errorf("export guard for namespace %s: %w", ns, err))
		}
	}
	return errors.Join(errs...)
}

// stripDigest turns BuildKit's "name:tag@sha256:…" into "name:tag"; a
// reference by digest alone is kept.
func stripDigest(ref string) string {
	name, _, ok := strings.Cut(ref, "@")
	if ok && strings.LastIndexByte(name, ':') > strings.LastIndexByte(name, '/') {
		return name
	}
	return ref
}

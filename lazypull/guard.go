package lazypull

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"time"

	contentapi "github.com/containerd/containerd/api/services/content/v1"
	leasesapi "github.com/containerd/containerd/api/services/leases/v1"
	versionapi "github.com/containerd/containerd/api/services/version/v1"
	"github.com/containerd/containerd/v2/core/content"
	contentproxy "github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/containerd/v2/core/leases"
	leasesproxy "github.com/containerd/containerd/v2/core/leases/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/imageio"
)

// GuardLeaseID is the containerd lease, in each namespace the daemon
// guards blobs for, that holds the materialized blobs.
const GuardLeaseID = "lazybase-exportguard"

// Guard states of a layer, as GuardStatus reports them.
const (
	GuardScheduled     = "scheduled"     // waiting for its delay (lazy images)
	GuardMaterializing = "materializing" // transfer under way
	GuardMaterialized  = "materialized"  // blob verified in the content store
	GuardSkipped       = "skipped"       // lazy-only: never materialized
	GuardFailed        = "failed"        // given up on; Error says why
)

// guardStores opens the content store and lease manager of containerd; the
// namespace travels in each call's context.
type guardStores func(ctx context.Context) (content.Store, leases.Manager, error)

// blobSizer returns the compressed size of a layer blob of ref.
type blobSizer func(ctx context.Context, ref string, dgst digest.Digest) (int64, error)

// mountEvent is a layer the daemon mounted lazily.
type mountEvent struct {
	Namespace string
	Ref       string
	Layer     digest.Digest
	Mode      Mode
}

// GuardStatus lists the layers the export guard has been told about.
type GuardStatus struct {
	Layers []GuardLayerStatus `json:"layers"`
}

// GuardLayerStatus is one lazily mounted layer as the export guard sees it.
type GuardLayerStatus struct {
	Namespace string    `json:"namespace"`
	Image     string    `json:"image"`
	Layer     string    `json:"layer"`
	Mode      string    `json:"mode"`
	State     string    `json:"state"`
	Size      int64     `json:"size"`
	Error     string    `json:"error,omitempty"`
	Updated   time.Time `json:"updated"`
	// Materialized is true when the layer's blob is in the content store.
	Materialized bool `json:"materialized"`
}

// guardTrigger hands lazily mounted layers to an exportguard.Guard per
// containerd namespace, following the policy: export-base at once,
// lazy after a delay, lazy-only never.
type guardTrigger struct {
	cfg     GuardConfig
	stores  guardStores
	sizer   blobSizer
	fetcher exportguard.Fetcher
	reg     prometheus.Registerer

	triggers *prometheus.CounterVec

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu     sync.Mutex
	guards map[string]*exportguard.Guard // by namespace
	layers map[string]*GuardLayerStatus  // by namespace + "/" + digest
	wake   map[string]chan struct{}      // closed to end a layer's delay, same keys
	closed bool

	promotions prometheus.Counter

	onClose func() error // run last by close
}

func newGuardTrigger(cfg GuardConfig, stores guardStores, sizer blobSizer, fetcher exportguard.Fetcher, reg prometheus.Registerer) (*guardTrigger, error) {
	ctx, cancel := context.WithCancel(context.Background())
	g := &guardTrigger{
		cfg: cfg, stores: stores, sizer: sizer, fetcher: fetcher, reg: reg,
		ctx: ctx, cancel: cancel,
		guards: map[string]*exportguard.Guard{},
		layers: map[string]*GuardLayerStatus{},
		wake:   map[string]chan struct{}{},
		promotions: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "lazybase", Subsystem: "guard", Name: "promotions_total",
			Help: "Layers of lazy images materialized before guard.delay ended because the lazy filesystem started fetching their blob in earnest.",
		}),
		triggers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "lazybase", Subsystem: "guard", Name: "triggers_total",
			Help: "Lazily mounted layers handed to the export guard, by policy mode and action (now, delayed, skipped).",
		}, []string{"mode", "action"}),
	}
	if reg != nil {
		if err := errors.Join(reg.Register(g.triggers), reg.Register(g.promotions)); err != nil {
			cancel()
			return nil, fmt.Errorf("registering guard metrics: %w", err)
		}
	}
	return g, nil
}

// mounted is called for each layer mounted lazily. It never blocks on the
// network.
func (g *guardTrigger) mounted(ctx context.Context, ev mountEvent) {
	l := log.G(ctx).WithFields(log.Fields{"image": ev.Ref, "layer": ev.Layer, "mode": ev.Mode, "namespace": ev.Namespace})
	var delay time.Duration
	action := "now"
	switch ev.Mode {
	case ModeExportBase:
	case ModeLazy, "":
		delay, action = g.cfg.Delay.D(), "delayed"
	case ModeLazyOnly:
		action = "skipped"
	default: // eager: not lazily mounted, nothing to guard
		return
	}
	key := ev.Namespace + "/" + ev.Layer.String()
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return
	}
	if st, ok := g.layers[key]; ok && st.State != GuardFailed && !(st.State == GuardSkipped && action != "skipped") {
		g.mu.Unlock()
		return // already handled for this namespace
	}
	st := &GuardLayerStatus{Namespace: ev.Namespace, Image: ev.Ref, Layer: ev.Layer.String(), Mode: string(ev.Mode), Size: -1, Updated: time.Now()}
	g.layers[key] = st
	g.triggers.WithLabelValues(string(ev.Mode), action).Inc()
	if action == "skipped" {
		st.State = GuardSkipped
		g.mu.Unlock()
		l.Debug("export guard: lazy-only image, blob not materialized")
		return
	}
	st.State = GuardScheduled
	wake := make(chan struct{})
	g.wake[key] = wake
	g.wg.Add(1)
	g.mu.Unlock()
	l.WithField("delay", delay).Info("export guard: materializing blob")
	go func() {
		defer g.wg.Done()
		if delay > 0 {
			t := time.NewTimer(delay)
			defer t.Stop()
			select {
			case <-t.C:
			case <-wake:
			case <-g.ctx.Done():
				return
			}
		}
		g.mu.Lock()
		if g.wake[key] == wake {
			delete(g.wake, key)
		}
		g.mu.Unlock()
		g.materialize(ev, st)
	}()
}

func (g *guardTrigger) set(st *GuardLayerStatus, f func(*GuardLayerStatus)) {
	g.mu.Lock()
	f(st)
	st.Updated = time.Now()
	g.mu.Unlock()
}

func (g *guardTrigger) materialize(ev mountEvent, st *GuardLayerStatus) {
	ctx := namespaces.WithNamespace(g.ctx, ev.Namespace)
	l := log.G(ctx).WithFields(log.Fields{"image": ev.Ref, "layer": ev.Layer, "namespace": ev.Namespace})
	g.set(st, func(s *GuardLayerStatus) { s.State = GuardMaterializing })
	fail := func(err error) {
		if g.ctx.Err() != nil {
			return
		}
		g.set(st, func(s *GuardLayerStatus) { s.State, s.Error = GuardFailed, err.Error() })
		l.WithError(err).Warn("export guard: blob not materialized; an export of this image fetches it")
	}
	ref := stripDigest(ev.Ref)
	size, err := g.sizer(ctx, ref, ev.Layer)
	if err != nil {
		fail(fmt.Errorf("size of layer %s: %w", ev.Layer, err))
		return
	}
	g.set(st, func(s *GuardLayerStatus) { s.Size = size })
	guard, err := g.guard(ctx, ev.Namespace)
	if err != nil {
		fail(err)
		return
	}
	start := time.Now()
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: ev.Layer, Size: size}
	if err := guard.Ensure(ctx, ref, desc); err != nil {
		fail(err)
		return
	}
	g.set(st, func(s *GuardLayerStatus) { s.State, s.Materialized, s.Error = GuardMaterialized, true, "" })
	l.WithFields(log.Fields{"size": size, "duration": time.Since(start)}).Info("export guard: blob materialized")
}

// guard returns the namespace's Guard, connecting to containerd first,
// retrying while it is not up.
func (g *guardTrigger) guard(ctx context.Context, ns string) (*exportguard.Guard, error) {
	g.mu.Lock()
	gd, ok := g.guards[ns]
	g.mu.Unlock()
	if ok {
		return gd, nil
	}
	var (
		store content.Store
		lm    leases.Manager
		err   error
	)
	for wait := 200 * time.Millisecond; ; wait = min(2*wait, 5*time.Second) {
		if store, lm, err = g.stores(ctx); err == nil {
			break
		}
		log.G(ctx).WithError(err).Debug("export guard: containerd not reachable yet; retrying")
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("containerd at %s: %w", g.cfg.ContainerdAddress, err)
		case <-time.After(wait):
		}
	}
	opts := []exportguard.Option{
		exportguard.WithParallelism(g.cfg.Parallelism),
		exportguard.WithGCRoot(),
	}
	if lm != nil {
		opts = append(opts, exportguard.WithLease(lm, GuardLeaseID))
	}
	if g.reg != nil {
		opts = append(opts, exportguard.WithRegisterer(prometheus.WrapRegistererWith(prometheus.Labels{"namespace": ns}, g.reg)))
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if gd, ok := g.guards[ns]; ok {
		return gd, nil
	}
	gd, err = exportguard.New(store, g.fetcher, opts...)
	if err != nil {
		return nil, fmt.Errorf("export guard for namespace %s: %w", ns, err)
	}
	g.guards[ns] = gd
	return gd, nil
}

// status returns the guard's view of every layer it was told about.
func (g *guardTrigger) status() *GuardStatus {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := &GuardStatus{Layers: make([]GuardLayerStatus, 0, len(g.layers))}
	for _, l := range g.layers {
		st.Layers = append(st.Layers, *l)
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

func (g *guardTrigger) handler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(g.status())
	})
}

// close stops pending and running transfers and closes every Guard.
func (g *guardTrigger) close() error {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
	g.cancel()
	g.wg.Wait()
	var errs []error
	for ns, gd := range g.guards {
		if err := gd.Close(); err != nil {
			errs = append(errs, fmt.Errorf("export guard for namespace %s: %w", ns, err))
		}
	}
	if g.onClose != nil {
		if err := g.onClose(); err != nil {
			errs = append(errs, fmt.Errorf("containerd client: %w", err))
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

// remoteBlobSize asks ref's registry for the size of blob dgst (a HEAD
// request), with credentials from keychain, plain HTTP for loopback only,
// and each phase of a request bounded by timeouts.
func remoteBlobSize(keychain authn.Keychain, timeouts imageio.Timeouts) blobSizer {
	rt := imageio.PolicyTransport(imageio.NewTransport(false, timeouts), false)
	return func(ctx context.Context, ref string, dgst digest.Digest) (int64, error) {
		nref, err := name.ParseReference(ref)
		if err != nil {
			return 0, fmt.Errorf("parsing reference %q: %w", ref, err)
		}
		d, err := name.NewDigest(nref.Context().Name() + "@" + dgst.String())
		if err != nil {
			return 0, err
		}
		layer, err := remote.Layer(d, remote.WithContext(ctx), remote.WithAuthFromKeychain(keychain), remote.WithTransport(rt))
		if err != nil {
			return 0, err
		}
		return layer.Size()
	}
}

// GuardStatus returns the export guard's view of the lazily mounted layers;
// nil when guard.enable is false.
func (d *Daemon) GuardStatus() *GuardStatus {
	if d.guard == nil {
		return nil
	}
	return d.guard.status()
}

// guardMounted hands a lazily mounted layer to the export guard with the
// containerd namespace of the Prepare that mounted it.
func (d *Daemon) guardMounted(ctx context.Context, plan preparePlan) {
	ns, ok := namespaces.Namespace(ctx)
	if !ok {
		log.G(ctx).WithFields(log.Fields{"image": plan.Ref, "layer": plan.Layer}).
			Warn("export guard: Prepare carried no containerd namespace; using \"default\"")
		ns = namespaces.Default
	}
	dgst, err := digest.Parse(plan.Layer)
	if err != nil {
		log.G(ctx).WithError(err).WithField("image", plan.Ref).Warn("export guard: bad layer digest")
		return
	}
	d.guard.mounted(ctx, mountEvent{Namespace: ns, Ref: plan.Ref, Layer: dgst, Mode: plan.Decision.Mode})
}

// newDaemonGuard wires the export guard to containerd at
// cfg.Guard.ContainerdAddress, connected on first use, and to the
// registries with the docker keychain (auth.docker_config) and plain HTTP
// for loopback registries only. It attaches itself to src, the daemon's
// blob source, so that the lazy filesystem reads the blobs it committed.
func newDaemonGuard(ctx context.Context, cfg Config, src *blobSource, reg prometheus.Registerer) (*guardTrigger, error) {
	keychain := credentialKeychain{dockerCredentials(ctx, cfg.Auth)}
	var (
		mu   sync.Mutex
		conn *grpc.ClientConn
	)
	stores := func(ctx context.Context) (content.Store, leases.Manager, error) {
		mu.Lock()
		defer mu.Unlock()
		if conn == nil {
			c, err := grpc.NewClient("unix://"+cfg.Guard.ContainerdAddress,
				grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				return nil, nil, err
			}
			vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			_, err = versionapi.NewVersionClient(c).Version(vctx, &emptypb.Empty{})
			cancel()
			if err != nil {
				c.Close()
				return nil, nil, err
			}
			conn = c
		}
		// What containerd's client.ContentStore and LeasesService return.
		return contentproxy.NewContentStore(contentapi.NewContentClient(conn)),
			leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(conn)), nil
	}
	timeouts := cfg.Guard.Timeouts()
	g, err := newGuardTrigger(cfg.Guard, stores, remoteBlobSize(keychain, timeouts), &exportguard.Remote{Keychain: keychain, Timeouts: timeouts}, reg)
	if err != nil {
		return nil, err
	}
	// The lazy filesystem reads the blobs the guard committed instead of
	// fetching them again.
	if err := src.attach(g.localBlob, g.promote, reg); err != nil {
		g.close()
		return nil, err
	}
	g.onClose = func() error {
		src.detach()
		mu.Lock()
		defer mu.Unlock()
		if conn == nil {
			return nil
		}
		return conn.Close()
	}
	log.G(ctx).WithField("containerd", cfg.Guard.ContainerdAddress).Info("export guard enabled")
	return g, nil
}

// credentialKeychain is an authn.Keychain over the daemon's registry
// credentials (auth.docker_config and auth.credential_helpers), so the
// guard authenticates as the lazy filesystem does.
type credentialKeychain struct{ creds resolver.Credential }

func (k credentialKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	user, secret, err := k.creds(r.RegistryStr(), reference.Spec{})
	if err != nil {
		return nil, err
	}
	switch {
	case user == "" && secret == "":
		return authn.Anonymous, nil
	case user == "":
		return &authn.Bearer{Token: secret}, nil
	}
	return &authn.Basic{Username: user, Password: secret}, nil
}

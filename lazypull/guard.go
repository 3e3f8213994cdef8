package lazypull

import (
	"context"
	"net/http"
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
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/lazybase/lazybase/exportguard"
)

// whenOf maps a policy Mode onto when the export guard materializes the
// blob of a layer mounted lazily; ok is false for eager, which mounts
// nothing lazily.
func whenOf(m Mode) (w exportguard.When, ok bool) {
	switch m {
	case ModeExportBase:
		return exportguard.WhenNow, true
	case ModeLazy, "":
		return exportguard.WhenDelayed, true
	case ModeLazyOnly:
		return exportguard.WhenNever, true
	}
	return 0, false
}

// containerdStores is the export guard's way to containerd at
// guard.containerd_address: one gRPC connection, made on first use and
// checked with a Version call, closed by close.
type containerdStores struct {
	address string
	// open returns the stores; tests put an in-process store here.
	open func(ctx context.Context) (content.Store, leases.Manager, error)

	mu   sync.Mutex
	conn *grpc.ClientConn
}

var _ exportguard.Stores = (*containerdStores)(nil)

func newContainerdStores(address string) *containerdStores {
	s := &containerdStores{address: address}
	s.open = s.dial
	return s
}

// Open implements exportguard.Stores.
func (s *containerdStores) Open(ctx context.Context) (content.Store, leases.Manager, error) {
	return s.open(ctx)
}

// WithNamespace implements exportguard.Stores: the namespace travels as
// containerd's gRPC metadata.
func (s *containerdStores) WithNamespace(ctx context.Context, ns string) context.Context {
	return namespaces.WithNamespace(ctx, ns)
}

func (s *containerdStores) dial(ctx context.Context) (content.Store, leases.Manager, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		c, err := grpc.NewClient("unix://"+s.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
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
		s.conn = c
	}
	// What containerd's client.ContentStore and LeasesService return.
	return contentproxy.NewContentStore(contentapi.NewContentClient(s.conn)),
		leasesproxy.NewLeaseManager(leasesapi.NewLeasesClient(s.conn)), nil
}

func (s *containerdStores) close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.conn == nil {
		return nil
	}
	err := s.conn.Close()
	s.conn = nil
	return err
}

// newGuardRegistry is the export guard's access to the registries: the
// hosts of the daemon's [registry] section (mirrors or config_path
// hosts.toml directories), tried in order as the lazy filesystem tries
// them, with the daemon's registry credentials (auth.docker_config and
// auth.credential_helpers) and the guard.*_timeout bounds on each phase of
// a request.
func newGuardRegistry(ctx context.Context, cfg Config) exportguard.Registry {
	creds := dockerCredentials(ctx, cfg.Auth)
	return newHostsRegistry(cfg.hostsWith(ctx, creds, guardClients(cfg.Guard.Timeouts())), creds)
}

// newGuardTrigger builds the export guard over stores and reg as cfg's
// [guard] section says, with its metrics on the daemon's registry m.
func newGuardTrigger(cfg GuardConfig, stores exportguard.Stores, reg exportguard.Registry, m *metrics) (*exportguard.Trigger, error) {
	opts := []exportguard.TriggerOption{
		exportguard.WithDelay(cfg.Delay.D()),
		exportguard.WithGuardOptions(exportguard.WithParallelism(cfg.Parallelism)),
		exportguard.WithStoreName(cfg.ContainerdAddress),
		exportguard.WithMaxBytes(cfg.MaxBytes),
	}
	if m != nil {
		opts = append(opts, exportguard.WithTriggerRegisterer(m.reg))
	}
	return exportguard.NewTrigger(stores, reg, opts...)
}

// startGuard wires the export guard into d: to containerd at
// guard.containerd_address, connected on first use; to the lazy
// filesystem's blob reads, which it serves from the blobs it committed;
// and, with local.enable, to an Unpacker told about every mount and
// commit.
func (d *Daemon) startGuard(ctx context.Context, psn *policySnapshotter) error {
	d.stores = newContainerdStores(d.cfg.Guard.ContainerdAddress)
	g, err := newGuardTrigger(d.cfg.Guard, d.stores, newGuardRegistry(ctx, d.cfg), d.m)
	if err != nil {
		return err
	}
	// The lazy filesystem reads the blobs the guard committed instead of
	// fetching them again.
	if err := d.blobs.Attach(g.LocalBlob, g.Promote, d.m.reg); err != nil {
		g.Close()
		return err
	}
	d.guard = g
	// No background fetch decompresses the layers whose blob the guard
	// holds (bgfetch.go).
	d.fs.bg.attach(g.Holds)
	psn.lazy = d.guardMounted
	psn.hideRemote = true
	if d.cfg.Local.Enable {
		u, err := exportguard.NewUnpacker(log.WithLogger(context.Background(), log.G(ctx)), g.LocalBlob,
			exportguard.WithUnpackParallelism(d.cfg.Local.Parallelism),
			exportguard.WithUnpackRegisterer(d.m.reg))
		if err != nil {
			return err
		}
		d.attachUnpacker(u)
		g.OnCommit(func(st exportguard.LayerStatus) { u.Committed(digest.Digest(st.Layer)) })
	}
	log.G(ctx).WithField("containerd", d.cfg.Guard.ContainerdAddress).Info("export guard enabled")
	return nil
}

// attachUnpacker makes u the daemon's local unpacker: told about every
// lazy mount, those already there included, and rewriting the mounts the
// snapshotter hands out.
func (d *Daemon) attachUnpacker(u *exportguard.Unpacker) {
	d.local = u
	d.sn.(*policySnapshotter).local = u
	d.fs.watch(unpackWatcher{u})
}

// unpackWatcher tells an Unpacker about the mounts of a trackingFS.
type unpackWatcher struct{ u *exportguard.Unpacker }

func (w unpackWatcher) mounted(mp string, rec mountRecord) {
	w.u.Mounted(mp, exportguard.UnpackMount{
		Image: rec.image, Layer: digest.Digest(rec.layer), Skip: Mode(rec.mode) == ModeLazyOnly,
	})
}

func (w unpackWatcher) unmounted(mp string) { w.u.Unmounted(mp) }

// closeGuard stops the local unpacker and the export guard and closes the
// connection to containerd.
func (d *Daemon) closeGuard() error {
	if d.local != nil {
		d.local.Close()
	}
	if d.guard == nil {
		return nil
	}
	var err error
	if cerr := d.guard.Close(); cerr != nil {
		err = cerr
	}
	d.blobs.Detach()
	d.fs.bg.attach(nil)
	if cerr := d.stores.close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// GuardStatus returns the export guard's view of the lazily mounted layers;
// nil when guard.enable is false.
func (d *Daemon) GuardStatus() *exportguard.Status {
	if d.guard == nil {
		return nil
	}
	return d.guard.Status()
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
	when, ok := whenOf(plan.Decision.Mode)
	if !ok {
		return // eager: not lazily mounted, nothing to guard
	}
	d.guard.Mounted(ctx, exportguard.MountEvent{Namespace: ns, Ref: plan.Ref, Layer: dgst, Mode: string(plan.Decision.Mode), When: when})
	// The layer's mount may be one a lazy-only image made in another
	// namespace (containerd shares a chain's snapshot across namespaces).
	if d.local != nil && when != exportguard.WhenNever {
		d.local.Want(dgst)
	}
}

// barrierHandler serves exportguard.BarrierPath: the guard's barrier, or
// 409 when guard.enable is false.
func (d *Daemon) barrierHandler() http.Handler {
	if d.guard == nil {
		return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, "export guard disabled (guard.enable = false in the daemon's configuration)", http.StatusConflict)
		})
	}
	return d.guard.BarrierHandler()
}

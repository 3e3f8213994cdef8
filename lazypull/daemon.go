package lazypull

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/snapshot"
	"github.com/moby/sys/mountinfo"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/lazybase/lazybase/exportguard"
)

// Daemon is a running lazybase snapshotter: the upstream lazy filesystem and
// snapshotter wrapped with policy, metrics and status, ready to be served
// on containerd's snapshots gRPC API.
type Daemon struct {
	cfg    Config
	m      *metrics
	fs     *trackingFS
	base   snapshots.Snapshotter
	sn     snapshots.Snapshotter
	access *accessRecording
	pub    *profilePublisher     // nil when profile.publish is false
	guard  *exportguard.Trigger  // nil when guard.enable is false
	stores *containerdStores     // the guard's containerd connection
	local  *exportguard.Unpacker // nil when local.enable or guard.enable is false
	// blobs serves the lazy filesystem's blob reads from the guard's
	// local copies; this daemon's own, attached to its guard.
	blobs *exportguard.BlobSource
	// locks are the flocks on the root directory and the socket, held
	// from NewDaemon until Close.
	locks       []*os.File
	metricsAddr atomic.Pointer[net.TCPAddr] // set while the TCP listener serves
	closed      sync.Once
	err         error
}

// NewDaemon validates cfg and sets up the root directory and the upstream
// filesystem and snapshotter. The lazy snapshots a previous run left are
// mounted again by Serve once it listens (restore.go); a snapshot whose
// layer cannot be mounted then is kept, with a warning and a retry when a
// request needs it, so that a registry outage neither keeps the daemon
// from starting nor loses the snapshot.
//
// One daemon owns a root directory and a socket: NewDaemon locks
// ROOT/lazybase.lock and SOCKET.lock (flock, released by Close or when
// the process dies) and fails, touching nothing, when another daemon holds
// either or when a process serves the socket or the status socket.
func NewDaemon(ctx context.Context, cfg Config) (_ *Daemon, retErr error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	policy, err := NewPolicy(cfg.DefaultMode, cfg.Policy)
	if err != nil {
		return nil, err
	}
	locks, err := lockDaemon(cfg)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			unlock(locks)
		}
	}()
	snRoot := filepath.Join(cfg.Root, "snapshotter")
	if err := os.MkdirAll(snRoot, 0o700); err != nil {
		return nil, fmt.Errorf("root %s: %w", cfg.Root, err)
	}
	if err := service.Supported(cfg.Root); err != nil {
		return nil, fmt.Errorf("root %s: overlayfs not usable: %w", cfg.Root, err)
	}
	if err := initMetaStore(ctx, filepath.Join(snRoot, "metadata.db")); err != nil {
		return nil, err
	}
	if err := sweepCaches(ctx, cfg.Root); err != nil {
		return nil, err
	}
	m := newMetrics()
	// The registry hosts of the lazy filesystem read blobs through it;
	// the export guard, set up below, serves them from its local copies.
	blobs := exportguard.NewBlobSource()
	// The guard, once attached, tells which layers' background fetch is
	// declined.
	bg := newBackgroundFetch()
	sc, opts, err := cfg.upstream(ctx, blobs, bg)
	if err != nil {
		return nil, err
	}
	ufs, err := service.NewFileSystem(ctx, cfg.Root, &sc, opts...)
	if err != nil {
		return nil, fmt.Errorf("lazy filesystem at %s: %w", cfg.Root, err)
	}
	tfs := newTrackingFS(ufs, m)
	tfs.bg = bg
	tfs.readOnly = cfg.FUSE.ReadOnly
	var pub *profilePublisher
	var others []accessRecorder
	if cfg.Profile.Publish {
		creds := dockerCredentials(ctx, cfg.Auth)
		hosts := cfg.hostsWith(ctx, creds, guardClients(cfg.Guard.Timeouts()))
		pub = newProfilePublisher(cfg.Profile, newHostsRegistry(hosts, creds), hosts, creds, m)
		others = append(others, pub)
	}
	var access *accessRecording
	if cfg.AccessRecordDir != "" || pub != nil {
		// Before the snapshotter restores mounts, so that their accesses
		// are recorded too.
		if access, err = startAccessRecording(cfg.AccessRecordDir, tfs, others...); err != nil {
			return nil, err
		}
	}
	// The snapshotter mounts again, while it starts, every lazy snapshot
	// the previous daemon left: those mounts wait until Serve listens.
	tfs.restore.deferMounts(true)
	base, err := snapshot.NewSnapshotter(ctx, snRoot, tfs,
		snapshot.AsynchronousRemove, snapshot.AllowInvalidMountsOnRestart)
	tfs.restore.deferMounts(false)
	if err != nil {
		tfs.restore.stop()
		if access != nil {
			access.stop()
		}
		return nil, fmt.Errorf("snapshotter at %s: %w", snRoot, err)
	}
	psn := &policySnapshotter{Snapshotter: base, policy: policy, m: m}
	if pub != nil {
		pub.stat = base.Stat
		psn.uses = pub
		pub.start(log.WithLogger(context.Background(), log.G(ctx)))
	}
	d := &Daemon{
		cfg:    cfg,
		m:      m,
		fs:     tfs,
		base:   base,
		access: access,
		pub:    pub,
		sn:     psn,
		blobs:  blobs,
		locks:  locks,
	}
	if cfg.Guard.Enable {
		if err := d.startGuard(ctx, psn); err != nil {
			tfs.restore.stop()
			if pub != nil {
				pub.stopNow()
			}
			d.closeGuard()
			base.Close()
			if access != nil {
				access.stop()
			}
			return nil, err
		}
	} else if cfg.Local.Enable {
		log.G(ctx).Warn("local.enable has no effect: local unpacking unpacks the blobs the export guard materializes, and guard.enable is false")
	}
	return d, nil
}

// Snapshotter returns the policy-applying snapshotter the daemon serves.
func (d *Daemon) Snapshotter() snapshots.Snapshotter { return d.sn }

// StatusSocket returns the path of the status API's unix socket.
func (d *Daemon) StatusSocket() string { return d.cfg.statusSocket() }

// StatusSocketPath returns the path of the status API's unix socket:
// status_socket, else the snapshots socket with ".status" appended.
func (c *Config) StatusSocketPath() string { return c.statusSocket() }

func (c *Config) statusSocket() string {
	if c.StatusSocket != "" {
		return c.StatusSocket
	}
	return c.Socket + ".status"
}

// lockDaemon takes the locks of cfg's root directory and socket and
// checks that no process serves either socket, so that a second daemon
// fails before it mounts anything. Serve checks the sockets again when it
// listens.
func lockDaemon(cfg Config) (locks []*os.File, retErr error) {
	defer func() {
		if retErr != nil {
			unlock(locks)
			locks = nil
		}
	}()
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return nil, fmt.Errorf("root %s: %w", cfg.Root, err)
	}
	l, err := lockFile(filepath.Join(cfg.Root, "lazybase.lock"))
	if err != nil {
		return nil, fmt.Errorf("root %s: %w", cfg.Root, err)
	}
	locks = append(locks, l)
	if err := os.MkdirAll(filepath.Dir(cfg.Socket), 0o700); err != nil {
		return locks, fmt.Errorf("socket directory %s: %w", filepath.Dir(cfg.Socket), err)
	}
	if l, err = lockFile(cfg.Socket + ".lock"); err != nil {
		return locks, fmt.Errorf("socket %s: %w", cfg.Socket, err)
	}
	locks = append(locks, l)
	for _, p := range []string{cfg.Socket, cfg.statusSocket()} {
		if err := checkSocketFree(p); err != nil {
			return locks, err
		}
	}
	return locks, nil
}

func unlock(locks []*os.File) {
	for _, l := range locks {
		l.Close()
	}
}

// MetricsAddr returns the address the TCP metrics listener is bound to
// (metrics_address with the port the kernel chose for port 0), nil when
// it is not serving.
func (d *Daemon) MetricsAddr() net.Addr {
	if a := d.metricsAddr.Load(); a != nil {
		return a
	}
	return nil
}

// Serve serves the snapshots gRPC API on the configured socket, the status
// API (status, export guard, barrier and metrics) on the status socket and,
// when configured, metrics alone on the TCP metrics address, until ctx is
// done; then it stops the servers, removes the sockets it created and
// closes the daemon, unmounting every lazy mount.
//
// Once both sockets listen, it restores the lazy mounts of the previous
// daemon in the background: containerd connects at once and Stat, Walk
// and everything else that needs no lazy mount are answered meanwhile; a
// request that needs a layer not restored yet waits for it.
//
// Only the unix sockets, whose mode limits who may connect, serve routes
// that act or tell about images: the TCP listener answers GET /metrics and
// 404 to everything else.
func (d *Daemon) Serve(ctx context.Context) (retErr error) {
	defer func() {
		if err := d.Close(); err != nil && retErr == nil {
			retErr = err
		}
	}()
	grpcL, err := listenUnix(d.cfg.Socket, os.FileMode(d.cfg.SocketMode))
	if err != nil {
		return err
	}
	defer grpcL.removeIfOurs()
	statusL, err := listenUnix(d.cfg.statusSocket(), os.FileMode(d.cfg.SocketMode))
	if err != nil {
		grpcL.Close()
		return err
	}
	defer statusL.removeIfOurs()
	d.startRestore(ctx)

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(d.sn))

	metrics := promhttp.HandlerFor(d.m.gatherer(), promhttp.HandlerOpts{})
	mux := http.NewServeMux()
	mux.Handle("GET /status", d.statusHandler())
	if d.guard != nil {
		mux.Handle("GET "+exportguard.StatusPath, d.guard.StatusHandler())
	}
	mux.Handle("POST "+exportguard.BarrierPath, d.barrierHandler())
	mux.Handle("GET /metrics", metrics)
	httpSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}

	errc := make(chan error, 3)
	go func() { errc <- wrapServe("snapshots API on "+d.cfg.Socket, srv.Serve(grpcL)) }()
	go func() { errc <- wrapServe("status API on "+d.cfg.statusSocket(), httpSrv.Serve(statusL)) }()
	var metricsSrv *http.Server
	if d.cfg.MetricsAddress != "" {
		ml, err := net.Listen("tcp", d.cfg.MetricsAddress)
		if err != nil {
			srv.Stop()
			httpSrv.Close()
			return fmt.Errorf("metrics_address %s: %w", d.cfg.MetricsAddress, err)
		}
		metricsMux := http.NewServeMux()
		metricsMux.Handle("GET /metrics", metrics)
		metricsSrv = &http.Server{Handler: metricsMux, ReadHeaderTimeout: 10 * time.Second}
		if a, ok := ml.Addr().(*net.TCPAddr); ok {
			d.metricsAddr.Store(a)
		}
		go func() { errc <- wrapServe("metrics on "+ml.Addr().String(), metricsSrv.Serve(ml)) }()
		log.G(ctx).WithField("address", ml.Addr().String()).Info("serving metrics")
	}
	log.G(ctx).WithFields(log.Fields{
		"socket":        d.cfg.Socket,
		"status_socket": d.cfg.statusSocket(),
		"root":          d.cfg.Root,
	}).Info("serving lazybase snapshotter")

	select {
	case <-ctx.Done():
		log.G(ctx).Info("stopping lazybase snapshotter")
	case err = <-errc:
		log.G(ctx).WithError(err).Error("server failed; stopping")
	}
	stopGRPC(srv, 10*time.Second)
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_ = httpSrv.Shutdown(shutdownCtx)
	if metricsSrv != nil {
		_ = metricsSrv.Shutdown(shutdownCtx)
		d.metricsAddr.Store(nil)
	}
	return err
}

// wrapServe turns a server's normal stop into nil.
func wrapServe(what string, err error) error {
	if err == nil || errors.Is(err, http.ErrServerClosed) || errors.Is(err, grpc.ErrServerStopped) {
		return nil
	}
	return fmt.Errorf("%s: %w", what, err)
}

// stopGRPC lets in-flight calls finish for up to grace, then cuts them off.
func stopGRPC(srv *grpc.Server, grace time.Duration) {
	done := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(grace):
		srv.Stop()
	}
}

// Close closes the snapshotter, which unmounts every lazy mount, then
// detaches any FUSE mount still left under the root, and releases the
// daemon's locks. It is safe to call more than once.
func (d *Daemon) Close() error {
	d.closed.Do(func() {
		ctx := context.Background()
		d.fs.restore.stop()
		if err := d.closeGuard(); err != nil {
			d.err = fmt.Errorf("closing export guard: %w", err)
		}
		// Before the snapshotter closes: the publisher reads snapshots.
		if d.pub != nil {
			d.pub.close(ctx)
		}
		// Before the snapshotter removes the snapshot directories.
		d.keepLocal(ctx)
		if err := d.base.Close(); err != nil && d.err == nil {
			d.err = fmt.Errorf("closing snapshotter: %w", err)
		}
		if err := unmountLeftovers(ctx, filepath.Join(d.cfg.Root, "snapshotter", "snapshots")); err != nil && d.err == nil {
			d.err = err
		}
		if d.access != nil {
			if err := d.access.stop(); err != nil && d.err == nil {
				d.err = fmt.Errorf("closing access records: %w", err)
			}
		}
		unlock(d.locks)
	})
	return d.err
}

// unmountLeftovers unmounts every mount below dir, lazily if it is busy.
func unmountLeftovers(ctx context.Context, dir string) error {
	mounts, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		return fmt.Errorf("listing mounts under %s: %w", dir, err)
	}
	var errs []error
	// Deepest first.
	for i := len(mounts) - 1; i >= 0; i-- {
		mp := mounts[i].Mountpoint
		if err := unix.Unmount(mp, 0); err != nil {
			if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
				errs = append(errs, fmt.Errorf("unmounting %s: %w", mp, err))
				continue
			}
		}
		log.G(ctx).WithField("mountpoint", mp).Warn("unmounted a mount left after closing the snapshotter")
	}
	return errors.Join(errs...)
}

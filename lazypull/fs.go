package lazypull

import (
	"context"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/snapshot"
)

// trackingFS wraps the upstream lazy filesystem: it logs every mount with
// the image reference and layer digest, counts mounts and failures, and
// remembers what is mounted where for Status.
type trackingFS struct {
	fs snapshot.FileSystem
	m  *metrics

	// restore holds the mounts the upstream snapshotter restores when it
	// starts, until the daemon listens (restore.go).
	restore *restorer

	// bg, when set, is told about each mount before the upstream
	// filesystem mounts it (its background fetch starts during Mount).
	bg *backgroundFetch

	// readOnly remounts each layer read-only once mounted
	// (fuse.read_only, remountReadOnly).
	readOnly bool

	mu      sync.Mutex
	mounts  map[string]mountRecord
	watcher mountWatcher // told about mounts and unmounts, under mu
}

// mountWatcher is told about each lazy mount and unmount of a trackingFS,
// in order, under its lock: its methods must not block.
type mountWatcher interface {
	mounted(mountpoint string, rec mountRecord)
	unmounted(mountpoint string)
}

// watch makes w the watcher of t's mounts and tells it about the mounts
// already there.
func (t *trackingFS) watch(w mountWatcher) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.watcher = w
	for mp, rec := range t.mounts {
		w.mounted(mp, rec)
	}
}

var _ snapshot.FileSystem = (*trackingFS)(nil)

type mountRecord struct {
	image     string
	layer     string
	mode      string
	mountedAt time.Time
}

func newTrackingFS(fs snapshot.FileSystem, m *metrics) *trackingFS {
	t := &trackingFS{fs: fs, m: m, mounts: make(map[string]mountRecord)}
	t.restore = newRestorer(func(ctx context.Context, mp string, labels map[string]string) error {
		return t.mount(ctx, mp, labels, true)
	})
	return t
}

func layerLogger(ctx context.Context, labels map[string]string) context.Context {
	return log.WithLogger(ctx, log.G(ctx).WithFields(log.Fields{
		"image": imageRef(labels),
		"layer": layerDigest(labels),
	}))
}

// Mount mounts the layer lazily. On failure the upstream snapshotter falls
// back to a normal snapshot, so containerd pulls the layer; the log line
// says so and why. While the snapshotter restores the mounts of a previous
// daemon (restorer.deferMounts), Mount only records them: they are mounted
// once the daemon listens.
func (t *trackingFS) Mount(ctx context.Context, mountpoint string, labels map[string]string) error {
	if t.restore.add(ctx, mountpoint, labels) {
		return nil
	}
	return t.mount(ctx, mountpoint, labels, false)
}

// mount mounts the layer lazily; restoring says it is a previous daemon's
// mount, which has no fallback.
func (t *trackingFS) mount(ctx context.Context, mountpoint string, labels map[string]string, restoring bool) error {
	ctx = layerLogger(ctx, labels)
	start := time.Now()
	t.bg.mounted(mountpoint, labels)
	if err := t.fs.Mount(ctx, mountpoint, labels); err != nil {
		t.bg.unmounted(mountpoint)
		t.m.lazyMounts.WithLabelValues("failed").Inc()
		if restoring {
			return err // the restorer logs it
		}
		reason, msg := ReasonMountFailed, "lazy mount failed; containerd pulls this layer normally"
		if isInvalidTOC(err) {
			reason, msg = ReasonInvalidTOC, "lazy mount refused: invalid eStargz TOC; containerd pulls this layer normally"
		}
		t.m.fallbacks.WithLabelValues(reason).Inc()
		log.G(ctx).WithError(err).WithField("reason", reason).Warn(msg)
		return err
	}
	if t.readOnly {
		// Only the kernel's attribute caching depends on it: a layer
		// left read-write still serves every read.
		if err := remountReadOnly(mountpoint); err != nil {
			log.G(ctx).WithError(err).Warn("layer stays mounted read-write; the kernel asks for attributes again after each read")
		}
	}
	d := time.Since(start)
	t.m.lazyMounts.WithLabelValues("ok").Inc()
	t.m.mountDuration.Observe(d.Seconds())
	rec := mountRecord{
		image:     imageRef(labels),
		layer:     layerDigest(labels),
		mode:      snapshotMode(labels),
		mountedAt: time.Now(),
	}
	t.mu.Lock()
	t.mounts[mountpoint] = rec
	t.m.mounted.Set(float64(len(t.mounts)))
	if t.watcher != nil {
		t.watcher.mounted(mountpoint, rec)
	}
	t.mu.Unlock()
	log.G(ctx).WithField("mountpoint", mountpoint).WithField("duration", d).Info("layer mounted lazily")
	return nil
}

// Check checks that the layer's registry is still reachable. A layer the
// daemon has not restored yet is restored first (or waited for).
func (t *trackingFS) Check(ctx context.Context, mountpoint string, labels map[string]string) error {
	if err := t.restore.wait(ctx, mountpoint); err != nil {
		return restoreError(mountpoint, labels, err)
	}
	return t.fs.Check(layerLogger(ctx, labels), mountpoint, labels)
}

// Unmount unmounts the layer; a layer not restored yet never is.
func (t *trackingFS) Unmount(ctx context.Context, mountpoint string) error {
	t.restore.drop(mountpoint)
	t.mu.Lock()
	rec, ok := t.mounts[mountpoint]
	delete(t.mounts, mountpoint)
	t.m.mounted.Set(float64(len(t.mounts)))
	if ok && t.watcher != nil {
		t.watcher.unmounted(mountpoint)
	}
	t.mu.Unlock()
	t.bg.unmounted(mountpoint)
	err := t.fs.Unmount(ctx, mountpoint)
	if ok {
		l := log.G(ctx).WithFields(log.Fields{"image": rec.image, "layer": rec.layer, "mountpoint": mountpoint})
		if err != nil {
			l.WithError(err).Warn("unmounting layer")
		} else {
			l.Debug("layer unmounted")
		}
	}
	return err
}

// snapshot returns the current mounts.
func (t *trackingFS) snapshot() map[string]mountRecord {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]mountRecord, len(t.mounts))
	for k, v := range t.mounts {
		out[k] = v
	}
	return out
}

// imageOf returns the image reference of a mounted layer, "" when the layer
// is not mounted.
func (t *trackingFS) imageOf(layer string) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, rec := range t.mounts {
		if rec.layer == layer {
			return rec.image
		}
	}
	return ""
}

package exportguard

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/archive"
	"github.com/containerd/containerd/v2/pkg/archive/compression"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/internal/cpuacct"
)

// Names next to a lazily mounted layer's mountpoint (".../N/fs") in its
// snapshot directory (".../N"), which the snapshotter removes with the
// snapshot.
const (
	LocalDirName  = "lazybase-local"      // the unpacked layer
	LocalDoneName = "lazybase-local.done" // its layer digest, once complete
)

// BlobOpener opens a layer's verified compressed blob when one is at hand
// locally; ok is false when not (yet). Trigger.LocalBlob is one.
type BlobOpener func(ctx context.Context, layer digest.Digest) (ra content.ReaderAt, ok bool)

// UnpackMount is a lazily mounted layer an Unpacker is told about.
type UnpackMount struct {
	Image string
	Layer digest.Digest
	// Skip keeps the layer from being unpacked (lazy-only images) unless
	// another image wants it (Want).
	Skip bool
}

// UnpackResult is the end of one unpack.
type UnpackResult struct {
	Mountpoint string
	Layer      digest.Digest
	Dir        string // the unpacked directory; "" on failure
	Err        error  // nil on success
}

// Unpacker unpacks each lazily mounted layer, once its verified blob is at
// hand (a Trigger committed it), into a plain directory next to its
// mountpoint (LocalDirName), the way containerd unpacks a layer for
// overlayfs, and rewrites the mounts handed out from then on (Rewrite), so
// that containers started later read the layer through overlayfs alone: no
// FUSE round trip per lookup, open or read. Containers already running
// keep their lazy mounts.
//
// The Unpacker does not scan: it acts when told that a layer was mounted
// (Mounted), unmounted (Unmounted) or that a blob was committed
// (Committed). Its methods may be called from any goroutine.
type Unpacker struct {
	open BlobOpener
	o    unpackOptions
	sem  chan struct{}
	m    *unpackMetrics

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu       sync.Mutex
	mounts   map[string]UnpackMount // by mountpoint
	wanted   map[digest.Digest]bool // layers an image wants unpacked (Want)
	done     map[string]string      // mountpoint -> unpacked directory
	inflight map[string]*unpackRun  // mountpoint -> the unpack under way
	failed   map[string]bool
	closed   bool
}

// UnpackOption configures an Unpacker.
type UnpackOption func(*unpackOptions) error

type unpackOptions struct {
	parallelism int
	registerer  prometheus.Registerer
	onUnpacked  func(UnpackResult)
}

// WithUnpackParallelism sets how many layers are unpacked at once (1
// unless given).
func WithUnpackParallelism(n int) UnpackOption {
	return func(o *unpackOptions) error {
		if n <= 0 {
			return fmt.Errorf("unpack parallelism must be positive, got %d", n)
		}
		o.parallelism = n
		return nil
	}
}

// WithUnpackRegisterer registers the Unpacker's metrics
// (lazybase_snapshotter_localized_layers, _local_unpacks_total,
// _local_unpack_duration_seconds) on r.
func WithUnpackRegisterer(r prometheus.Registerer) UnpackOption {
	return func(o *unpackOptions) error { o.registerer = r; return nil }
}

// WithOnUnpacked calls fn at the end of every unpack that ran to an end
// (not cancelled by an unmount or Close), from the unpack's goroutine.
func WithOnUnpacked(fn func(UnpackResult)) UnpackOption {
	return func(o *unpackOptions) error { o.onUnpacked = fn; return nil }
}

// NewUnpacker returns an Unpacker that reads blobs through open. ctx
// carries the logger of its unpacks; Close ends them.
func NewUnpacker(ctx context.Context, open BlobOpener, opts ...UnpackOption) (*Unpacker, error) {
	if open == nil {
		return nil, errors.New("unpacker needs a blob opener")
	}
	o := unpackOptions{parallelism: 1}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	m := newUnpackMetrics()
	if o.registerer != nil {
		if err := m.register(o.registerer); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &Unpacker{
		open: open, o: o, m: m,
		sem:    make(chan struct{}, o.parallelism),
		ctx:    ctx,
		cancel: cancel,
		mounts: map[string]UnpackMount{}, wanted: map[digest.Digest]bool{}, done: map[string]string{},
		inflight: map[string]*unpackRun{}, failed: map[string]bool{},
	}, nil
}

// Mounted tells the Unpacker that m is mounted at mountpoint. The layer is
// unpacked at once if its blob is at hand, when it is committed otherwise.
// Mounted does not block: it looks for the blob in the background.
func (u *Unpacker) Mounted(mountpoint string, m UnpackMount) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return
	}
	if old, ok := u.mounts[mountpoint]; ok && old != m {
		u.forgetLocked(mountpoint)
	}
	u.mounts[mountpoint] = m
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		u.try(mountpoint)
	}()
}

// Want tells the Unpacker that an image that is not lazy-only uses layer:
// its mounts are unpacked even when they were mounted for a lazy-only
// image (Skip). containerd keeps one snapshot per chain for all its
// namespaces, so the mount a namespace's image uses may be the one another
// namespace's image made; its content is the same verified blob.
func (u *Unpacker) Want(layer digest.Digest) {
	u.mu.Lock()
	if u.closed || u.wanted[layer] {
		u.mu.Unlock()
		return
	}
	u.wanted[layer] = true
	var mps []string
	for mp, m := range u.mounts {
		if m.Layer == layer && m.Skip {
			mps = append(mps, mp)
		}
	}
	u.wg.Add(len(mps))
	u.mu.Unlock()
	for _, mp := range mps {
		go func() {
			defer u.wg.Done()
			u.try(mp)
		}()
	}
}

// Unmounted tells the Unpacker that nothing is mounted at mountpoint any
// more: an unpack under way stops, and mounts are no longer rewritten for
// it.
func (u *Unpacker) Unmounted(mountpoint string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	m, ok := u.mounts[mountpoint]
	u.forgetLocked(mountpoint)
	if !ok {
		return
	}
	for _, o := range u.mounts {
		if o.Layer == m.Layer {
			return
		}
	}
	delete(u.wanted, m.Layer) // its last mount
}

// forgetLocked forgets the mount at mp. An unpack under way is cancelled
// and stays in inflight until it ends, so that no second unpack writes
// next to mp meanwhile; if mp is mounted again by then, its end starts a
// new one.
func (u *Unpacker) forgetLocked(mp string) {
	if run, ok := u.inflight[mp]; ok {
		run.cancel()
	}
	delete(u.mounts, mp)
	delete(u.done, mp)
	delete(u.failed, mp)
	u.m.localized.Set(float64(len(u.done)))
}

// Committed tells the Unpacker that the blob of layer is at hand: every
// mount of it not unpacked yet is unpacked.
func (u *Unpacker) Committed(layer digest.Digest) {
	u.mu.Lock()
	var mps []string
	for mp, m := range u.mounts {
		if m.Layer == layer {
			mps = append(mps, mp)
		}
	}
	u.mu.Unlock()
	for _, mp := range mps {
		if !u.try(mp) {
			continue
		}
		// The blob was just committed, yet could not be opened (the
		// connection to containerd being re-established, say): try again
		// a few times, off the Trigger's goroutine.
		u.mu.Lock()
		if u.closed {
			u.mu.Unlock()
			return
		}
		u.wg.Add(1)
		u.mu.Unlock()
		go func() {
			defer u.wg.Done()
			u.retryCommitted(mp, layer)
		}()
	}
}

// retryCommitted retries the unpack of the mount at mp, whose blob layer
// was committed but could not be opened, with backoff for about six
// seconds; then it says so, and the next mount or commit tries again.
func (u *Unpacker) retryCommitted(mp string, layer digest.Digest) {
	delay := 100 * time.Millisecond
	for range 6 {
		t := time.NewTimer(delay)
		select {
		case <-u.ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if !u.try(mp) {
			return
		}
		delay *= 2
	}
	log.G(u.ctx).WithFields(log.Fields{"layer": layer, "mountpoint": mp}).
		Warn("local unpack: the committed blob could not be opened; the layer stays on its lazy mount until it is mounted or committed again")
}

// pendingLocked returns the mount at mp when it has no unpacked directory
// yet and no unpack under way; skip says that it is not to be unpacked
// (Skip, and no image wants its layer).
func (u *Unpacker) pendingLocked(mp string) (m UnpackMount, pending, skip bool) {
	m, ok := u.mounts[mp]
	if !ok || u.closed {
		return m, false, false
	}
	_, done := u.done[mp]
	_, running := u.inflight[mp]
	return m, !done && !running && !u.failed[mp], m.Skip && !u.wanted[m.Layer]
}

// try starts the unpack of the layer at mp if it needs one and its blob is
// at hand. It reports whether the layer still needs an unpack that could
// not start because its blob could not be opened. A complete unpacked
// directory already there (a previous daemon's) is taken as it is, even
// for a mount not to be unpacked: its content is the layer's.
func (u *Unpacker) try(mp string) (blobMissing bool) {
	u.mu.Lock()
	m, ok, skip := u.pendingLocked(mp)
	u.mu.Unlock()
	if !ok {
		return false
	}
	if dir, ok := completedLocal(mp, m.Layer); ok {
		u.mu.Lock()
		if cur, ok := u.mounts[mp]; ok && cur == m {
			u.done[mp] = dir
			u.m.localized.Set(float64(len(u.done)))
		}
		u.mu.Unlock()
		return false
	}
	if skip {
		return false
	}
	ra, ok := u.open(u.ctx, m.Layer)
	if !ok {
		return true
	}
	u.mu.Lock()
	if cur, ok, skip := u.pendingLocked(mp); !ok || skip || cur != m {
		u.mu.Unlock()
		ra.Close()
		return false
	}
	ctx, cancel := context.WithCancel(u.ctx)
	run := &unpackRun{cancel: cancel}
	u.inflight[mp] = run
	u.wg.Add(1)
	u.mu.Unlock()
	go func() {
		defer u.wg.Done()
		defer cancel()
		defer ra.Close()
		u.unpack(ctx, run, mp, m, ra)
	}()
	return false
}

// unpackRun is one unpack under way; an unmount cancels it.
type unpackRun struct{ cancel context.CancelFunc }

func (u *Unpacker) unpack(ctx context.Context, run *unpackRun, mp string, m UnpackMount, ra content.ReaderAt) {
	select {
	case u.sem <- struct{}{}:
		defer func() { <-u.sem }()
	case <-ctx.Done():
		u.finish(ctx, run, mp, m, "", nil)
		return
	}
	lg := log.G(ctx).WithFields(log.Fields{"image": m.Image, "layer": m.Layer})
	start := time.Now()
	dir, err := unpackLocal(ctx, filepath.Dir(mp), m.Layer, ra)
	switch {
	case err == nil:
		d := time.Since(start)
		u.m.duration.Observe(d.Seconds())
		u.m.unpacks.WithLabelValues("ok").Inc()
		lg.WithField("duration", d).WithField("dir", dir).Info("layer unpacked locally: new containers read it through overlayfs")
	case ctx.Err() != nil:
		err = nil // unmounted or shutting down: try again if it comes back
	default:
		u.m.unpacks.WithLabelValues("failed").Inc()
		lg.WithError(err).Warn("local unpack failed: the layer stays on its lazy mount")
	}
	u.finish(ctx, run, mp, m, dir, err)
}

// finish records the end of run, the unpack of m at mp, unless it was
// cancelled (the mount went away, or Close), and reports it. A run
// cancelled by an unmount whose mountpoint is mounted again meanwhile
// gives way to a new try.
func (u *Unpacker) finish(ctx context.Context, run *unpackRun, mp string, m UnpackMount, dir string, err error) {
	u.mu.Lock()
	if u.inflight[mp] == run {
		delete(u.inflight, mp)
	}
	cancelled := ctx.Err() != nil
	cur, mounted := u.mounts[mp]
	if mounted && cur == m && !cancelled {
		if err != nil {
			u.failed[mp] = true
		} else if dir != "" {
			u.done[mp] = dir
		}
	}
	retry := cancelled && mounted && !u.closed
	u.m.localized.Set(float64(len(u.done)))
	u.mu.Unlock()
	if retry {
		u.try(mp)
		return
	}
	if !cancelled && u.o.onUnpacked != nil {
		u.o.onUnpacked(UnpackResult{Mountpoint: mp, Layer: m.Layer, Dir: dir, Err: err})
	}
}

// Close ends unpacks under way and waits for them.
func (u *Unpacker) Close() {
	u.mu.Lock()
	u.closed = true
	u.mu.Unlock()
	u.cancel()
	u.wg.Wait()
}

// LocalDir returns the unpacked directory of the layer mounted at
// mountpoint, "" when it has none.
func (u *Unpacker) LocalDir(mountpoint string) string {
	if u == nil {
		return ""
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.done[mountpoint]
}

// Rewrite returns mounts with every lazily mounted layer that has been
// unpacked replaced by its unpacked directory: in overlay lowerdir lists
// and as the source of bind mounts. Mounts in user-xattr mode (whose
// opaque markers differ) are left alone.
func (u *Unpacker) Rewrite(mounts []mount.Mount) []mount.Mount {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.done) == 0 {
		return mounts
	}
	out := make([]mount.Mount, len(mounts))
	for i, m := range mounts {
		out[i] = m
		switch m.Type {
		case "bind", "rbind":
			if dir, ok := u.done[m.Source]; ok {
				out[i].Source = dir
			}
		case "overlay":
			if hasOption(m.Options, "userxattr") {
				continue
			}
			opts := make([]string, len(m.Options))
			for j, o := range m.Options {
				opts[j] = o
				lower, ok := strings.CutPrefix(o, "lowerdir=")
				if !ok {
					continue
				}
				dirs := strings.Split(lower, ":")
				for k, d := range dirs {
					if local, ok := u.done[d]; ok {
						dirs[k] = local
					}
				}
				opts[j] = "lowerdir=" + strings.Join(dirs, ":")
			}
			out[i].Options = opts
		}
	}
	return out
}

func hasOption(opts []string, o string) bool {
	for _, x := range opts {
		if x == o {
			return true
		}
	}
	return false
}

// completedLocal reports the unpacked directory of the layer mounted at mp
// when a previous unpack of that layer completed.
func completedLocal(mp string, layer digest.Digest) (string, bool) {
	snDir := filepath.Dir(mp)
	b, err := os.ReadFile(filepath.Join(snDir, LocalDoneName))
	if err != nil || strings.TrimSpace(string(b)) != layer.String() {
		return "", false
	}
	dir := filepath.Join(snDir, LocalDirName)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return "", false
	}
	return dir, true
}

// unpackLocal decompresses the verified blob of layer into
// snDir/LocalDirName the way containerd unpacks a layer for overlayfs
// (whiteouts as 0/0 character devices, opaque directories as the
// trusted.overlay.opaque attribute), leaving out eStargz's own entries
// (TOC and landmarks) as the lazy mount does. The directory appears
// complete or not at all: it is unpacked under a temporary name, renamed,
// and only then marked done.
func unpackLocal(ctx context.Context, snDir string, layer digest.Digest, ra content.ReaderAt) (string, error) {
	dir := filepath.Join(snDir, LocalDirName)
	tmp := dir + ".tmp"
	for _, p := range []string{tmp, dir, filepath.Join(snDir, LocalDoneName)} {
		if err := os.RemoveAll(p); err != nil {
			return "", fmt.Errorf("layer %s: clearing %s: %w", layer, p, err)
		}
	}
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return "", fmt.Errorf("layer %s: %w", layer, err)
	}
	err := func() error {
		// One unit of the CPU account: decompressing and writing the
		// layer (with unpigz on the PATH, containerd decompresses in a
		// child process, which the account does not see).
		span := cpuacct.Default.Start(cpuacct.LocalUnpack)
		defer span.End()
		dr, err := compression.DecompressStream(io.NewSectionReader(ra, 0, ra.Size()))
		if err != nil {
			return err
		}
		defer dr.Close()
		_, err = archive.Apply(ctx, tmp, &countingReader{r: dr, act: cpuacct.LocalUnpack},
			archive.WithConvertWhiteout(archive.OverlayConvertWhiteout),
			archive.WithFilter(skipEStargzEntries))
		return err
	}()
	if err == nil {
		err = os.Rename(tmp, dir)
	}
	if err == nil {
		err = writeFileSync(filepath.Join(snDir, LocalDoneName), []byte(layer.String()+"\n"))
	}
	if err != nil {
		os.RemoveAll(tmp)
		os.RemoveAll(dir)
		return "", fmt.Errorf("layer %s: unpacking into %s: %w", layer, dir, err)
	}
	return dir, nil
}

// countingReader counts the bytes read through it as written to disk by
// act in the CPU account (the uncompressed stream a local unpack writes).
type countingReader struct {
	r   io.Reader
	act cpuacct.Activity
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		cpuacct.Default.AddWritten(c.act, int64(n))
	}
	return n, err
}

// skipEStargzEntries leaves out the entries eStargz adds to a layer, which
// the lazy mount does not show either.
func skipEStargzEntries(h *tar.Header) (bool, error) {
	switch strings.TrimPrefix(h.Name, "./") {
	case estargz.TOCTarName, estargz.PrefetchLandmark, estargz.NoPrefetchLandmark:
		return false, nil
	}
	return true, nil
}

func writeFileSync(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// unpackMetrics are the Unpacker's Prometheus collectors, under the names
// the lazybase snapshotter has always exported them.
type unpackMetrics struct {
	localized prometheus.Gauge
	unpacks   *prometheus.CounterVec
	duration  prometheus.Histogram
}

func newUnpackMetrics() *unpackMetrics {
	const ns, sub = "lazybase", "snapshotter"
	m := &unpackMetrics{
		localized: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "localized_layers",
			Help: "Lazily mounted layers unpacked locally, which new containers read through overlayfs alone.",
		}),
		unpacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "local_unpacks_total",
			Help: "Local unpacks of lazily mounted layers from their verified blobs, by result (ok or failed).",
		}, []string{"result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "local_unpack_duration_seconds",
			Help:    "Time to unpack a lazily mounted layer locally from its verified blob.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 12),
		}),
	}
	m.unpacks.WithLabelValues("ok")
	m.unpacks.WithLabelValues("failed")
	return m
}

func (m *unpackMetrics) register(r prometheus.Registerer) error {
	if err := errors.Join(r.Register(m.localized), r.Register(m.unpacks), r.Register(m.duration)); err != nil {
		return fmt.Errorf("registering unpack metrics: %w", err)
	}
	return nil
}

// KeepLocal moves the complete unpacked directory of the layer mounted at
// mountpoint, with its done marker, into the directory keep (replaced),
// so that it survives the removal of its snapshot directory when the
// daemon stops; RestoreLocal puts it back. ok is false when there is no
// complete unpacked directory to keep.
func KeepLocal(mountpoint, keep string) (ok bool, err error) {
	snDir := filepath.Dir(mountpoint)
	b, err := os.ReadFile(filepath.Join(snDir, LocalDoneName))
	if err != nil {
		return false, nil
	}
	layer, err := digest.Parse(strings.TrimSpace(string(b)))
	if err != nil {
		return false, nil
	}
	if _, ok := completedLocal(mountpoint, layer); !ok {
		return false, nil
	}
	if err := os.RemoveAll(keep); err != nil {
		return false, fmt.Errorf("layer %s: clearing %s: %w", layer, keep, err)
	}
	if err := os.MkdirAll(keep, 0o700); err != nil {
		return false, fmt.Errorf("layer %s: %w", layer, err)
	}
	// The directory first, its marker last: a keep without a marker is
	// never put back.
	for _, name := range []string{LocalDirName, LocalDoneName} {
		if err := os.Rename(filepath.Join(snDir, name), filepath.Join(keep, name)); err != nil {
			return false, fmt.Errorf("layer %s: keeping %s: %w", layer, name, err)
		}
	}
	return true, nil
}

// RestoreLocal puts the unpacked directory KeepLocal kept in keep back
// next to mountpoint when its done marker names layer, and removes keep in
// any case. ok reports whether mountpoint has its layer's complete
// unpacked directory afterwards.
func RestoreLocal(keep, mountpoint string, layer digest.Digest) (ok bool, err error) {
	defer os.RemoveAll(keep)
	if _, ok := completedLocal(mountpoint, layer); ok {
		return true, nil // a killed daemon left it in place
	}
	if _, ok := completedLocal(filepath.Join(keep, "fs"), layer); !ok {
		return false, nil
	}
	snDir := filepath.Dir(mountpoint)
	for _, p := range []string{filepath.Join(snDir, LocalDirName+".tmp"), filepath.Join(snDir, LocalDirName), filepath.Join(snDir, LocalDoneName)} {
		if err := os.RemoveAll(p); err != nil {
			return false, fmt.Errorf("layer %s: clearing %s: %w", layer, p, err)
		}
	}
	for _, name := range []string{LocalDirName, LocalDoneName} {
		if err := os.Rename(filepath.Join(keep, name), filepath.Join(snDir, name)); err != nil {
			os.RemoveAll(filepath.Join(snDir, LocalDirName))
			return false, fmt.Errorf("layer %s: putting back %s: %w", layer, name, err)
		}
	}
	return true, nil
}

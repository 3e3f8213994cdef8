package lazypull

import (
	"archive/tar"
	"context"
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
)

// Names next to a lazily mounted layer's FUSE mountpoint (".../N/fs") in
// its upstream snapshot directory (".../N"), which the upstream
// snapshotter removes with the snapshot.
const (
	localDirName  = "lazybase-local"      // the unpacked layer
	localDoneName = "lazybase-local.done" // its layer digest, once complete
)

// blobFinder returns a reader of a layer's verified compressed blob when
// one is at hand locally, ok false when not (yet). The export guard's
// localBlob is one.
type blobFinder func(ctx context.Context, layer digest.Digest) (ra content.ReaderAt, ok bool)

// localizer unpacks each lazily mounted layer, once its verified blob is in
// the content store (the export guard put it there), into a plain
// directory next to its FUSE mount, and rewrites the mounts the
// snapshotter hands out from then on, so that containers started later
// read the layer through overlayfs alone: no FUSE round trip per lookup,
// open or read. Containers already running keep their FUSE-backed mounts.
// Layers of lazy-only images are never unpacked.
type localizer struct {
	fs       *trackingFS
	find     blobFinder
	interval time.Duration
	sem      chan struct{}
	m        *metrics

	mu       sync.Mutex
	done     map[string]string // FUSE mountpoint -> unpacked directory
	inflight map[string]context.CancelFunc
	failed   map[string]string // FUSE mountpoint -> layer digest that failed

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func newLocalizer(fs *trackingFS, find blobFinder, parallelism int, m *metrics) *localizer {
	return &localizer{
		fs:       fs,
		find:     find,
		interval: 500 * time.Millisecond,
		sem:      make(chan struct{}, parallelism),
		m:        m,
		done:     make(map[string]string),
		inflight: make(map[string]context.CancelFunc),
		failed:   make(map[string]string),
	}
}

// start watches the mounted layers until stop.
func (l *localizer) start(ctx context.Context) {
	ctx, l.cancel = context.WithCancel(ctx)
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		t := time.NewTicker(l.interval)
		defer t.Stop()
		for {
			l.scan(ctx)
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
}

// stop cancels unpacks under way and waits for them.
func (l *localizer) stop() {
	if l.cancel != nil {
		l.cancel()
	}
	l.wg.Wait()
}

// scan starts an unpack for every mounted layer that has none yet and whose
// blob is at hand, and forgets layers that are no longer mounted.
func (l *localizer) scan(ctx context.Context) {
	mounts := l.fs.snapshot()
	l.mu.Lock()
	for mp, cancel := range l.inflight {
		if _, ok := mounts[mp]; !ok {
			cancel()
		}
	}
	for mp := range l.done {
		if _, ok := mounts[mp]; !ok {
			delete(l.done, mp)
		}
	}
	for mp, layer := range l.failed {
		if rec, ok := mounts[mp]; !ok || rec.layer != layer {
			delete(l.failed, mp)
		}
	}
	l.m.localized.Set(float64(len(l.done)))
	var todo []string
	for mp, rec := range mounts {
		if Mode(rec.mode) == ModeLazyOnly {
			continue
		}
		if _, ok := l.done[mp]; ok {
			continue
		}
		if _, ok := l.inflight[mp]; ok {
			continue
		}
		if _, ok := l.failed[mp]; ok {
			continue
		}
		todo = append(todo, mp)
	}
	l.mu.Unlock()

	for _, mp := range todo {
		rec := mounts[mp]
		layer, err := digest.Parse(rec.layer)
		if err != nil {
			continue
		}
		if dir, ok := completedLocal(mp, layer); ok {
			l.mu.Lock()
			l.done[mp] = dir
			l.mu.Unlock()
			continue
		}
		ra, ok := l.find(ctx, layer)
		if !ok {
			continue
		}
		uctx, cancel := context.WithCancel(ctx)
		l.mu.Lock()
		l.inflight[mp] = cancel
		l.mu.Unlock()
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			defer cancel()
			defer ra.Close()
			l.unpack(uctx, mp, rec, layer, ra)
		}()
	}
}

func (l *localizer) unpack(ctx context.Context, mp string, rec mountRecord, layer digest.Digest, ra content.ReaderAt) {
	select {
	case l.sem <- struct{}{}:
		defer func() { <-l.sem }()
	case <-ctx.Done():
		l.finish(mp, "", nil)
		return
	}
	lg := log.G(ctx).WithFields(log.Fields{"image": rec.image, "layer": layer})
	start := time.Now()
	dir, err := unpackLocal(ctx, filepath.Dir(mp), layer, ra)
	switch {
	case err == nil:
		d := time.Since(start)
		l.m.localizeDuration.Observe(d.Seconds())
		l.m.localizations.WithLabelValues("ok").Inc()
		lg.WithField("duration", d).WithField("dir", dir).Info("layer unpacked locally: new containers read it through overlayfs")
	case ctx.Err() != nil:
		err = nil // unmounted or shutting down: try again if it comes back
	default:
		l.m.localizations.WithLabelValues("failed").Inc()
		lg.WithError(err).Warn("local unpack failed: the layer stays on its lazy mount")
	}
	l.finish(mp, dir, err)
	if err != nil {
		l.mu.Lock()
		l.failed[mp] = rec.layer
		l.mu.Unlock()
	}
}

func (l *localizer) finish(mp, dir string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.inflight, mp)
	if dir != "" && err == nil {
		l.done[mp] = dir
	}
}

// completedLocal reports the unpacked directory of the layer mounted at mp
// when a previous unpack of that layer completed.
func completedLocal(mp string, layer digest.Digest) (string, bool) {
	snDir := filepath.Dir(mp)
	b, err := os.ReadFile(filepath.Join(snDir, localDoneName))
	if err != nil || strings.TrimSpace(string(b)) != layer.String() {
		return "", false
	}
	dir := filepath.Join(snDir, localDirName)
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		return "", false
	}
	return dir, true
}

// unpackLocal decompresses the verified blob of layer into
// snDir/lazybase-local the way containerd unpacks a layer for overlayfs
// (whiteouts as 0/0 character devices, opaque directories as the
// trusted.overlay.opaque attribute), leaving out eStargz's own entries
// (TOC and landmarks) as the lazy mount does. The directory appears
// complete or not at all: it is unpacked under a temporary name, renamed,
// and only then marked done.
func unpackLocal(ctx context.Context, snDir string, layer digest.Digest, ra content.ReaderAt) (string, error) {
	dir := filepath.Join(snDir, localDirName)
	tmp := dir + ".tmp"
	for _, p := range []string{tmp, dir, filepath.Join(snDir, localDoneName)} {
		if err := os.RemoveAll(p); err != nil {
			return "", fmt.Errorf("layer %s: clearing %s: %w", layer, p, err)
		}
	}
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return "", fmt.Errorf("layer %s: %w", layer, err)
	}
	err := func() error {
		dr, err := compression.DecompressStream(io.NewSectionReader(ra, 0, ra.Size()))
		if err != nil {
			return err
		}
		defer dr.Close()
		if _, err := archive.Apply(ctx, tmp, dr,
			archive.WithConvertWhiteout(archive.OverlayConvertWhiteout),
			archive.WithFilter(skipEStargzEntries)); err != nil {
			return err
		}
		return nil
	}()
	if err == nil {
		err = os.Rename(tmp, dir)
	}
	if err == nil {
		err = writeFileSync(filepath.Join(snDir, localDoneName), []byte(layer.String()+"\n"))
	}
	if err != nil {
		os.RemoveAll(tmp)
		os.RemoveAll(dir)
		return "", fmt.Errorf("layer %s: unpacking into %s: %w", layer, dir, err)
	}
	return dir, nil
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

// rewrite returns mounts with every lazily mounted layer that has been
// unpacked replaced by its unpacked directory: in overlay lowerdir lists
// and as the source of bind mounts. Mounts in user-xattr mode (whose
// opaque markers differ) are left alone.
func (l *localizer) rewrite(mounts []mount.Mount) []mount.Mount {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.done) == 0 {
		return mounts
	}
	out := make([]mount.Mount, len(mounts))
	for i, m := range mounts {
		out[i] = m
		switch m.Type {
		case "bind", "rbind":
			if dir, ok := l.done[m.Source]; ok {
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
					if local, ok := l.done[d]; ok {
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

// localDir returns the unpacked directory of the layer mounted at mp, ""
// when it has none.
func (l *localizer) localDir(mp string) string {
	if l == nil {
		return ""
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.done[mp]
}

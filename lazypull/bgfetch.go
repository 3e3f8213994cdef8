package lazypull

import (
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/metadata"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/cpuacct"
)

// backgroundFetch decides, layer by layer, whether stargz's background
// fetch may decompress a lazily mounted layer whole into the cache
// (background_fetch.enable).
//
// It may not for a layer whose blob the export guard holds, is fetching
// or will fetch: the guard's transfer already brings the whole blob, and
// the reads the build makes are served on demand from that local copy
// (exportguard.BlobSource); decompressing the rest of the layer as well,
// while the build has the CPU, is work the build does not need. Layers
// of lazy-only images, which the guard skips, keep their background
// fetch; so does every layer when guard.enable is false. A background
// fetch that runs pauses its decompression while reads of the build
// decompress (demandFile, backgroundFile): stargz's own pause covers its
// blob reads only.
//
// stargz has no per-layer switch for its background fetch, but it walks
// the layer through a clone of the layer's metadata reader, the only
// clone it makes (fs/layer backgroundFetch, reader.Cache with a reader):
// the checking store (tocstore.go) hands out clones whose walk ends as
// soon as decline says so. The walk checks before each file, so a layer
// handed to the guard after its mount (the same chain mounted for a
// lazy-only image first) stops within a file.
//
// Clones know their layer only by TOC digest; the mounts tell which
// layer digests carry it. trackingFS records each mount here before the
// upstream filesystem mounts it, so the mount's labels decide until the
// guard has been told about the layer.
type backgroundFetch struct {
	// demand counts the reads of layer files (FUSE reads and prefetch)
	// that are decompressing from a blob now; lastDemand is when the
	// count last fell to zero (UnixNano). The background fetch of any
	// layer waits until none has run for demandQuiet.
	demand     atomic.Int64
	lastDemand atomic.Int64

	mu     sync.Mutex
	mounts map[string]bgMount // by mountpoint
	// holds is the export guard's exportguard.Trigger.Holds; nil without
	// a guard.
	holds func(digest.Digest) (held, known bool)
	// logged holds the TOC digests whose decline was logged.
	logged map[digest.Digest]bool
	// times records when each layer's fetch ran (bgtimes.go).
	times bgTimes
}

// bgMount is one lazy mount as backgroundFetch sees it.
type bgMount struct {
	toc   digest.Digest
	layer digest.Digest
	// guarded is true when the mount's policy mode hands the layer's blob
	// to the export guard (every mode but lazy-only).
	guarded bool
}

func newBackgroundFetch() *backgroundFetch {
	return &backgroundFetch{
		mounts: map[string]bgMount{}, logged: map[digest.Digest]bool{},
	}
}

// attach makes holds (the export guard's Trigger.Holds) the judge of
// which blobs the guard holds; nil detaches it.
func (b *backgroundFetch) attach(holds func(digest.Digest) (held, known bool)) {
	if b == nil {
		return
	}
	b.mu.Lock()
	b.holds = holds
	b.mu.Unlock()
}

// mounted records the lazy mount at mp with its snapshot labels. A mount
// without a TOC or layer digest is not recorded: its background fetch
// runs.
func (b *backgroundFetch) mounted(mp string, labels map[string]string) {
	if b == nil {
		return
	}
	toc, err := digest.Parse(labels[tocDigestLabel])
	if err != nil {
		return
	}
	layer, err := digest.Parse(layerDigest(labels))
	if err != nil {
		return
	}
	b.mu.Lock()
	b.mounts[mp] = bgMount{toc: toc, layer: layer, guarded: guardedMode(Mode(snapshotMode(labels)))}
	b.mu.Unlock()
}

// unmounted forgets the mount at mp.
func (b *backgroundFetch) unmounted(mp string) {
	if b == nil {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	m, ok := b.mounts[mp]
	delete(b.mounts, mp)
	if !ok {
		return
	}
	for _, o := range b.mounts {
		if o.toc == m.toc {
			return
		}
	}
	delete(b.logged, m.toc)
	b.times.forget(m.toc)
}

// decline reports whether the background fetch of the layers whose TOC
// digest is toc is to stop, and which layer the guard holds.
func (b *backgroundFetch) decline(toc digest.Digest) (digest.Digest, bool) {
	if b == nil {
		return "", false
	}
	b.mu.Lock()
	holds := b.holds
	var ms []bgMount
	for _, m := range b.mounts {
		if m.toc == toc {
			ms = append(ms, m)
		}
	}
	b.mu.Unlock()
	return declineBackgroundFetch(ms, holds)
}

// declineBackgroundFetch is decline's rule for the mounts ms of one TOC:
// without a guard (holds nil) never; otherwise when the guard holds the
// blob of one of them, or has not been told about it yet and the mount's
// mode hands it to the guard.
func declineBackgroundFetch(ms []bgMount, holds func(digest.Digest) (held, known bool)) (digest.Digest, bool) {
	if holds == nil {
		return "", false
	}
	for _, m := range ms {
		held, known := holds(m.layer)
		if held || (!known && m.guarded) {
			return m.layer, true
		}
	}
	return "", false
}

// guardedMode reports whether the export guard materializes, sooner or
// later, the blob of a layer mounted lazily under mode m.
func guardedMode(m Mode) bool {
	w, ok := whenOf(m)
	return ok && w != exportguard.WhenNever
}

// backgroundReader is the metadata reader of a layer's background fetch:
// its walk (ForeachChild) ends once decline says so, and its file reads
// pause while the build's are pending (backgroundFile).
type backgroundReader struct {
	*checkedReader
	bg *backgroundFetch
}

// ForeachChild calls f for the children of id until f returns false or
// the background fetch of the layer is declined.
func (r *backgroundReader) ForeachChild(id uint32, f func(name string, id uint32, mode os.FileMode) bool) error {
	toc := r.TOCDigest()
	err := r.checkedReader.ForeachChild(id, func(name string, cid uint32, mode os.FileMode) bool {
		if layer, ok := r.bg.decline(toc); ok {
			r.bg.logDecline(toc, layer)
			r.bg.times.declined(toc)
			return false
		}
		return f(name, cid, mode)
	})
	if id == r.RootID() {
		r.bg.times.walked(toc, time.Now())
	}
	return err
}

// logDecline logs, once per TOC, that the background fetch of layer stops.
func (b *backgroundFetch) logDecline(toc, layer digest.Digest) {
	b.mu.Lock()
	first := !b.logged[toc]
	b.logged[toc] = true
	b.mu.Unlock()
	if first {
		log.L.WithField("layer", layer).Info("background fetch declined: the export guard holds this layer's blob; reads are served from it on demand")
	}
}

// OpenFileWithPreReader opens a file for the background fetch: its reads
// wait while reads of the build are pending.
func (r *backgroundReader) OpenFileWithPreReader(id uint32, preRead func(id uint32, chunkOffset, chunkSize int64, chunkDigest string, r io.Reader) error) (metadata.File, error) {
	f, err := r.checkedReader.OpenFileWithPreReader(id, preRead)
	if err != nil {
		return nil, err
	}
	return &backgroundFile{File: f, bg: r.bg, toc: r.TOCDigest()}, nil
}

// OpenFile is OpenFileWithPreReader without a pre-reader.
func (r *backgroundReader) OpenFile(id uint32) (metadata.File, error) {
	f, err := r.checkedReader.OpenFile(id)
	if err != nil {
		return nil, err
	}
	return &backgroundFile{File: f, bg: r.bg, toc: r.TOCDigest()}, nil
}

// Timing of the background fetch's pauses for the build's reads.
const (
	// demandQuiet is how long no read of the build must have run before
	// the background fetch decompresses again.
	demandQuiet = 100 * time.Millisecond
	// demandPoll is how often a paused background fetch looks again.
	demandPoll = 10 * time.Millisecond
)

// backgroundFile is a file of a layer's background fetch: each read,
// which decompresses from the blob, first waits while reads of the build
// (demandFile) are pending and for demandQuiet after them.
type backgroundFile struct {
	metadata.File
	bg  *backgroundFetch
	toc digest.Digest
}

func (f *backgroundFile) ReadAt(p []byte, off int64) (n int, err error) {
	f.bg.yield()
	f.bg.times.readStarted(f.toc)
	defer func() { f.bg.times.readDone(f.toc, time.Now()) }()
	// One unit of the CPU account: fetching and decompressing the read.
	span := cpuacct.Default.Start(cpuacct.BackgroundFetch)
	defer span.End()
	return f.File.ReadAt(p, off)
}

// yield returns once no demand read has run for demandQuiet.
func (b *backgroundFetch) yield() {
	for {
		if b.demand.Load() > 0 {
			time.Sleep(demandPoll)
			continue
		}
		quiet := time.Since(time.Unix(0, b.lastDemand.Load()))
		if quiet >= demandQuiet {
			return
		}
		time.Sleep(demandQuiet - quiet)
	}
}

// demandFile is a file read on demand (a FUSE read or the prefetch): its
// reads are counted while they run, so that background fetches pause.
type demandFile struct {
	metadata.File
	bg *backgroundFetch
}

func (f *demandFile) ReadAt(p []byte, off int64) (int, error) {
	f.bg.demand.Add(1)
	defer func() {
		if f.bg.demand.Add(-1) == 0 {
			f.bg.lastDemand.Store(time.Now().UnixNano())
		}
	}()
	// One unit of the CPU account: fetching and decompressing the read.
	span := cpuacct.Default.Start(cpuacct.OnDemand)
	defer span.End()
	return f.File.ReadAt(p, off)
}

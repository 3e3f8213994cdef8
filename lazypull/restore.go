package lazypull

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/containerd/log"
)

// restoreParallelism is how many lazy mounts a starting daemon restores
// at once.
const restoreParallelism = 4

// restoreRetryAfter is how long a restore that failed (registry down)
// keeps failing before a request for its layer tries it again; a variable
// for tests.
var restoreRetryAfter = 5 * time.Second

// errRestoreDropped is the error of a restore whose snapshot was removed
// before it ran.
var errRestoreDropped = errors.New("snapshot removed before its lazy mount was restored")

// restorer holds the lazy mounts a starting daemon restores: the upstream
// snapshotter mounts again, while it starts, every lazy snapshot a previous
// daemon left, each mount fetching the layer's TOC from its registry. Done
// there, the daemon would listen only once every layer is mounted, and
// containerd's connection times out meanwhile. A trackingFS in deferring
// mode records those mounts instead (defer), and the daemon restores them
// after it listens (start); a request that needs a layer not restored yet
// (Check, before any Mounts, Prepare or View hands it out) waits for that
// layer's restore, runs it first if no worker has, and retries a failed one
// once restoreRetryAfter passed.
type restorer struct {
	mount func(ctx context.Context, mountpoint string, labels map[string]string) error

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	deferring bool
	started   bool
	pending   map[string]*restoreMount // by mountpoint, until mounted or dropped
	order     []*restoreMount
}

// restoreMount is one lazy mount to restore.
type restoreMount struct {
	mountpoint string
	labels     map[string]string

	// Guarded by the restorer's lock.
	running bool
	done    chan struct{} // closed when the attempt under way ends
	tried   time.Time     // when the last attempt ended
	err     error         // of the last attempt
	dropped bool
}

func newRestorer(mount func(ctx context.Context, mountpoint string, labels map[string]string) error) *restorer {
	ctx, cancel := context.WithCancel(context.Background())
	return &restorer{mount: mount, ctx: ctx, cancel: cancel, pending: map[string]*restoreMount{}}
}

// deferMounts makes mounts queue until start (on true) or go through
// again (false).
func (r *restorer) deferMounts(on bool) {
	r.mu.Lock()
	r.deferring = on
	r.mu.Unlock()
}

// add queues the mount of labels at mountpoint when r is deferring; ok is
// false when it is not, and the caller mounts.
func (r *restorer) add(ctx context.Context, mountpoint string, labels map[string]string) (ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.deferring {
		return false
	}
	rm := &restoreMount{mountpoint: mountpoint, labels: labels}
	r.pending[mountpoint] = rm
	r.order = append(r.order, rm)
	log.G(ctx).WithField("mountpoint", mountpoint).Debug("lazy mount restored once the daemon listens")
	return true
}

// queued returns the mounts still waiting, in the order the snapshotter
// asked for them.
func (r *restorer) queued() []*restoreMount {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*restoreMount
	for _, rm := range r.order {
		if r.pending[rm.mountpoint] == rm {
			out = append(out, rm)
		}
	}
	return out
}

// start restores every queued mount in the background, restoreParallelism
// at a time. It is called once the daemon listens.
func (r *restorer) start() {
	r.mu.Lock()
	if r.started {
		r.mu.Unlock()
		return
	}
	r.started = true
	order := r.order
	r.mu.Unlock()
	if len(order) == 0 {
		return
	}
	log.G(r.ctx).WithField("mounts", len(order)).Info("restoring the lazy mounts of the previous daemon")
	start := time.Now()
	sem := make(chan struct{}, restoreParallelism)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		var wg sync.WaitGroup
		for _, rm := range order {
			select {
			case sem <- struct{}{}:
			case <-r.ctx.Done():
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				_ = r.ensure(r.ctx, rm, false)
			}()
		}
		wg.Wait()
		st := r.status()
		log.G(r.ctx).WithFields(log.Fields{"mounts": len(order), "failed": len(st.Failed), "duration": time.Since(start)}).
			Info("restored the lazy mounts of the previous daemon")
	}()
}

// wait returns once the lazy mount at mountpoint is restored, at once when
// it is not waiting for a restore; it runs the restore itself when no one
// has yet, and again when the last one failed more than restoreRetryAfter
// ago. The error is the restore's.
func (r *restorer) wait(ctx context.Context, mountpoint string) error {
	r.mu.Lock()
	rm, ok := r.pending[mountpoint]
	r.mu.Unlock()
	if !ok {
		return nil
	}
	return r.ensure(ctx, rm, true)
}

// ensure runs rm's restore, or waits for the one under way, and returns
// its error. A restore that failed is run again only when retry is set and
// restoreRetryAfter passed; else its error is returned.
func (r *restorer) ensure(ctx context.Context, rm *restoreMount, retry bool) error {
	r.mu.Lock()
	switch {
	case rm.dropped:
		r.mu.Unlock()
		return errRestoreDropped
	case r.pending[rm.mountpoint] != rm:
		r.mu.Unlock()
		return nil // mounted
	case rm.running:
	case !rm.tried.IsZero() && (!retry || time.Since(rm.tried) < restoreRetryAfter):
		err := rm.err
		r.mu.Unlock()
		return err
	default:
		rm.running = true
		rm.done = make(chan struct{})
		r.wg.Add(1)
		go r.run(rm)
	}
	done := rm.done
	r.mu.Unlock()
	select {
	case <-done:
	case <-ctx.Done():
		return ctx.Err()
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pending[rm.mountpoint] != rm && !rm.dropped {
		return nil
	}
	if rm.dropped {
		return errRestoreDropped
	}
	return rm.err
}

// run mounts rm with the restorer's context: the mount outlives the
// request that asked for it.
func (r *restorer) run(rm *restoreMount) {
	defer r.wg.Done()
	ctx := layerLogger(r.ctx, rm.labels)
	err := r.ctx.Err()
	if err == nil {
		err = r.mount(ctx, rm.mountpoint, rm.labels)
	}
	r.mu.Lock()
	rm.running = false
	rm.tried = time.Now()
	rm.err = err
	if err == nil && r.pending[rm.mountpoint] == rm {
		delete(r.pending, rm.mountpoint)
	}
	close(rm.done)
	r.mu.Unlock()
	if err != nil && r.ctx.Err() == nil {
		log.G(ctx).WithError(err).WithField("mountpoint", rm.mountpoint).
			Warn("restoring a lazy mount failed; requests for this layer retry it")
	}
}

// drop forgets the restore of mountpoint (its snapshot is being removed
// or the daemon stops): a restore under way is waited for, one not run
// yet never runs. It reports whether mountpoint was waiting.
func (r *restorer) drop(mountpoint string) bool {
	r.mu.Lock()
	rm, ok := r.pending[mountpoint]
	if !ok {
		r.mu.Unlock()
		return false
	}
	rm.dropped = true
	delete(r.pending, mountpoint)
	running, done := rm.running, rm.done
	r.mu.Unlock()
	if running {
		<-done
	}
	return true
}

// stop cancels the restores under way and waits for them.
func (r *restorer) stop() {
	r.cancel()
	r.wg.Wait()
}

// RestoreStatus is where the restore of the previous daemon's lazy mounts
// stands.
type RestoreStatus struct {
	// Pending counts the mounts not restored yet (failed ones included).
	Pending int `json:"pending"`
	// Failed lists the mounts whose last restore failed; a request for
	// their layer tries again.
	Failed []RestoreFailure `json:"failed,omitempty"`
}

// RestoreFailure is a lazy mount whose restore failed.
type RestoreFailure struct {
	Mountpoint string    `json:"mountpoint"`
	Image      string    `json:"image"`
	Layer      string    `json:"layer"`
	Error      string    `json:"error"`
	Tried      time.Time `json:"tried"`
}

func (r *restorer) status() RestoreStatus {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := RestoreStatus{Pending: len(r.pending)}
	for mp, rm := range r.pending {
		if rm.err != nil && !rm.running {
			st.Failed = append(st.Failed, RestoreFailure{
				Mountpoint: mp, Image: imageRef(rm.labels), Layer: layerDigest(rm.labels),
				Error: rm.err.Error(), Tried: rm.tried,
			})
		}
	}
	sort.Slice(st.Failed, func(i, j int) bool { return st.Failed[i].Mountpoint < st.Failed[j].Mountpoint })
	return st
}

// restoreError names the layer whose restore failed.
func restoreError(mountpoint string, labels map[string]string, err error) error {
	return fmt.Errorf("layer %s of image %s (mountpoint %s) not restored: %w", layerDigest(labels), imageRef(labels), mountpoint, err)
}

package exportguard

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// errClosing is the barrier's error when the Trigger closes under it.
var errClosing = errors.New("export guard closed: the daemon is stopping")

// barrierLayer is one layer a barrier waits for.
type barrierLayer struct {
	image string // as the barrier was asked for it
	key   layerKey
}

// Barrier waits until every lazily mounted layer of images is materialized
// in namespace ns, starting at once those still waiting for their delay and
// trying again those that failed or whose blob left the content store. It
// fails at once for an image none of whose layers the Trigger was told
// about in ns, and for a layer mounted WhenNever. progress, when not nil,
// sees each layer whenever its state changes. It returns the last state of
// every layer waited for, and an error naming each image and layer at
// fault.
//
// Barrier does not poll: it wakes when a layer's state changes, when ctx
// ends and when the Trigger closes.
func (t *Trigger) Barrier(ctx context.Context, ns string, images []string, progress func(LayerStatus)) ([]LayerStatus, error) {
	wait, err := t.barrierLayers(ctx, ns, images)
	if err != nil {
		return nil, err
	}
	for _, b := range wait {
		t.mu.Lock()
		l := t.layers[b.key]
		t.mu.Unlock()
		if err := t.hurry(ctx, l); err != nil {
			return nil, err
		}
	}
	last := make([]State, len(wait))
	for {
		t.mu.Lock()
		snap := make([]LayerStatus, len(wait))
		for i, b := range wait {
			// By key: a new mount may have replaced a failed layer.
			snap[i] = t.layers[b.key].status()
		}
		changed, closed := t.changed, t.closed
		t.mu.Unlock()
		var (
			pending int
			failed  []error
		)
		for i, st := range snap {
			if progress != nil && last[i] != st.State {
				progress(st)
			}
			last[i] = st.State
			switch st.State {
			case StateMaterialized:
			case StateFailed:
				if strings.Contains(st.Error, st.Layer) {
					failed = append(failed, fmt.Errorf("export guard failed: %s", st.Error))
				} else {
					failed = append(failed, fmt.Errorf("image %s layer %s: export guard failed: %s", wait[i].image, st.Layer, st.Error))
				}
			default:
				pending++
			}
		}
		if pending == 0 {
			return snap, errors.Join(failed...)
		}
		if closed {
			return snap, errClosing
		}
		select {
		case <-ctx.Done():
			var still []string
			for i, st := range snap {
				if st.State != StateMaterialized && st.State != StateFailed {
					still = append(still, fmt.Sprintf("image %s layer %s %s", wait[i].image, st.Layer, st.State))
				}
			}
			return snap, errors.Join(append(failed, fmt.Errorf("%w waiting for %s", ctx.Err(), strings.Join(still, ", ")))...)
		case <-changed:
		}
	}
}

// barrierLayers returns the layers of images the Trigger knows in ns, each
// once, or an error naming every image it cannot wait for.
func (t *Trigger) barrierLayers(ctx context.Context, ns string, images []string) ([]barrierLayer, error) {
	if len(images) == 0 {
		return nil, errors.New("no image to wait for")
	}
	var (
		wait []barrierLayer
		errs []error
		seen = map[layerKey]bool{}
	)
	for _, img := range images {
		dgsts, err := t.reg.ImageLayers(ctx, img)
		if err != nil {
			errs = append(errs, fmt.Errorf("image %s: %w", img, err))
			continue
		}
		t.mu.Lock()
		var mine []barrierLayer
		for _, d := range dgsts {
			key := layerKey{ns, d}
			l, ok := t.layers[key]
			if !ok {
				continue // not mounted lazily: pulled in full, or not mounted
			}
			if l.state == StateSkipped {
				errs = append(errs, fmt.Errorf("image %s layer %s: lazy-only policy: never materialized; an export of this image fetches it", img, d))
			}
			mine = append(mine, barrierLayer{image: img, key: key})
		}
		var elsewhere []string
		if len(mine) == 0 {
			elsewhere = t.namespacesOfLocked(dgsts, ns)
		}
		t.mu.Unlock()
		if len(mine) == 0 {
			msg := fmt.Sprintf("image %s: not mounted by this daemon in namespace %s", img, ns)
			if len(elsewhere) > 0 {
				msg += " (mounted in namespace " + strings.Join(elsewhere, ", ") + ")"
			}
			errs = append(errs, errors.New(msg))
			continue
		}
		for _, b := range mine {
			if !seen[b.key] {
				seen[b.key] = true
				wait = append(wait, b)
			}
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return wait, nil
}

// namespacesOfLocked returns the namespaces other than ns in which any of
// dgsts was mounted lazily. t.mu is held.
func (t *Trigger) namespacesOfLocked(dgsts []digest.Digest, ns string) []string {
	set := map[string]bool{}
	for _, d := range dgsts {
		for k := range t.layers {
			if k.digest == d && k.ns != ns {
				set[k.ns] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// hurry makes l move towards the content store now: a layer waiting for
// its delay starts, a failed one starts again, and a materialized one whose
// blob is no longer in the content store is fetched again.
func (t *Trigger) hurry(ctx context.Context, l *layer) error {
	t.mu.Lock()
	state := l.state
	if state == StateScheduled && l.wake != nil {
		close(l.wake)
		l.wake = nil
		log.G(ctx).WithFields(log.Fields{"layer": l.digest, "namespace": l.ns, "image": l.image}).
			Info("export guard: barrier asks for this blob; materializing it now")
	}
	t.mu.Unlock()
	switch state {
	case StateMaterialized:
		store, _, err := t.stores.Open(ctx)
		if err != nil {
			return fmt.Errorf("containerd at %s: %w", t.o.storeName, err)
		}
		_, err = store.Info(t.stores.WithNamespace(ctx, l.ns), l.digest)
		if err == nil {
			return nil
		}
		if !errdefs.IsNotFound(err) {
			return fmt.Errorf("layer %s in namespace %s: %w", l.digest, l.ns, err)
		}
		log.G(ctx).WithFields(log.Fields{"layer": l.digest, "namespace": l.ns}).
			Warn("export guard: a materialized blob left the content store; fetching it again")
		return t.restart(l, StateMaterialized)
	case StateFailed:
		return t.restart(l, StateFailed)
	}
	return nil
}

// restart runs l's transfer again if it is still in state from.
func (t *Trigger) restart(l *layer, from State) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return errClosing
	}
	if l.state != from {
		return nil // another barrier or a new mount got there first
	}
	l.state, l.err, l.present, l.updated = StateScheduled, "", false, time.Now()
	t.notifyLocked()
	t.wg.Add(1)
	go func() {
		defer t.wg.Done()
		t.materialize(l)
	}()
	return nil
}

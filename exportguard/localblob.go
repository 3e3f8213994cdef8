package exportguard

import (
	"context"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// LocalBlob opens the blob dgst in the content store of a namespace the
// Trigger materialized it in; ok is false when it has none that it can
// read at the size it verified. A layer the Trigger was just told about
// (a daemon that restarts tells it about every layer it mounts again) is
// looked up in its namespace's content store until the Trigger's own
// check ran, so that a blob committed before the restart is read locally
// from the first read on. The caller closes ra.
func (t *Trigger) LocalBlob(ctx context.Context, dgst digest.Digest) (ra content.ReaderAt, ok bool) {
	type where struct {
		ns   string
		size int64 // -1: ask the store
	}
	var cands, unchecked []where
	t.mu.Lock()
	for k, l := range t.layers {
		switch {
		case k.digest != dgst:
		case l.present || l.inStore:
			cands = append(cands, where{k.ns, l.size})
		case !l.checked:
			unchecked = append(unchecked, where{k.ns, -1})
		}
	}
	t.mu.Unlock()
	cands = append(cands, unchecked...)
	if len(cands) == 0 {
		return nil, false
	}
	store, _, err := t.stores.Open(ctx)
	if err != nil {
		log.G(ctx).WithError(err).WithField("digest", dgst).Debug("blob source: content store not reachable")
		return nil, false
	}
	for _, c := range cands {
		nctx := t.stores.WithNamespace(ctx, c.ns)
		if c.size < 0 {
			info, err := store.Info(nctx, dgst)
			if err != nil {
				continue
			}
			c.size = info.Size
		}
		ra, err := store.ReaderAt(nctx, ocispec.Descriptor{Digest: dgst, Size: c.size})
		if err != nil {
			log.G(ctx).WithError(err).WithFields(log.Fields{"digest": dgst, "namespace": c.ns}).Debug("blob source: materialized blob not readable")
			continue
		}
		if ra.Size() != c.size {
			ra.Close()
			continue
		}
		return ra, true
	}
	return nil, false
}

// Promote ends the delay of every layer of blob dgst still waiting for it:
// the lazy filesystem is fetching the blob in earnest, and one transfer
// should serve both.
func (t *Trigger) Promote(dgst digest.Digest) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, l := range t.layers {
		if k.digest != dgst || l.state != StateScheduled || l.wake == nil {
			continue
		}
		close(l.wake)
		l.wake = nil
		t.promotions.Inc()
		log.G(t.ctx).WithFields(log.Fields{"layer": dgst, "namespace": l.ns, "image": l.image}).
			Info("export guard: the lazy filesystem is fetching this blob; materializing it now so that one transfer serves both")
	}
}

// Holds reports whether the Trigger holds blob dgst, or will: a layer of
// that digest in some namespace is waiting for its delay, being
// materialized, or materialized. known is false when no namespace has
// told the Trigger about the digest; a skipped (WhenNever) or failed layer
// is known and not held. A lazy filesystem need not decompress a held
// layer whole into its cache: its reads are served on demand from the
// blob the Trigger commits (LocalBlob).
func (t *Trigger) Holds(dgst digest.Digest) (held, known bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for k, l := range t.layers {
		if k.digest != dgst {
			continue
		}
		known = true
		switch l.state {
		case StateScheduled, StateMaterializing, StateMaterialized:
			return true, true
		}
	}
	return false, known
}

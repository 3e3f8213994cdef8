package exportguard

import (
	"container/list"
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// LabelSnapshotRef is the label lazybase puts on the snapshot of each
// layer it mounts lazily, with the layer's digest as value. containerd's
// garbage collection reads every "containerd.io/gc.ref.content.*" label of
// a snapshot as a reference to that content: a blob the guard committed
// lives as long as a snapshot of its layer exists in the namespace, and
// no longer unless something else (an image, a BuildKit record, the
// retention lease) references it.
const LabelSnapshotRef = "containerd.io/gc.ref.content.dev.lazybase.layer"

// transferLeaseExpiry bounds the life of the lease a transfer runs under
// when the process dies before it deletes the lease.
const transferLeaseExpiry = 24 * time.Hour

// WithRetention makes the Guard hold blobs only as long as something uses
// them. Each transfer writes and commits under a lease of its own, created
// in m and deleted once the blob is committed (a failed transfer's lease
// keeps its partial ingest for the next attempt to resume, and expires
// after a day): a committed blob is then held by what
// references it, such as a snapshot labelled LabelSnapshotRef, an image or
// a BuildKit lease. Besides, the lease id keeps the most recently
// materialized or found blobs up to maxBytes in all and releases the
// least recently used beyond; maxBytes 0 keeps none and deletes the lease.
//
// When the Guard first runs in a namespace it applies the same rule to
// what earlier lazybase versions held for ever: the blobs already in the
// lease id count against maxBytes, oldest first, and the
// containerd.io/gc.root label is removed from every blob Committed
// recognises. WithRetention conflicts with WithLease and WithGCRoot.
func WithRetention(m leases.Manager, id string, maxBytes int64) Option {
	return func(o *options) error {
		if m == nil {
			return errors.New("lease manager is nil")
		}
		if id == "" {
			return errors.New("retention lease id is empty")
		}
		if maxBytes < 0 {
			return fmt.Errorf("retention budget must not be negative, got %d", maxBytes)
		}
		o.leases, o.retain, o.maxBytes = m, id, maxBytes
		return nil
	}
}

// retention is the LRU byte budget of a Guard's retention lease.
type retention struct {
	store content.Store
	lm    leases.Manager
	id    string
	max   int64

	mu     sync.Mutex
	loaded bool
	order  *list.List // of *retained, most recently used first
	items  map[digest.Digest]*list.Element
	total  int64
}

type retained struct {
	digest digest.Digest
	size   int64
}

func newRetention(store content.Store, lm leases.Manager, id string, max int64) *retention {
	return &retention{store: store, lm: lm, id: id, max: max, order: list.New(), items: map[digest.Digest]*list.Element{}}
}

// load runs once per Guard: it takes over what the lease holds, enforces
// the budget and removes the GC root labels earlier versions set.
func (r *retention) load(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.loaded {
		return nil
	}
	if err := r.unroot(ctx); err != nil {
		return err
	}
	if r.max == 0 {
		if err := r.lm.Delete(ctx, leases.Lease{ID: r.id}); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("deleting lease %s: %w", r.id, err)
		}
		r.loaded = true
		return nil
	}
	if _, err := r.lm.Create(ctx, leases.WithID(r.id)); err != nil && !errdefs.IsAlreadyExists(err) {
		return fmt.Errorf("creating lease %s: %w", r.id, err)
	}
	rs, err := r.lm.ListResources(ctx, leases.Lease{ID: r.id})
	if err != nil {
		return fmt.Errorf("listing lease %s: %w", r.id, err)
	}
	var held []content.Info
	for _, res := range rs {
		if res.Type != "content" {
			continue
		}
		dgst, err := digest.Parse(res.ID)
		if err != nil {
			continue
		}
		info, err := r.store.Info(ctx, dgst)
		if err != nil {
			// Gone or unreadable: drop it from the lease.
			r.release(ctx, dgst)
			continue
		}
		held = append(held, info)
	}
	// Oldest first, so that the most recently updated end up in front.
	sort.Slice(held, func(i, j int) bool { return held[i].UpdatedAt.Before(held[j].UpdatedAt) })
	for _, info := range held {
		r.pushLocked(info.Digest, info.Size)
	}
	r.evictLocked(ctx)
	r.loaded = true
	return nil
}

// unroot removes containerd.io/gc.root from the blobs a Guard committed.
func (r *retention) unroot(ctx context.Context) error {
	var rooted []digest.Digest
	err := r.store.Walk(ctx, func(info content.Info) error {
		if _, ok := info.Labels[labelGCRoot]; ok {
			rooted = append(rooted, info.Digest)
		}
		return nil
	}, CommittedFilters()...)
	if err != nil {
		return fmt.Errorf("listing committed blobs: %w", err)
	}
	for _, dgst := range rooted {
		if _, err := r.store.Update(ctx, content.Info{Digest: dgst}, "labels."+labelGCRoot); err != nil && !errdefs.IsNotFound(err) {
			return fmt.Errorf("removing the GC root label of blob %s: %w", dgst, err)
		}
	}
	if len(rooted) > 0 {
		log.G(ctx).WithField("blobs", len(rooted)).Info("exportguard: GC root labels of earlier versions removed; the blobs live as long as something uses them")
	}
	return nil
}

// use marks dgst as just used, holding it in the lease within the budget.
func (r *retention) use(ctx context.Context, dgst digest.Digest, size int64) error {
	if err := r.load(ctx); err != nil {
		return err
	}
	if r.max == 0 || size > r.max {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if e, ok := r.items[dgst]; ok {
		r.order.MoveToFront(e)
		return nil
	}
	if err := r.lm.AddResource(ctx, leases.Lease{ID: r.id}, leases.Resource{ID: dgst.String(), Type: "content"}); err != nil {
		return fmt.Errorf("adding to lease %s: %w", r.id, err)
	}
	r.pushLocked(dgst, size)
	r.evictLocked(ctx)
	return nil
}

func (r *retention) pushLocked(dgst digest.Digest, size int64) {
	r.items[dgst] = r.order.PushFront(&retained{digest: dgst, size: size})
	r.total += size
}

// evictLocked releases the least recently used blobs beyond the budget.
func (r *retention) evictLocked(ctx context.Context) {
	for r.total > r.max && r.order.Len() > 0 {
		e := r.order.Back()
		it := e.Value.(*retained)
		r.order.Remove(e)
		delete(r.items, it.digest)
		r.total -= it.size
		r.release(ctx, it.digest)
		log.G(ctx).WithFields(log.Fields{"digest": it.digest, "size": it.size, "budget": r.max}).
			Debug("exportguard: blob released from the retention lease")
	}
}

func (r *retention) release(ctx context.Context, dgst digest.Digest) {
	err := r.lm.DeleteResource(ctx, leases.Lease{ID: r.id}, leases.Resource{ID: dgst.String(), Type: "content"})
	if err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("digest", dgst).Warn("exportguard: releasing blob from the retention lease")
	}
}

// heldBytes returns the bytes the retention lease holds.
func (r *retention) heldBytes() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.total
}

// transferLease creates the lease one transfer of dgst runs under and
// returns ctx carrying it and a function that deletes it, and with all
// (after the blob is committed) the leases earlier transfers of dgst kept
// for their partial ingests.
func transferLease(ctx context.Context, lm leases.Manager, dgst digest.Digest) (context.Context, func(all bool), error) {
	prefix := ingestPrefix + dgst.Encoded() + "-"
	id := fmt.Sprintf("%s%d", prefix, time.Now().UnixNano())
	l, err := lm.Create(ctx, leases.WithID(id), leases.WithExpiration(transferLeaseExpiry))
	if err != nil {
		return ctx, nil, fmt.Errorf("creating lease %s: %w", id, err)
	}
	return leases.WithLease(ctx, l.ID), func(all bool) {
		dctx := context.WithoutCancel(ctx)
		drop := []leases.Lease{l}
		if all {
			ls, err := lm.List(dctx, `id~="^`+prefix+`"`)
			if err != nil {
				log.G(ctx).WithError(err).WithField("digest", dgst).Warn("exportguard: listing transfer leases")
			}
			for _, o := range ls {
				if o.ID != l.ID && strings.HasPrefix(o.ID, prefix) {
					drop = append(drop, o)
				}
			}
		}
		for _, d := range drop {
			if err := lm.Delete(dctx, d); err != nil && !errdefs.IsNotFound(err) {
				log.G(ctx).WithError(err).WithField("lease", d.ID).Warn("exportguard: deleting transfer lease")
			}
		}
	}, nil
}

// SnapshotLabeler is implemented by Stores that can add LabelSnapshotRef
// to the snapshots containerd keeps of lazily mounted layers that lack it
// (those mounted by lazybase versions that did not set it). A Trigger
// calls LabelSnapshots once per namespace, with the namespace in ctx,
// before its Guard first releases anything there, so that blobs earlier
// versions held for ever stay while a snapshot of their layer exists.
type SnapshotLabeler interface {
	LabelSnapshots(ctx context.Context) error
}

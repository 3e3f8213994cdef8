package lazypull

import (
	"context"
	"maps"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"

	"github.com/lazybase/lazybase/exportguard"
)

// policySnapshotter applies the Policy to every Prepare before the upstream
// snapshotter sees it; every other method is the upstream one.
type policySnapshotter struct {
	snapshots.Snapshotter
	policy *Policy
	m      *metrics
	// lazy, when set, is told about every layer mounted lazily, with the
	// containerd namespace of the request in ctx.
	lazy func(ctx context.Context, plan preparePlan)
	// local, when set, replaces unpacked lazy layers in the mounts handed
	// out.
	local *exportguard.Unpacker
	// hideRemote drops the upstream snapshotter's remote-snapshot marker
	// from what Stat and Walk tell containerd (guard.enable).
	hideRemote bool
	// uses, when set, is told about every snapshot put in use over a
	// parent (Prepare, View) and released (Commit, Remove): the profile
	// publisher publishes an image once nothing uses it.
	uses useTracker
}

// useTracker is told about the snapshots in use; its methods must not
// block.
type useTracker interface {
	using(key, parent string)
	released(key string)
}

var _ snapshots.Snapshotter = (*policySnapshotter)(nil)

// Prepare declines the remote mount of layers that policy marks eager, that
// are not eStargz, or that come without an image reference, by handing the
// upstream snapshotter labels without the remote-snapshot keys; containerd
// then pulls and unpacks those layers normally.
func (s *policySnapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	var info snapshots.Info
	for _, o := range opts {
		if err := o(&info); err != nil {
			return nil, err
		}
	}
	plan := planPrepare(s.policy, info.Labels)
	if !plan.Candidate {
		mounts, err := s.Snapshotter.Prepare(ctx, key, parent, opts...)
		if err == nil && s.uses != nil {
			s.uses.using(key, parent)
		}
		return s.localMounts(mounts), err
	}
	decidedBy := "default"
	if plan.Decision.Rule >= 0 {
		decidedBy = "rule"
	}
	s.m.decisions.WithLabelValues(string(plan.Decision.Mode), decidedBy).Inc()
	l := log.G(ctx).WithFields(log.Fields{
		"image": plan.Ref,
		"layer": plan.Layer,
		"mode":  plan.Decision.Mode,
	})
	if !plan.Remote {
		s.m.fallbacks.WithLabelValues(plan.Reason).Inc()
		l.WithField("reason", plan.Reason).Infof("pulling layer normally: %s", plan.Detail)
	} else {
		l.Debug("mounting layer lazily")
	}
	if plan.Remote {
		if ns, ok := namespaces.Namespace(ctx); ok {
			plan.Labels[NamespaceLabel] = ns
		}
	}
	// snapshots.WithLabels merges, so the labels are replaced by an option of
	// our own, applied last; the plan's labels carry every label kept.
	mounts, err := s.Snapshotter.Prepare(ctx, key, parent, append(opts, replaceLabels(plan.Labels))...)
	mounts = s.localMounts(mounts)
	// The upstream snapshotter answers a successful remote mount with
	// "already exists": the layer's committed snapshot is there.
	if plan.Remote && errdefs.IsAlreadyExists(err) {
		s.dropDuplicate(ctx, key, l)
		if s.lazy != nil {
			s.lazy(ctx, plan)
		}
	}
	return mounts, err
}

// dropDuplicate removes the active snapshot key the upstream snapshotter
// mounted lazily but could not commit because a snapshot of the same
// chain is there already: the upstream snapshotter names committed remote
// snapshots by the chain alone, so a second containerd namespace pulling
// the same layers gets "already exists" and shares the first namespace's
// snapshot, and containerd's garbage collector would remove the duplicate
// some time later. Removing it now, with its directory and FUSE mount
// (Cleanup: the upstream snapshotter removes asynchronously), spares the
// mount and any work started on it.
func (s *policySnapshotter) dropDuplicate(ctx context.Context, key string, l *log.Entry) {
	info, err := s.Snapshotter.Stat(ctx, key)
	if err != nil || info.Kind != snapshots.KindActive {
		return // committed under its chain: the usual case
	}
	l = l.WithField("key", key)
	if err := s.Snapshotter.Remove(ctx, key); err != nil {
		l.WithError(err).Warn("removing the duplicate lazy mount of a layer another namespace mounted first; containerd's garbage collector removes it later")
		return
	}
	if err := s.Cleanup(ctx); err != nil {
		l.WithError(err).Warn("unmounting the duplicate lazy mount of a layer another namespace mounted first; containerd's next cleanup does")
		return
	}
	l.Info("layer shared with the snapshot another namespace mounted first; duplicate lazy mount removed")
}

// View is the upstream View with unpacked lazy layers in place of their
// lazy mounts.
func (s *policySnapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	mounts, err := s.Snapshotter.View(ctx, key, parent, opts...)
	if err == nil && s.uses != nil {
		s.uses.using(key, parent)
	}
	return s.localMounts(mounts), err
}

// Commit is the upstream Commit; the active snapshot key is no longer in
// use.
func (s *policySnapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	err := s.Snapshotter.Commit(ctx, name, key, opts...)
	if err == nil && s.uses != nil {
		s.uses.released(key)
	}
	return err
}

// Remove is the upstream Remove; the snapshot key is no longer in use.
func (s *policySnapshotter) Remove(ctx context.Context, key string) error {
	err := s.Snapshotter.Remove(ctx, key)
	if err == nil && s.uses != nil {
		s.uses.released(key)
	}
	return err
}

// Mounts is the upstream Mounts with unpacked lazy layers in place of
// their lazy mounts.
func (s *policySnapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	mounts, err := s.Snapshotter.Mounts(ctx, key)
	return s.localMounts(mounts), err
}

func (s *policySnapshotter) localMounts(mounts []mount.Mount) []mount.Mount {
	if s.local == nil || len(mounts) == 0 {
		return mounts
	}
	return s.local.Rewrite(mounts)
}

// replaceLabels is a snapshots.Opt that sets the labels to a copy of labels.
func replaceLabels(labels map[string]string) snapshots.Opt {
	return func(info *snapshots.Info) error {
		info.Labels = maps.Clone(labels)
		return nil
	}
}

// Stat is the upstream Stat; with hideRemote, without the remote-snapshot
// marker. BuildKit treats a layer whose snapshot carries the marker as lazy
// even when its blob is in the content store, and a buildkitd that starts
// again drops every cache record above a lazy layer ("missing descriptor
// handlers for lazy blobs"). Without the marker BuildKit decides by the
// content store alone: a layer whose blob the export guard committed is
// not lazy, its cache survives a restart and its export reads the blob.
func (s *policySnapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	info, err := s.Snapshotter.Stat(ctx, key)
	if err == nil && s.hideRemote {
		delete(info.Labels, remoteMarkerLabel)
	}
	return info, err
}

// Walk is the upstream Walk; with hideRemote, without the remote-snapshot
// marker. containerd copies the labels of the snapshot a remote Prepare
// found (by Walk) into its own metadata, and Stat merges those over the
// snapshotter's: the marker has to be hidden here too.
func (s *policySnapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	if !s.hideRemote {
		return s.Snapshotter.Walk(ctx, fn, filters...)
	}
	return s.Snapshotter.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		delete(info.Labels, remoteMarkerLabel)
		return fn(ctx, info)
	}, filters...)
}

package lazypull

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
)

// keptLocalDir is where, under the root, a stopping daemon keeps the
// unpacked directories of its lazy layers (local.enable), one per
// snapshot id, until the next daemon puts them back in place.
const keptLocalDir = "local-kept"

// startRestore restores the lazy mounts of the previous daemon, once Serve
// listens: it puts back the unpacked directories the previous daemon kept,
// tells the export guard about every lazy layer (whose blob it then finds
// in the content store if it committed it before), and mounts the layers
// again in the background.
func (d *Daemon) startRestore(ctx context.Context) {
	d.restoreLocal(ctx, d.fs.restore.queued())
	d.guardRestored(ctx)
	d.fs.restore.start()
}

// guardRestored hands every lazy snapshot of the previous daemon to the
// export guard, with the namespace of the Prepare that mounted it
// (NamespaceLabel; else the namespace of a key named as containerd names
// snapshots) and the policy mode it was mounted with: a layer whose blob is in that namespace's
// content store is materialized at once and read locally, one that is not
// is scheduled as its mode says.
func (d *Daemon) guardRestored(ctx context.Context) {
	if d.guard == nil {
		return
	}
	var n int
	err := d.base.Walk(ctx, func(ctx context.Context, info snapshots.Info) error {
		if _, ok := info.Labels[remoteMarkerLabel]; !ok {
			return nil
		}
		ref, layer := imageRef(info.Labels), layerDigest(info.Labels)
		lg := log.G(ctx).WithFields(log.Fields{"snapshot": info.Name, "image": ref, "layer": layer})
		ns, ok := info.Labels[NamespaceLabel], true
		if ns == "" {
			ns, ok = namespaceOfKey(info.Name)
		}
		if !ok {
			lg.Info("export guard: restored snapshot without its containerd namespace (mounted by an older lazybase); the guard learns of it when a build prepares it again")
			return nil
		}
		dgst, err := digest.Parse(layer)
		if err != nil {
			lg.WithError(err).Warn("export guard: restored snapshot with a bad layer digest")
			return nil
		}
		mode := Mode(snapshotMode(info.Labels))
		when, ok := whenOf(mode)
		if !ok {
			return nil
		}
		d.guard.Mounted(ctx, exportguard.MountEvent{Namespace: ns, Ref: ref, Layer: dgst, Mode: string(mode), When: when})
		n++
		return nil
	})
	if err != nil {
		log.G(ctx).WithError(err).Warn("export guard: listing restored snapshots")
	}
	if n > 0 {
		log.G(ctx).WithField("layers", n).Info("export guard: told about the lazy layers of the previous daemon")
	}
}

// namespaceOfKey returns the containerd namespace of a snapshot key as
// containerd's metadata store names the snapshots of its snapshotters,
// "NAMESPACE/ID/KEY"; ok is false for a key of another shape.
func namespaceOfKey(key string) (string, bool) {
	ns, rest, ok := strings.Cut(key, "/")
	if !ok {
		return "", false
	}
	id, name, ok := strings.Cut(rest, "/")
	if !ok || name == "" {
		return "", false
	}
	if _, err := strconv.ParseUint(id, 10, 64); err != nil {
		return "", false
	}
	if identifiers.Validate(ns) != nil {
		return "", false
	}
	return ns, true
}

// keptLocal returns where the unpacked directory of the layer mounted at
// mountpoint (".../snapshots/ID/fs") is kept while no daemon runs.
func (d *Daemon) keptLocal(mountpoint string) string {
	return filepath.Join(d.cfg.Root, "snapshotter", keptLocalDir, filepath.Base(filepath.Dir(mountpoint)))
}

// keepLocal keeps the unpacked directories of the mounted lazy layers out
// of the snapshot directories, which the snapshotter removes when it
// closes, for the next daemon to put back (restoreLocal) instead of
// unpacking the layers again.
func (d *Daemon) keepLocal(ctx context.Context) {
	if d.local == nil {
		return
	}
	var kept int
	for mp := range d.fs.snapshot() {
		if d.local.LocalDir(mp) == "" {
			continue
		}
		ok, err := exportguard.KeepLocal(mp, d.keptLocal(mp))
		if err != nil {
			log.G(ctx).WithError(err).WithField("mountpoint", mp).Warn("keeping an unpacked layer for the next start; it is unpacked again then")
			continue
		}
		if ok {
			kept++
		}
	}
	if kept > 0 {
		log.G(ctx).WithField("layers", kept).Info("kept the unpacked lazy layers for the next start")
	}
}

// restoreLocal puts the unpacked directories a stopped daemon kept back
// next to the mountpoints of the lazy mounts to restore, when they are of
// the same layer, and removes whatever else was kept.
func (d *Daemon) restoreLocal(ctx context.Context, queued []*restoreMount) {
	root := filepath.Join(d.cfg.Root, "snapshotter", keptLocalDir)
	if _, err := os.Stat(root); err != nil {
		return
	}
	if d.local != nil {
		var back int
		for _, rm := range queued {
			dgst, err := digest.Parse(layerDigest(rm.labels))
			if err != nil {
				continue
			}
			ok, err := exportguard.RestoreLocal(d.keptLocal(rm.mountpoint), rm.mountpoint, dgst)
			if err != nil {
				log.G(ctx).WithError(err).WithField("mountpoint", rm.mountpoint).Warn("putting back an unpacked layer; it is unpacked again")
			}
			if ok {
				back++
			}
		}
		if back > 0 {
			log.G(ctx).WithField("layers", back).Info("put back the unpacked lazy layers of the previous daemon")
		}
	}
	if err := os.RemoveAll(root); err != nil {
		log.G(ctx).WithError(err).WithField("dir", root).Warn("removing kept unpacked layers")
	}
}

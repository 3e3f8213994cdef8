package lazypull

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/log"
)

// cacheDirs are the directories, under the daemon's root, in which the
// upstream lazy filesystem keeps the per-layer caches of the blobs it
// fetched (httpcache) and of the file contents it decompressed (fscache).
// Each layer it resolves gets a fresh directory of its own there, removed
// when the layer is released; the directories of a previous process are
// never reused.
var cacheDirs = []string{
	filepath.Join("stargz", "httpcache"),
	filepath.Join("stargz", "fscache"),
}

// sweepCaches removes what earlier processes left in the lazy filesystem's
// cache directories under root. It runs before the filesystem starts: the
// upstream filesystem makes a new directory for every layer it resolves
// and removes it only when the layer is released in the same process, so
// the caches of a daemon that stopped or died stay on disk otherwise,
// every restart adding its own.
func sweepCaches(ctx context.Context, root string) error {
	var errs []error
	removed := 0
	for _, d := range cacheDirs {
		dir := filepath.Join(root, d)
		ents, err := os.ReadDir(dir)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("cache directory %s: %w", dir, err))
			continue
		}
		for _, e := range ents {
			p := filepath.Join(dir, e.Name())
			if err := os.RemoveAll(p); err != nil {
				errs = append(errs, fmt.Errorf("removing stale cache %s: %w", p, err))
				continue
			}
			removed++
		}
	}
	if removed > 0 {
		log.G(ctx).WithField("entries", removed).Info("removed the lazy filesystem caches an earlier run left")
	}
	return errors.Join(errs...)
}

// Cleanup removes the directories of removed snapshots. The upstream
// snapshotter removes snapshots asynchronously (snapshot.AsynchronousRemove):
// Remove drops the record and leaves the directory, and containerd calls
// Cleanup after each garbage collection to reclaim the disk. Without this
// method the wrapped snapshotter does not implement snapshots.Cleaner,
// containerd's call is answered "not implemented", and the directories of
// every removed snapshot (the layers builds wrote, unpacked lazy layers)
// stay until the daemon stops.
func (s *policySnapshotter) Cleanup(ctx context.Context) error {
	c, ok := s.Snapshotter.(snapshots.Cleaner)
	if !ok {
		return nil
	}
	if err := c.Cleanup(ctx); err != nil {
		return fmt.Errorf("cleaning up removed snapshots: %w", err)
	}
	return nil
}

var _ snapshots.Cleaner = (*policySnapshotter)(nil)

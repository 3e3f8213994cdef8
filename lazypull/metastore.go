package lazypull

import (
	"context"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
)

// initMetaStore creates the buckets of a new snapshot metadata database
// at dbfile. containerd's storage creates them only with the first
// snapshot, but the upstream snapshotter's cleanup on Close lists them
// unconditionally: a daemon that never created a snapshot logged
// "failed to cleanup: bucket does not exist" on every stop. Creating and
// removing a placeholder snapshot in one transaction leaves the buckets
// and no snapshot. A database that already has them is not written.
func initMetaStore(ctx context.Context, dbfile string) error {
	ms, err := storage.NewMetaStore(dbfile)
	if err != nil {
		return fmt.Errorf("snapshot metadata %s: %w", dbfile, err)
	}
	defer ms.Close()
	err = ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		if _, err := storage.IDMap(ctx); !errdefs.IsNotFound(err) {
			return err
		}
		const key = "lazybase-init-placeholder"
		if _, err := storage.CreateSnapshot(ctx, snapshots.KindActive, key, ""); err != nil {
			return err
		}
		_, _, err := storage.Remove(ctx, key)
		return err
	})
	if err != nil {
		return fmt.Errorf("snapshot metadata %s: %w", dbfile, err)
	}
	return nil
}

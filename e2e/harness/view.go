package harness

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
)

// MountView creates the read-only snapshot key of the committed snapshot
// parent (an unpacked image's top chain ID) in snapshotter ("overlayfs" or
// LazySnapshotterName) through containerd, in the default namespace, as
// `ctr snapshots view` does but labelled as a garbage-collection root so
// that containerd keeps it while it is in use, and mounts it on the host
// at a new directory under the Stack's directory. release unmounts it and
// removes the snapshot.
func (c *Containerd) MountView(ctx context.Context, snapshotter, key, parent string) (dir string, release func() error, err error) {
	cl, err := client.New(c.Address)
	if err != nil {
		return "", nil, fmt.Errorf("containerd client %s: %w", c.Address, err)
	}
	ctx = namespaces.WithNamespace(ctx, c.Namespace)
	sn := cl.SnapshotService(snapshotter)
	ms, err := sn.View(ctx, key, parent, snapshots.WithLabels(map[string]string{
		"containerd.io/gc.root": time.Now().UTC().Format(time.RFC3339),
	}))
	if err != nil {
		cl.Close()
		return "", nil, fmt.Errorf("view %s of %s in %s: %w", key, parent, snapshotter, err)
	}
	removeSnapshot := func() error {
		defer cl.Close()
		if err := sn.Remove(context.WithoutCancel(ctx), key); err != nil {
			return fmt.Errorf("removing view %s from %s: %w", key, snapshotter, err)
		}
		return nil
	}
	dir = c.s.path("views", key)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", nil, errors.Join(err, removeSnapshot())
	}
	if err := mount.All(ms, dir); err != nil {
		return "", nil, errors.Join(fmt.Errorf("mounting view %s of %s at %s: %w", key, snapshotter, dir, err), removeSnapshot())
	}
	release = func() error {
		if err := mount.UnmountAll(dir, 0); err != nil {
			return errors.Join(fmt.Errorf("unmounting view %s: %w", dir, err), removeSnapshot())
		}
		return removeSnapshot()
	}
	return dir, release, nil
}

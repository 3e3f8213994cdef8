package lazypull

import (
	"context"
	"fmt"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/snapshots"
	snproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
)

// snapshotterName is the name containerd knows this daemon by: its proxy
// plugin must be named stargz for BuildKit to pass lazy-pull labels.
const snapshotterName = "stargz"

var _ exportguard.SnapshotLabeler = (*containerdStores)(nil)

// LabelSnapshots implements exportguard.SnapshotLabeler over containerd's
// snapshots API, for the namespace in ctx.
func (s *containerdStores) LabelSnapshots(ctx context.Context) error {
	s.mu.Lock()
	conn := s.conn
	s.mu.Unlock()
	if conn == nil {
		return nil // a store without containerd's API (tests)
	}
	return labelLazySnapshots(ctx, snproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), snapshotterName))
}

// labelLazySnapshots adds exportguard.LabelSnapshotRef to the snapshots
// in sn (containerd's view, with the labels containerd keeps) that
// lazybase mounted lazily before it set that label at mount: containerd
// copies a remote snapshot's labels once, when it records it, so these
// would otherwise never reference their layer's blob.
func labelLazySnapshots(ctx context.Context, sn snapshots.Snapshotter) error {
	var todo []snapshots.Info
	for _, f := range []string{`labels."` + ModeLabel + `"`, `labels."` + legacyModeLabel + `"`} {
		err := sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
			if _, ok := info.Labels[exportguard.LabelSnapshotRef]; ok || info.Kind != snapshots.KindCommitted {
				return nil
			}
			if _, fell := info.Labels[FallbackLabel]; fell {
				return nil // pulled normally: containerd holds its blob as it does any other
			}
			todo = append(todo, info)
			return nil
		}, f)
		if err != nil {
			return fmt.Errorf("listing lazy snapshots: %w", err)
		}
	}
	n := 0
	for _, info := range todo {
		d, err := digest.Parse(layerDigest(info.Labels))
		if err != nil {
			continue
		}
		up := snapshots.Info{Name: info.Name, Labels: map[string]string{exportguard.LabelSnapshotRef: d.String()}}
		if _, err := sn.Update(ctx, up, "labels."+exportguard.LabelSnapshotRef); err != nil {
			return fmt.Errorf("labelling snapshot %s of layer %s: %w", info.Name, d, err)
		}
		n++
	}
	if n > 0 {
		log.G(ctx).WithField("snapshots", n).Info("export guard: lazy snapshots of an earlier version now reference their layers' blobs")
	}
	return nil
}

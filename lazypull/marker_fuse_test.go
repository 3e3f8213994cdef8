package lazypull

import (
	"context"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestRemoteMarkerHiddenWithGuard: with the export guard on, Stat and Walk
// do not show the upstream remote-snapshot marker (BuildKit would treat a
// guarded layer as lazy and drop its cache on restart); with the guard off
// they do.
func TestRemoteMarkerHiddenWithGuard(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	for _, guard := range []bool{true, false} {
		td := startDaemon(t, "", func(c *Config) { c.Guard.Enable = guard })
		ctx := namespaces.WithNamespace(context.Background(), "test")
		if _, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
			t.Fatalf("guard %v: Prepare = %v, want a remote snapshot", guard, err)
		}
		info, err := td.sn.Stat(ctx, "chain-0")
		if err != nil {
			t.Fatal(err)
		}
		_, statHas := info.Labels[remoteMarkerLabel]
		walkHas, walked := false, 0
		if err := td.sn.Walk(ctx, func(_ context.Context, info snapshots.Info) error {
			walked++
			if _, ok := info.Labels[remoteMarkerLabel]; ok {
				walkHas = true
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if walked == 0 {
			t.Fatalf("guard %v: Walk saw no snapshot", guard)
		}
		if statHas == guard || walkHas == guard {
			t.Errorf("guard %v: marker in Stat %v, in Walk %v; want %v", guard, statHas, walkHas, !guard)
		}
		td.stop(t)
	}
}

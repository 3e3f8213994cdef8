package lazypull

import (
	"context"
	"io"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"
)

// TestVerifiedBlob: the local unpacker finds a layer's blob in the content
// store of the namespace the export guard materialized it in, and nothing
// for a layer the guard has not materialized.
func TestVerifiedBlob(t *testing.T) {
	e := newGuardEnv(t)
	g := e.trigger(t, guardCfg(0), 0, prometheus.NewRegistry())
	ctx := context.Background()
	if _, ok, err := g.verifiedBlob(ctx, e.layer); ok || err != nil {
		t.Fatalf("before materializing: ok=%v err=%v", ok, err)
	}
	g.mounted(ctx, mountEvent{Namespace: "buildkit", Ref: e.ref, Layer: e.layer, Mode: ModeExportBase})
	waitState(t, g, "buildkit", e.layer, GuardMaterialized)
	ra, ok, err := g.verifiedBlob(ctx, e.layer)
	if !ok || err != nil {
		t.Fatalf("after materializing: ok=%v err=%v", ok, err)
	}
	defer ra.Close()
	b, err := io.ReadAll(content.NewReader(ra))
	if err != nil {
		t.Fatal(err)
	}
	if got := digest.FromBytes(b); got != e.layer || int64(len(b)) != e.size {
		t.Fatalf("blob read back: %s (%d bytes), want %s (%d)", got, len(b), e.layer, e.size)
	}
	if _, ok, err := g.verifiedBlob(ctx, digest.FromString("other")); ok || err != nil {
		t.Fatalf("other layer: ok=%v err=%v", ok, err)
	}
}

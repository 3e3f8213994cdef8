package exportguard_test

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/exportguard"
)

// A builder's content store and lease manager come from its containerd
// client (client.ContentStore(), client.LeasesService()), with the builder's
// namespace in ctx.
func Example() {
	var (
		ctx   context.Context
		store content.Store
		lm    leases.Manager
	)
	if ctx == nil {
		return // a sketch: no containerd here
	}
	guard, err := exportguard.New(store, &exportguard.Remote{},
		exportguard.WithParallelism(4),
		exportguard.WithRetry(5, 200*time.Millisecond, 5*time.Second),
		exportguard.WithLease(lm, "lazybase-exportguard"),
		exportguard.WithRegisterer(prometheus.DefaultRegisterer),
		exportguard.WithProgress(func(p exportguard.Progress) {
			fmt.Printf("%s %s %d/%d\n", p.Digest, p.Phase, p.Done, p.Total)
		}),
	)
	if err != nil {
		return
	}
	defer guard.Close()
	layer := ocispec.Descriptor{
		MediaType: ocispec.MediaTypeImageLayerGzip,
		Digest:    digest.Digest("sha256:…"),
		Size:      52_700_000,
	}
	if err := guard.Ensure(ctx, "registry.example/library/debian:bookworm", layer); err != nil {
		fmt.Println(err) // names the image and the layer at fault
	}
}

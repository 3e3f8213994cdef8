// Package exportguard materializes the compressed blobs of lazily mounted
// layers into a containerd content store before an image export needs them.
//
// A Guard fetches each blob once from its registry through a Fetcher,
// verifies it by digest and size while it streams into a content.Writer, and
// commits it only when both match; a blob that fails verification leaves no
// content and no ingest behind. Concurrent requests for one digest share one
// transfer, transfers run with bounded parallelism, and a broken transfer is
// retried with exponential backoff from the offset the content store's ingest
// reached. Committed and already present blobs are held against containerd's
// garbage collection by a lease (WithLease) and, when asked, a GC root label
// (WithGCRoot). Progress is reported per blob (WithProgress) and Prometheus
// metrics on a given registerer (WithRegisterer).
//
// Every blob a Guard commits carries LabelRef and LabelVerified, plus
// containerd's distribution source label; Committed and CommittedFilters
// recognise those blobs, including ones committed by earlier lazybase
// versions under the old lazybase.io/exportguard label.
//
// The package holds no FUSE file system and no gRPC server: the lazybase
// daemon wires a Guard to its mounts and API.
package exportguard

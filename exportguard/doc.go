// Package exportguard puts the compressed blobs of lazily mounted layers
// into a containerd content store, verified, before an image export needs
// them, and keeps everything that depends on them: when to fetch, who waits,
// and who reads them locally once they are there.
//
// A Guard is the materializer. It fetches each blob once from its registry
// through a Fetcher, verifies it by digest and size while it streams into a
// content.Writer, and commits it only when both match; a blob that fails
// verification leaves no content and no ingest behind. Concurrent requests
// for one digest share one transfer, transfers run with bounded parallelism,
// and a broken transfer is retried with exponential backoff from the offset
// the content store's ingest reached. With WithRetention a blob lives as
// long as something uses it: each transfer runs under a lease of its own,
// a snapshot labelled LabelSnapshotRef (lazypull labels every lazy
// snapshot so) references the blob for containerd's garbage collection,
// and a retention lease keeps the most recently used blobs within a byte
// budget; a Trigger's Guards use it (WithMaxBytes). Library users may hold
// blobs instead by a lease (WithLease) and a GC root label (WithGCRoot),
// which never expire. Progress is reported per
// blob (WithProgress) and Prometheus metrics on a given registerer
// (WithRegisterer).
//
// A Trigger drives one Guard per containerd namespace from mount events
// (Trigger.Mounted): each MountEvent says When its blob is materialized,
// at once (WhenNow), after a delay (WhenDelayed, WithDelay) or never
// (WhenNever); Promote ends a delay early. The namespaces share
// containerd's content store, so a blob crosses the network once for all
// of them: a namespace whose layer another namespace's Guard is fetching
// waits for that transfer, then commits the blob from the shared store.
// The Trigger keeps a typed State per layer
// (Status, served as JSON by StatusHandler) and tells subscribers when a
// blob is committed (OnCommit). Trigger.Barrier waits until the layers of
// given images are materialized, starting delayed ones and retrying failed
// ones; it wakes on state changes, it does not poll. BarrierHandler serves
// it as a stream of BarrierEvents and RequestBarrier is its client, over
// the unix socket the lazybase daemon serves both on. A Trigger reads
// blobs, sizes and manifests from a Registry: Remote goes to the registry
// each image names; the lazybase daemon gives it one over its [registry]
// hosts (mirrors first) instead.
//
// A blob already in a namespace's content store when a Trigger is told
// about its layer (committed before the daemon restarted) is taken from
// there: materialized at once, without a registry request.
//
// Trigger.LocalBlob opens a committed blob for local readers (the lazy
// filesystem, so that each blob crosses the network once), and an
// Unpacker unpacks a committed blob next to its layer's lazy mount and
// rewrites the mounts handed out from then on to use the unpacked
// directory; it acts when told about mounts and commits, it does not scan.
// KeepLocal and RestoreLocal carry an unpacked directory across a stop of
// the daemon, whose snapshotter removes the snapshot directories.
// Trigger.Holds tells the lazy filesystem which blobs it need not
// decompress whole in the background.
//
// Every blob a Guard commits carries LabelRef and LabelVerified, plus
// containerd's distribution source label; Committed and CommittedFilters
// recognise those blobs, including ones committed by earlier lazybase
// versions under the old lazybase.io/exportguard label.
//
// The package holds no FUSE file system and no gRPC server: the lazybase
// daemon (package lazypull) wires a Trigger to its mounts and serves its
// handlers.
package exportguard

// Package lazypull is the lazybase snapshotter: a containerd proxy
// snapshotter that mounts eStargz layers lazily over FUSE and pulls every
// other layer normally.
//
// It is built on github.com/containerd/stargz-snapshotter: the upstream
// filesystem (fs) fetches and verifies layer contents on demand, the
// upstream snapshot package keeps the overlayfs-style bookkeeping. lazypull
// adds what builders need around them:
//
//   - Config, a documented TOML configuration with strict decoding and
//     validation that names the key at fault, translated into upstream
//     options in one place (Config.upstream);
//   - a per-image Policy (lazy, eager, export-base, lazy-only) applied in
//     Prepare: declined images lose their remote-snapshot labels so that
//     containerd pulls and unpacks them normally, and layers that are not
//     eStargz fall back the same way with a log line saying why;
//   - a check of every layer's eStargz TOC (internal/toccheck) before
//     stargz's metadata reader builds a tree from it (tocstore.go): a
//     layer whose TOC could crash or mislead the reader is not mounted and
//     falls back to a normal pull;
//   - Prometheus metrics for mounts, fallbacks and policy decisions next to
//     the upstream filesystem metrics, and a status view of mounted layers
//     with their fetched percentages;
//   - a CPU and I/O account of the daemon's own work (internal/cpuacct):
//     CPU seconds on each unit's thread clock for guard transfers,
//     hashing, local unpacks, background fetch reads, on-demand reads and
//     TOC checks, the rest of the process's CPU as fuse_and_other, and
//     registry bytes by activity (metrics.go, Status.Account);
//   - access recording: per image, the files its lazily mounted layers
//     served, in first-access order with their sizes (access_record_dir),
//     for building prefetch profiles from real builds;
//   - the export guard wired to the mounts: package exportguard owns the
//     guard (its Trigger, barrier, local blobs and Unpacker); lazypull
//     maps each policy Mode onto an exportguard.When, hands every lazy
//     mount to the Trigger with the containerd namespace of its Prepare,
//     connects it to containerd ([guard]) and to the registries through
//     the same [registry] hosts and [auth] credentials as the lazy
//     filesystem (mirrors or hosts.toml, tried in order; guardregistry.go),
//     serves its status and barrier
//     routes on the status socket, lets the lazy filesystem read the blobs
//     it committed, and tells an Unpacker ([local]) about mounts so that
//     the snapshotter hands out overlayfs mounts of unpacked layers;
//   - bounded disk (disk.go, migrate.go): every lazy snapshot references
//     its layer's blob (exportguard.LabelSnapshotRef), so containerd keeps
//     the guard's blob exactly while a snapshot of the layer exists;
//     containerd's post-GC Cleanup reaches the upstream snapshotter and
//     reclaims removed snapshots' directories; the lazy filesystem's caches
//     an earlier run left are swept at start;
//   - Daemon, which serves containerd's snapshots gRPC API on a unix socket
//     and unmounts every FUSE mount when it stops; a restarted Daemon
//     listens first and then mounts again, in the background, the lazy
//     snapshots the previous one had (a request that needs one waits for
//     it; one that fails, registry down, is retried when a request needs
//     it), hands them to the export guard, which takes the blobs it
//     committed before from the content store instead of the registry,
//     and puts back the unpacked directories the previous daemon kept
//     when it stopped.
package lazypull

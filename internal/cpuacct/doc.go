// Package cpuacct accounts the CPU time and the I/O of the lazybase
// snapshotter's own activities: export guard transfers, hashing, local
// unpacks, stargz's background fetch, on-demand reads of the lazy
// filesystem and TOC checks.
//
// Go has no per-goroutine CPU clock. A Span measures one unit of work (a
// chunk of a guard transfer, one local unpack, one read of a background
// fetch) on the OS thread's own CPU clock (CLOCK_THREAD_CPUTIME_ID, user
// and kernel time): Start locks the calling goroutine to its thread
// (runtime.LockOSThread), so that no other goroutine runs on the thread
// until End, and End charges the thread's CPU time since Start to the
// span's Activity. Time the goroutine spends blocked (network, disk,
// locks) costs its thread no CPU and is not counted. Work the unit hands
// to other goroutines (HTTP/2 and TLS read loops, gRPC streams, the
// garbage collector's background workers) is not in its span.
//
// Where the snapshotter measures (one span per unit): each read-and-write
// of a guard transfer's copy loop; a whole local unpack; each read of a
// file of stargz's background fetch and each on-demand read of a layer
// file (fetching and decompressing chunks; stargz verifies each chunk's
// sha256 and writes it to its cache after the read returns, outside the
// span); the TOC check of a mount; the sha256 of each manifest the
// guard's registry reads. The guard hands each blob to containerd's
// content store over gRPC and containerd computes its digest: that
// hashing is containerd's CPU, not the snapshotter's.
//
// Spans nest: a span started inside another one on the same goroutine
// charges its time to its own activity only, and the outer span resumes
// when it ends, so a transfer loop can split out its hashing.
//
// A Span also tells which activity the current goroutine works for
// (Account.Current), so an HTTP transport can charge the bytes it fetches
// from a registry to it (AddFetched) without a context.
//
// Account.Snapshot puts the accounted activities next to the whole
// process's CPU time (getrusage RUSAGE_SELF): the difference,
// "fuse_and_other", is what no span measured, chiefly the FUSE requests
// that stargz and go-fuse serve on goroutines of their own (lookups,
// attributes, xattrs, opens, reads from the cache), the Go runtime
// (scheduler, garbage collector), gRPC and logging. It is named so
// because the upstream filesystem has no hook to measure FUSE serving
// apart. Snapshot adds the Go runtime's estimate of its garbage
// collector's CPU time, most of which is in fuse_and_other.
//
// Default is the process's account, which lazypull's metrics and status
// report; tests make accounts of their own with New.
package cpuacct

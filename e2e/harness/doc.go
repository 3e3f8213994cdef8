// Package harness starts the real container stack the e2e tests run against:
// a registry (Debian's docker-registry) behind an in-process shaping proxy,
// containerd v2 with Debian's runc, optionally a lazy snapshotter (the
// upstream stargz service or the project's own daemon, chosen by one switch)
// and optionally buildkitd with its containerd worker.
//
// Everything a Stack starts lives under one temporary directory, listens on
// loopback or on unix sockets only, and is torn down in order when the test
// ends: containers, images, leases, containerd garbage collection, the lazy
// snapshotter, then any FUSE or overlay mount still left under the
// directory, and finally every process the Stack started, stopped by its PID.
// When a test fails, the tail of each daemon's log is attached to it.
//
// Daemon binaries come from the version-keyed cache that hack/e2e-deps.sh
// fills ($LAZYBASE_E2E_BIN, else $LAZYBASE_CACHE/e2e/bin, else .cache/e2e/bin
// in the checkout); a missing cache is filled by running that script.
package harness

// Command stargzd is the upstream stargz snapshotter service
// (github.com/containerd/stargz-snapshotter/service) served as a containerd
// proxy snapshotter on a unix socket: the e2e harness's "upstream" lazy
// snapshotter kind (harness.Upstream, the kind tests that pass an empty kind
// get unless $LAZYBASE_E2E_SNAPSHOTTER=lazybase). It is kept beside the
// project's own daemon (`lazybase snapshotter`, harness.Lazybase) so that
// the same tests and benchmarks can run on either and compare the two.
//
// Usage:
//
//	stargzd -address /run/x/stargz.sock -root /var/lib/x [-config stargz.toml]
//
// The config file is the upstream service.Config in TOML (fs options such as
// no_background_fetch, resolver hosts). On SIGINT or SIGTERM the daemon stops
// serving and closes the snapshotter, which unmounts its FUSE mounts.
package main

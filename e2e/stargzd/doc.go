// Command stargzd is the e2e harness's stand-in lazy snapshotter: the upstream
// stargz snapshotter service (github.com/containerd/stargz-snapshotter/service)
// served as a containerd proxy snapshotter on a unix socket. The harness runs it
// when a test asks for the "upstream" lazy snapshotter, until the project's own
// lazypull daemon takes its place behind the same switch.
//
// Usage:
//
//	stargzd -address /run/x/stargz.sock -root /var/lib/x [-config stargz.toml]
//
// The config file is the upstream service.Config in TOML (fs options such as
// no_background_fetch, resolver hosts). On SIGINT or SIGTERM the daemon stops
// serving and closes the snapshotter, which unmounts its FUSE mounts.
package main

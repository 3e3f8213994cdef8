package harness

import (
	"fmt"
	"os"
	"time"
)

// SnapshotterKind names the lazy snapshotter daemon a Stack runs.
type SnapshotterKind string

const (
	// NoLazySnapshotter runs containerd with its built-in snapshotters only.
	NoLazySnapshotter SnapshotterKind = ""
	// Upstream runs the upstream stargz snapshotter service (e2e/stargzd).
	Upstream SnapshotterKind = "upstream"
	// Lazybase runs the project's own daemon (`lazybase snapshotter`).
	Lazybase SnapshotterKind = "lazybase"
)

// SnapshotterEnv selects the lazy snapshotter for tests that want one and
// do not name it: "upstream" (the default) or "lazybase".
const SnapshotterEnv = "LAZYBASE_E2E_SNAPSHOTTER"

// DefaultLazySnapshotter returns the kind $LAZYBASE_E2E_SNAPSHOTTER selects,
// Upstream when it is unset.
func DefaultLazySnapshotter() (SnapshotterKind, error) {
	switch v := os.Getenv(SnapshotterEnv); v {
	case "", string(Upstream):
		return Upstream, nil
	case string(Lazybase):
		return Lazybase, nil
	default:
		return "", fmt.Errorf("%s=%q: want upstream or lazybase", SnapshotterEnv, v)
	}
}

type options struct {
	lazy         SnapshotterKind
	lazyConfig   string // extra TOML for the upstream stargz service
	buildkit     bool
	buildkitLazy bool
	// buildkitOCI is the snapshotter of buildkitd's OCI worker; empty
	// runs the containerd worker.
	buildkitOCI  string
	lazybaseTOML string // the lazybase daemon's config; empty: $LAZYBASE_SNAPSHOTTER_CONFIG
	bandwidth    int64
	rtt          time.Duration
	namespace    string
	// registryUser and registryPassword turn on the registry's htpasswd
	// auth (WithRegistryAuth).
	registryUser     string
	registryPassword string
	// registryToken puts a token server in front of them
	// (WithRegistryTokenAuth).
	registryToken bool
	// env is added to every daemon's and tool's environment (WithEnv).
	env []string
	// lazybaseTOMLFunc writes the lazybase daemon's config once the
	// registry runs (WithLazybaseConfigFunc).
	lazybaseTOMLFunc func(*Registry) string
	// mirror makes the registry a mirror of a host (WithRegistryMirror).
	mirror *mirrorOpt
	// secondRegistry starts Stack.Registry2 (WithSecondRegistry).
	secondRegistry bool
}

// Option configures a Stack.
type Option func(*options) error

// WithLazySnapshotter runs a lazy snapshotter of the given kind, registered
// in containerd as the proxy snapshotter "stargz". An empty kind means the
// one $LAZYBASE_E2E_SNAPSHOTTER selects.
func WithLazySnapshotter(kind SnapshotterKind) Option {
	return func(o *options) error {
		if kind == "" {
			k, err := DefaultLazySnapshotter()
			if err != nil {
				return err
			}
			kind = k
		}
		switch kind {
		case Upstream, Lazybase:
		default:
			return fmt.Errorf("lazy snapshotter %q: want upstream or lazybase", kind)
		}
		o.lazy = kind
		return nil
	}
}

// WithStargzConfig adds TOML to the upstream stargz service's config, e.g.
// "no_background_fetch = true" to keep it from fetching whole layers.
func WithStargzConfig(toml string) Option {
	return func(o *options) error {
		o.lazyConfig = toml
		return nil
	}
}

// WithBuildkit runs buildkitd with its containerd worker on the Stack's
// containerd, using the overlayfs snapshotter.
func WithBuildkit() Option {
	return func(o *options) error {
		o.buildkit = true
		return nil
	}
}

// WithBuildkitLazy runs buildkitd with its containerd worker on the lazy
// snapshotter "stargz"; it needs WithLazySnapshotter.
func WithBuildkitLazy() Option {
	return func(o *options) error {
		o.buildkit = true
		o.buildkitLazy = true
		return nil
	}
}

// WithBuildkitOCI runs buildkitd with its OCI worker (runc from the
// harness's PATH, state under the Stack's directory) on one of BuildKit's
// own snapshotters, such as "overlayfs" or "stargz" (BuildKit's built-in
// stargz snapshotter), instead of the containerd worker.
func WithBuildkitOCI(snapshotter string) Option {
	return func(o *options) error {
		if snapshotter == "" {
			return fmt.Errorf("buildkit OCI worker: empty snapshotter name")
		}
		o.buildkit = true
		o.buildkitOCI = snapshotter
		return nil
	}
}

// WithLazybaseConfig gives the lazybase daemon this TOML configuration
// instead of the file $LAZYBASE_SNAPSHOTTER_CONFIG names. Either way, the
// harness sets guard.containerd_address to the Stack's containerd unless
// the configuration names one.
func WithLazybaseConfig(toml string) Option {
	return func(o *options) error {
		o.lazybaseTOML = toml
		return nil
	}
}

// WithBandwidth starts the shaping proxy with a bandwidth limit in bytes per
// second (zero: unlimited).
func WithBandwidth(bytesPerSecond int64) Option {
	return func(o *options) error {
		o.bandwidth = bytesPerSecond
		return nil
	}
}

// WithRTT starts the shaping proxy adding d to every request.
func WithRTT(d time.Duration) Option {
	return func(o *options) error {
		o.rtt = d
		return nil
	}
}

// WithSecondRegistry starts a second registry process, Stack.Registry2,
// with its own storage and shaping proxy (the same bandwidth and RTT) and
// no auth: a second push target, as builds that push to two registries
// need. buildkitd reaches it over plain HTTP.
func WithSecondRegistry() Option {
	return func(o *options) error {
		o.secondRegistry = true
		return nil
	}
}

func makeOptions(opts ...Option) (*options, error) {
	o := &options{namespace: "e2e"}
	for _, opt := range opts {
		if err := opt(o); err != nil {
			return nil, err
		}
	}
	if o.buildkitLazy && o.buildkitOCI != "" {
		return nil, fmt.Errorf("buildkit: WithBuildkitLazy uses the containerd worker, WithBuildkitOCI the OCI worker: choose one")
	}
	if o.lazybaseTOML != "" && o.lazybaseTOMLFunc != nil {
		return nil, fmt.Errorf("lazybase config: WithLazybaseConfig and WithLazybaseConfigFunc: choose one")
	}
	if o.buildkitLazy && o.lazy == NoLazySnapshotter {
		return nil, fmt.Errorf("buildkit on the lazy snapshotter needs WithLazySnapshotter")
	}
	return o, nil
}

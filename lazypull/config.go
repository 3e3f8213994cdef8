package lazypull

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/internal/imageio"
)

// Config is the lazybase snapshotter's configuration, read from TOML by
// LoadConfig. Every field states its default; DefaultConfig returns them.
// deploy/containerd/lazybase.defaults.toml lists every key with exactly
// these defaults (a test keeps it so); deploy/containerd/lazybase.toml is a
// commented example.
// Settings of the stargz filesystem that no key here maps to (such as
// FUSE passthrough's 400 MiB merge buffer) keep the defaults stargz's own
// config loader gives them.
type Config struct {
	// Root is the directory that holds snapshots, the layer cache and the
	// metadata database (key "root"). It must be absolute.
	// Default "/var/lib/lazybase/snapshotter".
	Root string `toml:"root"`

	// Socket is the unix socket the snapshots gRPC API is served on (key
	// "socket"); containerd's proxy_plugins.stargz.address. Its parent
	// directory is created with mode 0700. A socket some process serves
	// stops the daemon at start; a stale one (nobody listens) is replaced.
	// SOCKET.lock and ROOT/lazybase.lock keep a second daemon off the
	// socket and the root. Default "/run/lazybase/snapshotter.sock".
	Socket string `toml:"socket"`

	// SocketMode is the permission of Socket and StatusSocket, an octal
	// string such as "0660" (key "socket_mode"); a TOML integer is an
	// error. Default "0660".
	SocketMode FileMode `toml:"socket_mode"`

	// StatusSocket is the unix socket of the status HTTP API that
	// `lazybase snapshotter status` reads (key "status_socket"). Empty means
	// Socket with ".status" appended. Default "".
	StatusSocket string `toml:"status_socket"`

	// MetricsAddress is the TCP address Prometheus metrics are served on at
	// /metrics, e.g. "127.0.0.1:9106" (key "metrics_address"). It serves
	// GET /metrics only; status, export guard and barrier are served on
	// StatusSocket alone. Empty disables the listener. Default "".
	MetricsAddress string `toml:"metrics_address"`

	// LogLevel is one of trace, debug, info, warn, error (key "log_level");
	// trace also turns on stargz's FUSE request tracing. `lazybase
	// --log-level` overrides it. Default "info".
	LogLevel string `toml:"log_level"`

	// AccessRecordDir, when set, is where the files each lazily mounted
	// layer serves are recorded, per image, in first-access order with
	// their sizes: one JSON-lines file per image reference (key
	// "access_record_dir"), the input for prefetch profiles. Absolute path.
	// Default "" (off).
	AccessRecordDir string `toml:"access_record_dir"`

	// Profile configures publishing what the lazy mounts served as
	// prefetch profiles, for the mirror to convert the next image with
	// (table "profile").
	Profile ProfileConfig `toml:"profile"`

	// Registry configures how registries are reached (table "registry").
	Registry RegistryConfig `toml:"registry"`

	// Auth configures registry credentials (table "auth").
	Auth AuthConfig `toml:"auth"`

	// Fetch bounds on-demand reads from the registry (table "fetch").
	Fetch FetchConfig `toml:"fetch"`

	// Prefetch configures fetching the prioritized files of a layer when it
	// is mounted (table "prefetch").
	Prefetch PrefetchConfig `toml:"prefetch"`

	// BackgroundFetch configures fetching whole layers in the background
	// after mount (table "background_fetch").
	BackgroundFetch BackgroundFetchConfig `toml:"background_fetch"`

	// Cache configures the layer caches (table "cache").
	Cache CacheConfig `toml:"cache"`

	// FUSE configures the FUSE mounts (table "fuse").
	FUSE FUSEConfig `toml:"fuse"`

	// Guard configures the export guard, which materializes the compressed
	// blobs of lazily mounted layers into containerd's content store
	// (table "guard").
	Guard GuardConfig `toml:"guard"`

	// Local unpacks lazily mounted layers once the export guard has their
	// verified blobs, so later containers read them through overlayfs.
	Local LocalConfig `toml:"local"`

	// DefaultMode is the mode of images no policy rule matches (key
	// "default_mode"). Default "lazy".
	DefaultMode Mode `toml:"default_mode"`

	// Policy is the ordered list of per-image rules (array of tables
	// "policy"); the first rule whose Match matches the image reference
	// decides. Default: none.
	Policy []PolicyRule `toml:"policy"`
}

// ProfileConfig configures the closed prefetch loop on the builder's side:
// per lazily mounted image, the files its lazy mounts served since the
// last publish become a prefetch profile that the daemon pushes to the
// registry the image came from (through [registry] mirrors or hosts.toml,
// mirrors first, with the [auth] credentials) as an OCI artifact whose
// subject is the image's manifest (the platform manifest of an index);
// `lazybase mirror` merges the published profiles of many builds and
// converts the image again with them. The records are kept in memory,
// bounded, whether or not access_record_dir is set. An image is published
// once no snapshot over its layers is in use (the build is over) and no
// access was recorded for Delay, or once no access was recorded for Idle
// (BuildKit keeps the snapshots of finished steps active), and at a clean
// shutdown (within Timeout
// or 10s, whichever is shorter, for all images); at most once per
// MinInterval. A failed publish is logged with the image and host,
// counted (lazybase_snapshotter_profile_publish_total{result="failed"})
// and shown by `lazybase snapshotter status`; it never fails or slows a
// build, and the records are kept (bounded) for the next attempt.
type ProfileConfig struct {
	// Publish turns publishing on (key "profile.publish"). Default true.
	Publish bool `toml:"publish"`

	// Delay is how long an image must be unused (no snapshot over its
	// layers in use) and without a new access before it is published (key
	// "profile.delay"). 0 or more. Default "5s".
	Delay Duration `toml:"delay"`

	// Idle is how long without a new access before an image is published
	// even while snapshots over its layers are in use: BuildKit keeps the
	// snapshot of a finished step active until it needs it committed
	// (key "profile.idle"). At least Delay. Default "60s".
	Idle Duration `toml:"idle"`

	// MinInterval is the least time between two publishes of one image,
	// failed ones included (key "profile.min_interval"). 0 or more.
	// Default "10m".
	MinInterval Duration `toml:"min_interval"`

	// MaxFiles bounds the files of one published profile, and the access
	// records kept per image until it is published (key
	// "profile.max_files"); a profile is also cut to fit the artifact's
	// 1 MiB bound. 1 to 1000000. Default 20000.
	MaxFiles int `toml:"max_files"`

	// Timeout bounds one publish: reading the image's manifests and
	// pushing the artifact, retries included (key "profile.timeout"). A
	// positive duration. Default "30s".
	Timeout Duration `toml:"timeout"`
}

// RegistryConfig configures how registries are reached, by everything in
// the daemon that reaches one: the lazy filesystem and the export guard
// (blob transfers, blob sizes, the barrier's manifest reads).
type RegistryConfig struct {
	// ConfigPath lists containerd hosts.toml directories (the layout of
	// /etc/containerd/certs.d: one directory per host holding hosts.toml
	// and certificates), searched in order (key "registry.config_path").
	// It cannot be combined with Mirrors. Default: none.
	ConfigPath []string `toml:"config_path"`

	// Mirrors maps a registry host to the mirrors tried, in order, before
	// the host itself (table "registry.mirrors", e.g.
	// mirrors."docker.io" = [{ host = "mirror.local:5000", insecure = true }]).
	// Default: none.
	Mirrors map[string][]Mirror `toml:"mirrors"`
}

// Mirror is one registry mirror.
type Mirror struct {
	// Host is the mirror's host[:port] (key "host"). Required.
	Host string `toml:"host"`
	// Insecure uses plain HTTP instead of HTTPS (key "insecure"); loopback
	// hosts always use HTTP. Default false.
	Insecure bool `toml:"insecure"`
}

// AuthConfig configures registry credentials.
type AuthConfig struct {
	// DockerConfig is the directory holding the docker config.json whose
	// auths, credsStore and credHelpers are used (key "auth.docker_config").
	// Empty means $DOCKER_CONFIG, else ~/.docker. Default "".
	DockerConfig string `toml:"docker_config"`

	// CredentialHelpers maps a registry host to a credential helper name
	// (the suffix of a docker-credential-NAME program on PATH), overriding
	// config.json's credHelpers (table "auth.credential_helpers").
	// Default: none.
	CredentialHelpers map[string]string `toml:"credential_helpers"`
}

// FetchConfig bounds on-demand reads from the registry.
type FetchConfig struct {
	// Timeout bounds every registry request and every chunk fetch, retries
	// included: a read stalled at the registry fails with EIO instead of
	// hanging, after about this long for each FUSE read request it needs
	// (measured: 4s for a 3 MiB file with "2s") (key "fetch.timeout").
	// Between 1s and 10m, whole seconds. Default "30s".
	Timeout Duration `toml:"timeout"`

	// MaxRetries is how often a failed chunk request is retried within
	// Timeout (key "fetch.max_retries"). 1 to 10. Default 2.
	MaxRetries int `toml:"max_retries"`

	// ChunkSize is the granularity, in bytes, of on-demand and background
	// fetches (key "fetch.chunk_size"). At least 4096. Default 50000.
	ChunkSize int64 `toml:"chunk_size"`
}

// PrefetchConfig configures prefetching at mount time.
type PrefetchConfig struct {
	// Enable fetches the layer's prioritized files (up to its prefetch
	// landmark) when it is mounted, and makes the first use of the layer
	// wait for them (key "prefetch.enable"). Default true.
	Enable bool `toml:"enable"`

	// DefaultSize is the number of bytes to prefetch from layers that carry
	// no landmark (key "prefetch.default_size"). Default 0.
	DefaultSize int64 `toml:"default_size"`

	// Timeout is how long the first use of a layer waits for its prefetch
	// (key "prefetch.timeout"). Whole seconds, at least 1s. Default "10s".
	Timeout Duration `toml:"timeout"`

	// AsyncSize lets containers start without waiting for prefetches larger
	// than this many bytes; 0 always waits (key "prefetch.async_size").
	// Default 0.
	AsyncSize int64 `toml:"async_size"`
}

// BackgroundFetchConfig configures fetching whole layers after mount.
type BackgroundFetchConfig struct {
	// Enable fetches the rest of every mounted layer in the background
	// and decompresses it into the cache (key "background_fetch.enable").
	// With guard.enable, layers whose blob the export guard holds, is
	// fetching or will fetch (every mode but lazy-only) are not: the
	// guard's transfer brings the whole blob, and reads are served from
	// it on demand; lazy-only layers keep their background fetch. A
	// background fetch pauses while reads of the build decompress from a
	// blob, and for 100ms after. Default true.
	Enable bool `toml:"enable"`

	// MaxConcurrency is the number of layers fetched in the background at
	// once (key "background_fetch.max_concurrency"). 1 to 64. Default 2.
	MaxConcurrency int64 `toml:"max_concurrency"`
}

// CacheConfig configures the caches of fetched layer data.
type CacheConfig struct {
	// HTTPCache is where fetched compressed chunks are kept: "disk" or
	// "memory" (key "cache.http_cache"). Default "disk".
	HTTPCache string `toml:"http_cache"`

	// FSCache is where decompressed file contents are kept: "disk" or
	// "memory" (key "cache.fs_cache"). Default "disk".
	FSCache string `toml:"fs_cache"`

	// MaxLRUEntries is the number of cache entries held in memory (key
	// "cache.max_lru_entries"). At least 1. Default 10.
	MaxLRUEntries int `toml:"max_lru_entries"`

	// MaxOpenFiles is the number of cache files kept open (key
	// "cache.max_open_files"). At least 1. Default 10.
	MaxOpenFiles int `toml:"max_open_files"`

	// ResolveTTL is how long a resolved layer is kept for reuse by later
	// mounts of the same layer (key "cache.resolve_ttl"). Whole seconds, at
	// least 1s. Default "120s".
	ResolveTTL Duration `toml:"resolve_ttl"`
}

// FUSEConfig configures the FUSE mounts.
type FUSEConfig struct {
	// Passthrough hands reads of fully cached files to the kernel (FUSE
	// passthrough, Linux 6.9 and later, needs root), so they cost what
	// local reads cost (key "fuse.passthrough"). Needs cache.fs_cache
	// "disk". Opening a file through passthrough first fetches all of it.
	// Default true where the kernel supports it (Linux 6.9 or later, run
	// as root), false elsewhere.
	Passthrough bool `toml:"passthrough"`

	// AttrTimeout is how long the kernel caches attributes (key
	// "fuse.attr_timeout"). Whole seconds, at least 1s. Default "1h":
	// a layer is immutable, so the kernel need not ask again; with stargz's
	// own 1s, every build step that stats a file more than a second after
	// the last one costs a FUSE request for it.
	AttrTimeout Duration `toml:"attr_timeout"`

	// EntryTimeout is how long the kernel caches name lookups (key
	// "fuse.entry_timeout"). Whole seconds, at least 1s. Default "1h",
	// for the reason AttrTimeout gives: with 1s, each new container (each
	// RUN step) looks every name up again through FUSE. Names that do not
	// exist are not cached: stargz sets no negative-entry timeout.
	EntryTimeout Duration `toml:"entry_timeout"`

	// ReadOnly remounts each lazily mounted layer read-only (key
	// "fuse.read_only"). stargz mounts layers read-write, and on a
	// read-write FUSE file system the kernel asks for a directory's or
	// file's attributes again after every read of it (its access time
	// may have changed), whatever AttrTimeout says. Nothing ever writes
	// to a layer. Default true.
	ReadOnly bool `toml:"read_only"`
}

// GuardConfig configures the export guard. The policy decides per image
// when a lazily mounted layer's blob is materialized: export-base at once
// when the layer is mounted, lazy in the background after Delay, lazy-only
// never (eager layers are pulled normally and need no guard).
type GuardConfig struct {
	// Enable materializes the blobs of lazily mounted layers into the
	// content store of the containerd namespace that mounted them (key
	// "guard.enable"). Default true.
	Enable bool `toml:"enable"`

	// ContainerdAddress is containerd's gRPC unix socket (key
	// "guard.containerd_address"). The daemon connects when the first layer
	// needs its blob and retries while containerd is not up. Absolute path.
	// Default "/run/containerd/containerd.sock".
	ContainerdAddress string `toml:"containerd_address"`

	// Parallelism is how many blobs are transferred at once (key
	// "guard.parallelism"). 1 to 64. Default 4.
	Parallelism int `toml:"parallelism"`

	// Delay is how long after its mount a layer of a "lazy" image waits
	// before its blob is materialized, so that on-demand reads and prefetch
	// go first (key "guard.delay"). Export-base layers never wait. A
	// duration such as "10s", "0s" or more. Default "10s".
	Delay Duration `toml:"delay"`

	// MaxBytes is how many bytes of materialized blobs the guard keeps,
	// per containerd namespace, after nothing uses them any more (key
	// "guard.max_bytes"): the most recently used ones, held in the lease
	// "lazybase-exportguard", so that a build that mounts the same base
	// again after a prune exports it without fetching it. A blob is
	// always kept while a snapshot of its layer exists (the snapshot
	// references it), and while an image or a BuildKit record references
	// it. 0 keeps nothing beyond that: `buildctl prune --all` and removing
	// the images release every blob. 0 or more. Default 0.
	MaxBytes int64 `toml:"max_bytes"`

	// ConnectTimeout bounds a TCP connect to a registry for the guard's
	// requests: blob transfers, the blob size lookup at mount and the
	// barrier's manifest reads (key "guard.connect_timeout"). Like the
	// three keys below it bounds one phase of a request, never a whole
	// transfer; a registry that runs out of one fails that attempt with an
	// error naming the host, and the guard retries the blob (5 attempts,
	// resuming from the bytes it has). A positive duration. Default "30s".
	ConnectTimeout Duration `toml:"connect_timeout"`

	// TLSTimeout bounds a TLS handshake with a registry (key
	// "guard.tls_timeout"). A positive duration. Default "10s".
	TLSTimeout Duration `toml:"tls_timeout"`

	// ResponseTimeout bounds the wait for a registry's response headers
	// once a request is sent (key "guard.response_timeout"). A positive
	// duration. Default "60s".
	ResponseTimeout Duration `toml:"response_timeout"`

	// IdleTimeout bounds every wait for the next bytes of a blob or
	// manifest body (key "guard.idle_timeout"); a transfer that keeps
	// delivering runs as long as it needs. A positive duration.
	// Default "60s".
	IdleTimeout Duration `toml:"idle_timeout"`
}

// Timeouts returns the guard's registry timeouts.
func (g GuardConfig) Timeouts() imageio.Timeouts {
	return imageio.Timeouts{
		Connect:        g.ConnectTimeout.D(),
		TLSHandshake:   g.TLSTimeout.D(),
		ResponseHeader: g.ResponseTimeout.D(),
		Idle:           g.IdleTimeout.D(),
	}
}

// LocalConfig configures local unpacking. Once the export guard has put a
// lazily mounted layer's verified blob in the content store, the daemon
// unpacks it next to the layer's FUSE mount, as containerd would unpack
// it, and hands out mounts that use the unpacked directory from then on:
// containers started afterwards (the next RUN step of a build) read the
// layer through overlayfs alone, at local-disk cost, with no FUSE round
// trip. Containers already running keep their lazy mounts. Layers of
// lazy-only images are never unpacked; nothing is unpacked when the guard
// is off. The unpacked copy costs the layer's uncompressed size on disk
// and is removed with the snapshot.
type LocalConfig struct {
	// Enable turns local unpacking on (key "local.enable"). Default false:
	// unpacking takes CPU from the build while it runs (on a 2-core builder
	// it slowed a cold build-and-push by 7-15 s), and with FUSE passthrough
	// cached reads already cost about what overlayfs reads cost. Turn it on
	// for builders with cores to spare that run many steps on one base.
	Enable bool `toml:"enable"`

	// Parallelism is how many layers are unpacked at once (key
	// "local.parallelism"). 1 to 16. Default 1, so that unpacking takes one
	// core at most from the build.
	Parallelism int `toml:"parallelism"`
}

// PolicyRule decides the Mode of the images whose reference matches.
type PolicyRule struct {
	// Match is a glob on the image reference as containerd passes it
	// (fully qualified, e.g. "docker.io/library/golang:1.23"; a reference
	// BuildKit passes as "name:tag@sha256:…" also matches without its
	// digest): "*" matches
	// any run of characters including "/", "?" one character, and
	// "[...]" a character class (key "policy[N].match"). Required.
	Match string `toml:"match"`

	// Mode is "lazy", "eager", "export-base" or "lazy-only" (key
	// "policy[N].mode"). Required.
	Mode Mode `toml:"mode"`
}

// Limits enforced by validation.
const (
	minFetchTimeout = time.Second
	maxFetchTimeout = 10 * time.Minute
)

// DefaultConfig returns the configuration with every default applied.
func DefaultConfig() Config {
	return Config{
		Root:       "/var/lib/lazybase/snapshotter",
		Socket:     "/run/lazybase/snapshotter.sock",
		SocketMode: 0o660,
		LogLevel:   "info",
		Fetch: FetchConfig{
			Timeout:    Duration(30 * time.Second),
			MaxRetries: 2,
			ChunkSize:  50000,
		},
		Prefetch: PrefetchConfig{
			Enable:  true,
			Timeout: Duration(10 * time.Second),
		},
		BackgroundFetch: BackgroundFetchConfig{
			Enable:         true,
			MaxConcurrency: 2,
		},
		Cache: CacheConfig{
			HTTPCache:     "disk",
			FSCache:       "disk",
			MaxLRUEntries: 10,
			MaxOpenFiles:  10,
			ResolveTTL:    Duration(120 * time.Second),
		},
		FUSE: FUSEConfig{
			Passthrough:  passthroughSupported(),
			AttrTimeout:  Duration(time.Hour),
			EntryTimeout: Duration(time.Hour),
			ReadOnly:     true,
		},
		Guard: GuardConfig{
			Enable:            true,
			ContainerdAddress: "/run/containerd/containerd.sock",
			Parallelism:       4,
			Delay:             Duration(10 * time.Second),
			ConnectTimeout:    Duration(imageio.DefaultConnectTimeout),
			TLSTimeout:        Duration(imageio.DefaultTLSTimeout),
			ResponseTimeout:   Duration(imageio.DefaultResponseTimeout),
			IdleTimeout:       Duration(imageio.DefaultIdleTimeout),
		},
		Local: LocalConfig{
			Parallelism: 1,
		},
		Profile: ProfileConfig{
			Publish:     true,
			Delay:       Duration(5 * time.Second),
			Idle:        Duration(60 * time.Second),
			MinInterval: Duration(10 * time.Minute),
			MaxFiles:    20000,
			Timeout:     Duration(30 * time.Second),
		},
		DefaultMode: ModeLazy,
	}
}

// KeyError is a configuration error at one key.
type KeyError struct {
	// Key is the dotted TOML key at fault, e.g. "fetch.timeout" or
	// "policy[1].mode".
	Key string
	Err error
}

func (e *KeyError) Error() string { return fmt.Sprintf("key %s: %v", e.Key, e.Err) }

func (e *KeyError) Unwrap() error { return e.Err }

// LoadConfig reads the TOML file at path over DefaultConfig, rejecting
// unknown keys and invalid values with an error that names the key.
func LoadConfig(path string) (Config, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg, err := ParseConfig(b)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes TOML over DefaultConfig and validates the result.
func ParseConfig(b []byte) (Config, error) {
	if err := checkStringValues(b); err != nil {
		return Config{}, err
	}
	cfg := DefaultConfig()
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, decodeError(err)
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// decodeError turns go-toml's errors into KeyErrors.
func decodeError(err error) error {
	var strict *toml.StrictMissingError
	if errors.As(err, &strict) && len(strict.Errors) > 0 {
		errs := make([]error, 0, len(strict.Errors))
		for i := range strict.Errors {
			e := &strict.Errors[i]
			row, col := e.Position()
			errs = append(errs, &KeyError{
				Key: keyString(e.Key()),
				Err: fmt.Errorf("unknown key (line %d, column %d)", row, col),
			})
		}
		return errors.Join(errs...)
	}
	var de *toml.DecodeError
	if errors.As(err, &de) {
		row, col := de.Position()
		if k := keyString(de.Key()); k != "" {
			return &KeyError{Key: k, Err: fmt.Errorf("%v (line %d, column %d)", err, row, col)}
		}
		return fmt.Errorf("%w (line %d, column %d)", err, row, col)
	}
	return err
}

func keyString(k toml.Key) string { return strings.Join(k, ".") }

// Validate checks every key of c and returns the errors, each naming its
// key.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key string, format string, args ...any) {
		errs = append(errs, &KeyError{Key: key, Err: fmt.Errorf(format, args...)})
	}
	absPath := func(key, p string, required bool) {
		switch {
		case p == "" && required:
			bad(key, "must be set")
		case p != "" && !filepath.IsAbs(p):
			bad(key, "%q is not an absolute path", p)
		}
	}
	absPath("root", c.Root, true)
	absPath("socket", c.Socket, true)
	absPath("status_socket", c.StatusSocket, false)
	absPath("access_record_dir", c.AccessRecordDir, false)
	if c.SocketMode == 0 || c.SocketMode&^0o777 != 0 {
		bad("socket_mode", "%#o is not a permission between 0001 and 0777", uint32(c.SocketMode))
	}
	if c.StatusSocket != "" && c.StatusSocket == c.Socket {
		bad("status_socket", "must differ from socket")
	}
	if c.MetricsAddress != "" {
		if err := checkTCPAddress(c.MetricsAddress); err != nil {
			bad("metrics_address", "%v", err)
		}
	}
	switch c.LogLevel {
	case "trace", "debug", "info", "warn", "error":
	default:
		bad("log_level", "%q is not one of trace, debug, info, warn, error", c.LogLevel)
	}

	if len(c.Registry.ConfigPath) > 0 && len(c.Registry.Mirrors) > 0 {
		bad("registry.mirrors", "cannot be combined with registry.config_path (put mirrors in hosts.toml)")
	}
	for i, p := range c.Registry.ConfigPath {
		absPath(fmt.Sprintf("registry.config_path[%d]", i), p, true)
	}
	for host, ms := range c.Registry.Mirrors {
		if host == "" || strings.ContainsAny(host, "/ ") {
			bad("registry.mirrors", "%q is not a registry host", host)
		}
		for i, m := range ms {
			if m.Host == "" || strings.ContainsAny(m.Host, "/ ") {
				bad(fmt.Sprintf("registry.mirrors.%q[%d].host", host, i), "%q is not a host[:port]", m.Host)
			}
		}
	}
	absPath("auth.docker_config", c.Auth.DockerConfig, false)
	for host, helper := range c.Auth.CredentialHelpers {
		if helper == "" || strings.ContainsAny(helper, "/ ") {
			bad(fmt.Sprintf("auth.credential_helpers.%q", host), "%q is not a credential helper name", helper)
		}
	}

	if t := c.Fetch.Timeout.D(); t < minFetchTimeout || t > maxFetchTimeout || t%time.Second != 0 {
		bad("fetch.timeout", "%s: want a duration string of whole seconds between %s and %s, such as \"30s\"", t, minFetchTimeout, maxFetchTimeout)
	}
	if c.Fetch.MaxRetries < 1 || c.Fetch.MaxRetries > 10 {
		bad("fetch.max_retries", "%d: want 1 to 10", c.Fetch.MaxRetries)
	}
	if c.Fetch.ChunkSize < 4096 {
		bad("fetch.chunk_size", "%d: want at least 4096", c.Fetch.ChunkSize)
	}

	wholeSeconds := func(key string, d Duration) {
		if t := d.D(); t < time.Second || t%time.Second != 0 {
			bad(key, "%s: want a duration string of whole seconds, at least \"1s\"", t)
		}
	}
	if c.Prefetch.DefaultSize < 0 {
		bad("prefetch.default_size", "%d: must not be negative", c.Prefetch.DefaultSize)
	}
	wholeSeconds("prefetch.timeout", c.Prefetch.Timeout)
	if c.Prefetch.AsyncSize < 0 {
		bad("prefetch.async_size", "%d: must not be negative", c.Prefetch.AsyncSize)
	}
	if c.BackgroundFetch.MaxConcurrency < 1 || c.BackgroundFetch.MaxConcurrency > 64 {
		bad("background_fetch.max_concurrency", "%d: want 1 to 64", c.BackgroundFetch.MaxConcurrency)
	}

	for key, v := range map[string]string{"cache.http_cache": c.Cache.HTTPCache, "cache.fs_cache": c.Cache.FSCache} {
		if v != "disk" && v != "memory" {
			bad(key, "%q: want disk or memory", v)
		}
	}
	if c.Cache.MaxLRUEntries < 1 {
		bad("cache.max_lru_entries", "%d: want at least 1", c.Cache.MaxLRUEntries)
	}
	if c.Cache.MaxOpenFiles < 1 {
		bad("cache.max_open_files", "%d: want at least 1", c.Cache.MaxOpenFiles)
	}
	wholeSeconds("cache.resolve_ttl", c.Cache.ResolveTTL)
	if c.FUSE.Passthrough && c.Cache.FSCache != "disk" {
		bad("fuse.passthrough", "needs cache.fs_cache = \"disk\": the kernel reads the cache files (passthrough is on by default on Linux 6.9+; set it to false to use a memory cache)")
	}
	wholeSeconds("fuse.attr_timeout", c.FUSE.AttrTimeout)
	wholeSeconds("fuse.entry_timeout", c.FUSE.EntryTimeout)

	absPath("guard.containerd_address", c.Guard.ContainerdAddress, c.Guard.Enable)
	if c.Guard.Parallelism < 1 || c.Guard.Parallelism > 64 {
		bad("guard.parallelism", "%d: want 1 to 64", c.Guard.Parallelism)
	}
	if c.Guard.MaxBytes < 0 {
		bad("guard.max_bytes", "%d: want 0 or more", c.Guard.MaxBytes)
	}
	if c.Guard.Delay < 0 {
		bad("guard.delay", "%s: must not be negative", c.Guard.Delay.D())
	}
	for key, d := range map[string]Duration{
		"guard.connect_timeout": c.Guard.ConnectTimeout, "guard.tls_timeout": c.Guard.TLSTimeout,
		"guard.response_timeout": c.Guard.ResponseTimeout, "guard.idle_timeout": c.Guard.IdleTimeout,
	} {
		if d <= 0 {
			bad(key, "%s: want a positive duration such as \"30s\"", d.D())
		}
	}

	if c.Profile.Delay < 0 {
		bad("profile.delay", "%s: must not be negative", c.Profile.Delay.D())
	}
	if c.Profile.Idle < c.Profile.Delay {
		bad("profile.idle", "%s: want at least profile.delay (%s)", c.Profile.Idle.D(), c.Profile.Delay.D())
	}
	if c.Profile.MinInterval < 0 {
		bad("profile.min_interval", "%s: must not be negative", c.Profile.MinInterval.D())
	}
	if c.Profile.MaxFiles < 1 || c.Profile.MaxFiles > 1000000 {
		bad("profile.max_files", "%d: want 1 to 1000000", c.Profile.MaxFiles)
	}
	if c.Profile.Timeout <= 0 {
		bad("profile.timeout", "%s: want a positive duration such as \"30s\"", c.Profile.Timeout.D())
	}

	if c.Local.Parallelism < 1 || c.Local.Parallelism > 16 {
		bad("local.parallelism", "%d: want 1 to 16", c.Local.Parallelism)
	}

	if err := c.DefaultMode.check(); err != nil {
		bad("default_mode", "%v", err)
	}
	for i, r := range c.Policy {
		if _, err := compileGlob(r.Match); err != nil {
			bad(fmt.Sprintf("policy[%d].match", i), "%v", err)
		}
		if err := r.Mode.check(); err != nil {
			bad(fmt.Sprintf("policy[%d].mode", i), "%v", err)
		}
	}
	// Map iteration above is unordered; report errors in key order.
	sortKeyErrors(errs)
	return errors.Join(errs...)
}

func sortKeyErrors(errs []error) {
	key := func(e error) string {
		var ke *KeyError
		if errors.As(e, &ke) {
			return ke.Key
		}
		return ""
	}
	slices.SortStableFunc(errs, func(a, b error) int { return strings.Compare(key(a), key(b)) })
}

func checkTCPAddress(addr string) error {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return fmt.Errorf("%q: want host:port", addr)
	}
	port, err := strconv.Atoi(addr[i+1:])
	if err != nil || port < 0 || port > 65535 {
		return fmt.Errorf("%q: bad port", addr)
	}
	return nil
}

// checkStringValues rejects TOML values that are not strings for keys of
// type Duration or FileMode, with a message that says how to write them.
// Both types are integers underneath, so the decoder would take an
// integer as is: timeout = 30 would mean 30ns and socket_mode = 660 the
// decimal 660 (0o1224). A document that does not parse is left to the
// decoder, which reports where.
func checkStringValues(b []byte) error {
	var doc map[string]any
	if err := toml.Unmarshal(b, &doc); err != nil {
		return nil
	}
	var errs []error
	checkStringFields(doc, reflect.TypeFor[Config](), "", &errs)
	sortKeyErrors(errs)
	return errors.Join(errs...)
}

func checkStringFields(doc map[string]any, t reflect.Type, prefix string, errs *[]error) {
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		v, ok := doc[name]
		if name == "" || name == "-" || !ok {
			continue
		}
		key := name
		if prefix != "" {
			key = prefix + "." + name
		}
		switch f.Type {
		case reflect.TypeFor[Duration]():
			if err := durationValue(v); err != nil {
				*errs = append(*errs, &KeyError{Key: key, Err: err})
			}
			continue
		case reflect.TypeFor[FileMode]():
			if err := fileModeValue(v); err != nil {
				*errs = append(*errs, &KeyError{Key: key, Err: err})
			}
			continue
		}
		switch f.Type.Kind() {
		case reflect.Struct:
			if m, ok := v.(map[string]any); ok {
				checkStringFields(m, f.Type, key, errs)
			}
		case reflect.Slice:
			if f.Type.Elem().Kind() != reflect.Struct {
				continue
			}
			items, _ := v.([]any)
			for j, item := range items {
				if m, ok := item.(map[string]any); ok {
					checkStringFields(m, f.Type.Elem(), fmt.Sprintf("%s[%d]", key, j), errs)
				}
			}
		}
	}
}

// durationValue explains why a TOML value that is not a string is not a
// Duration.
func durationValue(v any) error {
	switch v := v.(type) {
	case string:
		return nil
	case int64:
		return fmt.Errorf("%d is not a duration; write %q", v, strconv.FormatInt(v, 10)+"s")
	case float64:
		return fmt.Errorf("%v is not a duration; write %q", v, strconv.FormatFloat(v, 'f', -1, 64)+"s")
	default:
		return fmt.Errorf("%v is not a duration; write a string such as \"30s\"", v)
	}
}

// fileModeValue explains why a TOML value that is not a string is not a
// FileMode. Integers are refused whatever their base: 660 would be
// decimal, and accepting 0o660 alone would make 660 a trap.
func fileModeValue(v any) error {
	switch v := v.(type) {
	case string:
		return nil
	case int64:
		return fmt.Errorf("integer %d (octal %O) is not a mode; write the mode as an octal string such as \"0660\"", v, v)
	default:
		return fmt.Errorf("%v is not a mode; write the mode as an octal string such as \"0660\"", v)
	}
}

// Duration is a time.Duration written in TOML as a string such as "30s";
// an integer is an error, not nanoseconds.
type Duration time.Duration

// D returns d as a time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("%q is not a duration like \"30s\"", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText formats d as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// FileMode is a permission written in TOML as an octal string such as
// "0660"; an integer is an error, whatever its base.
type FileMode os.FileMode

// UnmarshalText parses an octal permission.
func (m *FileMode) UnmarshalText(b []byte) error {
	v, err := strconv.ParseUint(string(b), 8, 32)
	if err != nil {
		return fmt.Errorf("%q is not an octal mode like \"0660\"", b)
	}
	*m = FileMode(v)
	return nil
}

// MarshalText formats m as an octal string.
func (m FileMode) MarshalText() ([]byte, error) { return fmt.Appendf(nil, "%04o", uint32(m)), nil }

// passthroughSupported reports whether FUSE passthrough can work here:
// Linux 6.9 or later, and root (registering a backing file needs
// CAP_SYS_ADMIN).
func passthroughSupported() bool {
	if os.Geteuid() != 0 {
		return false
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return false
	}
	return kernelAtLeast(unix.ByteSliceToString(u.Release[:]), 6, 9)
}

// kernelAtLeast reports whether the kernel release string (such as
// "6.9.0-rc1" or "6.18.44-fc") is major.minor or later.
func kernelAtLeast(release string, major, minor int) bool {
	var ma, mi int
	if _, err := fmt.Sscanf(release, "%d.%d", &ma, &mi); err != nil {
		return false
	}
	return ma > major || ma == major && mi >= minor
}

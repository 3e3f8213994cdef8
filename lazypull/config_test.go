package lazypull

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/pelletier/go-toml/v2"

	"github.com/lazybase/lazybase/exportguard"
)

func TestParseConfigDefaults(t *testing.T) {
	cfg, err := ParseConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	if cfg.Root != want.Root || cfg.Socket != want.Socket || cfg.SocketMode != 0o660 ||
		cfg.Fetch.Timeout.D() != 30*time.Second || cfg.DefaultMode != ModeLazy ||
		!cfg.Prefetch.Enable || !cfg.BackgroundFetch.Enable {
		t.Fatalf("defaults not applied: %+v", cfg)
	}
	if got := cfg.statusSocket(); got != "/run/lazybase/snapshotter.sock.status" {
		t.Errorf("status socket = %q", got)
	}
}

func TestParseConfigValues(t *testing.T) {
	cfg, err := ParseConfig([]byte(`
root = "/srv/lb"
socket = "/srv/lb.sock"
socket_mode = "0600"
metrics_address = "127.0.0.1:9106"
log_level = "debug"
default_mode = "eager"
[registry.mirrors]
"docker.io" = [{ host = "127.0.0.1:5000", insecure = true }]
[auth]
docker_config = "/etc/lazybase/docker"
credential_helpers = { "registry.example.com" = "ecr-login" }
[fetch]
timeout = "5s"
max_retries = 1
[prefetch]
enable = false
[fuse]
passthrough = true
[[policy]]
match = "docker.io/library/*"
mode = "lazy"
[[policy]]
match = "*"
mode = "export-base"
`))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/srv/lb" || cfg.SocketMode != 0o600 || cfg.Fetch.Timeout.D() != 5*time.Second ||
		cfg.Fetch.MaxRetries != 1 || cfg.Prefetch.Enable || !cfg.FUSE.Passthrough ||
		len(cfg.Policy) != 2 || cfg.Policy[1].Mode != ModeExportBase ||
		cfg.Registry.Mirrors["docker.io"][0].Host != "127.0.0.1:5000" ||
		cfg.Auth.CredentialHelpers["registry.example.com"] != "ecr-login" {
		t.Fatalf("values not decoded: %+v", cfg)
	}
	// Keys not in the file keep their defaults.
	if cfg.Fetch.ChunkSize != 50000 || cfg.Cache.HTTPCache != "disk" {
		t.Errorf("defaults lost: %+v", cfg)
	}
}

// TestParseConfigInvalid checks that every invalid key fails with an error
// naming that key.
func TestParseConfigInvalid(t *testing.T) {
	for _, tc := range []struct {
		name, toml, key string
	}{
		{"unknown top-level key", `rooot = "/x"`, "rooot"},
		{"unknown nested key", "[fetch]\ntimout = \"1s\"", "fetch.timout"},
		{"unknown policy key", "[[policy]]\nmatch = \"*\"\nmode = \"lazy\"\nmod = \"x\"", "policy.mod"},
		{"root type", `root = 3`, "root"},
		{"root relative", `root = "var/lib"`, "root"},
		{"root empty", `root = ""`, "root"},
		{"socket relative", `socket = "s.sock"`, "socket"},
		{"socket mode not octal", `socket_mode = "0999"`, "socket_mode"},
		{"socket mode zero", `socket_mode = "0"`, "socket_mode"},
		{"socket mode too wide", `socket_mode = "4777"`, "socket_mode"},
		{"status socket relative", `status_socket = "x"`, "status_socket"},
		{"status socket same", "socket = \"/a.sock\"\nstatus_socket = \"/a.sock\"", "status_socket"},
		{"metrics address", `metrics_address = "localhost"`, "metrics_address"},
		{"metrics port", `metrics_address = "127.0.0.1:http"`, "metrics_address"},
		{"log level", `log_level = "loud"`, "log_level"},
		{"access record dir relative", `access_record_dir = "access"`, "access_record_dir"},
		{"config path relative", "[registry]\nconfig_path = [\"certs.d\"]", "registry.config_path[0]"},
		{"config path with mirrors", "[registry]\nconfig_path = [\"/etc/containerd/certs.d\"]\n[registry.mirrors]\n\"docker.io\" = [{host = \"m\"}]", "registry.mirrors"},
		{"mirror host empty", "[registry.mirrors]\n\"docker.io\" = [{host = \"\"}]", `registry.mirrors."docker.io"[0].host`},
		{"mirror unknown key", "[registry.mirrors]\n\"docker.io\" = [{hots = \"m\"}]", "registry.mirrors.hots"},
		{"docker config relative", "[auth]\ndocker_config = \"docker\"", "auth.docker_config"},
		{"credential helper path", "[auth.credential_helpers]\n\"r.io\" = \"/bin/x\"", `auth.credential_helpers."r.io"`},
		{"fetch timeout zero", "[fetch]\ntimeout = \"0s\"", "fetch.timeout"},
		{"fetch timeout unbounded", "[fetch]\ntimeout = \"1h\"", "fetch.timeout"},
		{"fetch timeout fraction", "[fetch]\ntimeout = \"1500ms\"", "fetch.timeout"},
		{"fetch timeout syntax", "[fetch]\ntimeout = \"soon\"", "fetch.timeout"},
		{"fetch timeout integer", "[fetch]\ntimeout = 30", "fetch.timeout"},
		{"fetch retries", "[fetch]\nmax_retries = 11", "fetch.max_retries"},
		{"fetch retries zero", "[fetch]\nmax_retries = 0", "fetch.max_retries"},
		{"chunk size", "[fetch]\nchunk_size = 10", "fetch.chunk_size"},
		{"prefetch size", "[prefetch]\ndefault_size = -1", "prefetch.default_size"},
		{"prefetch timeout", "[prefetch]\ntimeout = \"0s\"", "prefetch.timeout"},
		{"prefetch async", "[prefetch]\nasync_size = -5", "prefetch.async_size"},
		{"prefetch enable type", "[prefetch]\nenable = \"yes\"", "prefetch.enable"},
		{"background concurrency", "[background_fetch]\nmax_concurrency = 0", "background_fetch.max_concurrency"},
		{"http cache", "[cache]\nhttp_cache = \"ssd\"", "cache.http_cache"},
		{"fs cache", "[cache]\nfs_cache = \"\"", "cache.fs_cache"},
		{"lru entries", "[cache]\nmax_lru_entries = 0", "cache.max_lru_entries"},
		{"open files", "[cache]\nmax_open_files = -1", "cache.max_open_files"},
		{"resolve ttl", "[cache]\nresolve_ttl = \"0s\"", "cache.resolve_ttl"},
		{"passthrough memory cache", "[fuse]\npassthrough = true\n[cache]\nfs_cache = \"memory\"", "fuse.passthrough"},
		{"attr timeout", "[fuse]\nattr_timeout = \"100ms\"", "fuse.attr_timeout"},
		{"entry timeout", "[fuse]\nentry_timeout = \"-1s\"", "fuse.entry_timeout"},
		{"local parallelism", "[local]\nparallelism = 0", "local.parallelism"},
		{"guard address relative", "[guard]\ncontainerd_address = \"containerd.sock\"", "guard.containerd_address"},
		{"guard address empty", "[guard]\ncontainerd_address = \"\"", "guard.containerd_address"},
		{"guard parallelism", "[guard]\nparallelism = 0", "guard.parallelism"},
		{"guard parallelism too many", "[guard]\nparallelism = 65", "guard.parallelism"},
		{"guard max_bytes negative", "[guard]\nmax_bytes = -1", "guard.max_bytes"},
		{"guard delay negative", "[guard]\ndelay = \"-1s\"", "guard.delay"},
		{"guard delay syntax", "[guard]\ndelay = \"later\"", "guard.delay"},
		{"profile delay negative", "[profile]\ndelay = \"-1s\"", "profile.delay"},
		{"profile min_interval negative", "[profile]\nmin_interval = \"-1m\"", "profile.min_interval"},
		{"profile idle below delay", "[profile]\ndelay = \"10s\"\nidle = \"5s\"", "profile.idle"},
		{"profile max_files zero", "[profile]\nmax_files = 0", "profile.max_files"},
		{"profile max_files huge", "[profile]\nmax_files = 1000001", "profile.max_files"},
		{"profile timeout zero", "[profile]\ntimeout = \"0s\"", "profile.timeout"},
		{"profile unknown key", "[profile]\npublish_to = \"x\"", "profile.publish_to"},
		{"guard enable type", "[guard]\nenable = 1", "guard.enable"},
		{"guard unknown key", "[guard]\nnamespace = \"buildkit\"", "guard.namespace"},
		{"default mode", `default_mode = "sometimes"`, "default_mode"},
		{"policy match empty", "[[policy]]\nmatch = \"\"\nmode = \"lazy\"", "policy[0].match"},
		{"policy match class", "[[policy]]\nmatch = \"a\"\nmode = \"lazy\"\n[[policy]]\nmatch = \"[abc\"\nmode = \"lazy\"", "policy[1].match"},
		{"policy mode", "[[policy]]\nmatch = \"*\"\nmode = \"lazzy\"", "policy[0].mode"},
		{"policy mode missing", "[[policy]]\nmatch = \"*\"", "policy[0].mode"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.toml))
			if err == nil {
				t.Fatalf("no error for %q", tc.toml)
			}
			var ke *KeyError
			if !errors.As(err, &ke) {
				t.Fatalf("error %q is not a KeyError", err)
			}
			if !strings.Contains(err.Error(), "key "+tc.key+":") {
				t.Fatalf("error %q does not name key %s", err, tc.key)
			}
		})
	}
}

// TestParseConfigIntegerDurationsAndModes: durations and modes are
// strings; a TOML number is refused with a message that says how to write
// it instead of being read as nanoseconds or as a decimal mode.
func TestParseConfigIntegerDurationsAndModes(t *testing.T) {
	for _, tc := range []struct {
		name, toml, want string
	}{
		{"fetch timeout", "[fetch]\ntimeout = 30", `key fetch.timeout: 30 is not a duration; write "30s"`},
		{"fetch timeout dotted", "fetch.timeout = 30", `key fetch.timeout: 30 is not a duration; write "30s"`},
		{"fetch timeout inline table", "fetch = { timeout = 30 }", `key fetch.timeout: 30 is not a duration; write "30s"`},
		{"fetch timeout float", "[fetch]\ntimeout = 1.5", `key fetch.timeout: 1.5 is not a duration; write "1.5s"`},
		{"fetch timeout bool", "[fetch]\ntimeout = true", `key fetch.timeout: true is not a duration; write a string such as "30s"`},
		{"prefetch timeout", "[prefetch]\ntimeout = 10", `key prefetch.timeout: 10 is not a duration; write "10s"`},
		{"resolve ttl", "[cache]\nresolve_ttl = 120", `key cache.resolve_ttl: 120 is not a duration; write "120s"`},
		{"attr timeout", "[fuse]\nattr_timeout = 1", `key fuse.attr_timeout: 1 is not a duration; write "1s"`},
		{"entry timeout", "[fuse]\nentry_timeout = 1", `key fuse.entry_timeout: 1 is not a duration; write "1s"`},
		{"guard delay zero", "[guard]\ndelay = 0", `key guard.delay: 0 is not a duration; write "0s"`},
		{"socket mode decimal", "socket_mode = 660", `key socket_mode: integer 660 (octal 0o1224) is not a mode; write the mode as an octal string such as "0660"`},
		{"socket mode octal integer", "socket_mode = 0o660", `key socket_mode: integer 432 (octal 0o660) is not a mode; write the mode as an octal string such as "0660"`},
		{"socket mode decimal of 0660", "socket_mode = 432", `key socket_mode: integer 432 (octal 0o660) is not a mode`},
		{"socket mode bool", "socket_mode = true", `key socket_mode: true is not a mode; write the mode as an octal string such as "0660"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig([]byte(tc.toml))
			if err == nil {
				t.Fatalf("no error for %q", tc.toml)
			}
			var ke *KeyError
			if !errors.As(err, &ke) {
				t.Fatalf("error %q is not a KeyError", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want %q", err, tc.want)
			}
		})
	}
	// Several at once, in key order; strings are still accepted beside
	// them, including in [[policy]] tables.
	_, err := ParseConfig([]byte("socket_mode = 660\n[fetch]\ntimeout = 30\n[guard]\ndelay = \"5s\"\n[[policy]]\nmatch = \"*\"\nmode = \"lazy\""))
	if err == nil || !strings.Contains(err.Error(), "key fetch.timeout: 30 is not") || !strings.Contains(err.Error(), "key socket_mode: integer 660") ||
		strings.Index(err.Error(), "fetch.timeout") > strings.Index(err.Error(), "socket_mode") {
		t.Errorf("got %v", err)
	}
	cfg, err := ParseConfig([]byte("socket_mode = \"0600\"\n[fetch]\ntimeout = \"7s\"\n[[policy]]\nmatch = \"*\"\nmode = \"eager\""))
	if err != nil || cfg.SocketMode != 0o600 || cfg.Fetch.Timeout.D() != 7*time.Second {
		t.Errorf("string values: %+v, %v", cfg, err)
	}
}

func TestParseConfigSeveralErrors(t *testing.T) {
	_, err := ParseConfig([]byte("log_level = \"x\"\n[fetch]\nchunk_size = 1"))
	if err == nil || !strings.Contains(err.Error(), "key log_level:") || !strings.Contains(err.Error(), "key fetch.chunk_size:") {
		t.Fatalf("want both keys named, got %v", err)
	}
}

func TestLoadConfigNamesFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte(`log_level = "x"`), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadConfig(p)
	if err == nil || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "key log_level:") {
		t.Fatalf("got %v", err)
	}
	if _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.toml")); err == nil {
		t.Fatal("missing file loaded")
	}
}

// TestDeployDefaultsAreDefaults keeps deploy/containerd/lazybase.defaults.toml
// exactly the defaults: the daemon's loader and a plain decode into a zero
// Config both give DefaultConfig, and every key of Config is set in the
// file, or, for the keys that have no value by default (lists, tables,
// [[policy]]) or a host-dependent one (fuse.passthrough), shown commented
// out. A new key without a documented default fails here.
func TestDeployDefaultsAreDefaults(t *testing.T) {
	p := filepath.Join("..", "deploy", "containerd", "lazybase.defaults.toml")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	loaded, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(loaded, want) {
		t.Errorf("LoadConfig(%s)\n got %+v\nwant %+v", p, loaded, want)
	}
	// Decoded over nothing, the file alone must state every default.
	var bare Config
	dec := toml.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&bare); err != nil {
		t.Fatalf("%s: %v", p, err)
	}
	bare.FUSE.Passthrough = want.FUSE.Passthrough // host-dependent, commented out
	if !reflect.DeepEqual(bare, want) {
		t.Errorf("%s decoded into a zero Config\n got %+v\nwant %+v", p, bare, want)
	}

	var doc map[string]any
	if err := toml.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	keys := configKeys(reflect.TypeFor[Config](), "")
	if len(keys) < 40 {
		t.Fatalf("found %d keys in Config, want every key", len(keys))
	}
	for _, k := range keys {
		set := lookupKey(doc, k.path)
		switch {
		case k.noDefault:
			name := k.path[len(k.path)-1]
			commented := regexp.MustCompile(`(?m)^# (` + name + ` = |\[\[` + name + `\]\]$)`)
			if set || !commented.Match(b) {
				t.Errorf("%s: key %s has no written default: want it commented out (# %s = …), set %v", p, k, name, set)
			}
		case !set:
			t.Errorf("%s: key %s is not set to its default", p, k)
		}
	}
}

// configKey is one TOML key of Config.
type configKey struct {
	path []string
	// noDefault: the default is none (a list or a table) or depends on the
	// host (fuse.passthrough), so the defaults file shows the key commented
	// out.
	noDefault bool
}

func (k configKey) String() string { return strings.Join(k.path, ".") }

// configKeys lists the leaf keys of the struct type t by their toml tags.
func configKeys(t reflect.Type, prefix string) []configKey {
	var keys []configKey
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "" || name == "-" {
			continue
		}
		path := name
		if prefix != "" {
			path = prefix + "." + name
		}
		switch f.Type.Kind() {
		case reflect.Struct:
			keys = append(keys, configKeys(f.Type, path)...)
		case reflect.Map, reflect.Slice:
			keys = append(keys, configKey{path: strings.Split(path, "."), noDefault: true})
		default:
			keys = append(keys, configKey{path: strings.Split(path, "."), noDefault: path == "fuse.passthrough"})
		}
	}
	return keys
}

// lookupKey reports whether the decoded TOML document sets the key path.
func lookupKey(doc map[string]any, path []string) bool {
	for i, name := range path {
		v, ok := doc[name]
		if !ok {
			return false
		}
		if i == len(path)-1 {
			return true
		}
		if doc, ok = v.(map[string]any); !ok {
			return false
		}
	}
	return false
}

// TestDeployExampleLoads keeps deploy/containerd/lazybase.toml, the
// commented example, loadable by the daemon, and checks the values it
// shows off: the metrics listener on loopback and two sample policy rules,
// with everything else at its default.
func TestDeployExampleLoads(t *testing.T) {
	p := filepath.Join("..", "deploy", "containerd", "lazybase.toml")
	cfg, err := LoadConfig(p)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	want.MetricsAddress = "127.0.0.1:9106"
	want.Policy = []PolicyRule{
		{Match: "*/release/*", Mode: ModeEager},
		{Match: "docker.io/library/golang:*", Mode: ModeLazy},
	}
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("%s\n got %+v\nwant %+v", p, cfg, want)
	}
}

// TestUpstreamTranslation checks the one place where lazybase keys become
// upstream ones.
func TestUpstreamTranslation(t *testing.T) {
	cfg, err := ParseConfig([]byte(`
log_level = "trace"
[fetch]
timeout = "7s"
max_retries = 3
chunk_size = 65536
[prefetch]
enable = false
default_size = 1000
timeout = "4s"
async_size = 2000
[background_fetch]
enable = false
max_concurrency = 5
[cache]
http_cache = "memory"
fs_cache = "disk"
max_lru_entries = 20
max_open_files = 30
resolve_ttl = "60s"
[fuse]
passthrough = true
attr_timeout = "2s"
entry_timeout = "3s"
`))
	if err != nil {
		t.Fatal(err)
	}
	sc, opts, err := cfg.upstream(t.Context(), exportguard.NewBlobSource(), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := config.Config{
		HTTPCacheType:            "memory",
		FSCacheType:              "",
		ResolveResultEntryTTLSec: 60,
		PrefetchSize:             1000,
		PrefetchTimeoutSec:       4,
		PrefetchAsyncSize:        2000,
		NoPrefetch:               true,
		NoBackgroundFetch:        true,
		Debug:                    true,
		MaxConcurrency:           5,
		// profile.publish is on by default: the publisher needs stargz's
		// first-access entries.
		LogFileAccess:        true,
		BlobConfig:           config.BlobConfig{ChunkSize: 65536, FetchTimeoutSec: 7, MaxRetries: 3},
		DirectoryCacheConfig: config.DirectoryCacheConfig{MaxLRUCacheEntry: 20, MaxCacheFds: 30, Direct: true},
		// MergeBufferSize and MergeWorkerCount are stargz's loader defaults.
		FuseConfig: config.FuseConfig{PassThrough: true, AttrTimeout: 2, EntryTimeout: 3,
			MergeBufferSize: 419430400, MergeWorkerCount: 10},
	}
	if sc.Config != want {
		t.Errorf("fs config\n got %+v\nwant %+v", sc.Config, want)
	}
	off, err := ParseConfig([]byte("[profile]\npublish = false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if osc, _, err := off.upstream(t.Context(), exportguard.NewBlobSource(), nil); err != nil || osc.Config.LogFileAccess {
		t.Errorf("profile.publish = false without access_record_dir: LogFileAccess %v (err %v), want false", osc.Config.LogFileAccess, err)
	}
	if sc.ResolverConfig.RequestTimeoutSec != 7 {
		t.Errorf("request timeout = %d", sc.ResolverConfig.RequestTimeoutSec)
	}
	if len(opts) != 2 {
		t.Errorf("want the registry hosts and TOC-checking filesystem options, got %d options", len(opts))
	}
}

// TestUpstreamFUSETracing: stargz's FUSE request tracing (its Debug
// option, go-fuse's per-request log) is on at log level trace and only
// there, whether the level comes from log_level or from --log-level (which
// the CLI copies into LogLevel).
func TestUpstreamFUSETracing(t *testing.T) {
	for _, level := range []string{"trace", "debug", "info", "warn", "error"} {
		cfg := DefaultConfig()
		cfg.LogLevel = level
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
		sc, _, err := cfg.upstream(t.Context(), exportguard.NewBlobSource(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if want := level == "trace"; sc.Config.Debug != want {
			t.Errorf("log level %s: FUSE tracing (Debug) = %v, want %v", level, sc.Config.Debug, want)
		}
	}
}

func TestParseConfigGuard(t *testing.T) {
	cfg, err := ParseConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	g := cfg.Guard
	if !g.Enable || g.ContainerdAddress != "/run/containerd/containerd.sock" || g.Parallelism != 4 || g.Delay.D() != 10*time.Second {
		t.Errorf("guard defaults %+v", g)
	}
	cfg, err = ParseConfig([]byte("[guard]\nenable = true\ncontainerd_address = \"/tmp/x/containerd.sock\"\nparallelism = 8\ndelay = \"0s\""))
	if err != nil {
		t.Fatal(err)
	}
	g = cfg.Guard
	if g.ContainerdAddress != "/tmp/x/containerd.sock" || g.Parallelism != 8 || g.Delay.D() != 0 {
		t.Errorf("guard values %+v", g)
	}
	// A disabled guard needs no containerd address.
	if cfg, err = ParseConfig([]byte("[guard]\nenable = false\ncontainerd_address = \"\"")); err != nil || cfg.Guard.Enable {
		t.Errorf("disabled guard: %+v, %v", cfg.Guard, err)
	}
}

func TestKernelAtLeast(t *testing.T) {
	for _, tc := range []struct {
		release string
		want    bool
	}{
		{"6.9.0", true}, {"6.18.44-fc-v445", true}, {"7.0", true}, {"6.8.12-amd64", false},
		{"5.15.0-91-generic", false}, {"6", false}, {"", false}, {"x.y", false},
	} {
		if got := kernelAtLeast(tc.release, 6, 9); got != tc.want {
			t.Errorf("kernelAtLeast(%q, 6, 9) = %v, want %v", tc.release, got, tc.want)
		}
	}
}

package lazypull

import (
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/exportguard"
)

// upstreamOnPurpose lists the fields of stargz's service.Config (by TOML
// key) that lazybase sets from its own configuration, each with the
// reason. Every other field must keep stargz's loader default.
var upstreamOnPurpose = map[string]string{
	"http_cache_type":                     "cache.http_cache chooses memory or disk",
	"filesystem_cache_type":               "cache.fs_cache chooses memory or disk",
	"resolve_result_entry_ttl_sec":        "cache.resolve_ttl",
	"prefetch_size":                       "prefetch.default_size",
	"prefetch_timeout_sec":                "prefetch.timeout",
	"prefetch_async_size":                 "prefetch.async_size",
	"noprefetch":                          "prefetch.enable",
	"no_background_fetch":                 "background_fetch.enable",
	"debug":                               "FUSE request tracing only at log_level trace",
	"max_concurrency":                     "background_fetch.max_concurrency",
	"no_prometheus":                       "the upstream metrics feed the daemon's status (fetched bytes per layer)",
	"log_file_access":                     "on when access_record_dir is set: the access recorder reads these entries",
	"blob.chunk_size":                     "fetch.chunk_size",
	"blob.fetching_timeout_sec":           "fetch.timeout bounds a chunk fetch with its retries",
	"blob.max_retries":                    "fetch.max_retries",
	"directory_cache.max_lru_cache_entry": "cache.max_lru_entries",
	"directory_cache.max_cache_fds":       "cache.max_open_files",
	"directory_cache.direct":              "always true: FUSE passthrough hands the kernel the cache file itself",
	"fuse.attr_timeout":                   "fuse.attr_timeout",
	"fuse.entry_timeout":                  "fuse.entry_timeout",
	"fuse.passthrough":                    "fuse.passthrough (on by default where the kernel supports it)",
	"resolver.request_timeout_sec":        "fetch.timeout bounds every registry request",
}

// upstreamLeftAtDefault lists the fields lazybase leaves at stargz's
// loader default. A field in neither list is one a new stargz version
// added: decide which list it belongs in.
var upstreamLeftAtDefault = []string{
	"allow_no_verification",
	"disable_verification",
	"resolve_result_entry",
	"blob.valid_interval",
	"blob.check_always",
	"blob.force_single_range_mode",
	"blob.prefetch_chunk_size",
	"blob.min_wait_msec",
	"blob.max_wait_msec",
	"directory_cache.sync_add",
	"directory_cache.fadv_dontneed",
	"fuse.merge_buffer_size",
	"fuse.merge_worker_count",
	"kubeconfig_keychain.enable_keychain",
	"kubeconfig_keychain.kubeconfig_path",
	"cri_keychain.enable_keychain",
	"cri_keychain.image_service_path",
	"cri_keychain.listen_path",
	"resolver.host",
	"snapshotter.allow_invalid_mounts_on_restart",
}

// configLeaves returns every non-struct field of v by its dotted TOML key,
// as stargz's loader names it: an embedded struct without a toml tag is
// flattened into its parent.
func configLeaves(v reflect.Value, prefix string, out map[string]reflect.Value) {
	t := v.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if key == "" && !f.Anonymous {
			key = f.Name
		}
		name := prefix
		if key != "" {
			name = prefix + key
		}
		if f.Type.Kind() == reflect.Struct {
			if key != "" {
				name += "."
			}
			configLeaves(v.Field(i), name, out)
			continue
		}
		out[name] = v.Field(i)
	}
}

// TestUpstreamDefaults walks every field of the upstream configuration the
// daemon builds and compares it with stargz's loader default: fields
// lazybase does not set on purpose must hold that default, for the
// default configuration and for one that changes every lazybase key.
func TestUpstreamDefaults(t *testing.T) {
	def, err := stargzDefaults()
	if err != nil {
		t.Fatal(err)
	}
	// The loader defaults stargz documents, so that the tag reader is
	// checked against upstream's own words and not only against itself.
	if def.MergeBufferSize != 400<<20 || def.MergeWorkerCount != 10 || !def.Direct || def.PassThrough {
		t.Errorf("stargz loader defaults: merge_buffer_size %d, merge_worker_count %d, direct %v, passthrough %v; want 419430400, 10, true, false",
			def.MergeBufferSize, def.MergeWorkerCount, def.Direct, def.PassThrough)
	}
	defLeaves := map[string]reflect.Value{}
	configLeaves(reflect.ValueOf(def), "", defLeaves)

	leftAtDefault := map[string]bool{}
	for _, k := range upstreamLeftAtDefault {
		if _, dup := upstreamOnPurpose[k]; dup {
			t.Errorf("%s is in both lists", k)
		}
		leftAtDefault[k] = true
	}
	var keys []string
	for k := range defLeaves {
		keys = append(keys, k)
		if _, ok := upstreamOnPurpose[k]; !ok && !leftAtDefault[k] {
			t.Errorf("stargz config field %s is in neither upstreamOnPurpose nor upstreamLeftAtDefault: a new upstream field; decide whether lazybase sets it", k)
		}
	}
	sort.Strings(keys)
	for k := range upstreamOnPurpose {
		if _, ok := defLeaves[k]; !ok {
			t.Errorf("upstreamOnPurpose names %s, which stargz's config does not have", k)
		}
	}
	for k := range leftAtDefault {
		if _, ok := defLeaves[k]; !ok {
			t.Errorf("upstreamLeftAtDefault names %s, which stargz's config does not have", k)
		}
	}

	defaultCfg := DefaultConfig()
	changed, err := ParseConfig([]byte(`
log_level = "trace"
access_record_dir = "/var/lib/lazybase/access"
[registry]
mirrors."docker.io" = [{ host = "mirror.local:5000", insecure = true }]
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
fs_cache = "memory"
max_lru_entries = 20
max_open_files = 30
resolve_ttl = "60s"
[fuse]
passthrough = false
attr_timeout = "2s"
entry_timeout = "3s"
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
	}{{"default", defaultCfg}, {"changed", changed}} {
		sc, _, err := tc.cfg.upstream(t.Context(), exportguard.NewBlobSource(), nil)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]reflect.Value{}
		configLeaves(reflect.ValueOf(sc), "", got)
		for _, k := range keys {
			if !leftAtDefault[k] {
				continue
			}
			if g, w := got[k].Interface(), defLeaves[k].Interface(); !reflect.DeepEqual(g, w) {
				t.Errorf("%s config: stargz field %s = %v, want stargz's default %v", tc.name, k, g, w)
			}
		}
	}
}

// TestApplyDefaultTags checks the tag reader on every kind it accepts and
// on tags it must refuse.
func TestApplyDefaultTags(t *testing.T) {
	type inner struct {
		D   time.Duration `default:"90s"`
		DN  time.Duration `default:"42"`
		U8  uint8         `default:"255"`
		F   float64       `default:"1.5"`
		Neg int32         `default:"-7"`
	}
	type good struct {
		S     string `default:"memory"`
		B     bool   `default:"true"`
		I     int64  `default:"419430400"`
		Empty int    `default:""`
		None  int
		In    inner `toml:"in"`
		inner
	}
	var g good
	if err := applyDefaultTags(reflect.ValueOf(&g).Elem(), ""); err != nil {
		t.Fatal(err)
	}
	want := good{S: "memory", B: true, I: 419430400,
		In:    inner{D: 90 * time.Second, DN: 42, U8: 255, F: 1.5, Neg: -7},
		inner: inner{}, // unexported: left alone
	}
	if g != want {
		t.Errorf("got %+v\nwant %+v", g, want)
	}

	for _, tc := range []struct {
		name string
		v    any
		want string
	}{
		{"bad bool", &struct {
			B bool `default:"yes please"`
		}{}, "field B"},
		{"bad int", &struct {
			I int `default:"10MB"`
		}{}, "field I"},
		{"overflow", &struct {
			I int8 `default:"300"`
		}{}, "field I"},
		{"negative uint", &struct {
			U uint `default:"-1"`
		}{}, "field U"},
		{"bad duration", &struct {
			D time.Duration `default:"5 parsecs"`
		}{}, "field D"},
		{"unsupported kind", &struct {
			L []string `default:"a,b"`
		}{}, "unsupported kind slice"},
		{"nested", &struct {
			N struct {
				X int `default:"x"`
			}
		}{}, "field N.X"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := applyDefaultTags(reflect.ValueOf(tc.v).Elem(), "")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestUpstreamPassthroughBuffer pins the fields whose zero broke FUSE
// passthrough: the daemon's config must carry stargz's merge buffer size
// and worker count whatever lazybase's own keys say.
func TestUpstreamPassthroughBuffer(t *testing.T) {
	for _, pt := range []bool{true, false} {
		cfg := DefaultConfig()
		cfg.FUSE.Passthrough = pt
		sc, _, err := cfg.upstream(t.Context(), exportguard.NewBlobSource(), nil)
		if err != nil {
			t.Fatal(err)
		}
		if sc.PassThrough != pt || sc.MergeBufferSize != 419430400 || sc.MergeWorkerCount != 10 || !sc.Direct {
			t.Errorf("passthrough %v: fuse config %+v, directory cache %+v", pt, sc.FuseConfig, sc.DirectoryCacheConfig)
		}
	}
}

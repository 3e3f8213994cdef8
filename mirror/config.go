package mirror

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path"
	"regexp"
	"strings"
	"time"

	"github.com/containerd/platforms"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/pelletier/go-toml/v2"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

// Config is the mirror.toml file. Every field states its default; a zero
// value means the default.
//
//	# The mirror namespace: registry host and optional path prefix. A source
//	# repository "REGISTRY/PATH" is mirrored to "DESTINATION/PATH". Empty:
//	# converted images go back into their source repository, and tag_suffix
//	# and records_repository are required. Default: "".
//	destination = "mirror.example.com/esgz"
//	# Appended to the source tag to name the converted tag. Default: "".
//	tag_suffix = "-esgz"
//	# Where conversion records (and the converted layer blobs they hold)
//	# live. Default: DESTINATION/lazybase-records.
//	records_repository = "mirror.example.com/esgz/lazybase-records"
//	# Output format: "estargz" or "zstd-chunked". Default: "estargz".
//	format = "estargz"
//	# Compression level: gzip 1-9, zstd 1-22. Default: 0, the format's
//	# default (gzip 6, zstd 3).
//	level = 0
//	# Largest piece of a file compressed as one stream. Default: 0 (4 MiB).
//	chunk_size = 0
//	# Directory of prefetch lists or profiles (prefetch.Load formats). For a
//	# source repository PATH (without the registry) and tag TAG the mirror
//	# reads NAME.TAG.json, else NAME.json, where NAME is PATH with "/"
//	# replaced by "_"; no file means no prefetch list. A profile recorded for
//	# another image is ignored with a warning. Default: "".
//	prefetch_dir = "/etc/lazybase/prefetch"
//	# Platforms converted from multi-platform sources ("os/arch[/variant]").
//	# Default: every platform. A source's own list overrides it.
//	platforms = ["linux/amd64", "linux/arm64"]
//	# Images mirrored at the same time. Default: 2.
//	concurrency = 2
//	# Layers converted at the same time, and compressors running in
//	# parallel, per converter. Default: 0 (GOMAXPROCS).
//	jobs = 0
//	# Blobs transferred at the same time per image. Default: 4.
//	transfer_jobs = 4
//	# Attempts per image before it counts as failed; between two attempts
//	# the mirror waits 4 x retry_initial, doubling up to retry_max.
//	# Default: 3.
//	image_attempts = 3
//	# HTTP retries per request on 429, 5xx and connection resets, with
//	# exponential backoff and jitter from retry_initial up to retry_max;
//	# Retry-After is honoured up to retry_after_max. Defaults: 5, "200ms",
//	# "10s", "60s".
//	retries = 5
//	retry_initial = "200ms"
//	retry_max = "10s"
//	retry_after_max = "60s"
//	# Plain HTTP to non-loopback registries, and skipping TLS verification.
//	# Defaults: false, false.
//	plain_http = false
//	insecure = false
//	# Directory for converted layers and spooled tars. What killed runs
//	# left there (converter directories no live process holds, untouched
//	# for a minute) is removed when a run or serve starts. Default:
//	# os.TempDir().
//	temp_dir = ""
//	# How long a conversion claim holds (see the package documentation):
//	# mirrors started together (shards of an Indexed Job) claim a layer in
//	# the records repository before converting it, and a mirror finding
//	# another's fresh claim waits for its conversion record instead of
//	# converting too. The holder renews its claim every third of this; a
//	# mirror killed mid-way holds its layers for at most this long before
//	# another takes over. Keep it well above the clock skew between the
//	# mirrors' machines. "0s" turns claims off. Claims need the record
//	# key. Default: "2m".
//	claim_ttl = "2m"
//	# Quarantine: an image that fails the same way (same source digest,
//	# same reason) on this many consecutive runs is known bad, reported as
//	# "quarantined" and not tried again (three manifest reads per run, no
//	# blob) until its source digest changes. Known-bad images do not make a
//	# run fail: the exit status is non-zero only for new failures. The state
//	# lives in failure records in the records repository (no disk needed)
//	# and needs the record key. 0 turns quarantine off. Default: 2.
//	quarantine_after = 2
//	# Registry timeouts, per request phase, never for a whole transfer: TCP
//	# connect, TLS handshake, response headers once the request is sent,
//	# and idle (the longest wait for the next bytes of a body, sent or
//	# received). A registry silent for longer fails that request with an
//	# error naming the host; timeouts are not retried per request (retries
//	# does not apply), the image's attempts are. Defaults: "30s", "10s",
//	# "60s", "60s".
//	connect_timeout = "30s"
//	tls_timeout = "10s"
//	response_timeout = "60s"
//	idle_timeout = "60s"
//
//	[[source]]
//	# Repository to mirror, with its registry. Required.
//	repository = "registry-1.docker.io/library/debian"
//	# Shell globs (path.Match) a tag must match. Default: every tag,
//	# unless tag_regex is set.
//	tags = ["bookworm*", "12.*"]
//	# Regular expression (RE2, anchored) a tag must match, instead of or in
//	# addition to tags (a tag matching either is kept). Default: "".
//	tag_regex = '^12\.[0-9]+$'
//	# Keep only the newest N matching tags. Default: 0 (all).
//	newest = 3
//	# How "newest" orders tags: "semver" (a leading "v" dropped, tags split
//	# into runs of digits and of other characters and compared run by run,
//	# digits numerically, a "-" suffix marking a pre-release: 1.10 > 1.9 >
//	# 1.9-rc2 > 1.9-rc1 > 1.8; ties broken by the plain string) or
//	# "created" (the image config's created time, ties by semver order;
//	# costs a manifest and a config request per matching tag).
//	# Default: "semver".
//	order = "semver"
//	# Platforms for this source. Default: the global list.
//	platforms = ["linux/amd64"]
//
// Conversion records are reused only when they carry a valid MAC made with
// the record key (see the package documentation). The key is read from a
// file or an environment variable (one of the two; at least 16 bytes,
// surrounding whitespace dropped). Without a key, records are neither read
// nor written and every layer is converted. Defaults: "", "".
//
//	record_key_file = "/etc/lazybase/record-key"
//	# record_key_env = "LAZYBASE_MIRROR_RECORD_KEY"
//
// The [profiles] table configures the closed prefetch loop: the mirror
// merges the prefetch profiles builders publish for its conversions and
// re-converts when the merge changes materially (see ProfilesConfig).
//
//	[profiles]
//	from_registry = true
//	min_change = 0.1
//	max_age = "720h"
//	half_life = "168h"
//	max_artifacts = 64
//	min_fraction = 0.0
//	layer_bytes = 0
//	image_bytes = 0
//
// The [serve] table configures `lazybase mirror serve` (see ServeConfig).
//
//	[serve]
//	# The shared secret notifications must carry, from a file or an
//	# environment variable (one of the two; at least 16 bytes). Required
//	# unless no_auth is set. Defaults: "", "".
//	token_file = "/etc/lazybase/serve/token"
//	# token_env = "LAZYBASE_MIRROR_TOKEN"
//	# Accept unauthenticated notifications; refused unless the listen
//	# address is loopback. Default: false.
//	no_auth = false
//	# Push events accepted in one request; more is answered 413.
//	# Default: 100.
//	max_events = 100
//	# Jobs that may wait, in all and per source repository; beyond them a
//	# notification is answered 503 (all) or 429 (its repository), with
//	# Retry-After. Defaults: 256, 32.
//	queue = 256
//	queue_per_repository = 32
//	# On SIGTERM, how long queued and running jobs may still run. Default:
//	# "30s".
//	grace_period = "30s"
//	# Where jobs not finished within the grace period are saved; the next
//	# start queues them again. Default: "" (they are only logged).
//	state_file = "/var/lib/lazybase/mirror-serve.json"
type Config struct {
	Destination       string   `toml:"destination"`
	TagSuffix         string   `toml:"tag_suffix"`
	RecordsRepository string   `toml:"records_repository"`
	Format            string   `toml:"format"`
	Level             int      `toml:"level"`
	ChunkSize         int      `toml:"chunk_size"`
	PrefetchDir       string   `toml:"prefetch_dir"`
	Platforms         []string `toml:"platforms"`
	Concurrency       int      `toml:"concurrency"`
	Jobs              int      `toml:"jobs"`
	TransferJobs      int      `toml:"transfer_jobs"`
	ImageAttempts     int      `toml:"image_attempts"`
	Retries           *int     `toml:"retries"`
	RetryInitial      string   `toml:"retry_initial"`
	RetryMax          string   `toml:"retry_max"`
	RetryAfterMax     string   `toml:"retry_after_max"`
	PlainHTTP         bool     `toml:"plain_http"`
	Insecure          bool     `toml:"insecure"`
	TempDir           string   `toml:"temp_dir"`
	ClaimTTL          string   `toml:"claim_ttl"`
	QuarantineAfter   *int     `toml:"quarantine_after"`
	Sources           []Source `toml:"source"`

	// Profiles is the [profiles] table: the closed prefetch loop (see
	// ProfilesConfig).
	Profiles ProfilesConfig `toml:"profiles"`

	// Record authentication and the [serve] table (see security.go).
	RecordAuth
	Serve ServeConfig `toml:"serve"`

	// Registry timeouts (imageio.Timeouts), durations such as "30s".
	ConnectTimeout  string `toml:"connect_timeout"`
	TLSTimeout      string `toml:"tls_timeout"`
	ResponseTimeout string `toml:"response_timeout"`
	IdleTimeout     string `toml:"idle_timeout"`
}

// Source is one [[source]] table.
type Source struct {
	Repository string   `toml:"repository"`
	Tags       []string `toml:"tags"`
	TagRegex   string   `toml:"tag_regex"`
	Newest     int      `toml:"newest"`
	Order      string   `toml:"order"`
	Platforms  []string `toml:"platforms"`

	re        *regexp.Regexp
	platforms []v1.Platform
}

// Orders of "newest".
const (
	OrderSemver  = "semver"
	OrderCreated = "created"
)

// Defaults.
const (
	DefaultConcurrency   = 2
	DefaultTransferJobs  = 4
	DefaultImageAttempts = 3
	DefaultRetries       = 5
	DefaultRetryInitial  = 200 * time.Millisecond
	DefaultRetryMax      = 10 * time.Second
	DefaultRetryAfterMax = 60 * time.Second
	// RecordsRepositoryName is appended to the destination to name the
	// default records repository.
	RecordsRepositoryName = "lazybase-records"
)

// LoadConfig reads and validates a mirror.toml file.
func LoadConfig(file string) (*Config, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading mirror config: %w", err)
	}
	c, err := ParseConfig(b)
	if err != nil {
		return nil, fmt.Errorf("mirror config %s: %w", file, err)
	}
	return c, nil
}

// ParseConfig decodes a mirror.toml document strictly (unknown keys are
// errors), fills in defaults and validates it. Errors name the key at fault.
func ParseConfig(b []byte) (*Config, error) {
	var c Config
	dec := toml.NewDecoder(bytes.NewReader(b)).DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		var sm *toml.StrictMissingError
		if errors.As(err, &sm) {
			var keys []string
			for _, e := range sm.Errors {
				keys = append(keys, strings.Join(e.Key(), "."))
			}
			return nil, fmt.Errorf("unknown key(s): %s", strings.Join(keys, ", "))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			row, col := de.Position()
			if k := strings.Join(de.Key(), "."); k != "" {
				return nil, fmt.Errorf("key %s (line %d, column %d): %w", k, row, col, err)
			}
			return nil, fmt.Errorf("line %d, column %d: %w", row, col, err)
		}
		return nil, err
	}
	if err := c.validate(); err != nil {
		return nil, err
	}
	return &c, nil
}

func (c *Config) validate() error {
	if c.Format == "" {
		c.Format = string(convert.FormatEStargz)
	}
	f, err := convert.ParseFormat(c.Format)
	if err != nil {
		return fmt.Errorf("format: %w", err)
	}
	c.Format = string(f)
	if c.Level != 0 {
		max := 9
		if f == convert.FormatZstdChunked {
			max = 22
		}
		if c.Level < 1 || c.Level > max {
			return fmt.Errorf("level: must be 1-%d for %s, got %d", max, f, c.Level)
		}
	}
	if c.ChunkSize < 0 {
		return fmt.Errorf("chunk_size: must not be negative, got %d", c.ChunkSize)
	}
	c.Destination = strings.TrimSuffix(c.Destination, "/")
	if c.Destination == "" {
		if c.TagSuffix == "" {
			return errors.New("tag_suffix: required when destination is empty (images go back into their source repository)")
		}
		if c.RecordsRepository == "" {
			return errors.New("records_repository: required when destination is empty")
		}
	}
	if c.RecordsRepository == "" {
		c.RecordsRepository = c.Destination + "/" + RecordsRepositoryName
	}
	for _, r := range [][2]string{{"destination", c.Destination}, {"records_repository", c.RecordsRepository}} {
		if err := imageio.CheckRepositoryPath(r[1]); r[1] != "" && err != nil {
			return fmt.Errorf("%s: %w", r[0], err)
		}
	}
	if c.TagSuffix != "" && !validTagPart.MatchString(c.TagSuffix) {
		return fmt.Errorf("tag_suffix: %q has characters a tag may not hold", c.TagSuffix)
	}
	for _, p := range []struct {
		key string
		v   *int
		def int
	}{
		{"concurrency", &c.Concurrency, DefaultConcurrency},
		{"transfer_jobs", &c.TransferJobs, DefaultTransferJobs},
		{"image_attempts", &c.ImageAttempts, DefaultImageAttempts},
	} {
		if *p.v < 0 {
			return fmt.Errorf("%s: must not be negative, got %d", p.key, *p.v)
		}
		if *p.v == 0 {
			*p.v = p.def
		}
	}
	if c.Jobs < 0 {
		return fmt.Errorf("jobs: must not be negative, got %d", c.Jobs)
	}
	if c.Retries == nil {
		n := DefaultRetries
		c.Retries = &n
	} else if *c.Retries < 0 {
		return fmt.Errorf("retries: must not be negative, got %d", *c.Retries)
	}
	for _, d := range []struct {
		key string
		v   *string
		def time.Duration
	}{
		{"retry_initial", &c.RetryInitial, DefaultRetryInitial},
		{"retry_max", &c.RetryMax, DefaultRetryMax},
		{"retry_after_max", &c.RetryAfterMax, DefaultRetryAfterMax},
	} {
		if *d.v == "" {
			*d.v = d.def.String()
		}
		v, err := time.ParseDuration(*d.v)
		if err != nil || v <= 0 {
			return fmt.Errorf("%s: want a positive duration such as \"500ms\", got %q", d.key, *d.v)
		}
	}
	if c.QuarantineAfter == nil {
		n := DefaultQuarantineAfter
		c.QuarantineAfter = &n
	} else if *c.QuarantineAfter < 0 {
		return fmt.Errorf("quarantine_after: must not be negative, got %d", *c.QuarantineAfter)
	}
	if c.ClaimTTL == "" {
		c.ClaimTTL = DefaultClaimTTL.String()
	}
	if v, err := time.ParseDuration(c.ClaimTTL); err != nil || v < 0 {
		return fmt.Errorf("claim_ttl: want a duration such as \"2m\" (\"0s\" for no claims), got %q", c.ClaimTTL)
	}
	if err := c.validateTimeouts(); err != nil {
		return err
	}
	if err := c.Profiles.validate(); err != nil {
		return err
	}
	global, err := parsePlatforms(c.Platforms)
	if err != nil {
		return fmt.Errorf("platforms: %w", err)
	}
	if len(c.Sources) == 0 {
		return errors.New("source: at least one [[source]] is required")
	}
	for i := range c.Sources {
		s := &c.Sources[i]
		key := fmt.Sprintf("source[%d]", i)
		if s.Repository == "" {
			return fmt.Errorf("%s.repository: required", key)
		}
		s.Repository = strings.TrimSuffix(s.Repository, "/")
		if err := imageio.CheckRepositoryPath(s.Repository); err != nil {
			return fmt.Errorf("%s.repository: %w", key, err)
		}
		for _, g := range s.Tags {
			if _, err := path.Match(g, ""); err != nil {
				return fmt.Errorf("%s.tags: glob %q: %w", key, g, err)
			}
		}
		if s.TagRegex != "" {
			re, err := regexp.Compile("^(?:" + s.TagRegex + ")$")
			if err != nil {
				return fmt.Errorf("%s.tag_regex: %w", key, err)
			}
			s.re = re
		}
		if s.Newest < 0 {
			return fmt.Errorf("%s.newest: must not be negative, got %d", key, s.Newest)
		}
		switch s.Order {
		case "":
			s.Order = OrderSemver
		case OrderSemver, OrderCreated:
		default:
			return fmt.Errorf("%s.order: want %q or %q, got %q", key, OrderSemver, OrderCreated, s.Order)
		}
		if len(s.Platforms) == 0 {
			s.platforms = global
		} else if s.platforms, err = parsePlatforms(s.Platforms); err != nil {
			return fmt.Errorf("%s.platforms: %w", key, err)
		}
	}
	return c.validateSecurity()
}

var validTagPart = regexp.MustCompile(`^[A-Za-z0-9_.-]+$`)

func parsePlatforms(ss []string) ([]v1.Platform, error) {
	var out []v1.Platform
	for _, s := range ss {
		p, err := platforms.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("%q: %w", s, err)
		}
		out = append(out, v1.Platform{OS: p.OS, Architecture: p.Architecture, Variant: p.Variant})
	}
	return out, nil
}

func (c *Config) durations() (initial, max, afterMax time.Duration) {
	initial, _ = time.ParseDuration(c.RetryInitial)
	max, _ = time.ParseDuration(c.RetryMax)
	afterMax, _ = time.ParseDuration(c.RetryAfterMax)
	return
}

// claimTTL returns the claim expiry of a validated Config (0: no claims).
func (c *Config) claimTTL() time.Duration {
	d, _ := time.ParseDuration(c.ClaimTTL)
	return d
}

// validateTimeouts fills in and checks the registry timeouts.
func (c *Config) validateTimeouts() error {
	d := imageio.DefaultTimeouts()
	for _, t := range []struct {
		key string
		v   *string
		def time.Duration
	}{
		{"connect_timeout", &c.ConnectTimeout, d.Connect},
		{"tls_timeout", &c.TLSTimeout, d.TLSHandshake},
		{"response_timeout", &c.ResponseTimeout, d.ResponseHeader},
		{"idle_timeout", &c.IdleTimeout, d.Idle},
	} {
		if *t.v == "" {
			*t.v = t.def.String()
		}
		v, err := time.ParseDuration(*t.v)
		if err != nil || v <= 0 {
			return fmt.Errorf("%s: want a positive duration such as \"30s\", got %q", t.key, *t.v)
		}
	}
	return nil
}

// Timeouts returns the registry timeouts of a validated Config.
func (c *Config) Timeouts() imageio.Timeouts {
	p := func(s string) time.Duration { d, _ := time.ParseDuration(s); return d }
	return imageio.Timeouts{
		Connect:        p(c.ConnectTimeout),
		TLSHandshake:   p(c.TLSTimeout),
		ResponseHeader: p(c.ResponseTimeout),
		Idle:           p(c.IdleTimeout),
	}
}

// MatchTag reports whether tag passes the source's glob and regex filters
// (newest N is applied to a whole tag list by SelectTags).
func (s *Source) MatchTag(tag string) bool {
	if len(s.Tags) == 0 && s.re == nil {
		return true
	}
	for _, g := range s.Tags {
		if ok, _ := path.Match(g, tag); ok {
			return true
		}
	}
	return s.re != nil && s.re.MatchString(tag)
}

package lazypull

import (
	"context"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/service"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	dockercliconfig "github.com/docker/cli/cli/config"

	"github.com/lazybase/lazybase/exportguard"
)

// upstream translates c into the upstream stargz service configuration and
// options. It is the one place where lazybase keys meet upstream ones. It
// starts from stargz's own defaults (stargzDefaults) and sets only the
// fields below; TestUpstreamDefaults lists them, each with its reason.
// The registry hosts read blobs through src, the daemon's blob source;
// bg (nil: none) declines the background fetch of the layers the export
// guard holds.
func (c *Config) upstream(ctx context.Context, src *exportguard.BlobSource, bg *backgroundFetch) (service.Config, []service.Option, error) {
	secs := func(d Duration) int64 { return int64(d.D() / time.Second) }
	cacheType := func(v string) string {
		if v == "memory" {
			return "memory"
		}
		return "" // upstream: anything but "memory" is the disk cache
	}
	fetchSecs := secs(c.Fetch.Timeout)

	sc, err := stargzDefaults()
	if err != nil {
		return service.Config{}, nil, err
	}
	fc := &sc.Config
	fc.HTTPCacheType = cacheType(c.Cache.HTTPCache)
	fc.FSCacheType = cacheType(c.Cache.FSCache)
	fc.ResolveResultEntryTTLSec = int(secs(c.Cache.ResolveTTL))
	fc.DirectoryCacheConfig.MaxLRUCacheEntry = c.Cache.MaxLRUEntries
	fc.DirectoryCacheConfig.MaxCacheFds = c.Cache.MaxOpenFiles
	// No in-memory copy of cached data (also upstream's default): FUSE
	// passthrough needs it, as it hands the kernel the cache file itself.
	fc.DirectoryCacheConfig.Direct = true

	fc.NoPrefetch = !c.Prefetch.Enable
	fc.PrefetchSize = c.Prefetch.DefaultSize
	fc.PrefetchTimeoutSec = secs(c.Prefetch.Timeout)
	fc.PrefetchAsyncSize = c.Prefetch.AsyncSize

	fc.NoBackgroundFetch = !c.BackgroundFetch.Enable
	fc.MaxConcurrency = c.BackgroundFetch.MaxConcurrency

	fc.BlobConfig.ChunkSize = c.Fetch.ChunkSize
	// The fetch context bounds a chunk fetch including its retries, so a
	// stalled registry turns into EIO after Timeout.
	fc.BlobConfig.FetchTimeoutSec = fetchSecs
	fc.BlobConfig.MaxRetries = c.Fetch.MaxRetries

	fc.FuseConfig.PassThrough = c.FUSE.Passthrough
	fc.FuseConfig.AttrTimeout = secs(c.FUSE.AttrTimeout)
	fc.FuseConfig.EntryTimeout = secs(c.FUSE.EntryTimeout)

	// The upstream filesystem logs the first access to each file; the
	// access recorder turns those entries into records, for the record
	// files and the profile publisher.
	fc.LogFileAccess = c.AccessRecordDir != "" || c.Profile.Publish

	// FUSE request tracing is only wanted at the most verbose level.
	fc.Debug = c.LogLevel == "trace"
	// The upstream metrics feed Status (fetched bytes per layer).
	fc.NoPrometheus = false

	sc.ResolverConfig.RequestTimeoutSec = int(fetchSecs)

	// Blob reads are served from the export guard's verified copies once
	// it has committed them (exportguard.BlobSource).
	hosts := c.registryHosts(ctx, dockerCredentials(ctx, c.Auth), src)
	return sc, []service.Option{
		service.WithCustomRegistryHosts(hosts),
		// Every TOC is checked before stargz reads it (tocstore.go), and
		// the background fetch of a layer the guard holds is declined
		// (bgfetch.go).
		service.WithFilesystemOptions(tocCheckOption(bg)),
	}, nil
}

// dockerCredentials reads credentials from the docker config.json in
// a.DockerConfig (or the default location), honouring its auths, credsStore
// and credHelpers, with a.CredentialHelpers overriding credHelpers.
func dockerCredentials(ctx context.Context, a AuthConfig) resolver.Credential {
	return func(host string, _ reference.Spec) (string, string, error) {
		cf, err := dockercliconfig.Load(a.DockerConfig)
		if err != nil {
			// A broken config file must not break anonymous pulls.
			log.G(ctx).WithError(err).WithField("host", host).Warn("reading docker config; pulling anonymously")
			return "", "", nil
		}
		if len(a.CredentialHelpers) > 0 {
			if cf.CredentialHelpers == nil {
				cf.CredentialHelpers = make(map[string]string, len(a.CredentialHelpers))
			}
			for h, helper := range a.CredentialHelpers {
				cf.CredentialHelpers[h] = helper
			}
		}
		key := host
		if host == "docker.io" || host == "registry-1.docker.io" {
			key = "https://index.docker.io/v1/"
		}
		ac, err := cf.GetAuthConfig(key)
		if err != nil {
			return "", "", fmt.Errorf("credentials for %s: %w", host, err)
		}
		if ac.IdentityToken != "" {
			return "", ac.IdentityToken, nil
		}
		return ac.Username, ac.Password, nil
	}
}

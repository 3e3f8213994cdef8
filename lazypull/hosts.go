package lazypull

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	dconfig "github.com/containerd/containerd/v2/core/remotes/docker/config"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	rhttp "github.com/hashicorp/go-retryablehttp"

	"github.com/lazybase/lazybase/exportguard"
)

// registryHosts returns the registry hosts the lazy filesystem reads from:
// those of the hosts.toml directories in registry.config_path when it is
// set, else those of registry.mirrors. Every host's HTTP client reads blobs
// through src, which serves the ones the export guard committed from their
// local copy.
func (c *Config) registryHosts(ctx context.Context, creds resolver.Credential, src *exportguard.BlobSource) source.RegistryHosts {
	if len(c.Registry.ConfigPath) > 0 {
		return hostsFromDirs(ctx, c.Registry.ConfigPath, c.Fetch.Timeout.D(), creds, src)
	}
	return hostsFromMirrors(c.Registry.Mirrors, c.Fetch.Timeout.D(), creds, src)
}

// hostsFromMirrors resolves a reference to registry host H as the mirrors
// of H, in their order, then H itself. Loopback hosts and insecure mirrors
// are reached over plain HTTP, the others over HTTPS; docker.io is
// registry-1.docker.io. Each host gets a client of its own on every call,
// since stargz's fetcher tunes the client it is handed.
func hostsFromMirrors(mirrors map[string][]Mirror, timeout time.Duration, creds resolver.Credential, src *exportguard.BlobSource) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		targets := append(slices.Clone(mirrors[host]), Mirror{Host: host})
		hosts := make([]docker.RegistryHost, 0, len(targets))
		for _, m := range targets {
			client := retryingClient(timeout, src)
			h := docker.RegistryHost{
				Client:       client,
				Host:         m.Host,
				Scheme:       "https",
				Path:         "/v2",
				Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
				Authorizer: docker.NewDockerAuthorizer(
					docker.WithAuthClient(client),
					docker.WithAuthCreds(func(host string) (string, string, error) { return creds(host, ref) })),
			}
			if loopback, _ := docker.MatchLocalhost(m.Host); loopback || m.Insecure {
				h.Scheme = "http"
			}
			if h.Host == "docker.io" {
				h.Host = "registry-1.docker.io"
			}
			hosts = append(hosts, h)
		}
		return hosts, nil
	}
}

// retryingClient returns a go-retryablehttp client (stargz's fetcher
// recognizes its transport and applies fetch.max_retries and its backoff
// to it) bounded by timeout per request, whose own transport is src's
// blob transport over a pooled HTTP transport.
func retryingClient(timeout time.Duration, src *exportguard.BlobSource) *http.Client {
	rc := rhttp.NewClient()
	rc.Logger = nil // not a line per request
	rc.HTTPClient.Timeout = timeout
	rc.HTTPClient.Transport = src.Transport(rc.HTTPClient.Transport)
	return rc.StandardClient()
}

// hostsFromDirs resolves registry hosts from containerd hosts.toml
// directories, the first directory that has an entry for a host winning.
// Every client is bounded by timeout per request and reads blobs through
// src.
func hostsFromDirs(ctx context.Context, roots []string, timeout time.Duration, creds resolver.Credential, src *exportguard.BlobSource) source.RegistryHosts {
	hostDir := func(host string) (string, error) {
		for _, root := range roots {
			dir, err := dconfig.HostDirFromRoot(root)(host)
			if err == nil && dir != "" {
				return dir, nil
			}
			if err != nil && !errdefs.IsNotFound(err) {
				return "", fmt.Errorf("hosts directory %s for %s: %w", root, host, err)
			}
		}
		return "", errdefs.ErrNotFound
	}
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		opts := dconfig.HostOptions{
			HostDir: hostDir,
			Credentials: func(host string) (string, string, error) {
				return creds(host, ref)
			},
			// containerd calls this for its default client and again for
			// a copy of it per host with settings of its own; the copy
			// keeps the blob transport when its transport was not replaced
			// (src.transport does not wrap twice).
			UpdateClient: func(c *http.Client) error {
				c.Timeout = timeout
				c.Transport = src.Transport(c.Transport)
				return nil
			},
		}
		hosts, err := dconfig.ConfigureHosts(ctx, opts)(ref.Hostname())
		if err != nil {
			return nil, fmt.Errorf("registry hosts for %s: %w", ref.Hostname(), err)
		}
		return hosts, nil
	}
}

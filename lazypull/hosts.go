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
	return c.hostsWith(ctx, creds, lazyClients(c.Fetch.Timeout.D(), src))
}

// hostsWith returns the registry hosts of c's [registry] section, each
// with an HTTP client made by clients: those of the hosts.toml directories
// in registry.config_path when it is set, else those of registry.mirrors.
// The lazy filesystem and the export guard both resolve hosts here, with
// clients of their own.
func (c *Config) hostsWith(ctx context.Context, creds resolver.Credential, clients hostClients) source.RegistryHosts {
	if len(c.Registry.ConfigPath) > 0 {
		return hostsFromDirs(ctx, c.Registry.ConfigPath, creds, clients)
	}
	return hostsFromMirrors(c.Registry.Mirrors, creds, clients)
}

// hostClients makes the HTTP clients of registry hosts for one user of
// them (the lazy filesystem, the export guard).
type hostClients struct {
	// new returns the client of a host of registry.mirrors (or of the
	// registry itself), one per host and call.
	new func() *http.Client
	// update adapts a client containerd made for a host of a hosts.toml
	// file (dconfig.HostOptions.UpdateClient): containerd calls it for its
	// default client and again for a copy of it per host with settings of
	// its own, which keeps the already updated transport unless TLS or
	// dial settings gave it a fresh one.
	update func(c *http.Client) error
}

// lazyClients are the lazy filesystem's: retrying clients bounded by
// timeout per request, reading blobs through src.
func lazyClients(timeout time.Duration, src *exportguard.BlobSource) hostClients {
	return hostClients{
		new: func() *http.Client { return retryingClient(timeout, src) },
		update: func(c *http.Client) error {
			c.Timeout = timeout
			// src.Transport does not wrap twice.
			c.Transport = src.Transport(c.Transport)
			return nil
		},
	}
}

// hostsFromMirrors resolves a reference to registry host H as the mirrors
// of H, in their order, then H itself. Loopback hosts and insecure mirrors
// are reached over plain HTTP, the others over HTTPS; docker.io is
// registry-1.docker.io. Each host gets a client of its own on every call,
// since stargz's fetcher tunes the client it is handed.
func hostsFromMirrors(mirrors map[string][]Mirror, creds resolver.Credential, clients hostClients) source.RegistryHosts {
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		host := ref.Hostname()
		targets := append(slices.Clone(mirrors[host]), Mirror{Host: host})
		hosts := make([]docker.RegistryHost, 0, len(targets))
		for _, m := range targets {
			client := clients.new()
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
// Every client is adapted by clients.update.
func hostsFromDirs(ctx context.Context, roots []string, creds resolver.Credential, clients hostClients) source.RegistryHosts {
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
			UpdateClient: clients.update,
		}
		hosts, err := dconfig.ConfigureHosts(ctx, opts)(ref.Hostname())
		if err != nil {
			return nil, fmt.Errorf("registry hosts for %s: %w", ref.Hostname(), err)
		}
		return hosts, nil
	}
}

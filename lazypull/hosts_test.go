package lazypull

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/stargz-snapshotter/cache"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/remote"
	rhttp "github.com/hashicorp/go-retryablehttp"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/exportguard"
)

// retryingBlobTransport returns the blob transport inside c's retrying
// transport, failing t when c is not built that way: stargz's fetcher
// applies fetch.max_retries and its backoff only to a *rhttp.RoundTripper,
// and the blob transport must sit below it.
func retryingBlobTransport(t *testing.T, c *http.Client) *exportguard.BlobTransport {
	t.Helper()
	rt, ok := c.Transport.(*rhttp.RoundTripper)
	if !ok || rt.Client == nil || rt.Client.HTTPClient == nil {
		t.Fatalf("client transport is %T, want a retrying one", c.Transport)
	}
	bt, ok := rt.Client.HTTPClient.Transport.(*exportguard.BlobTransport)
	if !ok {
		t.Fatalf("transport inside the retrying one is %T, want the blob source's", rt.Client.HTTPClient.Transport)
	}
	if _, twice := bt.Next.(*exportguard.BlobTransport); twice {
		t.Fatal("blob transport wrapped twice")
	}
	if rt.Client.Logger != nil {
		t.Errorf("retrying client logs every request (Logger %T)", rt.Client.Logger)
	}
	return bt
}

// TestHostsFromMirrors: a reference's hosts are the mirrors of its registry
// in their order, then the registry; loopback and insecure ones are reached
// over HTTP, docker.io is registry-1.docker.io; each has its own retrying
// client, bounded by the fetch timeout, over the daemon's blob source.
func TestHostsFromMirrors(t *testing.T) {
	mirrors := map[string][]Mirror{
		"docker.io": {
			{Host: "mirror.example:5000", Insecure: true},
			{Host: "localhost:5001"},
			{Host: "secure.example"},
		},
		"ghcr.io": {{Host: "127.0.0.1:6000"}},
	}
	type host struct{ host, scheme string }
	for _, tc := range []struct {
		ref  string
		want []host
	}{
		{"docker.io/library/golang:1", []host{
			{"mirror.example:5000", "http"}, {"localhost:5001", "http"}, {"secure.example", "https"},
			{"registry-1.docker.io", "https"},
		}},
		{"ghcr.io/o/i:1", []host{{"127.0.0.1:6000", "http"}, {"ghcr.io", "https"}}},
		{"127.0.0.1:5000/i:1", []host{{"127.0.0.1:5000", "http"}}},
		{"localhost:5000/i:1", []host{{"localhost:5000", "http"}}},
		{"[::1]:5000/i:1", []host{{"[::1]:5000", "http"}}},
		{"quay.io/o/i:1", []host{{"quay.io", "https"}}},
	} {
		t.Run(tc.ref, func(t *testing.T) {
			src := exportguard.NewBlobSource()
			spec, err := reference.Parse(tc.ref)
			if err != nil {
				t.Fatal(err)
			}
			hs, err := hostsFromMirrors(mirrors, anonymous, lazyClients(7*time.Second, src))(spec)
			if err != nil {
				t.Fatal(err)
			}
			var got []host
			clients := map[*http.Client]bool{}
			for _, h := range hs {
				got = append(got, host{h.Host, h.Scheme})
				if h.Path != "/v2" || h.Capabilities != docker.HostCapabilityPull|docker.HostCapabilityResolve || h.Authorizer == nil {
					t.Errorf("host %s: path %q, capabilities %v, authorizer %v", h.Host, h.Path, h.Capabilities, h.Authorizer)
				}
				if clients[h.Client] {
					t.Errorf("host %s shares its client with another host", h.Host)
				}
				clients[h.Client] = true
				if bt := retryingBlobTransport(t, h.Client); bt.Source != src {
					t.Errorf("host %s reads blobs through another blob source", h.Host)
				}
				if rt := h.Client.Transport.(*rhttp.RoundTripper); rt.Client.HTTPClient.Timeout != 7*time.Second {
					t.Errorf("host %s: request timeout %s, want the fetch timeout", h.Host, rt.Client.HTTPClient.Timeout)
				}
			}
			if len(got) != len(tc.want) {
				t.Fatalf("hosts %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Errorf("host %d: %v, want %v (all: %v)", i, got[i], tc.want[i], got)
				}
			}
		})
	}
}

// TestHostsFromMirrorsReadsThroughMirror: stargz's fetcher reads a blob of
// an image on an unreachable registry from its mirror, which comes first.
func TestHostsFromMirrorsReadsThroughMirror(t *testing.T) {
	e := newSourceEnv(t, 300_000)
	ref := strings.Replace(e.ref, e.proxy.host, "registry.invalid", 1)
	spec, err := reference.Parse(ref)
	if err != nil {
		t.Fatal(err)
	}
	hosts := hostsFromMirrors(map[string][]Mirror{"registry.invalid": {{Host: e.proxy.host}}}, anonymous, lazyClients(10*time.Second, exportguard.NewBlobSource()))
	r := remote.NewResolver(config.BlobConfig{ChunkSize: 50000, FetchTimeoutSec: 10}, nil)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: e.layer, Size: int64(len(e.data))}
	blob, err := r.Resolve(context.Background(), hosts, spec, desc, cache.NewMemoryCache())
	if err != nil {
		t.Fatal(err)
	}
	defer blob.Close()
	got := make([]byte, len(e.data))
	if n, err := blob.ReadAt(got, 0); n != len(got) || (err != nil && err != io.EOF) {
		t.Fatalf("ReadAt: %d bytes, %v", n, err)
	}
	if !bytes.Equal(got, e.data) {
		t.Error("bytes read through the mirror differ from the blob")
	}
	if n := e.proxy.blobBytes(e.layer); n < int64(len(e.data)) {
		t.Errorf("the mirror sent %d blob bytes, want at least %d", n, len(e.data))
	}
}

// TestHostsFromDirsBlobTransportOnce: with hosts.toml directories, every
// host's client reads blobs through the blob source exactly once, including
// a host with a header of its own (containerd updates a copy of its
// already updated default client for it) and one with TLS settings of its
// own (a fresh transport); a committed blob is served locally through them.
func TestHostsFromDirsBlobTransportOnce(t *testing.T) {
	e := newSourceEnv(t, 200_000)
	g, src := e.trigger(t, time.Hour, prometheus.NewRegistry())
	dir := t.TempDir()
	toml := `server = "http://` + e.proxy.host + `"

[host."http://` + e.proxy.host + `"]
  capabilities = ["pull", "resolve"]
  header = { "X-Lazybase-Test" = "1" }

[host."https://tls-mirror.example"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
`
	hostDir := filepath.Join(dir, e.proxy.host)
	if err := os.MkdirAll(hostDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(hostDir, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	spec, err := reference.Parse(e.ref)
	if err != nil {
		t.Fatal(err)
	}
	hs, err := hostsFromDirs(context.Background(), []string{dir}, anonymous, lazyClients(9*time.Second, src))(spec)
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 3 {
		t.Fatalf("%d hosts, want the two of hosts.toml and the server", len(hs))
	}
	var local *http.Client
	for _, h := range hs {
		bt, ok := h.Client.Transport.(*exportguard.BlobTransport)
		if !ok {
			t.Fatalf("host %s: transport %T, want the blob source's", h.Host, h.Client.Transport)
		}
		if _, twice := bt.Next.(*exportguard.BlobTransport); twice || bt.Source != src {
			t.Errorf("host %s: blob transport over %T, source %p (want %p)", h.Host, bt.Next, bt.Source, src)
		}
		if h.Client.Timeout != 9*time.Second {
			t.Errorf("host %s: timeout %s, want the fetch timeout", h.Host, h.Client.Timeout)
		}
		if h.Host == e.proxy.host && h.Header.Get("X-Lazybase-Test") == "1" {
			local = h.Client
		}
	}
	if local == nil {
		t.Fatalf("no host %s with its header among %+v", e.proxy.host, hs)
	}

	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.Mounted(ctx, exportguard.MountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: string(ModeExportBase), When: exportguard.WhenNow})
	waitState(t, g.Status, "builder", e.layer, exportguard.StateMaterialized)
	before := e.proxy.blobBytes(e.layer)
	if resp := get(t, local, http.MethodGet, e.blobURL(), ""); !bytes.Equal(readAll(t, resp.Body), e.data) {
		t.Errorf("blob through the hosts.toml client: %s, bytes differ", resp.Status)
	}
	if n := e.proxy.blobBytes(e.layer) - before; n != 0 {
		t.Errorf("the registry sent %d blob bytes after the commit", n)
	}
}

// TestRegistryHostsPerDaemon: the registry hosts of two daemons (two roots,
// two blob sources) read blobs through their own source only: a blob one
// daemon's guard committed is local to it and still comes from the
// registry for the other.
func TestRegistryHostsPerDaemon(t *testing.T) {
	e := newSourceEnv(t, 200_000)
	g, srcA := e.trigger(t, time.Hour, prometheus.NewRegistry())
	srcB := exportguard.NewBlobSource()
	cfgA, cfgB := DefaultConfig(), DefaultConfig()
	cfgA.Root, cfgB.Root = t.TempDir(), t.TempDir()
	ctx := namespaces.WithNamespace(context.Background(), "builder")
	g.Mounted(ctx, exportguard.MountEvent{Namespace: "builder", Ref: e.ref, Layer: e.layer, Mode: string(ModeExportBase), When: exportguard.WhenNow})
	waitState(t, g.Status, "builder", e.layer, exportguard.StateMaterialized)

	spec, err := reference.Parse(e.ref)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		cfg        Config
		src        *exportguard.BlobSource
		fromRemote int64
	}{{"daemon A", cfgA, srcA, 0}, {"daemon B", cfgB, srcB, 1000}} {
		hs, err := tc.cfg.registryHosts(context.Background(), anonymous, tc.src)(spec)
		if err != nil {
			t.Fatal(err)
		}
		before := e.proxy.blobBytes(e.layer)
		resp := get(t, hs[0].Client, http.MethodGet, e.blobURL(), "bytes=0-999")
		if !bytes.Equal(readAll(t, resp.Body), e.data[:1000]) {
			t.Errorf("%s: range %s, bytes differ", tc.name, resp.Status)
		}
		if n := e.proxy.blobBytes(e.layer) - before; n != tc.fromRemote {
			t.Errorf("%s: the registry sent %d bytes, want %d", tc.name, n, tc.fromRemote)
		}
	}
}

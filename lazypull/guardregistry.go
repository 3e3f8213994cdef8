package lazypull

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/remotes"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	remoteserrors "github.com/containerd/containerd/v2/core/remotes/errors"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/errdefs"
	"github.com/containerd/platforms"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	dref "github.com/distribution/reference"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/cpuacct"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/prefetch"
)

// maxManifestBytes bounds a manifest or index the guard reads.
const maxManifestBytes = 8 << 20

// hostsRegistry is the export guard's exportguard.Registry over the
// daemon's registry hosts, the ones the lazy filesystem reads from
// ([registry] mirrors or config_path hosts.toml, [auth] credentials): a
// request goes to each host able to serve it in turn, as containerd's
// resolver tries them (mirrors, then the registry itself), through
// containerd's docker resolver and fetcher; per-host TLS, CA, headers and
// credentials come with each host's client and authorizer. Every byte is
// verified by the guard (blobs) or here (manifests) against its digest.
type hostsRegistry struct {
	resolveHosts source.RegistryHosts
	creds        resolver.Credential // nil: anonymous
	platform     platforms.MatchComparer

	mu    sync.Mutex
	hosts map[string]cachedHosts // by repository (host/path)
}

var _ exportguard.Registry = (*hostsRegistry)(nil)

// newHostsRegistry returns the guard's Registry over hosts, authenticating
// with creds.
func newHostsRegistry(hosts source.RegistryHosts, creds resolver.Credential) *hostsRegistry {
	return &hostsRegistry{resolveHosts: hosts, creds: creds, platform: platforms.Default(), hosts: map[string]cachedHosts{}}
}

// guardClients are the export guard's: no retries of their own (the guard
// retries a blob, resuming from the bytes it has) and no bound on a whole
// request, but every phase of a request bounded by t (the guard.*_timeout
// keys), as exportguard.Remote bounds its own.
func guardClients(t exportguard.Timeouts) hostClients {
	return hostClients{
		new: func() *http.Client {
			return &http.Client{Transport: closedRange{imageio.NewTransport(false, t)}}
		},
		update: func(c *http.Client) error {
			// A transport containerd made (its default one, or a fresh
			// one with a host's TLS settings) is bounded; a copy of the
			// default client keeps the transport bounded already.
			if _, ok := c.Transport.(*http.Transport); ok || c.Transport == nil {
				inner := c.Transport
				if inner == nil {
					inner = http.DefaultTransport
				}
				c.Transport = closedRange{imageio.BoundedTransport(inner, t)}
			}
			return nil
		},
	}
}

// RegistryHosts returns the registry hosts of c's [registry] section
// (mirrors in order, then each image's own registry; or those of the
// config_path hosts.toml directories) with the [auth] credentials, for
// clients outside the daemon that must reach registries as it does, such
// as the pull of `lazybase prefetch record`. Every phase of a request is
// bounded by the [guard] timeouts.
func (c *Config) RegistryHosts(ctx context.Context) docker.RegistryHosts {
	hosts := c.hostsWith(ctx, dockerCredentials(ctx, c.Auth), guardClients(c.Guard.Timeouts()))
	return func(host string) ([]docker.RegistryHost, error) {
		spec := reference.Spec{Locator: host}
		return hosts(spec)
	}
}

// ManifestSource returns a reader of manifests and indexes over the
// registry hosts of c's [registry] section with the [auth] credentials,
// as RegistryHosts reaches them, for `lazybase prefetch` to resolve a
// profile against its image: an image named by a host that only a mirror
// serves is read from the mirror. Every manifest is checked against its
// digest.
func (c *Config) ManifestSource(ctx context.Context) prefetch.ManifestSource {
	creds := dockerCredentials(ctx, c.Auth)
	return newHostsRegistry(c.hostsWith(ctx, creds, guardClients(c.Guard.Timeouts())), creds)
}

var _ prefetch.ManifestSource = (*hostsRegistry)(nil)

// Manifest implements prefetch.ManifestSource: the manifest or index ref
// names, from the first host that resolves it, verified against its
// digest.
func (r *hostsRegistry) Manifest(ctx context.Context, ref string) (prefetch.RawManifest, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return prefetch.RawManifest{}, err
	}
	res, err := r.resolver(spec)
	if err != nil {
		return prefetch.RawManifest{}, err
	}
	name, desc, err := res.Resolve(ctx, spec.String())
	if err != nil {
		return prefetch.RawManifest{}, fmt.Errorf("resolving %s: %w", spec, err)
	}
	f, err := res.Fetcher(ctx, name)
	if err != nil {
		return prefetch.RawManifest{}, fmt.Errorf("reading manifest of %s: %w", spec, err)
	}
	b, err := fetchVerified(ctx, f, desc)
	if err != nil {
		return prefetch.RawManifest{}, fmt.Errorf("reading manifest of %s: %w", spec, err)
	}
	h, err := v1.NewHash(desc.Digest.String())
	if err != nil {
		return prefetch.RawManifest{}, fmt.Errorf("manifest of %s: %w", spec, err)
	}
	return prefetch.RawManifest{MediaType: types.MediaType(desc.MediaType), Digest: h, Body: b}, nil
}

// blobSizeKey is the context key of the size of the blob a request
// fetches, for closedRange.
type blobSizeKey struct{}

// closedRange names the last byte of an open-ended "Range: bytes=N-"
// (containerd's fetcher resumes a blob with one) when the request's
// context carries the blob's size: go-containerregistry's registry, among
// others, answers only "bytes=N-M".
type closedRange struct{ next http.RoundTripper }

func (t closedRange) RoundTrip(req *http.Request) (*http.Response, error) {
	size, ok := req.Context().Value(blobSizeKey{}).(int64)
	rng := req.Header.Get("Range")
	if ok && size > 0 && strings.HasPrefix(rng, "bytes=") && strings.HasSuffix(rng, "-") && !strings.Contains(rng, ",") {
		if first, err := strconv.ParseInt(rng[len("bytes="):len(rng)-1], 10, 64); err == nil && first < size {
			req = req.Clone(req.Context())
			req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", first, size-1))
		}
	}
	return t.next.RoundTrip(req)
}

// parseRef returns ref, normalized (docker.io/library/ for short names) as
// containerd's reference.
func parseRef(ref string) (reference.Spec, error) {
	named, err := dref.ParseDockerRef(ref)
	if err != nil {
		return reference.Spec{}, fmt.Errorf("parsing reference %q: %w", ref, err)
	}
	spec, err := reference.Parse(named.String())
	if err != nil {
		return reference.Spec{}, fmt.Errorf("parsing reference %q: %w", ref, err)
	}
	return spec, nil
}

// hostsTTL is how long the guard keeps the hosts (and their clients) of
// one repository before it resolves them again, so that an edited
// hosts.toml takes effect without a restart.
const hostsTTL = time.Minute

// cachedHosts are the hosts of one repository and when they were made.
type cachedHosts struct {
	hosts []docker.RegistryHost
	made  time.Time
}

// resolver returns a resolver of spec's repository over its hosts, made
// at most hostsTTL ago, whose clients keep their connections from one
// request to the next. Each resolver gets authorizers of its own, which
// read the credentials again (a changed password or credential helper
// answer takes effect at the next request, a wrong one fails it). A
// failure to resolve the hosts is not kept.
func (r *hostsRegistry) resolver(spec reference.Spec) (remotes.Resolver, error) {
	r.mu.Lock()
	c, ok := r.hosts[spec.Locator]
	r.mu.Unlock()
	if !ok || time.Since(c.made) >= hostsTTL {
		hosts, err := r.resolveHosts(spec)
		if err != nil {
			return nil, fmt.Errorf("registry hosts of %s: %w", spec.Locator, err)
		}
		c = cachedHosts{hosts: hosts, made: time.Now()}
		r.mu.Lock()
		r.hosts[spec.Locator] = c
		r.mu.Unlock()
	}
	hosts := slices.Clone(c.hosts)
	for i := range hosts {
		opts := []docker.AuthorizerOpt{docker.WithAuthClient(hosts[i].Client)}
		if r.creds != nil {
			opts = append(opts, docker.WithAuthCreds(func(host string) (string, string, error) { return r.creds(host, spec) }))
		}
		if len(hosts[i].Header) > 0 {
			opts = append(opts, docker.WithAuthHeader(hosts[i].Header))
		}
		hosts[i].Authorizer = docker.NewDockerAuthorizer(opts...)
	}
	return docker.NewResolver(docker.ResolverOptions{
		Hosts: func(string) ([]docker.RegistryHost, error) { return hosts, nil },
	}), nil
}

// FetchRange implements exportguard.Fetcher: the blob from the first host
// that has it, from offset on. Errors that retrying cannot fix (no host
// has the blob, access denied) are marked exportguard.Permanent.
func (r *hostsRegistry) FetchRange(ctx context.Context, ref string, desc ocispec.Descriptor, offset int64) (io.ReadCloser, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, exportguard.Permanent(err)
	}
	res, err := r.resolver(spec)
	if err != nil {
		return nil, err
	}
	f, err := res.Fetcher(ctx, spec.Locator)
	if err != nil {
		return nil, classify(fmt.Errorf("blob %s of %s: %w", desc.Digest, spec.Locator, err))
	}
	rc, err := f.Fetch(context.WithValue(ctx, blobSizeKey{}, desc.Size), desc)
	if err != nil {
		return nil, classify(fmt.Errorf("blob %s of %s: %w", desc.Digest, spec.Locator, err))
	}
	if offset > 0 {
		s, ok := rc.(io.Seeker)
		if !ok {
			rc.Close()
			return nil, exportguard.Permanent(fmt.Errorf("blob %s of %s: fetcher cannot resume at %d", desc.Digest, spec.Locator, offset))
		}
		if _, err := s.Seek(offset, io.SeekStart); err != nil {
			rc.Close()
			return nil, fmt.Errorf("blob %s of %s: resuming at %d: %w", desc.Digest, spec.Locator, offset, err)
		}
	}
	// containerd's fetcher sends the request on the first read: make it
	// now, so that a host that fails is reported here, classified.
	br := bufio.NewReaderSize(rc, 64<<10)
	if _, err := br.Peek(1); err != nil && !errors.Is(err, io.EOF) {
		rc.Close()
		return nil, classify(fmt.Errorf("blob %s of %s: %w", desc.Digest, spec.Locator, err))
	}
	return struct {
		io.Reader
		io.Closer
	}{br, rc}, nil
}

// BlobSize implements exportguard.Registry with a HEAD request for the
// blob, at the first host that answers it.
func (r *hostsRegistry) BlobSize(ctx context.Context, ref string, dgst digest.Digest) (int64, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return 0, err
	}
	if err := dgst.Validate(); err != nil {
		return 0, fmt.Errorf("blob digest %q: %w", dgst, err)
	}
	res, err := r.resolver(spec)
	if err != nil {
		return 0, err
	}
	f, err := res.Fetcher(ctx, spec.Locator)
	if err != nil {
		return 0, fmt.Errorf("size of blob %s of %s: %w", dgst, spec.Locator, err)
	}
	fd, ok := f.(remotes.FetcherByDigest)
	if !ok {
		return 0, fmt.Errorf("size of blob %s of %s: fetcher %T cannot look blobs up by digest", dgst, spec.Locator, f)
	}
	// FetchByDigest sends the HEAD requests (blobs first, each host in
	// turn) and defers the GET to the first read, which never comes.
	rc, desc, err := fd.FetchByDigest(ctx, dgst)
	if err != nil {
		return 0, fmt.Errorf("size of blob %s of %s: %w", dgst, spec.Locator, err)
	}
	rc.Close()
	if desc.Size < 0 {
		return 0, fmt.Errorf("size of blob %s of %s: registry sent no length", dgst, spec.Locator)
	}
	return desc.Size, nil
}

// ImageLayers implements exportguard.Registry: it reads ref's manifest,
// for the running platform when ref names an index, each verified against
// its digest.
func (r *hostsRegistry) ImageLayers(ctx context.Context, ref string) ([]digest.Digest, error) {
	spec, err := parseRef(ref)
	if err != nil {
		return nil, err
	}
	res, err := r.resolver(spec)
	if err != nil {
		return nil, err
	}
	name, desc, err := res.Resolve(ctx, spec.String())
	if err != nil {
		return nil, fmt.Errorf("resolving %s: %w", spec, err)
	}
	f, err := res.Fetcher(ctx, name)
	if err != nil {
		return nil, fmt.Errorf("reading manifest of %s: %w", spec, err)
	}
	// An index per level at most: an index of indexes is refused.
	for range 2 {
		b, err := fetchVerified(ctx, f, desc)
		if err != nil {
			return nil, fmt.Errorf("reading manifest of %s: %w", spec, err)
		}
		switch {
		case images.IsIndexType(desc.MediaType):
			var idx ocispec.Index
			if err := json.Unmarshal(b, &idx); err != nil {
				return nil, fmt.Errorf("reading index %s of %s: %w", desc.Digest, spec, err)
			}
			child, err := r.pick(idx)
			if err != nil {
				return nil, fmt.Errorf("index %s of %s: %w", desc.Digest, spec, err)
			}
			desc = child
			continue
		case images.IsManifestType(desc.MediaType):
			var m ocispec.Manifest
			if err := json.Unmarshal(b, &m); err != nil {
				return nil, fmt.Errorf("reading manifest %s of %s: %w", desc.Digest, spec, err)
			}
			out := make([]digest.Digest, 0, len(m.Layers))
			for _, l := range m.Layers {
				out = append(out, l.Digest)
			}
			return out, nil
		default:
			return nil, fmt.Errorf("%s of %s is a %q, not an image manifest or index", desc.Digest, spec, desc.MediaType)
		}
	}
	return nil, fmt.Errorf("%s: index nested in an index", spec)
}

// pick returns the image manifest of idx for the running platform, the
// best match if several.
func (r *hostsRegistry) pick(idx ocispec.Index) (ocispec.Descriptor, error) {
	var (
		best  ocispec.Descriptor
		found bool
	)
	for _, d := range idx.Manifests {
		if !images.IsManifestType(d.MediaType) {
			continue
		}
		if d.Platform == nil || !r.platform.Match(*d.Platform) {
			continue
		}
		if !found || r.platform.Less(*d.Platform, *best.Platform) {
			best, found = d, true
		}
	}
	if !found {
		return ocispec.Descriptor{}, fmt.Errorf("no manifest for %s: %w", platforms.DefaultString(), errdefs.ErrNotFound)
	}
	return best, nil
}

// fetchVerified reads the manifest or index desc, at most
// maxManifestBytes, and checks it against desc's digest and size.
func fetchVerified(ctx context.Context, f remotes.Fetcher, desc ocispec.Descriptor) ([]byte, error) {
	if desc.Size > maxManifestBytes {
		return nil, fmt.Errorf("%s: %d bytes, more than the %d a manifest may have", desc.Digest, desc.Size, maxManifestBytes)
	}
	rc, err := f.Fetch(ctx, desc)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, maxManifestBytes+1))
	if err != nil {
		return nil, err
	}
	if desc.Size >= 0 && int64(len(b)) != desc.Size {
		return nil, fmt.Errorf("%s: registry sent %d bytes, descriptor says %d", desc.Digest, len(b), desc.Size)
	}
	span := cpuacct.Default.Start(cpuacct.Hashing)
	got := desc.Digest.Algorithm().FromBytes(b)
	span.End()
	if got != desc.Digest {
		return nil, fmt.Errorf("%s: registry sent content with digest %s", desc.Digest, got)
	}
	return b, nil
}

// classify marks the errors of a blob fetch that retrying cannot fix as
// exportguard.Permanent: no host has the blob, or a host refused the
// request or the credentials (4xx but 408 and 429).
func classify(err error) error {
	if errdefs.IsNotFound(err) || errors.Is(err, docker.ErrInvalidAuthorization) {
		return exportguard.Permanent(err)
	}
	var us remoteserrors.ErrUnexpectedStatus
	if errors.As(err, &us) && us.StatusCode >= 400 && us.StatusCode < 500 &&
		us.StatusCode != http.StatusRequestTimeout && us.StatusCode != http.StatusTooManyRequests {
		return exportguard.Permanent(err)
	}
	return err
}

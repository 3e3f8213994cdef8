package exportguard

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazybase/lazybase/internal/imageio"
)

// Remote is a Fetcher that reads blobs from their image's registry with
// go-containerregistry's authenticating transport, resuming with a
// "Range: bytes=OFFSET-LAST" request. Its zero value is ready to use:
// credentials from the docker config and credential helpers, plain HTTP only
// for loopback registries, certificates verified, every phase of a request
// bounded by the default Timeouts. A registry that stops answering fails the
// attempt with a *TimeoutError naming the host; the Guard retries it like
// any transient error (WithRetry), resuming from the bytes it has.
type Remote struct {
	// Keychain gives registry credentials (authn.DefaultKeychain if nil).
	Keychain authn.Keychain
	// Transport is the base HTTP transport. If nil, a clone of
	// go-containerregistry's remote.DefaultTransport (proxy settings from
	// the environment) with its dial, TLS handshake and response header
	// waits bounded by Timeouts is used. Timeouts and the plain-HTTP policy
	// are applied on top of it.
	Transport http.RoundTripper
	// Timeouts bound each phase of a registry request (zero fields take
	// their defaults): connect, TLS handshake, response headers, and each
	// read of the blob, never the whole transfer.
	Timeouts Timeouts
	// PlainHTTP allows plain HTTP to registries that are not on loopback.
	PlainHTTP bool

	mu         sync.Mutex
	transports map[string]http.RoundTripper // by repository
	base       http.RoundTripper            // of the manifest and size lookups, made once
}

var (
	_ Fetcher  = (*Remote)(nil)
	_ Registry = (*Remote)(nil)
)

// BlobSize implements Registry with a HEAD request for the blob.
func (r *Remote) BlobSize(ctx context.Context, ref string, dgst digest.Digest) (int64, error) {
	nref, err := name.ParseReference(ref)
	if err != nil {
		return 0, fmt.Errorf("parsing reference %q: %w", ref, err)
	}
	d, err := name.NewDigest(nref.Context().Name() + "@" + dgst.String())
	if err != nil {
		return 0, err
	}
	layer, err := remote.Layer(d, r.remoteOptions(ctx)...)
	if err != nil {
		return 0, err
	}
	return layer.Size()
}

// ImageLayers implements Registry: it reads ref's manifest, for the
// running platform when ref names an index.
func (r *Remote) ImageLayers(ctx context.Context, ref string) ([]digest.Digest, error) {
	nref, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("parsing reference %q: %w", ref, err)
	}
	img, err := remote.Image(nref, r.remoteOptions(ctx)...)
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("reading manifest: %w", err)
	}
	out := make([]digest.Digest, 0, len(m.Layers))
	for _, l := range m.Layers {
		out = append(out, digest.Digest(l.Digest.String()))
	}
	return out, nil
}

// remoteOptions are go-containerregistry's options for the lookups: the
// keychain, and the base transport with timeouts and the plain-HTTP
// policy.
func (r *Remote) remoteOptions(ctx context.Context) []remote.Option {
	kc := r.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	r.mu.Lock()
	if r.base == nil {
		r.base = imageio.PolicyTransport(r.baseTransport(), r.PlainHTTP)
	}
	rt := r.base
	r.mu.Unlock()
	return []remote.Option{remote.WithContext(ctx), remote.WithAuthFromKeychain(kc), remote.WithTransport(rt)}
}

// baseTransport is Transport bounded by Timeouts, or a new bounded
// transport.
func (r *Remote) baseTransport() http.RoundTripper {
	if r.Transport != nil {
		return imageio.BoundedTransport(r.Transport, r.Timeouts)
	}
	return imageio.NewTransport(false, r.Timeouts)
}

// FetchRange implements Fetcher. A registry that ignores the Range header is
// read from the start and the first offset bytes are skipped. A response
// whose length disagrees with desc.Size fails with ErrSizeMismatch before a
// byte is read.
func (r *Remote) FetchRange(ctx context.Context, ref string, desc ocispec.Descriptor, offset int64) (io.ReadCloser, error) {
	nref, err := name.ParseReference(ref)
	if err != nil {
		return nil, Permanent(fmt.Errorf("parsing reference %q: %w", ref, err))
	}
	repo := nref.Context()
	rt, err := r.transport(ctx, repo)
	if err != nil {
		return nil, err
	}
	u := url.URL{
		Scheme: repo.Scheme(),
		Host:   repo.RegistryStr(),
		Path:   fmt.Sprintf("/v2/%s/blobs/%s", repo.RepositoryStr(), desc.Digest),
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, Permanent(err)
	}
	if offset > 0 {
		// go-containerregistry's registry, among others, does not answer
		// the open-ended "bytes=N-": name the last byte.
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", offset, desc.Size-1))
	}
	resp, err := (&http.Client{Transport: rt}).Do(req)
	if err != nil {
		return nil, err
	}
	switch resp.StatusCode {
	case http.StatusOK:
		if resp.ContentLength >= 0 && resp.ContentLength != desc.Size {
			resp.Body.Close()
			return nil, fmt.Errorf("registry has %d bytes, descriptor says %d: %w", resp.ContentLength, desc.Size, ErrSizeMismatch)
		}
		if offset > 0 {
			if _, err := io.CopyN(io.Discard, resp.Body, offset); err != nil {
				resp.Body.Close()
				return nil, fmt.Errorf("skipping %d bytes the registry sent again: %w", offset, err)
			}
		}
		return resp.Body, nil
	case http.StatusPartialContent:
		var first, last, total int64
		if _, err := fmt.Sscanf(resp.Header.Get("Content-Range"), "bytes %d-%d/%d", &first, &last, &total); err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("reading Content-Range %q: %w", resp.Header.Get("Content-Range"), err)
		}
		if total != desc.Size {
			resp.Body.Close()
			return nil, fmt.Errorf("registry has %d bytes, descriptor says %d: %w", total, desc.Size, ErrSizeMismatch)
		}
		if first != offset || last != desc.Size-1 {
			resp.Body.Close()
			return nil, Permanent(fmt.Errorf("registry answered range %d-%d for %d-%d", first, last, offset, desc.Size-1))
		}
		return resp.Body, nil
	}
	defer resp.Body.Close()
	err = transport.CheckError(resp, http.StatusOK, http.StatusPartialContent)
	if te, ok := err.(*transport.Error); ok && !te.Temporary() && resp.StatusCode < 500 {
		return nil, Permanent(err)
	}
	return nil, err
}

// transport returns the authenticating transport for repo, made once. The
// lock is not held while the registry is pinged.
func (r *Remote) transport(ctx context.Context, repo name.Repository) (http.RoundTripper, error) {
	key := repo.Name()
	r.mu.Lock()
	rt, ok := r.transports[key]
	r.mu.Unlock()
	if ok {
		return rt, nil
	}
	kc := r.Keychain
	if kc == nil {
		kc = authn.DefaultKeychain
	}
	auth, err := authn.Resolve(ctx, kc, repo)
	if err != nil {
		return nil, fmt.Errorf("credentials for %s: %w", repo, err)
	}
	rt, err = transport.NewWithContext(ctx, repo.Registry, auth, imageio.PolicyTransport(r.baseTransport(), r.PlainHTTP), []string{repo.Scope(transport.PullScope)})
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", repo, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if have, ok := r.transports[key]; ok {
		return have, nil
	}
	if r.transports == nil {
		r.transports = map[string]http.RoundTripper{}
	}
	r.transports[key] = rt
	return rt, nil
}

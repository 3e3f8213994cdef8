package imageio

import (
	"fmt"
	"net/http"
	"runtime"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Option configures a Client.
type Option func(*options) error

type options struct {
	plainHTTP bool
	insecure  bool
	userAgent string
	jobs      int
	keychain  authn.Keychain
	transport http.RoundTripper
	backoff   *remote.Backoff
	timeouts  Timeouts
}

// WithPlainHTTP allows plain HTTP to every registry, not only loopback ones.
func WithPlainHTTP(b bool) Option {
	return func(o *options) error { o.plainHTTP = b; return nil }
}

// WithInsecure skips TLS certificate verification.
func WithInsecure(b bool) Option {
	return func(o *options) error { o.insecure = b; return nil }
}

// WithUserAgent sets the User-Agent sent to registries.
func WithUserAgent(ua string) Option {
	return func(o *options) error { o.userAgent = ua; return nil }
}

// WithJobs sets how many blobs are transferred at the same time.
func WithJobs(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("jobs must be positive, got %d", n)
		}
		o.jobs = n
		return nil
	}
}

// WithKeychain sets where registry credentials come from. The default is
// authn.DefaultKeychain (docker config and credential helpers).
func WithKeychain(kc authn.Keychain) Option {
	return func(o *options) error { o.keychain = kc; return nil }
}

// WithTimeouts bounds each phase of every registry request (see Timeouts;
// zero fields keep their defaults). The default is DefaultTimeouts.
func WithTimeouts(t Timeouts) Option {
	return func(o *options) error {
		if err := t.Validate(); err != nil {
			return err
		}
		o.timeouts = t
		return nil
	}
}

// WithTransport sets the base HTTP transport. The transport policy (plain
// HTTP for loopback registries only) is applied on top of it; WithInsecure
// and WithTimeouts have no effect on a transport given here (build it with
// NewTransport to keep registry requests bounded).
func WithTransport(rt http.RoundTripper) Option {
	return func(o *options) error { o.transport = rt; return nil }
}

// WithRetryBackoff sets how failed registry requests are retried.
func WithRetryBackoff(b remote.Backoff) Option {
	return func(o *options) error { o.backoff = &b; return nil }
}

// Client reads and writes images under one transport policy.
type Client struct {
	o         options
	transport http.RoundTripper
}

// New returns a Client.
func New(opts ...Option) (*Client, error) {
	o := options{
		userAgent: "lazybase",
		jobs:      runtime.GOMAXPROCS(0),
		keychain:  authn.DefaultKeychain,
	}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	base := o.transport
	if base == nil {
		base = NewTransport(o.insecure, o.timeouts)
	}
	return &Client{o: o, transport: PolicyTransport(base, o.plainHTTP)}, nil
}

func (c *Client) remoteOptions(ctxOpt remote.Option) []remote.Option {
	opts := []remote.Option{
		ctxOpt,
		remote.WithTransport(c.transport),
		remote.WithAuthFromKeychain(c.o.keychain),
		remote.WithUserAgent(c.o.userAgent),
		remote.WithJobs(c.o.jobs),
	}
	if c.o.backoff != nil {
		opts = append(opts, remote.WithRetryBackoff(*c.o.backoff))
	}
	return opts
}

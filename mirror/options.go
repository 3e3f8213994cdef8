package mirror

import (
	"fmt"
	"net/http"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert"
)

// Option configures a Mirror.
type Option func(*options) error

type options struct {
	keychain  authn.Keychain
	transport http.RoundTripper
	shard     Shard
	force     bool
	onImage   func(ImageReport)
	onLayer   func(convert.Event)
	onRetry   func(*http.Request, int, error)
	backoff   *remote.Backoff
	userAgent string
	recordKey []byte
}

// WithKeychain sets where registry credentials come from. The default is
// authn.DefaultKeychain (docker config and credential helpers).
func WithKeychain(kc authn.Keychain) Option {
	return func(o *options) error { o.keychain = kc; return nil }
}

// WithTransport sets the base HTTP transport under the retry transport. The
// default is go-containerregistry's, with TLS verification unless the
// config's insecure is set. The config's registry timeouts are applied on
// top of either (imageio.BoundedTransport).
func WithTransport(rt http.RoundTripper) Option {
	return func(o *options) error { o.transport = rt; return nil }
}

// WithShard restricts Run to one shard of the images.
func WithShard(s Shard) Option {
	return func(o *options) error {
		if s.Count > 0 && (s.Index < 0 || s.Index >= s.Count) {
			return fmt.Errorf("shard %s: index out of range", s)
		}
		o.shard = s
		return nil
	}
}

// WithForce converts images even when the destination already holds their
// conversion, and ignores conversion records, claims and quarantine.
func WithForce(b bool) Option { return func(o *options) error { o.force = b; return nil } }

// WithImageDone registers a function called when an image is done. Calls
// come from the worker goroutines, one at a time; fn must not block for long.
func WithImageDone(fn func(ImageReport)) Option {
	return func(o *options) error { o.onImage = fn; return nil }
}

// WithLayerProgress passes the converter's progress events to fn.
func WithLayerProgress(fn func(convert.Event)) Option {
	return func(o *options) error { o.onLayer = fn; return nil }
}

// WithRetryHook registers a function called before each HTTP retry.
func WithRetryHook(fn func(req *http.Request, status int, err error)) Option {
	return func(o *options) error { o.onRetry = fn; return nil }
}

// WithOperationBackoff sets go-containerregistry's per-operation retry
// (whole blob uploads, see RetryTransport). The default is its own.
func WithOperationBackoff(b remote.Backoff) Option {
	return func(o *options) error { o.backoff = &b; return nil }
}

// WithUserAgent sets the User-Agent sent to registries.
func WithUserAgent(ua string) Option {
	return func(o *options) error { o.userAgent = ua; return nil }
}

// WithRecordKey sets the key that authenticates conversion records,
// instead of the config's record_key_file or record_key_env. It must be at
// least MinSecretLength bytes long.
func WithRecordKey(key []byte) Option {
	return func(o *options) error {
		if len(key) < MinSecretLength {
			return fmt.Errorf("record key: %d bytes long, want at least %d", len(key), MinSecretLength)
		}
		o.recordKey = append([]byte(nil), key...)
		return nil
	}
}

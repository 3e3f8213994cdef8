package imageio

import (
	"crypto/tls"
	"net"
	"net/http"
	"strings"

	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// IsLoopback reports whether host (a registry name, "host" or "host:port")
// is a loopback address: localhost, a name under .localhost, 127.0.0.0/8 or
// ::1.
func IsLoopback(host string) bool {
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	h = strings.ToLower(strings.TrimSuffix(h, "."))
	if h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// AllowsPlainHTTP reports whether plain HTTP may be used to talk to host:
// always for loopback registries, for the others only when plainHTTP (the
// --plain-http flag) is set.
func AllowsPlainHTTP(host string, plainHTTP bool) bool {
	return plainHTTP || IsLoopback(host)
}

// Scheme returns the scheme a Client tries first for host and the ones it
// may fall back to: "https" alone unless plain HTTP is allowed.
func Scheme(host string, plainHTTP bool) []string {
	if AllowsPlainHTTP(host, plainHTTP) {
		return []string{"https", "http"}
	}
	return []string{"https"}
}

// PolicyTransport wraps inner so that every request follows the plain-HTTP
// policy (see policyTransport). Clients made with New already use it; it is
// for callers that talk to registries through go-containerregistry directly.
func PolicyTransport(inner http.RoundTripper, plainHTTP bool) http.RoundTripper {
	return &policyTransport{inner: inner, plainHTTP: plainHTTP}
}

// BaseTransport returns go-containerregistry's default transport with TLS 1.2
// or later and certificate verification unless insecure. It bounds only the
// TCP connect and the TLS handshake: talk to registries through
// NewTransport, which bounds every phase of a request.
func BaseTransport(insecure bool) *http.Transport {
	t := remote.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: insecure} //nolint:gosec // --insecure asks for it
	return t
}

// policyTransport enforces the plain-HTTP policy on every request, whoever
// built its URL: go-containerregistry picks http for RFC 1918 addresses, and
// redirects or token realms may name http URLs. Requests over http to a host
// that may not have it are sent over https instead.
type policyTransport struct {
	inner     http.RoundTripper
	plainHTTP bool
}

func (t *policyTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Scheme == "http" && !AllowsPlainHTTP(req.URL.Host, t.plainHTTP) {
		r := req.Clone(req.Context())
		u := *req.URL
		u.Scheme = "https"
		r.URL = &u
		req = r
	}
	return t.inner.RoundTrip(req)
}

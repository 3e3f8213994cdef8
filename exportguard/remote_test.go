package exportguard

import (
	"errors"
	"net/http"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

// staticKeychain gives one credential for every registry.
type staticKeychain authn.Basic

func (k staticKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	b := authn.Basic(k)
	return &b, nil
}

// TestRemoteUsesKeychain puts the registry behind HTTP basic auth: the
// keychain's credential opens it; without one the fetch fails at once, as
// retrying cannot fix it.
func TestRemoteUsesKeychain(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(40 << 10)
	inner := tr.srv.Config.Handler
	tr.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != "builder" || p != "s3cret" {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		inner.ServeHTTP(w, r)
	})

	s := localStore(t)
	g, err := New(s.store, &Remote{Keychain: authn.NewMultiKeychain()}, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	err = g.Ensure(s.ctx, tr.ref, d)
	var p *permanentError
	if err == nil || !errors.As(err, &p) {
		t.Fatalf("Ensure without credentials: %v, want a permanent error", err)
	}
	assertNothingLeft(t, s, d.Digest)

	g2, err := New(s.store, &Remote{Keychain: staticKeychain{Username: "builder", Password: "s3cret"}}, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	defer g2.Close()
	if err := g2.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
}

package imageio

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/random"
)

// TestRegistryErrorKindsMatchWithErrorsIs opens a manifest on registries
// that answer each refusal status and checks that the error matches its kind
// (and no other) with errors.Is, and still names the kind in its text.
// TestRegistryErrorKindsMatchWithErrorsIs: each HTTP status a registry
// answers with becomes one kind, matched with errors.Is and no other, kept
// as a RegistryError with its status, and named in the message after the
// operation and the image.
func TestRegistryErrorKindsMatchWithErrorsIs(t *testing.T) {
	kinds := []error{ErrUnauthorized, ErrDenied, ErrNotFound, ErrServer, ErrRefused, ErrCertificate}
	for _, tc := range []struct {
		status int
		want   error
		real   bool // the registry's own answer: the image is absent
	}{
		{http.StatusUnauthorized, ErrUnauthorized, false},
		{http.StatusForbidden, ErrDenied, false},
		{http.StatusNotFound, ErrNotFound, false},
		{http.StatusNotFound, ErrNotFound, true},
		{http.StatusInternalServerError, ErrServer, false},
		{http.StatusBadGateway, ErrServer, false},
		{http.StatusTeapot, ErrRefused, false},
	} {
		name := fmt.Sprint(tc.status)
		if tc.real {
			name += " from the registry"
		}
		t.Run(name, func(t *testing.T) {
			wrap := func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.URL.Path == "/v2/" {
						h.ServeHTTP(w, r)
						return
					}
					http.Error(w, "refused", tc.status)
				})
			}
			if tc.real {
				wrap = nil
			}
			host := newRegistry(t, wrap)
			c := newClient(t)
			_, err := c.Open(context.Background(), mustRef(t, c, host+"/x/app:v1"))
			if err == nil {
				t.Fatal("open succeeded")
			}
			for _, k := range kinds {
				if got := errors.Is(err, k); got != (k == tc.want) {
					t.Errorf("errors.Is(%v, %q) = %v", err, k, got)
				}
			}
			var re *RegistryError
			if !errors.As(err, &re) || re.StatusCode != tc.status {
				t.Errorf("error %v: want a RegistryError with status %d", err, tc.status)
			}
			if want := "reading " + host + "/x/app:v1: " + tc.want.Error() + ": "; !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not name the operation, the image and its kind: want %q", err, want)
			}
		})
	}
}

// TestClassifyLayerReadError reads a layer whose blob the registry lost:
// the error reaches the caller unclassified, and Classify makes it match
// ErrNotFound without wrapping an already classified error twice.
func TestClassifyLayerReadError(t *testing.T) {
	ctx := context.Background()
	img, err := random.Image(1024, 1)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	dgst, err := layers[0].Digest()
	if err != nil {
		t.Fatal(err)
	}
	host := newRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+dgst.String()) {
				http.Error(w, `{"errors":[{"code":"BLOB_UNKNOWN","message":"gone"}]}`, http.StatusNotFound)
				return
			}
			h.ServeHTTP(w, r)
		})
	})
	c := newClient(t)
	ref := mustRef(t, c, host+"/lib/app:v1")
	if _, err := c.Write(ctx, ref, img, nil); err != nil {
		t.Fatal(err)
	}
	src, err := c.Open(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	ls, err := src.Image.Layers()
	if err != nil {
		t.Fatal(err)
	}
	_, err = ls[0].Compressed()
	if err == nil {
		t.Fatal("reading the lost blob succeeded")
	}
	cerr := Classify(err)
	if !errors.Is(cerr, ErrNotFound) || errors.Is(cerr, ErrServer) {
		t.Errorf("Classify(%v) = %v: want ErrNotFound only", err, cerr)
	}
	if again := Classify(cerr); again != cerr {
		t.Errorf("Classify of a classified error wrapped it again: %v", again)
	}
	plain := errors.New("disk full")
	if got := Classify(plain); got != plain {
		t.Errorf("Classify(%v) = %v, want it unchanged", plain, got)
	}
	if Classify(nil) != nil {
		t.Error("Classify(nil) != nil")
	}
}

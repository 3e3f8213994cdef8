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
func TestRegistryErrorKindsMatchWithErrorsIs(t *testing.T) {
	kinds := []error{ErrUnauthorized, ErrDenied, ErrNotFound, ErrServer, ErrRefused, ErrCertificate}
	for _, tc := range []struct {
		status int
		want   error
	}{
		{http.StatusUnauthorized, ErrUnauthorized},
		{http.StatusForbidden, ErrDenied},
		{http.StatusNotFound, ErrNotFound},
		{http.StatusInternalServerError, ErrServer},
		{http.StatusBadGateway, ErrServer},
		{http.StatusTeapot, ErrRefused},
	} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			host := newRegistry(t, func(h http.Handler) http.Handler {
				return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if r.URL.Path == "/v2/" {
						h.ServeHTTP(w, r)
						return
					}
					http.Error(w, "refused", tc.status)
				})
			})
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
			if !strings.Contains(err.Error(), tc.want.Error()+": ") {
				t.Errorf("error %q does not name its kind %q", err, tc.want)
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

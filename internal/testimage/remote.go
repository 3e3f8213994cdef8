package testimage

import (
	"errors"
	"io"
	"net/http"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// PushRef writes an image or index to ref, a reference to any registry
// (this package's or another test server), failing the test on an error.
func PushRef(t TB, ref string, a remote.Taggable) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Push(r, a); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
}

// RemoteImage reads the image ref names, failing the test on an error.
func RemoteImage(t TB, ref string) v1.Image {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		t.Fatalf("reading %s: %v", ref, err)
	}
	return img
}

// TagExists reports whether the registry has a manifest under ref; an
// answer other than found or 404 fails the test.
func TagExists(t TB, ref string) bool {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	_, err = remote.Head(r)
	if err == nil {
		return true
	}
	var te *transport.Error
	if !errors.As(err, &te) || te.StatusCode != http.StatusNotFound {
		t.Fatalf("HEAD %s: %v", ref, err)
	}
	return false
}

// BlobAt returns the blob dgst of repository repo at host, or nil when
// the registry does not hold it.
func BlobAt(t TB, host, repo string, dgst v1.Hash) []byte {
	t.Helper()
	ref, err := name.NewDigest(host+"/"+repo+"@"+dgst.String(), name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	l, err := remote.Layer(ref)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		return nil
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		return nil
	}
	return b
}

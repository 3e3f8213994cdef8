package imageio

import (
	"bytes"
	"context"
	"crypto/rand"
	"net/http"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestBlobUpload streams blobs in pieces to a registry: a committed one is
// there byte for byte under its digest; an aborted one, one committed with
// another digest and one committed with a wrong size are not, and the
// last two fail naming the blob.
func TestBlobUpload(t *testing.T) {
	ctx := context.Background()
	var patches int
	host := newRegistry(t, func(h http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.Method == http.MethodPatch {
				patches++
			}
			h.ServeHTTP(w, r)
		})
	})
	c := newClient(t)
	ref := mustRef(t, c, host+"/stream/app:v1")
	blob := func() ([]byte, v1.Hash) {
		b := make([]byte, 3<<20+17)
		rand.Read(b)
		h, _, _ := v1.SHA256(bytes.NewReader(b))
		return b, h
	}
	send := func(u *BlobUpload, b []byte) {
		for len(b) > 0 {
			n := min(len(b), 64<<10)
			if k, err := u.Write(b[:n]); k != n || err != nil {
				t.Fatalf("Write: %d, %v", k, err)
			}
			b = b[n:]
		}
	}

	good, goodDigest := blob()
	u, err := c.StartBlobUpload(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	send(u, good)
	if err := u.Finish(); err != nil {
		t.Fatal(err)
	}
	if got := testimage.BlobAt(t, host, "stream/app", goodDigest); got != nil {
		t.Fatal("blob present before Commit")
	}
	if err := u.Commit(ctx, goodDigest, int64(len(good))); err != nil {
		t.Fatal(err)
	}
	if got := testimage.BlobAt(t, host, "stream/app", goodDigest); !bytes.Equal(got, good) {
		t.Fatalf("committed blob: %d bytes, want the %d streamed", len(got), len(good))
	}
	if patches != 1 {
		t.Errorf("%d PATCH requests, want one streamed PATCH", patches)
	}

	aborted, abortedDigest := blob()
	u, err = c.StartBlobUpload(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	send(u, aborted)
	u.Abort(ctx)
	if err := u.Commit(ctx, abortedDigest, int64(len(aborted))); err == nil {
		t.Error("Commit after Abort succeeded")
	}
	if testimage.BlobAt(t, host, "stream/app", abortedDigest) != nil {
		t.Error("aborted blob is in the registry")
	}

	for _, tc := range []struct {
		name string
		size func(n int) int64
		dgst func(h v1.Hash) v1.Hash
		want string
	}{
		{"wrong digest", func(n int) int64 { return int64(n) }, func(v1.Hash) v1.Hash { return goodDigest }, "committing"},
		{"wrong size", func(n int) int64 { return int64(n) + 1 }, func(h v1.Hash) v1.Hash { return h }, "bytes streamed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, h := blob()
			u, err := c.StartBlobUpload(ctx, ref)
			if err != nil {
				t.Fatal(err)
			}
			send(u, b)
			d := tc.dgst(h)
			err = u.Commit(ctx, d, tc.size(len(b)))
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), d.String()) {
				t.Fatalf("Commit: %v, want an error naming %s (%q)", err, d, tc.want)
			}
			if testimage.BlobAt(t, host, "stream/app", h) != nil {
				t.Error("refused blob is in the registry under its own digest")
			}
		})
	}

	if _, err := c.StartBlobUpload(ctx, mustRef(t, c, "oci:"+t.TempDir())); err == nil {
		t.Error("StartBlobUpload to a layout succeeded")
	}
}

//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
)

// tamperOffset returns an offset inside the compressed payload of a file
// of the eStargz layer that a build does not read: the regular file under
// usr/share/ that lies furthest into the blob, away from the prefetch
// section at its start.
func tamperOffset(t *testing.T, l v1.Layer) (int64, string) {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}
	r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(b), 0, int64(len(b))))
	if err != nil {
		t.Fatal(err)
	}
	root, ok := r.Lookup("")
	if !ok {
		t.Fatal("eStargz layer has no root entry")
	}
	var best *estargz.TOCEntry
	var walk func(e *estargz.TOCEntry)
	walk = func(e *estargz.TOCEntry) {
		e.ForeachChild(func(_ string, c *estargz.TOCEntry) bool {
			switch {
			case c.Type == "dir":
				walk(c)
			case c.Type == "reg" && c.Size > 16<<10 && strings.HasPrefix(c.Name, "usr/share/"):
				if best == nil || c.Offset > best.Offset {
					best = c
				}
			}
			return true
		})
	}
	walk(root)
	if best == nil {
		t.Fatal("no file under usr/share/ to tamper with")
	}
	return best.Offset + 64, best.Name
}

// TestGuardTamperedBlob: one byte of the final base's largest eStargz blob
// is flipped in the registry's storage, in a file the build never reads.
// The lazy build still runs; the guard's verification fails, naming the
// digest; `lazybase guard --dockerfile` fails with that error; a push of
// the build fails and nothing is pushed; no unverified blob is committed
// to the builder's content store.
func TestGuardTamperedBlob(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(guardConfig("export-base", "lazy-only")),
	)
	debian, _ := publishAll(ctx, t, s)

	ls, err := debian.estargz.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var bad v1.Layer
	var badSize int64
	for _, l := range ls {
		if sz, _ := l.Size(); sz > badSize {
			bad, badSize = l, sz
		}
	}
	h, err := bad.Digest()
	if err != nil {
		t.Fatal(err)
	}
	badDigest := h.String()
	off, file := tamperOffset(t, bad)
	data := filepath.Join(s.Dir, "registry", "docker", "registry", "v2", "blobs", "sha256", h.Hex[:2], h.Hex, "data")
	f, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("registry storage of %s: %v", badDigest, err)
	}
	one := make([]byte, 1)
	if _, err := f.ReadAt(one, off); err != nil {
		t.Fatal(err)
	}
	one[0] ^= 0xff
	if _, err := f.WriteAt(one, off); err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Logf("flipped the byte at offset %d of %s (%d bytes), inside %s", off, badDigest, badSize, file)

	work := multiStageContext(t, s, tagEStargz)
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
		t.Fatalf("the lazy build read the tampered file: %v\n%s", err, s.Logs(40))
	}

	// export-base: the guard fetched the blob at once and refused it.
	var st exportguard.LayerStatus
	eventually.Require(t, 3*time.Minute, "guard verdict on the tampered layer "+badDigest, func() error {
		st = guardStates(ctx, t, s)[badDigest]
		if st.State == exportguard.StateFailed || st.State == exportguard.StateMaterialized {
			return nil
		}
		return fmt.Errorf("guard state %+v", st)
	})
	if st.State != exportguard.StateFailed || !strings.Contains(st.Error, "verification") || !strings.Contains(st.Error, badDigest) {
		t.Fatalf("tampered layer: guard state %q, error %q; want failed with a verification error naming %s", st.State, st.Error, badDigest)
	}
	t.Logf("guard: %s", st.Error)

	_, stderr, err := s.Lazybase(ctx, "guard", "--status-socket="+s.Snapshotter.StatusSocket(), "--timeout", "5m", "--dockerfile", filepath.Join(work, "Dockerfile"))
	if err == nil {
		t.Fatalf("lazybase guard passed a tampered base:\n%s", stderr)
	}
	for _, want := range []string{"lazybase: export guard failed: image " + s.Registry.Ref(repoDebian, tagEStargz), "layer " + badDigest, "verification"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("lazybase guard error %q does not contain %q", err, want)
		}
	}
	t.Logf("lazybase guard --dockerfile: %v", err)

	// The push fails too, and nothing reaches the target repository.
	out := s.Registry.DirectRef("e2e/hello-tampered", "latest")
	_, pushErr := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...)
	if pushErr == nil {
		t.Error("the push of an image on a tampered base succeeded")
	} else {
		msg := pushErr.Error()
		if i := strings.LastIndex(msg, "ERROR:"); i >= 0 {
			msg = msg[i:]
		}
		t.Logf("buildctl push: %s", msg)
		if !strings.Contains(pushErr.Error(), h.Hex) {
			t.Errorf("the push's error does not name %s", badDigest)
		}
	}
	ref, err := name.ParseReference(out)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := remote.Head(ref, remote.WithContext(ctx)); err == nil {
		t.Errorf("%s was pushed", out)
	}
	if buildkitContent(ctx, t, s)[badDigest] {
		t.Errorf("the tampered blob %s is in the buildkit namespace's content store", badDigest)
	}
	if all, err := s.Containerd.ContentDigests(ctx); err == nil && all[badDigest] {
		t.Errorf("the tampered blob %s is in containerd's content store", badDigest)
	}
}

package lazypull

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestEmptyFilesRead mounts an eStargz layer holding empty regular files
// (interleaved with non-empty ones) with FUSE passthrough on and off, and
// reads every file: an empty file opens and reads as zero bytes. With
// passthrough on, stargz's merge buffer size left at zero once made every
// such open fail with EIO (a division by zero in the FUSE handler).
func TestEmptyFilesRead(t *testing.T) {
	requireFUSE(t)
	rnd := rand.New(rand.NewPCG(3, 4))
	big := make([]byte, 5<<20+17) // more than one stargz chunk
	for i := range big {
		big[i] = byte(rnd.UintN(256))
	}
	files := map[string][]byte{
		"etc/environment":        {},
		"pkg/__init__.py":        {},
		"pkg/mod.py":             []byte("x = 1\n"),
		"pkg/sub/__init__.py":    {},
		"usr/share/big.bin":      big,
		"usr/share/empty-after":  {},
		"var/lib/dpkg/lock":      {},
		"var/lib/dpkg/status":    []byte("Package: none\n"),
		"zz/last-entry-is-empty": {},
	}
	var kv []string
	for _, name := range []string{"etc/environment", "pkg/__init__.py", "pkg/mod.py", "pkg/sub/__init__.py",
		"usr/share/big.bin", "usr/share/empty-after", "var/lib/dpkg/lock", "var/lib/dpkg/status", "zz/last-entry-is-empty"} {
		kv = append(kv, name, string(files[name]))
	}
	tarball, err := testimage.Tar(testimage.Files(kv...))
	if err != nil {
		t.Fatal(err)
	}
	esgz, err := testimage.EStargz(tarball)
	if err != nil {
		t.Fatal(err)
	}
	ociImg, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, esgz)
	if err != nil {
		t.Fatal(err)
	}
	reg := testimage.NewRegistry(t)
	ref := reg.Push(t, "empty:estargz", ociImg)
	m, err := ociImg.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	img := testImage{ref: ref.String(), layers: m.Layers, files: files}

	for _, passthrough := range []bool{true, false} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			if passthrough {
				requirePassthrough(t)
			}
			td := startDaemon(t, "", func(c *Config) {
				c.FUSE.Passthrough = passthrough
				c.BackgroundFetch.Enable = false
				c.Guard.Enable = false
			})
			ctx := namespaces.WithNamespace(context.Background(), "test")
			if _, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
				t.Fatalf("Prepare = %v, want a remote snapshot", err)
			}
			mounts, err := td.sn.View(ctx, "view-0", "chain-0")
			if err != nil {
				t.Fatal(err)
			}
			target := t.TempDir()
			if err := mount.All(mounts, target); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := mount.UnmountAll(target, 0); err != nil {
					t.Error(err)
				}
			}()
			// Twice: the second round is served from the cache (and,
			// with passthrough, by the kernel from the cache file).
			for round := range 2 {
				for name, want := range files {
					got, err := catFile(filepath.Join(target, name))
					if err != nil {
						t.Errorf("round %d: reading %s (%d bytes): %v", round, name, len(want), err)
					} else if !bytes.Equal(got, want) {
						t.Errorf("round %d: %s: read %d bytes, want %d", round, name, len(got), len(want))
					}
				}
			}
		})
	}
}

// catFile opens and reads a file as cat does: open, read until EOF.
func catFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(f)
}

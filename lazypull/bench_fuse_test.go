package lazypull

import (
	"archive/tar"
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/testimage"
)

// benchEntries is a toolchain-like tree: many small files in many
// directories and a few large ones.
func benchEntries() []testimage.Entry {
	rnd := rand.New(rand.NewPCG(7, 7))
	data := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte('a' + rnd.UintN(16)) // compressible, like source
		}
		return b
	}
	var es []testimage.Entry
	mt := testimage.Epoch
	for d := 0; d < 100; d++ {
		dir := fmt.Sprintf("src/pkg%03d/", d)
		es = append(es, testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: mt}})
		for f := 0; f < 30; f++ {
			b := data(2048 + rnd.IntN(8192))
			es = append(es, testimage.Entry{
				Header: &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%sfile%02d.go", dir, f), Mode: 0o644, Size: int64(len(b)), ModTime: mt},
				Data:   b,
			})
		}
	}
	es = append(es, testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "bin/", Mode: 0o755, ModTime: mt}})
	for i := 0; i < 8; i++ {
		b := data(2 << 20)
		es = append(es, testimage.Entry{
			Header: &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("bin/tool%d", i), Mode: 0o755, Size: int64(len(b)), ModTime: mt},
			Data:   b,
		})
	}
	return es
}

// walkAndRead stats every entry below dir and reads every regular file,
// like a build reading its toolchain; it returns the bytes read.
func walkAndRead(b *testing.B, dir string) int64 {
	var n int64
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if _, err := os.Stat(p); err != nil {
			return err
		}
		if d.Type().IsRegular() {
			data, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			n += int64(len(data))
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return n
}

func dropCaches(b *testing.B) {
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
		b.Fatalf("dropping the page cache: %v", err)
	}
}

// BenchmarkLocalReads measures walking and reading a lazily mounted layer
// whose contents are already in the daemon's cache, through overlayfs as a
// container sees it: FUSE with the upstream default kernel cache timeouts,
// with long timeouts, with passthrough, against the same tree on plain
// overlayfs.
//
//	go test -run '^$' -bench LocalReads -benchtime 5x ./lazypull/
func BenchmarkLocalReads(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root: mounts FUSE and overlayfs, drops the page cache")
	}
	es := benchEntries()
	tarball, err := testimage.Tar(es)
	if err != nil {
		b.Fatal(err)
	}
	esgz, err := testimage.EStargz(tarball)
	if err != nil {
		b.Fatal(err)
	}
	reg := testimage.NewRegistry(b)
	img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, esgz)
	if err != nil {
		b.Fatal(err)
	}
	ref := reg.Push(b, "bench:estargz", img)
	m, err := img.Manifest()
	if err != nil {
		b.Fatal(err)
	}
	ti := testImage{ref: ref.String(), layers: m.Layers}

	b.Run("overlayfs", func(b *testing.B) {
		lower := b.TempDir()
		for _, e := range es {
			p := filepath.Join(lower, e.Header.Name)
			if e.Header.Typeflag == tar.TypeDir {
				if err := os.MkdirAll(p, 0o755); err != nil {
					b.Fatal(err)
				}
				continue
			}
			if err := os.WriteFile(p, e.Data, 0o644); err != nil {
				b.Fatal(err)
			}
		}
		target := b.TempDir()
		upper, work := b.TempDir(), b.TempDir()
		mnt := mount.Mount{Type: "overlay", Source: "overlay", Options: []string{
			"lowerdir=" + lower + ":" + b.TempDir(), "upperdir=" + upper, "workdir=" + work,
		}}
		if err := mnt.Mount(target); err != nil {
			b.Fatal(err)
		}
		defer mount.UnmountAll(target, 0)
		runPasses(b, target)
	})
	for _, tc := range []struct {
		name string
		cfg  func(*Config)
	}{
		{"fuse-timeout-1s", func(c *Config) {}},
		{"fuse-timeout-600s", func(c *Config) {
			c.FUSE.AttrTimeout = Duration(600 * time.Second)
			c.FUSE.EntryTimeout = Duration(600 * time.Second)
		}},
		{"fuse-passthrough", func(c *Config) { c.FUSE.Passthrough = true }},
		{"fuse-passthrough-timeout-600s", func(c *Config) {
			c.FUSE.Passthrough = true
			c.FUSE.AttrTimeout = Duration(600 * time.Second)
			c.FUSE.EntryTimeout = Duration(600 * time.Second)
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			td := startDaemon(b, "", func(c *Config) {
				c.BackgroundFetch.Enable = false
				tc.cfg(c)
			})
			ctx := namespaces.WithNamespace(context.Background(), "bench")
			_, err := td.sn.Prepare(ctx, "extract", "", snapshots.WithLabels(ti.unpackLabels(0, "chain")))
			if !errdefs.IsAlreadyExists(err) {
				b.Fatalf("Prepare = %v", err)
			}
			// A container's rootfs: an active overlay over the lazy layer.
			mounts, err := td.sn.Prepare(ctx, "rootfs", "chain")
			if err != nil {
				b.Fatal(err)
			}
			target := b.TempDir()
			if err := mount.All(mounts, target); err != nil {
				b.Fatal(err)
			}
			defer mount.UnmountAll(target, 0)
			// Fill the daemon's cache: the passes measure local reads only.
			walkAndRead(b, target)
			runPasses(b, target)
		})
	}
}

// runPasses runs the cold passes (page, dentry and inode caches dropped
// before each) and the warm passes (caches kept, but every pass starts
// after the default 1s FUSE attribute and entry timeouts have run out, as
// the steps of a build do).
func runPasses(b *testing.B, dir string) {
	b.Run("cold", func(b *testing.B) {
		var n int64
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			dropCaches(b)
			b.StartTimer()
			n = walkAndRead(b, dir)
		}
		b.SetBytes(n)
	})
	b.Run("warm", func(b *testing.B) {
		n := walkAndRead(b, dir)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			time.Sleep(1100 * time.Millisecond)
			b.StartTimer()
			walkAndRead(b, dir)
		}
		b.SetBytes(n)
	})
}

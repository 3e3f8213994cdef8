package lazypull

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestLayersMountedReadOnly mounts an eStargz layer with fuse.read_only on
// and off: on, the layer's FUSE file system is read-only (so reading a
// file does not make the kernel ask for its attributes again) and keeps
// the mount's other flags (nosuid, nodev); off, it is read-write as
// stargz mounts it. Either way every file reads back and the layer serves
// the view containerd mounts.
func TestLayersMountedReadOnly(t *testing.T) {
	requireFUSE(t)
	files := map[string][]byte{
		"etc/hostname":     []byte("lazy\n"),
		"usr/bin/tool":     bytes.Repeat([]byte("x"), 70000),
		"usr/share/a/b/c":  []byte("deep\n"),
		"var/lib/emptyish": {},
	}
	var kv []string
	for _, name := range []string{"etc/hostname", "usr/bin/tool", "usr/share/a/b/c", "var/lib/emptyish"} {
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
	ref := reg.Push(t, "ro:estargz", ociImg)
	m, err := ociImg.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	img := testImage{ref: ref.String(), layers: m.Layers, files: files}

	flags := map[bool]uint64{}
	for _, readOnly := range []bool{true, false} {
		t.Run(fmt.Sprintf("read_only=%v", readOnly), func(t *testing.T) {
			td := startDaemon(t, "", func(c *Config) {
				c.FUSE.ReadOnly = readOnly
				c.BackgroundFetch.Enable = false
				c.Guard.Enable = false
			})
			ctx := namespaces.WithNamespace(context.Background(), "test")
			if _, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
				t.Fatalf("Prepare = %v, want a remote snapshot", err)
			}
			ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(td.cfg.Root))
			if err != nil {
				t.Fatal(err)
			}
			var layer string
			for _, mi := range ms {
				if strings.HasPrefix(mi.FSType, "fuse") {
					layer = mi.Mountpoint
				}
			}
			if layer == "" {
				t.Fatalf("no FUSE mount under %s: %v", td.cfg.Root, ms)
			}
			var st unix.Statfs_t
			if err := unix.Statfs(layer, &st); err != nil {
				t.Fatal(err)
			}
			if got := st.Flags&unix.ST_RDONLY != 0; got != readOnly {
				t.Errorf("layer %s read-only = %v, want %v (statfs flags %#x)", layer, got, readOnly, st.Flags)
			}
			flags[readOnly] = uint64(st.Flags) &^ unix.ST_RDONLY
			for name, want := range files {
				got, err := catFile(filepath.Join(layer, name))
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("reading %s from the layer: %d bytes, %v; want %d bytes", name, len(got), err, len(want))
				}
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
			for name, want := range files {
				got, err := catFile(filepath.Join(target, name))
				if err != nil || !bytes.Equal(got, want) {
					t.Errorf("reading %s from the view: %d bytes, %v; want %d bytes", name, len(got), err, len(want))
				}
			}
		})
	}
	if ro, rw := flags[true], flags[false]; ro != rw {
		t.Errorf("the read-only remount changed the mount's other flags: %#x, read-write %#x", ro, rw)
	}
}

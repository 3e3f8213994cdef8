package lazypull

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/internal/testimage"
)

// requirePassthrough skips on kernels without FUSE passthrough (6.9).
func requirePassthrough(t *testing.T) {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	if release := unix.ByteSliceToString(u.Release[:]); !kernelAtLeast(release, 6, 9) {
		t.Skipf("needs Linux 6.9 or later for FUSE passthrough, have %s", release)
	}
}

// TestPassthroughServesReadsWithoutTheDaemon proves that fuse.passthrough
// takes effect: a file opened through a passthrough mount is read by the
// kernel from the daemon's cache file, so the read succeeds with the
// daemon stopped (SIGSTOP) and the page cache dropped. Without passthrough
// the same read waits for the daemon, which shows the check is real.
func TestPassthroughServesReadsWithoutTheDaemon(t *testing.T) {
	requireFUSE(t)
	requirePassthrough(t)
	dir := t.TempDir()
	bin := buildLazybase(t, dir)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	want := img.files["usr/bin/tool"]

	for _, passthrough := range []bool{true, false} {
		t.Run(fmt.Sprintf("passthrough=%v", passthrough), func(t *testing.T) {
			root := t.TempDir()
			t.Cleanup(func() {
				if err := unmountLeftovers(context.Background(), root); err != nil {
					t.Error(err)
				}
			})
			cfg := filepath.Join(t.TempDir(), "lazybase.toml")
			body := fmt.Sprintf("[background_fetch]\nenable = false\n[guard]\nenable = false\n[fuse]\npassthrough = %v\n", passthrough)
			if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			sockDir, err := os.MkdirTemp("", "lbpt")
			if err != nil {
				t.Fatal(err)
			}
			defer os.RemoveAll(sockDir)
			sock := filepath.Join(sockDir, "sn.sock")
			p := startDaemonProc(t, bin, root, sock, cfg)
			sn := dialSnapshotter(t, sock)
			ctx := namespaces.WithNamespace(context.Background(), "test")
			if _, err := sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
				t.Fatalf("Prepare = %v, want a remote snapshot", err)
			}
			mounts, err := sn.View(ctx, "view-0", "chain-0")
			if err != nil {
				t.Fatal(err)
			}
			target := t.TempDir()
			if err := mount.All(mounts, target); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(filepath.Join(target, "usr/bin/tool"))
			if err != nil {
				t.Fatal(err)
			}
			got := make([]byte, len(want))
			if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("first read: %v (equal %v)", err, bytes.Equal(got, want))
			}

			unix.Sync()
			if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
				t.Fatalf("dropping the page cache: %v", err)
			}
			if err := p.cmd.Process.Signal(syscall.SIGSTOP); err != nil {
				t.Fatal(err)
			}
			type result struct {
				n   int
				err error
			}
			done := make(chan result, 1)
			again := make([]byte, len(want))
			go func() {
				n, err := f.ReadAt(again, 0)
				done <- result{n, err}
			}()
			var r result
			served := false
			select {
			case r = <-done:
				served = true
			case <-time.After(3 * time.Second):
			}
			if err := p.cmd.Process.Signal(syscall.SIGCONT); err != nil {
				t.Fatal(err)
			}
			if !served {
				r = <-done
			}
			if r.err != nil || !bytes.Equal(again, want) {
				t.Fatalf("read after the page cache drop: %v (equal %v)", r.err, bytes.Equal(again, want))
			}
			if served != passthrough {
				t.Fatalf("read with the daemon stopped served=%v, want %v (passthrough %v)", served, passthrough, passthrough)
			}
			f.Close()
			if err := mount.UnmountAll(target, 0); err != nil {
				t.Error(err)
			}
			if err := sn.Remove(ctx, "view-0"); err != nil {
				t.Error(err)
			}
			if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-p.done:
				if err != nil {
					t.Errorf("daemon exit after SIGTERM: %v\n%s", err, p.log.String())
				}
			case <-time.After(30 * time.Second):
				t.Fatal("daemon did not stop on SIGTERM")
			}
		})
	}
}

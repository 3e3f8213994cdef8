package lazypull

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// daemonProc is a `lazybase snapshotter` process.
type daemonProc struct {
	cmd  *exec.Cmd
	done chan error
	log  *bytes.Buffer
}

// startDaemonProc starts `lazybase snapshotter` as a process; config is
// its configuration file, "" for the defaults.
func startDaemonProc(t *testing.T, bin, root, sock, config string) *daemonProc {
	t.Helper()
	// Never mistake the sockets of a killed daemon for the new one's.
	os.Remove(sock)
	os.Remove(sock + ".status")
	var logBuf bytes.Buffer
	cmd := exec.Command(bin, "snapshotter", "--root", root, "--address", sock)
	cmd.Stdout, cmd.Stderr = &logBuf, &logBuf
	cmd.Env = append(os.Environ(), "LAZYBASE_SNAPSHOTTER_CONFIG="+config)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &daemonProc{cmd: cmd, done: make(chan error, 1), log: &logBuf}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		if _, err := os.Stat(sock + ".status"); err == nil {
			return p
		}
		select {
		case err := <-p.done:
			t.Fatalf("daemon exited: %v\n%s", err, logBuf.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not listen\n%s", logBuf.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// buildLazybase builds the lazybase command into dir.
func buildLazybase(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "lazybase")
	build := exec.Command("go", "build", "-o", bin, "github.com/lazybase/lazybase/cmd/lazybase")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func dialSnapshotter(t *testing.T, sock string) snapshots.Snapshotter {
	t.Helper()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "stargz")
}

// TestKill9Restart kills the daemon with SIGKILL while a layer is mounted:
// the FUSE mount goes stale; a restarted daemon clears it, mounts the layer
// again and serves it; SIGTERM then leaves no mount behind.
func TestKill9Restart(t *testing.T) {
	requireFUSE(t)
	dir := t.TempDir()
	bin := buildLazybase(t, dir)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	root := filepath.Join(dir, "root")
	// Registered before the daemons' cleanups, so it runs after them: a
	// failing test must not leave a stale FUSE mount behind.
	t.Cleanup(func() {
		if err := unmountLeftovers(context.Background(), root); err != nil {
			t.Error(err)
		}
	})
	sockDir, err := os.MkdirTemp("", "lbkill")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "sn.sock")
	ctx := namespaces.WithNamespace(context.Background(), "test")

	p := startDaemonProc(t, bin, root, sock, "")
	sn := dialSnapshotter(t, sock)
	if _, err := sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want a remote snapshot", err)
	}
	if n := fuseMountsUnder(t, root); n != 1 {
		t.Fatalf("%d FUSE mounts, want 1", n)
	}

	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p.done
	// The mount outlives the daemon, disconnected.
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		t.Fatal(err)
	}
	var stale []string
	for _, m := range ms {
		if strings.HasPrefix(m.FSType, "fuse") {
			stale = append(stale, m.Mountpoint)
		}
	}
	if len(stale) != 1 {
		t.Fatalf("after SIGKILL: FUSE mounts %v under %s, want the one stale mount", stale, root)
	}
	if _, err := os.ReadDir(stale[0]); !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("reading the mount of the killed daemon = %v, want ENOTCONN", err)
	}

	p2 := startDaemonProc(t, bin, root, sock, "")
	sn2 := dialSnapshotter(t, sock)
	// Restored in the background once the daemon listens.
	eventually.Require(t, 30*time.Second, "the lazy mount restored", func() error {
		if n := fuseMountsUnder(t, root); n != 1 {
			return fmt.Errorf("%d FUSE mounts after restart, want 1: %v", n, mountsUnder(t, root))
		}
		return nil
	})
	mounts, err := sn2.View(ctx, "view-0", "chain-0")
	if err != nil {
		t.Fatalf("View after restart: %v\n%s", err, p2.log.String())
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(target, "usr/bin/tool"))
	if uerr := mount.UnmountAll(target, 0); uerr != nil {
		t.Error(uerr)
	}
	if err != nil || !bytes.Equal(got, img.files["usr/bin/tool"]) {
		t.Fatalf("read after restart: %v (equal %v)", err, bytes.Equal(got, img.files["usr/bin/tool"]))
	}

	if err := p2.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-p2.done:
		if err != nil {
			t.Errorf("daemon exit after SIGTERM: %v\n%s", err, p2.log.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not stop on SIGTERM")
	}
	if ms := mountsUnder(t, root); len(ms) > 0 {
		t.Errorf("mounts left after SIGTERM: %v", ms)
	}
}

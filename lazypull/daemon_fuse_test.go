package lazypull

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/snapshotters"
	"github.com/containerd/errdefs"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/moby/sys/mountinfo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// requireFUSE skips tests that mount FUSE and overlayfs when they cannot.
func requireFUSE(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: mounts FUSE and overlayfs")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skipf("needs /dev/fuse: %v", err)
	}
}

// testDaemon is a Daemon serving on a temporary socket in this process.
type testDaemon struct {
	d      *Daemon
	cfg    Config
	sn     snapshots.Snapshotter // gRPC client, as containerd sees it
	conn   *grpc.ClientConn
	cancel context.CancelFunc
	done   chan error
}

// startDaemon starts a Daemon on root (a new temporary directory when
// empty) with the socket in a short temporary directory.
func startDaemon(t testing.TB, root string, mutate func(*Config)) *testDaemon {
	t.Helper()
	return startDaemonWith(t, root, mutate, nil)
}

// startDaemonWith is startDaemon calling before, when set, between
// NewDaemon and Serve.
func startDaemonWith(t testing.TB, root string, mutate func(*Config), before func(*Daemon)) *testDaemon {
	t.Helper()
	if root == "" {
		root = t.TempDir()
	}
	sockDir, err := os.MkdirTemp("", "lbsock")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := DefaultConfig()
	cfg.Root = root
	cfg.Socket = filepath.Join(sockDir, "run", "sn.sock")
	cfg.Fetch.Timeout = Duration(5 * time.Second)
	if mutate != nil {
		mutate(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := NewDaemon(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if before != nil {
		before(d)
	}
	td := &testDaemon{d: d, cfg: cfg, cancel: cancel, done: make(chan error, 1)}
	go func() { td.done <- d.Serve(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(cfg.statusSocket()); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not listen on %s", cfg.Socket)
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	td.conn = conn
	td.sn = proxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "stargz")
	t.Cleanup(func() { td.stop(t) })
	return td
}

// stop stops the daemon like SIGTERM does and checks that it left no
// mount and no socket behind.
func (td *testDaemon) stop(t testing.TB) {
	t.Helper()
	if td.cancel == nil {
		return
	}
	td.conn.Close()
	td.cancel()
	td.cancel = nil
	select {
	case err := <-td.done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not stop")
	}
	if ms := mountsUnder(t, td.cfg.Root); len(ms) > 0 {
		t.Errorf("mounts left under %s after stop: %v", td.cfg.Root, ms)
	}
	for _, p := range []string{td.cfg.Socket, td.cfg.statusSocket()} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s left after stop (%v)", p, err)
		}
	}
}

func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(dir))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, m := range ms {
		out = append(out, m.FSType+" "+m.Mountpoint)
	}
	return out
}

func fuseMountsUnder(t testing.TB, dir string) int {
	n := 0
	for _, m := range mountsUnder(t, dir) {
		if strings.HasPrefix(m, "fuse") {
			n++
		}
	}
	return n
}

// TestSnapshotterConformance runs containerd's snapshotter test suite
// against the daemon through its gRPC API, as containerd uses it. Without
// remote-snapshot labels every snapshot is a normal overlayfs one.
func TestSnapshotterConformance(t *testing.T) {
	requireFUSE(t)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		td := startDaemon(t, root, nil)
		return td.sn, func() error {
			td.stop(t)
			return nil
		}, nil
	})
}

type testImage struct {
	ref    string
	layers []v1.Descriptor
	files  map[string][]byte // contents of the eStargz layer
}

// pushTestImage pushes an image whose first layer is eStargz and whose
// second is plain gzip.
func pushTestImage(t *testing.T, reg *testimage.Registry, repoTag string) testImage {
	t.Helper()
	rnd := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 3<<20)
	for i := range big {
		big[i] = byte(rnd.UintN(256))
	}
	files := map[string][]byte{
		"etc/hello.txt": []byte("hello, lazy world\n"),
		"usr/bin/tool":  big,
	}
	tarball, err := testimage.Tar(testimage.Files("etc/hello.txt", string(files["etc/hello.txt"]), "usr/bin/tool", string(big)))
	if err != nil {
		t.Fatal(err)
	}
	esgz, err := testimage.EStargz(tarball)
	if err != nil {
		t.Fatal(err)
	}
	plain, err := testimage.EntriesLayer(testimage.Files("etc/plain.txt", "not lazy\n"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, esgz, plain)
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.Push(t, repoTag, img)
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return testImage{ref: ref.String(), layers: m.Layers, files: files}
}

// unpackLabels are the labels containerd's unpacker passes for layer i of
// img with enable_remote_snapshot_annotations.
func (img testImage) unpackLabels(i int, chainID string) map[string]string {
	var all []string
	for _, l := range img.layers {
		all = append(all, l.Digest.String())
	}
	labels := map[string]string{
		targetLabel:                         chainID,
		snapshotters.TargetRefLabel:         img.ref,
		snapshotters.TargetLayerDigestLabel: img.layers[i].Digest.String(),
		snapshotters.TargetImageLayersLabel: strings.Join(all[i:], ","),
		"containerd.io/gc.root":             "test",
	}
	for k, v := range img.layers[i].Annotations {
		if strings.HasPrefix(k, "containerd.io/snapshot/") {
			labels[k] = v
		}
	}
	return labels
}

// TestLazyMount mounts an eStargz layer from an in-process registry through
// the daemon's gRPC API, reads it back, checks policy fallbacks, status,
// metrics, shutdown and restore.
func TestLazyMount(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	eagerImg := pushTestImage(t, reg, "base:eager")
	root := t.TempDir()
	policy := func(c *Config) {
		c.Policy = []PolicyRule{{Match: "*/base:eager", Mode: ModeEager}}
		c.BackgroundFetch.Enable = false // keep fetched bytes meaningful
	}
	td := startDaemon(t, root, policy)
	ctx := namespaces.WithNamespace(context.Background(), "test")

	// The eStargz layer is mounted remotely: Prepare reports the target as
	// existing and commits it.
	_, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0")))
	if !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of the eStargz layer = %v, want already exists (remote snapshot)", err)
	}
	info, err := td.sn.Stat(ctx, "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindCommitted || info.Labels[ModeLabel] != "lazy" {
		t.Fatalf("remote snapshot info %+v", info)
	}
	if n := fuseMountsUnder(t, root); n != 1 {
		t.Fatalf("%d FUSE mounts, want 1: %v", n, mountsUnder(t, root))
	}

	// Its files read back byte for byte through a view.
	mounts, err := td.sn.View(ctx, "view-0", "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	for name, want := range img.files {
		got, err := os.ReadFile(filepath.Join(target, name))
		if err != nil {
			t.Errorf("reading %s: %v", name, err)
		} else if !bytes.Equal(got, want) {
			t.Errorf("%s: %d bytes differ from the image's %d", name, len(got), len(want))
		}
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}

	// The gzip layer falls back to a normal snapshot.
	ms, err := td.sn.Prepare(ctx, "extract-1", "chain-0", snapshots.WithLabels(img.unpackLabels(1, "chain-1")))
	if err != nil {
		t.Fatalf("Prepare of the gzip layer = %v, want mounts for a normal unpack", err)
	}
	if len(ms) == 0 {
		t.Fatal("no mounts for the gzip layer")
	}
	info, err = td.sn.Stat(ctx, "extract-1")
	if err != nil {
		t.Fatal(err)
	}
	if info.Kind != snapshots.KindActive || info.Labels[FallbackLabel] != ReasonNotEStargz {
		t.Errorf("gzip layer snapshot %+v", info)
	}
	if err := td.sn.Remove(ctx, "extract-1"); err != nil {
		t.Fatal(err)
	}

	// Policy eager declines the eStargz layer of the eager image.
	if _, err := td.sn.Prepare(ctx, "extract-eager", "", snapshots.WithLabels(eagerImg.unpackLabels(0, "chain-eager"))); err != nil {
		t.Fatalf("Prepare of an eager image's layer = %v, want mounts for a normal unpack", err)
	}
	if info, err := td.sn.Stat(ctx, "extract-eager"); err != nil || info.Kind != snapshots.KindActive || info.Labels[ModeLabel] != "eager" {
		t.Errorf("eager snapshot %+v, %v", info, err)
	}
	if n := fuseMountsUnder(t, root); n != 1 {
		t.Errorf("%d FUSE mounts after fallbacks, want 1", n)
	}

	// Status, through the status socket, lists the lazy layer with its
	// fetched share.
	st, err := FetchStatus(ctx, td.cfg.statusSocket())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Layers) != 1 {
		t.Fatalf("status %+v, want one layer", st)
	}
	l := st.Layers[0]
	if l.Image != img.ref || l.Layer != img.layers[0].Digest.String() || l.Mode != "lazy" {
		t.Errorf("status layer %+v", l)
	}
	if l.Size != img.layers[0].Size || l.FetchedBytes <= 0 || l.FetchedPercent <= 0 || l.FetchedPercent > 100 {
		t.Errorf("status layer sizes %+v (blob size %d)", l, img.layers[0].Size)
	}
	// Its CPU and I/O account has the mount's TOC check and the reads
	// above, within the process's CPU time.
	if a := st.Account; a == nil {
		t.Error("status has no account")
	} else {
		if a.Units["toc"] == 0 || a.RegistryBytes["toc"] == 0 {
			t.Errorf("account has no TOC check: units %v, registry bytes %v", a.Units, a.RegistryBytes)
		}
		if a.Units["on_demand"] == 0 || a.CPUSeconds["on_demand"] <= 0 {
			t.Errorf("account has no on-demand read: units %v, cpu %v", a.Units, a.CPUSeconds)
		}
		var accounted float64
		for act, v := range a.CPUSeconds {
			if act != "fuse_and_other" {
				accounted += v
			}
		}
		if a.ProcessCPUSeconds <= 0 || accounted > a.ProcessCPUSeconds || a.CPUSeconds["fuse_and_other"] < 0 {
			t.Errorf("account: %.4fs accounted, process %.4fs, cpu %v", accounted, a.ProcessCPUSeconds, a.CPUSeconds)
		}
	}

	// Metrics count what happened.
	for _, c := range []struct {
		name string
		got  float64
		want float64
	}{
		{"lazy mounts ok", counterValue(t, td.d.m.lazyMounts.WithLabelValues("ok")), 1},
		{"lazy mounts failed", counterValue(t, td.d.m.lazyMounts.WithLabelValues("failed")), 0},
		{"not eStargz fallbacks", counterValue(t, td.d.m.fallbacks.WithLabelValues(ReasonNotEStargz)), 1},
		{"policy fallbacks", counterValue(t, td.d.m.fallbacks.WithLabelValues(ReasonPolicy)), 1},
		{"eager decisions", counterValue(t, td.d.m.decisions.WithLabelValues("eager", "rule")), 1},
	} {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}

	// The metrics endpoint serves the upstream filesystem's metrics too.
	mfs, err := td.d.m.gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	families := map[string]bool{}
	for _, mf := range mfs {
		families[mf.GetName()] = true
	}
	for _, name := range []string{
		"lazybase_snapshotter_mounted_layers", "lazybase_snapshotter_mount_duration_seconds",
		"lazybase_snapshotter_cpu_seconds_total", "lazybase_snapshotter_registry_bytes_total",
		"lazybase_snapshotter_disk_written_bytes_total",
		metricLayerFetched, metricLayerSize, "stargz_fs_operation_duration_milliseconds",
	} {
		if !families[name] {
			t.Errorf("metrics lack %s", name)
		}
	}

	// Stopping unmounts (stop checks that nothing is left); a new daemon
	// on the same root restores the lazy mount.
	td.stop(t)
	td2 := startDaemon(t, root, policy)
	// Restored in the background once the daemon listens.
	eventually.Require(t, 30*time.Second, "the lazy mount restored", func() error {
		if n := fuseMountsUnder(t, root); n != 1 {
			return fmt.Errorf("%d FUSE mounts after restart, want 1 restored", n)
		}
		st, err = td2.d.Status(ctx)
		if err != nil || len(st.Layers) != 1 || st.Layers[0].Layer != img.layers[0].Digest.String() || st.Restore != nil {
			return fmt.Errorf("status after restart %+v, %v", st, err)
		}
		return nil
	})
	mounts, err = td2.sn.View(ctx, "view-restored", "chain-0")
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(target, "etc/hello.txt"))
	if uerr := mount.UnmountAll(target, 0); uerr != nil {
		t.Error(uerr)
	}
	if err != nil || !bytes.Equal(got, img.files["etc/hello.txt"]) {
		t.Fatalf("restored read %q, %v", got, err)
	}
}

// TestMetricsEndpoint serves metrics on a loopback port and finds both
// lazybase's and the Go runtime's series.
func TestMetricsEndpoint(t *testing.T) {
	requireFUSE(t)
	td := startDaemon(t, "", func(c *Config) { c.MetricsAddress = "127.0.0.1:0" })
	// The TCP port is chosen by the kernel; the status socket serves the
	// same mux.
	client := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", td.cfg.statusSocket())
	}}}
	resp, err := client.Get("http://lazybase/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"lazybase_snapshotter_lazy_mounts_total", "lazybase_snapshotter_fallbacks_total", "go_goroutines"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

package lazypull

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/cpuacct"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// TestLazyReadsAfterGuardCommitStayLocal mounts an eStargz layer of an
// export-base image lazily through the daemon, with background fetch on.
// The guard materializes its blob into a containerd content store; after
// that, reading every file of the FUSE mount in full takes no byte of the
// blob from the registry: the registry sends the blob about once (the
// guard's transfer plus the mount's table-of-contents reads), never twice.
func TestLazyReadsAfterGuardCommitStayLocal(t *testing.T) {
	requireFUSE(t)
	reg := testimage.NewRegistry(t)
	img := pushTestImage(t, reg, "base:estargz")
	proxy := newCountingProxy(t, reg.Server.URL)
	img.ref = strings.Replace(img.ref, reg.Host, proxy.host, 1)
	layer := digest.Digest(img.layers[0].Digest.String())
	size := img.layers[0].Size

	root := t.TempDir()
	td := startDaemon(t, root, func(c *Config) {
		c.Policy = []PolicyRule{{Match: "*/base:estargz", Mode: ModeExportBase}}
		c.Guard.Delay = Duration(time.Hour) // export-base must not wait for it
	})
	if td.d.guard == nil {
		t.Fatal("the daemon runs no export guard")
	}
	acct0 := cpuacct.Default.Snapshot()
	// containerd's content store, in process, in place of the daemon's
	// connection to a containerd socket.
	store, lm := newContentStore(t)
	td.d.stores.open = func(context.Context) (content.Store, leases.Manager, error) { return store, lm, nil }

	ctx := namespaces.WithNamespace(context.Background(), "builder")
	if _, err := td.sn.Prepare(ctx, "extract-0", "", snapshots.WithLabels(img.unpackLabels(0, "chain-0"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare = %v, want a remote snapshot", err)
	}
	ms, err := mountinfo.GetMounts(mountinfo.PrefixFilter(root))
	if err != nil {
		t.Fatal(err)
	}
	var fuseDir string
	for _, m := range ms {
		if strings.HasPrefix(m.FSType, "fuse") {
			fuseDir = m.Mountpoint
		}
	}
	if fuseDir == "" {
		t.Fatalf("no FUSE mount under %s", root)
	}

	waitState(t, td.d.GuardStatus, "builder", layer, exportguard.StateMaterialized)
	if _, err := store.Info(ctx, layer); err != nil {
		t.Fatalf("blob not in the content store: %v", err)
	}
	atCommit := proxy.blobBytes(layer)
	// The CPU and I/O account charges the transfer to the guard.
	acct1 := cpuacct.Default.Snapshot()
	if got := acct1.RegistryBytes["guard"] - acct0.RegistryBytes["guard"]; got != size {
		t.Errorf("account: guard fetched %d registry bytes, the blob has %d", got, size)
	}
	if got := acct1.DiskWrittenBytes["guard"] - acct0.DiskWrittenBytes["guard"]; got != size {
		t.Errorf("account: guard wrote %d bytes, the blob has %d", got, size)
	}
	if acct1.CPUSeconds["guard"] <= acct0.CPUSeconds["guard"] || acct1.Units["guard"] <= acct0.Units["guard"] {
		t.Errorf("account: no guard CPU or unit for the transfer: %+v then %+v", acct0, acct1)
	}
	lazyBytes := func(s cpuacct.Snapshot) int64 {
		return s.RegistryBytes["toc"] + s.RegistryBytes["on_demand"] + s.RegistryBytes["background_fetch"] + s.RegistryBytes["other"]
	}
	// The account counts every blob; the image's other layers (a small
	// gzip one, whose TOC check fails) add a few probes of their own.
	var others int64
	for _, l := range img.layers[1:] {
		others += l.Size
	}
	if got, want := lazyBytes(acct1)-lazyBytes(acct0), atCommit-size; got < want || got > want+2*others {
		t.Errorf("account: the lazy filesystem fetched %d registry bytes, the registry sent it %d of this layer (%d bytes in other layers)", got, want, others)
	}
	if acct1.RegistryBytes["toc"] <= acct0.RegistryBytes["toc"] {
		t.Errorf("account: no registry bytes charged to the TOC check: %+v", acct1.RegistryBytes)
	}

	// Read every file of the lazy mount, in full, through FUSE.
	var read int64
	err = filepath.WalkDir(fuseDir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		read += int64(len(b))
		rel, _ := filepath.Rel(fuseDir, p)
		if want, ok := img.files[rel]; ok && !bytes.Equal(b, want) {
			t.Errorf("%s: bytes differ from the image's", rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	var want int64
	for _, b := range img.files {
		want += int64(len(b))
	}
	if read != want {
		t.Errorf("read %d bytes of files, want %d", read, want)
	}
	// The background fill must not fetch either: wait until the layer is
	// fetched in full (on demand and by the fill), then count.
	eventually.Require(t, 30*time.Second, "layer fetched in full", func() error {
		st, err := td.d.Status(ctx)
		if err != nil {
			return err
		}
		for _, l := range st.Layers {
			if l.Layer == layer.String() && l.Size > 0 && l.FetchedBytes >= l.Size {
				return nil
			}
		}
		return fmt.Errorf("layers %+v", st.Layers)
	})

	total := proxy.blobBytes(layer)
	local := blobSourceBytes(t, td.d.m.reg, "local")
	t.Logf("blob %d bytes: registry sent %d before the commit (guard transfer and mount), %d after; %v bytes read locally", size, atCommit, total-atCommit, local)
	if total != atCommit {
		t.Errorf("the registry sent %d blob bytes after the guard's commit, want 0", total-atCommit)
	}
	if total >= 2*size {
		t.Errorf("the registry sent %d bytes of a %d-byte blob: downloaded twice", total, size)
	}
	if local < float64(size)/2 {
		t.Errorf("only %v bytes read from the local copy", local)
	}
}

// TestDaemonsHaveTheirOwnBlobSource starts two daemons in one process, on
// two roots, and then a third on the first root once the first stopped:
// each has a blob source of its own, attached to its own guard, and
// stopping one detaches only its own. (A blob source found by root in a
// process-wide map was shared by a restarted daemon with its predecessor.)
func TestDaemonsHaveTheirOwnBlobSource(t *testing.T) {
	requireFUSE(t)
	attached := (*exportguard.BlobSource).Attached
	rootA := t.TempDir()
	a := startDaemon(t, rootA, nil)
	b := startDaemon(t, "", nil)
	if a.d.blobs == nil || b.d.blobs == nil || a.d.blobs == b.d.blobs {
		t.Fatalf("blob sources %p and %p, want two", a.d.blobs, b.d.blobs)
	}
	if !attached(a.d.blobs) || !attached(b.d.blobs) {
		t.Fatal("a daemon's blob source is not attached to its guard")
	}
	first := a.d.blobs
	a.stop(t)
	if attached(first) {
		t.Error("the stopped daemon's blob source still serves its guard's blobs")
	}
	if !attached(b.d.blobs) {
		t.Error("stopping one daemon detached the other's blob source")
	}
	again := startDaemon(t, rootA, nil)
	if again.d.blobs == first || again.d.blobs == b.d.blobs || !attached(again.d.blobs) {
		t.Errorf("daemon restarted on %s: blob source %p (before %p, other daemon %p), attached %v",
			rootA, again.d.blobs, first, b.d.blobs, attached(again.d.blobs))
	}
}

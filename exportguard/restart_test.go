package exportguard

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/opencontainers/go-digest"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/internal/eventually"
)

// pushBlob uploads data as a layer blob of tr's repository.
func pushBlob(t *testing.T, tr *testRegistry, data []byte) digest.Digest {
	t.Helper()
	repo, err := name.NewRepository(strings.TrimSuffix(tr.ref, ":latest"))
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteLayer(repo, static.NewLayer(data, types.OCILayer)); err != nil {
		t.Fatalf("pushing blob: %v", err)
	}
	return digest.FromBytes(data)
}

// TestTriggerRemembersCommittedBlobs: a Trigger that starts over a content
// store where an earlier one (an earlier daemon) committed a layer's blob
// takes it from the store when told about the layer again: materialized at
// once although its mode waits an hour, served by LocalBlob from the first
// call on, unpacked by an Unpacker, all while the registry is gone. A
// layer whose blob was never committed keeps waiting.
func TestTriggerRemembersCommittedBlobs(t *testing.T) {
	tr := newTestRegistry(t)
	blob, layer := estargzBlob(t)
	pushBlob(t, tr, blob)
	other, _ := tr.push(50_000)
	otherLayer := digest.FromBytes(other)
	stores := newTestStores(t)
	const ns = "buildkit"

	before, err := NewTrigger(stores, &Remote{}, WithDelay(time.Hour), WithGuardOptions(fastRetry))
	if err != nil {
		t.Fatal(err)
	}
	before.Mounted(context.Background(), MountEvent{Namespace: ns, Ref: tr.ref, Layer: layer, Mode: "export-base", When: WhenNow})
	waitState(t, before, ns, layer, StateMaterialized)
	if err := before.Close(); err != nil {
		t.Fatal(err)
	}
	gets := len(tr.gets())
	// The registry goes away with the daemon.
	tr.srv.Close()

	after, err := NewTrigger(stores, &Remote{}, WithDelay(time.Hour), WithGuardOptions(fastRetry), WithTriggerRegisterer(prometheus.NewRegistry()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { after.Close() })
	if ra, ok := after.LocalBlob(context.Background(), layer); ok {
		ra.Close()
		t.Fatal("LocalBlob serves a layer the Trigger was not told about")
	}
	after.Mounted(context.Background(), MountEvent{Namespace: ns, Ref: tr.ref, Layer: layer, Mode: "lazy", When: WhenDelayed})
	after.Mounted(context.Background(), MountEvent{Namespace: ns, Ref: tr.ref, Layer: otherLayer, Mode: "lazy", When: WhenDelayed})
	// Served at once, whether or not the Trigger's own check ran yet.
	ra, ok := after.LocalBlob(context.Background(), layer)
	if !ok {
		t.Fatal("LocalBlob does not serve the blob committed before the restart")
	}
	got, err := io.ReadAll(io.NewSectionReader(ra, 0, ra.Size()))
	ra.Close()
	if err != nil || !bytes.Equal(got, blob) {
		t.Fatalf("local blob: %v (equal %v)", err, bytes.Equal(got, blob))
	}
	st := waitState(t, after, ns, layer, StateMaterialized)
	if !st.Materialized || st.Size != int64(len(blob)) || st.Error != "" {
		t.Errorf("status %+v", st)
	}
	// Still the guard's blob, and no GC root: it lives as long as a
	// snapshot, image or lease references it (retain.go).
	ctx := namespaces.WithNamespace(context.Background(), ns)
	info, err := stores.store.Info(ctx, layer)
	if err != nil || info.Labels[labelGCRoot] != "" || !Committed(info.Labels) {
		t.Errorf("blob info %+v (%v): want the guard's labels and no GC root", info, err)
	}
	// The layer never committed waits for its delay, and is not local.
	if st, _ := layerStatus(after, ns, otherLayer); st.State != StateScheduled {
		t.Errorf("uncommitted layer: state %q, want scheduled", st.State)
	}
	if ra, ok := after.LocalBlob(context.Background(), otherLayer); ok {
		ra.Close()
		t.Error("LocalBlob serves a blob that is not in the content store")
	}

	u, results := newTestUnpacker(t, after.LocalBlob, prometheus.NewRegistry())
	mp := snapshotMount(t, "7")
	u.Mounted(mp, UnpackMount{Image: tr.ref, Layer: layer})
	res := await(t, results, "unpack")
	if res.Err != nil {
		t.Fatal(res.Err)
	}
	if b, err := os.ReadFile(filepath.Join(res.Dir, "etc/motd")); err != nil || string(b) != "hello\n" {
		t.Errorf("unpacked etc/motd: %q, %v", b, err)
	}
	if n := len(tr.gets()); n != gets {
		t.Errorf("%d blob GETs after the restart, want 0", n-gets)
	}
}

// TestTriggerFinishesInterruptedTransfer: a transfer cut off when the
// daemon stops (a kill leaves the same content store behind: an ingest, no
// blob) leaves no committed blob; a new Trigger told about the layer again
// resumes the ingest from where it stopped and commits the verified blob.
func TestTriggerFinishesInterruptedTransfer(t *testing.T) {
	tr := newTestRegistry(t)
	data, desc := tr.push(3 << 20)
	stores := newTestStores(t)
	const ns = "buildkit"
	ctx := namespaces.WithNamespace(context.Background(), ns)

	// The first transfer sends 1 MiB and then stalls until the client
	// goes away.
	half := make(chan struct{})
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if n > 0 {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Length", "3145728")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write(data[:1<<20])
		w.(http.Flusher).Flush()
		close(half)
		<-r.Context().Done()
	})
	first, err := NewTrigger(stores, &Remote{}, WithGuardOptions(fastRetry))
	if err != nil {
		t.Fatal(err)
	}
	first.Mounted(context.Background(), MountEvent{Namespace: ns, Ref: tr.ref, Layer: desc.Digest, Mode: "export-base", When: WhenNow})
	<-half
	eventually.Require(t, 10*time.Second, "1 MiB in the ingest", func() error {
		st, err := stores.store.Status(ctx, ingestRef(desc.Digest))
		if err != nil {
			return err
		}
		if st.Offset < 1<<20 {
			return io.ErrShortWrite
		}
		return nil
	})
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := stores.store.Info(ctx, desc.Digest); !errdefs.IsNotFound(err) {
		t.Fatalf("blob of a cut transfer: Info = %v, want not found", err)
	}

	second, err := NewTrigger(stores, &Remote{}, WithGuardOptions(fastRetry))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { second.Close() })
	second.Mounted(context.Background(), MountEvent{Namespace: ns, Ref: tr.ref, Layer: desc.Digest, Mode: "export-base", When: WhenNow})
	waitState(t, second, ns, desc.Digest, StateMaterialized)
	gets := tr.gets()
	if last := gets[len(gets)-1]; !strings.HasPrefix(last, "bytes=1048576-") {
		t.Errorf("GETs %q: want the last to resume at 1048576", gets)
	}
	ra, err := stores.store.ReaderAt(ctx, desc)
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	got, err := io.ReadAll(io.NewSectionReader(ra, 0, ra.Size()))
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("committed blob: %v (equal %v)", err, bytes.Equal(got, data))
	}
}

// TestKeepAndRestoreLocal: an unpacked directory kept while the daemon is
// stopped goes back next to its mountpoint only when its done marker names
// the layer mounted there again; the keep is removed in every case, and an
// incomplete unpack is never kept.
func TestKeepAndRestoreLocal(t *testing.T) {
	layer := digest.FromString("layer")
	other := digest.FromString("other")
	unpacked := func(t *testing.T, mp string, marker string) {
		t.Helper()
		snDir := filepath.Dir(mp)
		if err := os.MkdirAll(filepath.Join(snDir, LocalDirName, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(snDir, LocalDirName, "etc", "motd"), []byte("hi\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		if marker != "" {
			if err := os.WriteFile(filepath.Join(snDir, LocalDoneName), []byte(marker+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, tc := range []struct {
		name     string
		marker   string        // "" : unpack not complete
		remount  digest.Digest // the layer mounted again
		kept     bool
		restored bool
	}{
		{"same layer", layer.String(), layer, true, true},
		{"another layer mounted there", layer.String(), other, true, false},
		{"incomplete unpack", "", layer, false, false},
		{"bad marker", "not a digest", layer, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mp := snapshotMount(t, "3")
			keep := filepath.Join(t.TempDir(), "kept", "3")
			unpacked(t, mp, tc.marker)
			kept, err := KeepLocal(mp, keep)
			if err != nil || kept != tc.kept {
				t.Fatalf("KeepLocal = %v, %v; want %v", kept, err, tc.kept)
			}
			// The snapshotter removes the snapshot directory, restores make
			// it again.
			if err := os.RemoveAll(filepath.Dir(mp)); err != nil {
				t.Fatal(err)
			}
			if err := os.MkdirAll(mp, 0o755); err != nil {
				t.Fatal(err)
			}
			restored, err := RestoreLocal(keep, mp, tc.remount)
			if err != nil || restored != tc.restored {
				t.Fatalf("RestoreLocal = %v, %v; want %v", restored, err, tc.restored)
			}
			if _, err := os.Stat(keep); !os.IsNotExist(err) {
				t.Errorf("keep %s left: %v", keep, err)
			}
			dir, ok := completedLocal(mp, tc.remount)
			if ok != tc.restored {
				t.Fatalf("completed unpack after restore: %v, want %v", ok, tc.restored)
			}
			if ok {
				if b, err := os.ReadFile(filepath.Join(dir, "etc", "motd")); err != nil || string(b) != "hi\n" {
					t.Errorf("restored file: %q, %v", b, err)
				}
			}
		})
	}
}

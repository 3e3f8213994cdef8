package exportguard

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
)

func TestMain(m *testing.M) {
	// The local store warns on every open that fsverity is unsupported.
	_ = log.SetLevel("error")
	os.Exit(m.Run())
}

// TestResumesAcrossCalls: a transfer whose only caller gives up keeps its
// partial ingest, and the next call fetches only the rest.
func TestResumesAcrossCalls(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(512 << 10)
	const first = 100 << 10
	started := make(chan struct{})
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if n > 0 {
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Content-Length", fmt.Sprint(d.Size))
		w.WriteHeader(http.StatusOK)
		w.Write(data[:first])
		w.(http.Flusher).Flush()
		close(started)
		select {
		case <-r.Context().Done():
		case <-time.After(10 * time.Second):
		}
	})
	s := localStore(t)
	g := newGuard(t, s)
	ctx, cancel := context.WithCancel(s.ctx)
	go func() {
		<-started
		// Let the client write what it received before it is cut off.
		time.Sleep(100 * time.Millisecond)
		cancel()
	}()
	if err := g.Ensure(ctx, tr.ref, d); !errors.Is(err, context.Canceled) {
		t.Fatalf("Ensure: %v, want context.Canceled", err)
	}
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	gets := tr.gets()
	if want := fmt.Sprintf("bytes=%d-%d", first, d.Size-1); len(gets) != 2 || gets[1] != want {
		t.Errorf("Range headers %q, want the second to be %q", gets, want)
	}
}

// TestBadPartialIngestStartsOver: bytes left in an ingest by an earlier
// transfer that do not belong to the blob fail verification once; the
// guard then starts over from nothing instead of failing.
func TestBadPartialIngestStartsOver(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(128 << 10)
	s := localStore(t)
	w, err := content.OpenWriter(s.ctx, s.store, content.WithRef(ingestRef(d.Digest)), content.WithDescriptor(d))
	if err != nil {
		t.Fatal(err)
	}
	junk := make([]byte, 1000)
	if _, err := w.Write(junk); err != nil {
		t.Fatal(err)
	}
	w.Close()

	reg := prometheus.NewRegistry()
	g := newGuard(t, s, WithRegisterer(reg))
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	gets := tr.gets()
	want := []string{fmt.Sprintf("bytes=1000-%d", d.Size-1), ""}
	if fmt.Sprint(gets) != fmt.Sprint(want) {
		t.Errorf("Range headers %q, want %q", gets, want)
	}
	if v := gathered(t, reg, "lazybase_exportguard_verify_failures_total"); v != 1 {
		t.Errorf("verify failures = %v, want 1", v)
	}
}

// TestRegistryIgnoringRange: a registry that answers a range request with
// the whole blob still yields the blob, the resent prefix skipped.
func TestRegistryIgnoringRange(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(300 << 10)
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		r.Header.Del("Range")
		if n == 0 {
			next.ServeHTTP(&cutWriter{ResponseWriter: w, limit: 50 << 10}, r)
			return
		}
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	g := newGuard(t, s)
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	if gets := tr.gets(); len(gets) != 2 || gets[1] == "" {
		t.Errorf("Range headers %q, want a range request second", gets)
	}
}

// TestSharedTransferOutlivesOneCaller: when one of two callers waiting for a
// blob gives up, the transfer goes on for the other.
func TestSharedTransferOutlivesOneCaller(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(64 << 10)
	started := make(chan struct{})
	var once sync.Once
	tr.setServe(func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		once.Do(func() { close(started) })
		time.Sleep(300 * time.Millisecond)
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	g := newGuard(t, s)
	ctx, cancel := context.WithCancel(s.ctx)
	errA := make(chan error, 1)
	go func() { errA <- g.Ensure(ctx, tr.ref, d) }()
	<-started
	errB := make(chan error, 1)
	go func() { errB <- g.Ensure(s.ctx, tr.ref, d) }()
	time.Sleep(50 * time.Millisecond) // let B join the transfer
	cancel()
	if err := <-errA; !errors.Is(err, context.Canceled) {
		t.Errorf("caller A: %v, want context.Canceled", err)
	}
	if err := <-errB; err != nil {
		t.Fatalf("caller B: %v", err)
	}
	assertBlob(t, s, d, data)
	if n := len(tr.gets()); n != 1 {
		t.Errorf("%d blob GETs, want 1", n)
	}
}

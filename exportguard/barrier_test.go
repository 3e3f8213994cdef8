package exportguard

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/leases"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// serveSocket serves g's status and barrier routes on a unix socket, as
// the daemon's status API does, and returns the socket's path.
func serveSocket(t *testing.T, g *Trigger) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "s.status")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+StatusPath, g.StatusHandler())
	mux.Handle("POST "+BarrierPath, g.BarrierHandler())
	srv := &http.Server{Handler: mux}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// TestBarrierTriggersDelayedLayers: layers waiting for an hour long delay
// are started at once by the barrier, which returns when both blobs are in
// the namespace's content store, reporting each state change; a second
// barrier fetches nothing.
func TestBarrierTriggersDelayedLayers(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, time.Hour)
	e.mountAll(g, "buildkit", WhenDelayed)
	sock := serveSocket(t, g)

	var mu sync.Mutex
	var seen []string
	layers, err := RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}, Timeout: 30 * time.Second},
		func(l LayerStatus) {
			mu.Lock()
			seen = append(seen, l.Layer+" "+string(l.State))
			mu.Unlock()
		})
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 2 {
		t.Fatalf("barrier reported %d layers, want 2: %+v", len(layers), layers)
	}
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	for _, d := range e.layers {
		info, err := e.stores.store.Info(ctx, d)
		if err != nil {
			t.Fatalf("layer %s not in the content store after the barrier: %v", d, err)
		}
		if info.Size != testLayerSize {
			t.Errorf("layer %s: size %d", d, info.Size)
		}
		if !strings.Contains(strings.Join(seen, "\n"), d.String()+" "+string(StateMaterialized)) {
			t.Errorf("progress never reported %s materialized: %v", d, seen)
		}
	}
	// Again: nothing left to do, nothing fetched again.
	before := e.blobGETs(e.layers[0])
	if _, err := RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}}, nil); err != nil {
		t.Fatal(err)
	}
	if after := e.blobGETs(e.layers[0]); after != before {
		t.Errorf("second barrier fetched the blob again (%d GETs, was %d)", after, before)
	}
	// The status route shows both layers.
	st, err := FetchStatus(t.Context(), sock)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Layers) != 2 || st.Layers[0].State != StateMaterialized || st.Layers[1].State != StateMaterialized {
		t.Errorf("status %+v", st.Layers)
	}
}

// TestBarrierReturnsOnCommit: a barrier waiting on a transfer the registry
// holds is released by the commit itself. The order is asserted with
// channels: the barrier reports the layer materializing, has not returned
// while the registry holds the blob, and returns with the layer
// materialized once the registry lets it go; the commit subscriber sees
// the same commit.
func TestBarrierReturnsOnCommit(t *testing.T) {
	e := newTriggerEnv(t)
	hold := make(chan struct{})
	e.hold.Store(hold)
	g := e.trigger(t, 0)
	committed := make(chan digest.Digest, 2)
	g.OnCommit(func(st LayerStatus) { committed <- digest.Digest(st.Layer) })
	layer := e.layers[0]
	g.Mounted(context.Background(), MountEvent{Namespace: "buildkit", Ref: e.ref, Layer: layer, When: WhenNow})

	materializing := make(chan struct{})
	var once sync.Once
	type result struct {
		layers []LayerStatus
		err    error
	}
	done := make(chan result, 1)
	go func() {
		ls, err := g.Barrier(t.Context(), "buildkit", []string{e.ref}, func(l LayerStatus) {
			if l.State == StateMaterializing {
				once.Do(func() { close(materializing) })
			}
		})
		done <- result{ls, err}
	}()
	select {
	case <-materializing:
	case r := <-done:
		t.Fatalf("barrier returned before the transfer could finish: %+v, %v", r.layers, r.err)
	}
	// The transfer is held by the registry: the barrier is still waiting.
	select {
	case r := <-done:
		t.Fatalf("barrier returned while the registry held the blob: %+v, %v", r.layers, r.err)
	default:
	}
	close(hold)
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if len(r.layers) != 1 || r.layers[0].State != StateMaterialized || !r.layers[0].Materialized {
		t.Fatalf("barrier returned %+v", r.layers)
	}
	if got := <-committed; got != layer {
		t.Errorf("commit subscriber told about %s, want %s", got, layer)
	}
}

// TestBarrierReleasedByClose: a barrier waiting on a held transfer returns
// when the Trigger closes, saying so.
func TestBarrierReleasedByClose(t *testing.T) {
	e := newTriggerEnv(t)
	hold := make(chan struct{})
	defer close(hold)
	e.hold.Store(hold)
	g := e.trigger(t, 0)
	g.Mounted(context.Background(), MountEvent{Namespace: "buildkit", Ref: e.ref, Layer: e.layers[0], When: WhenNow})
	materializing := make(chan struct{})
	var once sync.Once
	done := make(chan error, 1)
	go func() {
		_, err := g.Barrier(t.Context(), "buildkit", []string{e.ref}, func(l LayerStatus) {
			if l.State == StateMaterializing {
				once.Do(func() { close(materializing) })
			}
		})
		done <- err
	}()
	<-materializing
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; !errors.Is(err, errClosing) {
		t.Fatalf("barrier after Close = %v, want %v", err, errClosing)
	}
}

// TestBarrierRefetchesDroppedBlob: a materialized blob deleted from the
// content store is fetched again by the next barrier.
func TestBarrierRefetchesDroppedBlob(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	e.mountAll(g, "buildkit", WhenNow)
	waitState(t, g, "buildkit", e.layers[0], StateMaterialized)
	waitState(t, g, "buildkit", e.layers[1], StateMaterialized)
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	if err := e.stores.store.Delete(ctx, e.layers[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := g.Barrier(t.Context(), "buildkit", []string{e.ref}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := e.stores.store.Info(ctx, e.layers[0]); err != nil {
		t.Fatalf("dropped blob not fetched again: %v", err)
	}
}

func TestBarrierNotMounted(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	sock := serveSocket(t, g)
	_, err := RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}}, nil)
	if err == nil || !strings.Contains(err.Error(), "image "+e.ref+": not mounted by this daemon in namespace buildkit") {
		t.Fatalf("got %v, want not mounted by this daemon", err)
	}
	// Mounted in another namespace: the error says where.
	e.mountAll(g, "other", WhenNow)
	_, err = RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}}, nil)
	if err == nil || !strings.Contains(err.Error(), "mounted in namespace other") {
		t.Fatalf("got %v, want the other namespace named", err)
	}
	// An image the registry does not have.
	missing := strings.Replace(e.ref, "trigger-test", "nope", 1)
	_, err = RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "other", Images: []string{missing}}, nil)
	if err == nil || !strings.Contains(err.Error(), "image "+missing+": reading manifest") {
		t.Fatalf("got %v, want a manifest error naming the image", err)
	}
}

// TestBarrierBadRequests: requests the barrier route cannot serve are
// refused with 400 and a reason.
func TestBarrierBadRequests(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	sock := serveSocket(t, g)
	client := unixClient(sock)
	defer client.CloseIdleConnections()
	for name, c := range map[string]struct{ body, want string }{
		"not JSON":     {"{", "decoding barrier request"},
		"bad timeout":  {`{"namespace":"n","images":["a"],"timeout":"soon"}`, `timeout "soon" is not a duration`},
		"no namespace": {`{"images":["a"]}`, "needs a namespace"},
		"no image":     {`{"namespace":"n"}`, "at least one image"},
	} {
		t.Run(name, func(t *testing.T) {
			resp, err := client.Post("http://lazybase"+BarrierPath, "application/json", strings.NewReader(c.body))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), c.want) {
				t.Errorf("%s: %q, want 400 with %q", resp.Status, b, c.want)
			}
		})
	}
}

func TestBarrierLazyOnly(t *testing.T) {
	e := newTriggerEnv(t)
	g := e.trigger(t, 0)
	e.mountAll(g, "buildkit", WhenNever)
	_, err := g.Barrier(t.Context(), "buildkit", []string{e.ref}, nil)
	if err == nil || !strings.Contains(err.Error(), "lazy-only policy") || !strings.Contains(err.Error(), e.layers[0].String()) {
		t.Fatalf("got %v, want lazy-only policy naming the layer", err)
	}
	if _, err := e.stores.store.Info(namespaces.WithNamespace(context.Background(), "buildkit"), e.layers[0]); !errdefs.IsNotFound(err) {
		t.Errorf("lazy-only blob in the content store: %v", err)
	}
}

// TestBarrierTamperedBlob: the registry serves a blob with one byte
// flipped. The barrier fails with a verification error naming the image and
// the layer, tries the failed layer once more, and nothing unverified is
// committed.
func TestBarrierTamperedBlob(t *testing.T) {
	e := newTriggerEnv(t)
	bad := e.layers[1]
	e.tamper.Store(bad)
	g := e.trigger(t, 0)
	e.mountAll(g, "buildkit", WhenNow)
	waitState(t, g, "buildkit", e.layers[0], StateMaterialized)
	waitState(t, g, "buildkit", bad, StateFailed)
	gets := e.blobGETs(bad)
	sock := serveSocket(t, g)
	_, err := RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}, Timeout: 30 * time.Second}, nil)
	if err == nil {
		t.Fatal("barrier succeeded over a tampered blob")
	}
	msg := err.Error()
	for _, want := range []string{"image " + e.ref, "layer " + bad.String(), "verification"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not contain %q", msg, want)
		}
	}
	if strings.Contains(msg, e.layers[0].String()) {
		t.Errorf("error %q names the good layer", msg)
	}
	if n := e.blobGETs(bad); n <= gets {
		t.Errorf("the barrier did not try the failed layer again (%d GETs before, %d after)", gets, n)
	}
	ctx := namespaces.WithNamespace(context.Background(), "buildkit")
	if _, err := e.stores.store.Info(ctx, bad); !errdefs.IsNotFound(err) {
		t.Errorf("tampered blob committed: %v", err)
	}
	// Once the registry serves the right bytes, the barrier succeeds.
	e.tamper.Store(digest.Digest(""))
	if _, err := g.Barrier(t.Context(), "buildkit", []string{e.ref}, nil); err != nil {
		t.Fatal(err)
	}
	ra, err := e.stores.store.ReaderAt(ctx, ocispec.Descriptor{Digest: bad, Size: testLayerSize})
	if err != nil {
		t.Fatal(err)
	}
	defer ra.Close()
	b := make([]byte, ra.Size())
	if _, err := ra.ReadAt(b, 0); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	if digest.FromBytes(b) != bad {
		t.Errorf("committed blob has digest %s, want %s", digest.FromBytes(b), bad)
	}
}

// TestBarrierTimeout: a barrier on layers whose transfer cannot finish
// (containerd hangs) gives up after its timeout, naming a layer and its
// state.
func TestBarrierTimeout(t *testing.T) {
	e := newTriggerEnv(t)
	release := make(chan struct{})
	defer close(release)
	e.stores.open = func(ctx context.Context) (content.Store, leases.Manager, error) {
		select {
		case <-release:
		case <-ctx.Done():
			return nil, nil, ctx.Err()
		}
		return e.stores.store, e.stores.leases, nil
	}
	g := e.trigger(t, time.Hour)
	e.mountAll(g, "buildkit", WhenDelayed)
	sock := serveSocket(t, g)
	_, err := RequestBarrier(t.Context(), sock, BarrierRequest{Namespace: "buildkit", Images: []string{e.ref}, Timeout: 700 * time.Millisecond}, nil)
	if err == nil || !strings.Contains(err.Error(), "timed out after 700ms") || !strings.Contains(err.Error(), e.layers[0].String()) {
		t.Fatalf("got %v, want a timeout naming the layer", err)
	}
}

// TestBarrierRequestJSON: the request's wire form is the one clients of
// earlier versions send: the timeout as a Go duration string, left out
// when zero.
func TestBarrierRequestJSON(t *testing.T) {
	for _, c := range []struct {
		req  BarrierRequest
		want string
	}{
		{BarrierRequest{Namespace: "n", Images: []string{"a"}, Timeout: 90 * time.Second}, `{"namespace":"n","images":["a"],"timeout":"1m30s"}`},
		{BarrierRequest{Namespace: "n", Images: []string{"a"}}, `{"namespace":"n","images":["a"]}`},
	} {
		b, err := c.req.MarshalJSON()
		if err != nil {
			t.Fatal(err)
		}
		if string(b) != c.want {
			t.Errorf("%+v marshals to %s, want %s", c.req, b, c.want)
		}
		var back BarrierRequest
		if err := back.UnmarshalJSON(b); err != nil {
			t.Fatal(err)
		}
		if back.Namespace != c.req.Namespace || back.Timeout != c.req.Timeout || len(back.Images) != 1 {
			t.Errorf("round trip of %s = %+v", b, back)
		}
	}
}

package exportguard

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
)

// shortTimeouts are the registry timeouts of these tests.
var shortTimeouts = Timeouts{Connect: 2 * time.Second, TLSHandshake: 300 * time.Millisecond, ResponseHeader: 300 * time.Millisecond, Idle: 300 * time.Millisecond}

// stallAfter serves the first n bytes of the blob, then nothing until the
// client gives up.
func stallAfter(n int) func(int, http.ResponseWriter, *http.Request, http.Handler) {
	return func(_ int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		next.ServeHTTP(&stallWriter{ResponseWriter: w, limit: n, done: r.Context().Done()}, r)
	}
}

// stallWriter passes limit bytes, then blocks until done.
type stallWriter struct {
	http.ResponseWriter
	limit int
	done  <-chan struct{}
}

func (w *stallWriter) Write(p []byte) (int, error) {
	if len(p) < w.limit {
		w.limit -= len(p)
		return w.ResponseWriter.Write(p)
	}
	w.ResponseWriter.Write(p[:w.limit])
	w.ResponseWriter.(http.Flusher).Flush()
	<-w.done
	return 0, http.ErrAbortHandler
}

// TestRemoteSilentRegistry: registries that stop answering after the TCP
// handshake, after the TLS handshake, or in the middle of a blob fail the
// Guard's every attempt within the timeouts, with an error naming the
// host; nothing is committed (a stalled transfer keeps its ingest, for the
// next Ensure to resume).
func TestRemoteSilentRegistry(t *testing.T) {
	tr := newTestRegistry(t)
	_, d := tr.push(256 << 10)
	tr.setServe(stallAfter(64 << 10))
	stalledHost := strings.TrimPrefix(tr.srv.URL, "http://")
	const attempts = 3
	for _, tc := range []struct {
		name, host, want string
		transport        http.RoundTripper
	}{
		{"silent after TCP", testimage.SilentServer(t), "within 300ms", nil},
		{"silent after TLS", testimage.SilentTLSServer(t), "no response headers within 300ms", imageio.BaseTransport(true)},
		{"stalled blob", stalledHost, "response body stalled, no data for 300ms", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := localStore(t)
			g, err := New(s.store, &Remote{Keychain: authn.NewMultiKeychain(), Transport: tc.transport, Timeouts: shortTimeouts},
				WithRetry(attempts, 10*time.Millisecond, 20*time.Millisecond))
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			start := time.Now()
			err = g.Ensure(s.ctx, tc.host+"/test/img:latest", d)
			elapsed := time.Since(start)
			var te *TimeoutError
			if !errors.As(err, &te) || te.Host != tc.host || !strings.Contains(err.Error(), "registry "+tc.host+": ") || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Ensure: %v, want a timeout naming registry %s (%q)", err, tc.host, tc.want)
			}
			limit := shortTimeouts.ResponseHeader
			if elapsed < attempts*limit || elapsed > 10*attempts*limit {
				t.Errorf("%d attempts took %s, want between %s and %s", attempts, elapsed, attempts*limit, 10*attempts*limit)
			}
			if _, err := s.store.Info(s.ctx, d.Digest); !errdefs.IsNotFound(err) {
				t.Errorf("blob %s: Info returned %v, want not found", d.Digest, err)
			}
			t.Logf("%s: %v", elapsed.Round(time.Millisecond), err)
		})
	}
	// Every attempt at the stalled blob resumed where the last one stopped.
	gets := tr.gets()
	if len(gets) != attempts || gets[0] != "" || gets[1] != "bytes=65536-262143" {
		t.Errorf("blob GETs with Range %q, want %d, the second from byte 65536", gets, attempts)
	}
}

// TestRemoteStallThenResume: the first transfer stalls; the next attempt
// resumes and the blob is committed.
func TestRemoteStallThenResume(t *testing.T) {
	tr := newTestRegistry(t)
	data, d := tr.push(256 << 10)
	tr.setServe(func(n int, w http.ResponseWriter, r *http.Request, next http.Handler) {
		if n == 0 {
			stallAfter(100<<10)(n, w, r, next)
			return
		}
		next.ServeHTTP(w, r)
	})
	s := localStore(t)
	g, err := New(s.store, &Remote{Keychain: authn.NewMultiKeychain(), Timeouts: shortTimeouts}, fastRetry)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if err := g.Ensure(s.ctx, tr.ref, d); err != nil {
		t.Fatal(err)
	}
	assertBlob(t, s, d, data)
	if gets := tr.gets(); len(gets) != 2 || gets[1] != "bytes=102400-262143" {
		t.Errorf("blob GETs with Range %q, want a resumed second one", gets)
	}
}

// TestRegistryLookupsSilentRegistry: Remote's blob size lookup (at mount)
// and manifest read (barrier), against registries that never complete the
// TCP handshake or never answer after it, give up within their timeouts
// with an error naming the host; the barrier names the image at fault.
func TestRegistryLookupsSilentRegistry(t *testing.T) {
	short := Timeouts{Connect: 500 * time.Millisecond, TLSHandshake: 300 * time.Millisecond, ResponseHeader: 300 * time.Millisecond, Idle: 300 * time.Millisecond}
	const dgst = digest.Digest("sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
	r := &Remote{Keychain: authn.NewMultiKeychain(), Timeouts: short}
	for _, tc := range []struct {
		name  string
		host  string
		limit time.Duration
	}{
		{"no TCP handshake", testimage.BlackholeServer(t), short.Connect},
		{"silent after TCP", testimage.SilentServer(t), short.ResponseHeader},
	} {
		ref := tc.host + "/app:1"
		for _, lookup := range []struct {
			name string
			run  func(context.Context) error
		}{
			{"blob size", func(ctx context.Context) error { _, err := r.BlobSize(ctx, ref, dgst); return err }},
			{"image layers", func(ctx context.Context) error { _, err := r.ImageLayers(ctx, ref); return err }},
		} {
			t.Run(tc.name+"/"+lookup.name, func(t *testing.T) {
				start := time.Now()
				err := lookup.run(t.Context())
				elapsed := time.Since(start)
				if err == nil || !strings.Contains(err.Error(), "registry "+tc.host+": ") {
					t.Fatalf("error %v, want one naming registry %s", err, tc.host)
				}
				if elapsed < tc.limit || elapsed > 10*tc.limit {
					t.Errorf("gave up after %s, want between %s and %s", elapsed, tc.limit, 10*tc.limit)
				}
				t.Logf("%s: %v", elapsed.Round(time.Millisecond), err)
			})
		}
	}

	// The barrier reports the image at fault.
	g, err := NewTrigger(newTestStores(t), r)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	silent := testimage.SilentServer(t) + "/app:1"
	start := time.Now()
	_, err = g.Barrier(t.Context(), "buildkit", []string{silent}, nil)
	if err == nil || !strings.Contains(err.Error(), "image "+silent+": reading manifest") || !strings.Contains(err.Error(), "registry "+strings.TrimSuffix(silent, "/app:1")+": ") {
		t.Fatalf("barrier: %v, want the image and the registry named", err)
	}
	if elapsed := time.Since(start); elapsed > 10*short.ResponseHeader {
		t.Errorf("barrier gave up after %s", elapsed)
	}
}

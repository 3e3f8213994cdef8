package imageio

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/testimage"
)

// short are the timeouts of these tests.
var short = Timeouts{Connect: 2 * time.Second, TLSHandshake: 300 * time.Millisecond, ResponseHeader: 300 * time.Millisecond, Idle: 300 * time.Millisecond}

// bounded checks that an operation that took elapsed gave up within a
// generous multiple of the timeout, not after some other, longer, bound.
func bounded(t *testing.T, elapsed, timeout time.Duration) {
	t.Helper()
	if elapsed < timeout {
		t.Errorf("gave up after %s, before the %s timeout", elapsed, timeout)
	}
	if elapsed > 10*timeout {
		t.Errorf("gave up after %s, want within 10 x %s", elapsed, timeout)
	}
}

func TestTimeoutErrorMessages(t *testing.T) {
	for _, tc := range []struct {
		phase string
		limit time.Duration
		want  string
	}{
		{PhaseConnect, 30 * time.Second, "registry r.example:5000: no TCP connection within 30s"},
		{PhaseTLS, 10 * time.Second, "registry r.example:5000: TLS handshake not done within 10s"},
		{PhaseSend, time.Minute, "registry r.example:5000: request body not accepted for 60s"},
		{PhaseResponse, time.Minute, "registry r.example:5000: no response headers within 60s"},
		{PhaseBody, 1500 * time.Millisecond, "registry r.example:5000: response body stalled, no data for 1.5s"},
	} {
		err := error(&TimeoutError{Host: "r.example:5000", Phase: tc.phase, Limit: tc.limit})
		if err.Error() != tc.want {
			t.Errorf("%s: %q, want %q", tc.phase, err, tc.want)
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("%s: not a net.Error timeout", tc.phase)
		}
	}
}

func TestTimeoutsValidate(t *testing.T) {
	if _, err := New(WithTimeouts(Timeouts{Idle: -time.Second})); err == nil || !strings.Contains(err.Error(), "idle timeout") {
		t.Errorf("negative idle timeout: %v", err)
	}
	got := Timeouts{Idle: time.Second}.WithDefaults()
	if got.Idle != time.Second || got.Connect != DefaultConnectTimeout || got.TLSHandshake != DefaultTLSTimeout || got.ResponseHeader != DefaultResponseTimeout {
		t.Errorf("WithDefaults: %+v", got)
	}
}

// TestBoundedTransportSilentServers sends a request to servers that stop
// answering at each phase: each fails with a TimeoutError naming the host
// and the phase, within its timeout.
func TestBoundedTransportSilentServers(t *testing.T) {
	stalledBody := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "1000")
		w.WriteHeader(http.StatusOK)
		w.Write(make([]byte, 10))
		w.(http.Flusher).Flush()
		<-r.Context().Done()
	}))
	t.Cleanup(func() { stalledBody.CloseClientConnections(); stalledBody.Close() })
	for _, tc := range []struct {
		name     string
		url      string
		insecure bool
		phase    string
		limit    time.Duration
		body     bool // the failure comes while reading the body
	}{
		{"silent after TCP (http)", "http://" + testimage.SilentServer(t) + "/v2/", false, PhaseResponse, short.ResponseHeader, false},
		{"silent after TCP (https)", "https://" + testimage.SilentServer(t) + "/v2/", false, PhaseTLS, short.TLSHandshake, false},
		{"silent after TLS", "https://" + testimage.SilentTLSServer(t) + "/v2/", true, PhaseResponse, short.ResponseHeader, false},
		{"stalled body", stalledBody.URL + "/v2/blob", false, PhaseBody, short.Idle, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt := NewTransport(tc.insecure, short)
			req, err := http.NewRequestWithContext(t.Context(), http.MethodGet, tc.url, nil)
			if err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			resp, err := (&http.Client{Transport: rt}).Do(req)
			if err == nil {
				if !tc.body {
					resp.Body.Close()
					t.Fatalf("status %s, want a timeout", resp.Status)
				}
				_, err = io.ReadAll(resp.Body)
				resp.Body.Close()
			} else if tc.body {
				t.Fatalf("round trip: %v", err)
			}
			elapsed := time.Since(start)
			var te *TimeoutError
			if !errors.As(err, &te) {
				t.Fatalf("error %v (%T), want a TimeoutError", err, err)
			}
			if te.Phase != tc.phase || te.Limit != tc.limit || te.Host != req.URL.Host {
				t.Errorf("timeout %+v, want phase %q, limit %s, host %s", te, tc.phase, tc.limit, req.URL.Host)
			}
			if !strings.Contains(err.Error(), "registry "+req.URL.Host+": ") {
				t.Errorf("error %q does not name the host", err)
			}
			bounded(t, elapsed, tc.limit)
		})
	}
}

// TestBoundedTransportConnect dials an address whose TCP handshake never
// completes: the request fails within the connect timeout, naming the host.
func TestBoundedTransportConnect(t *testing.T) {
	host := testimage.BlackholeServer(t)
	tm := short
	tm.Connect = 500 * time.Millisecond
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+host+"/v2/", nil)
	start := time.Now()
	_, err := (&http.Client{Transport: NewTransport(false, tm)}).Do(req)
	var te *TimeoutError
	if !errors.As(err, &te) || te.Phase != PhaseConnect || !strings.Contains(err.Error(), "registry "+host+": no TCP connection within 500ms") {
		t.Fatalf("error %v, want a connect timeout naming %s", err, host)
	}
	bounded(t, time.Since(start), tm.Connect)
}

// TestBoundedTransportProgressingTransfers moves bodies that take far
// longer than every timeout but never pause for as long as one: they
// succeed. The caller pausing between reads does not count either.
func TestBoundedTransportProgressingTransfers(t *testing.T) {
	const pieces = 12
	piece := 60 * time.Millisecond // pieces x piece = 720ms > 2 x Idle
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPut {
			n, err := io.Copy(io.Discard, r.Body)
			if err != nil {
				w.WriteHeader(http.StatusBadRequest)
				return
			}
			w.Header().Set("X-Got", http.StatusText(int(n%600)))
			w.WriteHeader(http.StatusCreated)
			return
		}
		w.Header().Set("Content-Length", "12")
		for range pieces {
			w.Write([]byte("x"))
			w.(http.Flusher).Flush()
			time.Sleep(piece)
		}
	}))
	defer srv.Close()
	client := &http.Client{Transport: NewTransport(false, short)}

	start := time.Now()
	resp, err := client.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || len(b) != pieces {
		t.Fatalf("slow download: %d bytes, %v", len(b), err)
	}
	if elapsed := time.Since(start); elapsed < 2*short.Idle {
		t.Fatalf("the download took %s, not longer than the timeouts: the test proves nothing", elapsed)
	}

	// A slow reader: the caller waits longer than Idle between reads.
	resp, err = client.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	var got int
	buf := make([]byte, 1)
	for {
		time.Sleep(2 * short.Idle / pieces)
		n, err := resp.Body.Read(buf)
		got += n
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("slow reader: %v", err)
		}
		if got == 2 {
			time.Sleep(2 * short.Idle)
		}
	}
	resp.Body.Close()
	if got != pieces {
		t.Fatalf("slow reader: %d bytes", got)
	}

	// A slow request body: producing it takes longer than Idle.
	body := &slowReader{r: bytes.NewReader(make([]byte, 3)), pause: 2 * short.Idle}
	req, _ := http.NewRequest(http.MethodPut, srv.URL, body)
	req.ContentLength = 3
	resp, err = client.Do(req)
	if err != nil {
		t.Fatalf("slow request body: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		t.Fatalf("slow request body: %s", resp.Status)
	}
}

type slowReader struct {
	r     io.Reader
	pause time.Duration
}

func (s *slowReader) Read(p []byte) (int, error) {
	time.Sleep(s.pause)
	if len(p) > 1 {
		p = p[:1]
	}
	return s.r.Read(p)
}

// TestBoundedTransportStalledUpload sends a large body to a server that
// accepts the connection and never reads: the upload fails when the
// registry stops taking bytes.
func TestBoundedTransportStalledUpload(t *testing.T) {
	host := testimage.SilentServer(t)
	body := make([]byte, 64<<20) // far more than the socket buffers hold
	if _, err := rand.Read(body[:1024]); err != nil {
		t.Fatal(err)
	}
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodPut, "http://"+host+"/v2/r/blobs/uploads/x", bytes.NewReader(body))
	start := time.Now()
	resp, err := (&http.Client{Transport: NewTransport(false, short)}).Do(req)
	if err == nil {
		resp.Body.Close()
		t.Fatal("want a timeout")
	}
	var te *TimeoutError
	if !errors.As(err, &te) || te.Phase != PhaseSend || te.Host != host {
		t.Fatalf("error %v, want a request body timeout naming %s", err, host)
	}
	bounded(t, time.Since(start), short.Idle)
}

// TestBoundedTransportCallerCancel: the caller's own cancellation is
// reported as such, not as a timeout.
func TestBoundedTransportCallerCancel(t *testing.T) {
	host := testimage.SilentServer(t)
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/v2/", nil)
	_, err := (&http.Client{Transport: NewTransport(false, short)}).Do(req)
	var te *TimeoutError
	if errors.As(err, &te) || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("error %v, want the caller's deadline", err)
	}
}

// TestClientSilentRegistry opens an image on a registry that never
// answers: Open gives up within the response timeout (ping included, both
// schemes tried) with an error naming the host, and a stalled layer blob
// fails its read within the idle timeout.
func TestClientSilentRegistry(t *testing.T) {
	c := newClient(t, WithTimeouts(short))
	host := testimage.SilentServer(t)
	start := time.Now()
	_, err := c.Open(t.Context(), mustRef(t, c, host+"/r:1"))
	if err == nil || !strings.Contains(err.Error(), "registry "+host+": ") {
		t.Fatalf("error %v, want one naming registry %s", err, host)
	}
	bounded(t, time.Since(start), short.ResponseHeader)

	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(1, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	reg.Push(t, "r:1", img)
	layers, _ := img.Layers()
	dgst, _ := layers[0].Digest()
	reg.Stall(dgst, 10)
	src, err := c.Open(t.Context(), mustRef(t, c, reg.Host+"/r:1"))
	if err != nil {
		t.Fatal(err)
	}
	l, err := src.Image.LayerByDigest(dgst)
	if err != nil {
		t.Fatal(err)
	}
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	_, err = io.Copy(io.Discard, rc)
	rc.Close()
	var te *TimeoutError
	if !errors.As(err, &te) || te.Phase != PhaseBody || te.Host != reg.Host {
		t.Fatalf("error %v, want a response body timeout naming %s", err, reg.Host)
	}
	bounded(t, time.Since(start), short.Idle)
}

// TestTimeoutsNotRetriedByGGCR: with go-containerregistry's default retry
// (3 tries, 1s then 3s apart, for Temporary errors), a silent registry
// still costs one timeout: TimeoutError is not Temporary.
func TestTimeoutsNotRetriedByGGCR(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	c, err := New(WithTimeouts(short)) // the default retry backoff
	if err != nil {
		t.Fatal(err)
	}
	host := testimage.SilentServer(t)
	start := time.Now()
	_, err = c.Open(t.Context(), mustRef(t, c, host+"/r:1"))
	elapsed := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "registry "+host+": ") {
		t.Fatalf("error %v, want one naming registry %s", err, host)
	}
	// One round is about 600ms (https, then http 300ms later); a retry
	// would add 1s of backoff and another round.
	if elapsed > 2*time.Second {
		t.Errorf("gave up after %s: retried", elapsed)
	}
}

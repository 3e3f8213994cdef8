package mirror

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
)

// timeoutConfig is a mirror.toml with test-short registry timeouts.
const timeoutConfig = `
connect_timeout = "2s"
tls_timeout = "300ms"
response_timeout = "300ms"
idle_timeout = "300ms"
retry_initial = "5ms"
retry_max = "20ms"
image_attempts = 2
`

// TestMirrorStalledBlobFailsThatImageOnly: one image's layer blob stalls
// mid-transfer. That image fails, with an error naming the registry, after
// its attempts, each bounded by the idle timeout; the other images are
// mirrored.
func TestMirrorStalledBlobFailsThatImageOnly(t *testing.T) {
	src, dst := testimage.NewRegistry(t), testimage.NewRegistry(t)
	stalledTag := "1.1"
	for i := range 3 {
		img, err := testimage.SeedImage(uint64(10+i), testimage.LinuxAMD64, testimage.WithoutLargeFiles())
		if err != nil {
			t.Fatal(err)
		}
		tag := fmt.Sprintf("1.%d", i)
		src.Push(t, "lib/a:"+tag, img)
		if tag == stalledTag {
			layers, _ := img.Layers()
			d, _ := layers[1].Digest() // its own layer, shared with no other image
			src.Stall(d, 10)
		}
	}
	c, err := ParseConfig([]byte(fmt.Sprintf("destination = %q\n%s\n[[source]]\nrepository = %q\n", dst.Host+"/m", timeoutConfig, src.Host+"/lib/a")))
	if err != nil {
		t.Fatal(err)
	}
	m := newMirror(t, c)
	start := time.Now()
	rep, err := m.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("run: %s", time.Since(start))
	if rep.Converted != 2 || rep.Failed != 1 {
		t.Fatalf("converted %d, failed %d, want 2 and 1: %+v", rep.Converted, rep.Failed, rep.Images)
	}
	idle := c.Timeouts().Idle
	for _, ir := range rep.Images {
		if ir.Status != StatusFailed {
			continue
		}
		if !strings.HasSuffix(ir.Source, ":"+stalledTag) {
			t.Errorf("%s failed, want only :%s to: %s", ir.Source, stalledTag, ir.Reason)
		}
		if want := "registry " + src.Host + ": response body stalled, no data for 300ms"; !strings.Contains(ir.Reason, want) {
			t.Errorf("reason %q, want it to contain %q", ir.Reason, want)
		}
		if ir.Attempts != 2 {
			t.Errorf("%d attempts, want 2", ir.Attempts)
		}
		// Two attempts, each waiting out the idle timeout once.
		if got, max := time.Duration(ir.Seconds*float64(time.Second)), 10*2*idle; got < 2*idle || got > max {
			t.Errorf("the stalled image took %s, want between %s and %s", got, 2*idle, max)
		}
	}
}

// TestMirrorSilentRegistryFailsWithinTimeouts: a source registry that
// accepts connections and never answers (after TCP, or after the TLS
// handshake) fails planning for that source and each image mirrored from it
// (as serve does), with errors naming the host, within the timeouts; the
// other source is mirrored.
func TestMirrorSilentRegistryFailsWithinTimeouts(t *testing.T) {
	for _, tc := range []struct {
		name     string
		host     func(testimage.TB) string
		insecure bool
	}{
		{"after TCP", testimage.SilentServer, false},
		{"after TLS", testimage.SilentTLSServer, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			silent := tc.host(t)
			good, dst := testimage.NewRegistry(t), testimage.NewRegistry(t)
			img, err := testimage.SeedImage(3, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
			if err != nil {
				t.Fatal(err)
			}
			good.Push(t, "lib/b:1.0", img)
			c, err := ParseConfig([]byte(fmt.Sprintf(`destination = %q
insecure = %t
%s
[[source]]
repository = %q
[[source]]
repository = %q
`, dst.Host+"/m", tc.insecure, timeoutConfig, silent+"/lib/a", good.Host+"/lib/b")))
			if err != nil {
				t.Fatal(err)
			}
			m := newMirror(t, c)
			limit := c.Timeouts().ResponseHeader
			start := time.Now()
			rep, err := m.Run(context.Background())
			elapsed := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Converted != 1 || len(rep.Errors) != 1 || !strings.Contains(rep.Errors[0], "registry "+silent+": ") {
				t.Fatalf("converted %d, errors %q: want 1, and one error naming registry %s", rep.Converted, rep.Errors, silent)
			}
			if elapsed > 10*limit+5*time.Second {
				t.Errorf("the run took %s with a silent source", elapsed)
			}

			// An image of the silent registry mirrored on its own.
			j, ok := m.JobFor(silent, "lib/a", "1.0")
			if !ok {
				t.Fatal("no job for the silent source")
			}
			start = time.Now()
			ir := m.MirrorImage(context.Background(), j)
			elapsed = time.Since(start)
			if ir.Status != StatusFailed || !strings.Contains(ir.Reason, "registry "+silent+": ") {
				t.Fatalf("%+v: want a failure naming registry %s", ir, silent)
			}
			if elapsed < limit || elapsed > 10*2*limit {
				t.Errorf("two attempts took %s, want between %s and %s", elapsed, limit, 10*2*limit)
			}
			t.Logf("%s", ir.Reason)
		})
	}
}

// TestRetryTransportDoesNotRetryTimeouts: a request that ran out of a
// registry timeout is not retried by RetryTransport (the image's attempts
// retry it), so the wait is one timeout, not retries+1 of them.
func TestRetryTransportDoesNotRetryTimeouts(t *testing.T) {
	host := testimage.SilentServer(t)
	limit := 300 * time.Millisecond
	rt := NewRetryTransport(imageio.NewTransport(false, imageio.Timeouts{ResponseHeader: limit}), RetryPolicy{Retries: 5, Initial: time.Millisecond}, nil)
	req, _ := http.NewRequestWithContext(t.Context(), http.MethodGet, "http://"+host+"/v2/", nil)
	start := time.Now()
	_, err := rt.RoundTrip(req)
	elapsed := time.Since(start)
	var te *imageio.TimeoutError
	if !errors.As(err, &te) || te.Phase != imageio.PhaseResponse {
		t.Fatalf("error %v, want a response timeout", err)
	}
	// Retried, the 6 tries would take 6 x limit at least.
	if rt.Retries() != 0 || elapsed > 5*limit {
		t.Errorf("%d retries in %s, want none, within %s", rt.Retries(), elapsed, 5*limit)
	}
}

package main

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestConvertSilentRegistry converts from and to registries that stop
// answering at each phase: each conversion fails within a bounded multiple
// of its (shortened) timeout, with an error naming the registry's host.
func TestConvertSilentRegistry(t *testing.T) {
	isolate(t)
	good := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(5, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	good.Push(t, "app:v1", img)
	stalled := testimage.NewRegistry(t)
	stalled.Push(t, "app:v1", img)
	layers, _ := img.Layers()
	d, _ := layers[0].Digest()
	stalled.Stall(d, 100)

	const limit = 400 * time.Millisecond
	flags := []string{"--connect-timeout", "2s", "--tls-timeout", limit.String(), "--response-timeout", limit.String(), "--idle-timeout", limit.String()}
	silent, silentTLS := testimage.SilentServer(t), testimage.SilentTLSServer(t)
	for _, tc := range []struct {
		name, src, dst, host, want string
		extra                      []string
	}{
		{"source silent after TCP", silent + "/app:v1", good.Host + "/out:1", silent, "within 400ms", nil},
		{"source silent after TLS", silentTLS + "/app:v1", good.Host + "/out:2", silentTLS, "no response headers within 400ms", []string{"--insecure"}},
		{"source blob stalls", stalled.Host + "/app:v1", good.Host + "/out:3", stalled.Host, "response body stalled, no data for 400ms", nil},
		{"destination silent", good.Host + "/app:v1", silent + "/out:4", silent, "within 400ms", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append(append([]string{"convert"}, flags...), tc.extra...), tc.src, tc.dst)
			start := time.Now()
			_, stderr, err := runCLI(context.Background(), t, args...)
			elapsed := time.Since(start)
			if err == nil {
				t.Fatalf("converted:\n%s", stderr)
			}
			if !strings.Contains(err.Error(), "registry "+tc.host+": ") || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to name registry %s and say %q", err, tc.host, tc.want)
			}
			if elapsed < limit || elapsed > 10*limit {
				t.Errorf("gave up after %s, want between %s and %s", elapsed, limit, 10*limit)
			}
			t.Logf("%s: %v", elapsed.Round(time.Millisecond), err)
		})
	}
}

func TestConvertBadTimeoutFlags(t *testing.T) {
	isolate(t)
	for _, tc := range [][]string{
		{"--connect-timeout", "0s"},
		{"--tls-timeout", "-1s"},
		{"--response-timeout", "0"},
		{"--idle-timeout", "-5m"},
	} {
		_, _, err := runCLI(context.Background(), t, append(append([]string{"convert"}, tc...), "oci:a", "oci:b")...)
		if err == nil || !strings.Contains(err.Error(), tc[0]+" must be positive") {
			t.Errorf("%v: %v", tc, err)
		}
	}
	_, _, err := runCLI(context.Background(), t, "convert", "--idle-timeout", "soon", "oci:a", "oci:b")
	if err == nil || !strings.Contains(err.Error(), "idle-timeout") {
		t.Errorf("--idle-timeout soon: %v", err)
	}
}

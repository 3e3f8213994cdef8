package lazypull

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
)

func TestGuardTimeoutsConfig(t *testing.T) {
	cfg, err := ParseConfig(nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Guard.Timeouts(); got != imageio.DefaultTimeouts() {
		t.Errorf("default guard timeouts %+v, want %+v", got, imageio.DefaultTimeouts())
	}
	cfg, err = ParseConfig([]byte("[guard]\nconnect_timeout = \"5s\"\ntls_timeout = \"3s\"\nresponse_timeout = \"2m\"\nidle_timeout = \"90s\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := cfg.Guard.Timeouts(), (imageio.Timeouts{Connect: 5 * time.Second, TLSHandshake: 3 * time.Second, ResponseHeader: 2 * time.Minute, Idle: 90 * time.Second}); got != want {
		t.Errorf("guard timeouts %+v, want %+v", got, want)
	}
	for _, tc := range []struct{ doc, key string }{
		{"[guard]\nconnect_timeout = \"0s\"", "guard.connect_timeout"},
		{"[guard]\ntls_timeout = \"-1s\"", "guard.tls_timeout"},
		{"[guard]\nresponse_timeout = \"soon\"", "guard.response_timeout"},
		{"[guard]\nidle_timeout = \"0s\"", "guard.idle_timeout"},
	} {
		if _, err := ParseConfig([]byte(tc.doc)); err == nil || !strings.Contains(err.Error(), "key "+tc.key+":") {
			t.Errorf("%q: %v, want an error naming %s", tc.doc, err, tc.key)
		}
	}
	// deploy/containerd/lazybase.defaults.toml states these keys and their
	// defaults: TestDeployDefaultsAreDefaults.
}

// TestGuardLookupsSilentRegistry: the guard's blob size lookup (at mount)
// and the barrier's manifest read, against registries that never complete
// the TCP handshake or never answer after it, give up within their
// timeouts with an error naming the host.
func TestGuardLookupsSilentRegistry(t *testing.T) {
	short := imageio.Timeouts{Connect: 500 * time.Millisecond, TLSHandshake: 300 * time.Millisecond, ResponseHeader: 300 * time.Millisecond, Idle: 300 * time.Millisecond}
	const dgst = digest.Digest("sha256:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae")
	sizer := remoteBlobSize(authn.NewMultiKeychain(), short)
	layersOf := remoteImageLayers(authn.NewMultiKeychain(), short)
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
			{"blob size", func(ctx context.Context) error { _, err := sizer(ctx, ref, dgst); return err }},
			{"image layers", func(ctx context.Context) error { _, err := layersOf(ctx, ref); return err }},
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
	e := newBarrierEnv(t)
	g := e.trigger(t, guardCfg(0), 0, nil)
	silent := testimage.SilentServer(t) + "/app:1"
	start := time.Now()
	_, err := g.barrier(t.Context(), "buildkit", []string{silent}, layersOf, nil)
	if err == nil || !strings.Contains(err.Error(), "image "+silent+": reading manifest") || !strings.Contains(err.Error(), "registry "+strings.TrimSuffix(silent, "/app:1")+": ") {
		t.Fatalf("barrier: %v, want the image and the registry named", err)
	}
	if elapsed := time.Since(start); elapsed > 10*short.ResponseHeader {
		t.Errorf("barrier gave up after %s", elapsed)
	}
}

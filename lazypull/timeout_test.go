package lazypull

import (
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/imageio"
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

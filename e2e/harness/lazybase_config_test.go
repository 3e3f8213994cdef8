package harness

import (
	"path/filepath"
	"testing"

	"github.com/lazybase/lazybase/lazypull"
)

// TestLazybaseConfigContainerdAddress: the daemon's configuration keeps
// what the test gave and points the export guard at the Stack's containerd,
// unless the test named another address.
func TestLazybaseConfigContainerdAddress(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, toml, want string
	}{
		{"defaults", "", filepath.Join(dir, "containerd.sock")},
		{"policy kept", "[background_fetch]\nenable = false\n[guard]\ndelay = \"0s\"\n[[policy]]\nmatch = \"*/debian:*\"\nmode = \"export-base\"\n", filepath.Join(dir, "containerd.sock")},
		{"address kept", "[guard]\ncontainerd_address = \"/run/elsewhere.sock\"\n", "/run/elsewhere.sock"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &Stack{Dir: dir, opts: &options{lazybaseTOML: tc.toml}}
			t.Setenv(LazybaseConfigEnv, "")
			path, err := s.lazybaseConfig()
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := lazypull.LoadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Guard.ContainerdAddress != tc.want {
				t.Errorf("guard.containerd_address = %q, want %q", cfg.Guard.ContainerdAddress, tc.want)
			}
			if tc.name == "policy kept" {
				if cfg.BackgroundFetch.Enable || cfg.Guard.Delay.D() != 0 || len(cfg.Policy) != 1 || cfg.Policy[0].Mode != lazypull.ModeExportBase {
					t.Errorf("configuration lost: %+v", cfg)
				}
			}
		})
	}
}

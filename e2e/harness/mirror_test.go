package harness

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/lazybase/lazybase/e2e/shaper"
	"github.com/lazybase/lazybase/lazypull"
)

// TestRegistryMirrorConfigs: WithRegistryMirror points buildkitd's
// resolver, containerd's transfer service and the lazybase daemon (in the
// form asked, keeping the test's own keys) at the Stack's registry for the
// mirrored host, and writes the hosts.toml they share; bad forms are
// refused.
func TestRegistryMirrorConfigs(t *testing.T) {
	p, err := shaper.New("http://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(); err != nil { // Addr is known once it listens
		t.Fatal(err)
	}
	defer p.Close()
	const host = "unresolvable.invalid"
	for _, form := range []MirrorForm{MirrorsTable, HostsToml} {
		t.Run(string(form), func(t *testing.T) {
			o, err := makeOptions(WithLazySnapshotter(Lazybase), WithBuildkitLazy(), WithRegistryMirror(host, form),
				WithLazybaseConfig("[background_fetch]\nenable = false\n"))
			if err != nil {
				t.Fatal(err)
			}
			s := &Stack{Dir: t.TempDir(), opts: o, bins: &binaries{runc: "/usr/sbin/runc"},
				Registry:   &Registry{Direct: "127.0.0.1:2", Proxy: p},
				Containerd: &Containerd{Address: "/tmp/x/containerd.sock"}}
			if err := s.writeHostsDir(); err != nil {
				t.Fatal(err)
			}
			hosts, err := os.ReadFile(filepath.Join(s.HostsDir(), host, "hosts.toml"))
			if err != nil {
				t.Fatal(err)
			}
			var ht struct {
				Server string `toml:"server"`
				Host   map[string]struct {
					Capabilities []string `toml:"capabilities"`
				} `toml:"host"`
			}
			if err := toml.Unmarshal(hosts, &ht); err != nil {
				t.Fatalf("hosts.toml: %v\n%s", err, hosts)
			}
			if ht.Server != "https://"+host || len(ht.Host["http://"+p.Addr()].Capabilities) != 2 {
				t.Errorf("hosts.toml: %+v", ht)
			}

			text, _ := s.buildkitConfig("/tmp/x/buildkit", "/tmp/x/buildkitd.sock")
			var bk struct {
				Registry map[string]struct {
					Mirrors []string `toml:"mirrors"`
					HTTP    bool     `toml:"http"`
				} `toml:"registry"`
			}
			if err := toml.Unmarshal([]byte(text), &bk); err != nil {
				t.Fatalf("buildkitd.toml: %v\n%s", err, text)
			}
			if m := bk.Registry[host].Mirrors; len(m) != 1 || m[0] != p.Addr() || !bk.Registry[p.Addr()].HTTP {
				t.Errorf("buildkitd registry config: %+v", bk.Registry)
			}

			var ctd struct {
				Plugins map[string]struct {
					ConfigPath string `toml:"config_path"`
				} `toml:"plugins"`
			}
			ctext := s.containerdConfig()
			if err := toml.Unmarshal([]byte(ctext), &ctd); err != nil {
				t.Fatalf("containerd config: %v\n%s", err, ctext)
			}
			if got := ctd.Plugins["io.containerd.transfer.v1.local"].ConfigPath; got != s.HostsDir() {
				t.Errorf("transfer config_path %q, want %q", got, s.HostsDir())
			}

			t.Setenv(LazybaseConfigEnv, "")
			path, err := s.lazybaseConfig()
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := lazypull.LoadConfig(path)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.BackgroundFetch.Enable {
				t.Error("the test's own keys were lost")
			}
			switch form {
			case MirrorsTable:
				if m := cfg.Registry.Mirrors[host]; len(m) != 1 || m[0].Host != p.Addr() || len(cfg.Registry.ConfigPath) != 0 {
					t.Errorf("registry: %+v", cfg.Registry)
				}
			case HostsToml:
				if len(cfg.Registry.ConfigPath) != 1 || cfg.Registry.ConfigPath[0] != s.HostsDir() || len(cfg.Registry.Mirrors) != 0 {
					t.Errorf("registry: %+v", cfg.Registry)
				}
			}
		})
	}
	for _, tc := range []struct {
		name string
		host string
		form MirrorForm
	}{{"empty host", "", MirrorsTable}, {"unknown form", host, "certs.d"}} {
		if _, err := makeOptions(WithRegistryMirror(tc.host, tc.form)); err == nil || !strings.Contains(err.Error(), "mirror") {
			t.Errorf("%s: %v, want an error", tc.name, err)
		}
	}
}

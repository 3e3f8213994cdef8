package harness

import (
	"runtime"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// TestContainerdConfig checks that the generated config is valid TOML that
// keeps every path under the Stack's directory and wires the lazy
// snapshotter as the proxy plugin "stargz" with an unpack entry.
func TestContainerdConfig(t *testing.T) {
	s := &Stack{Dir: "/tmp/lzb-e2e-x", opts: &options{namespace: "e2e"}}
	s.Snapshotter = &Snapshotter{Address: "/tmp/lzb-e2e-x/snapshotter.sock", Root: "/tmp/lzb-e2e-x/snapshotter"}
	var cfg struct {
		Version  int      `toml:"version"`
		Root     string   `toml:"root"`
		State    string   `toml:"state"`
		Temp     string   `toml:"temp"`
		Disabled []string `toml:"disabled_plugins"`
		GRPC     struct {
			Address string `toml:"address"`
		} `toml:"grpc"`
		Plugins map[string]struct {
			Path   string `toml:"path"`
			Unpack []struct {
				Platform    string `toml:"platform"`
				Snapshotter string `toml:"snapshotter"`
			} `toml:"unpack_config"`
		} `toml:"plugins"`
		Proxy map[string]struct {
			Type    string            `toml:"type"`
			Address string            `toml:"address"`
			Exports map[string]string `toml:"exports"`
		} `toml:"proxy_plugins"`
	}
	text := s.containerdConfig()
	if err := toml.Unmarshal([]byte(text), &cfg); err != nil {
		t.Fatalf("config does not parse: %v\n%s", err, text)
	}
	if cfg.Version != 3 {
		t.Errorf("version = %d", cfg.Version)
	}
	for name, p := range map[string]string{"root": cfg.Root, "state": cfg.State, "temp": cfg.Temp, "grpc": cfg.GRPC.Address, "opt": cfg.Plugins["io.containerd.internal.v1.opt"].Path} {
		if len(p) <= len(s.Dir) || p[:len(s.Dir)+1] != s.Dir+"/" {
			t.Errorf("%s path %q is not under %s", name, p, s.Dir)
		}
	}
	px, ok := cfg.Proxy[LazySnapshotterName]
	if !ok || px.Type != "snapshot" || px.Address != s.Snapshotter.Address ||
		px.Exports["root"] != s.Snapshotter.Root || px.Exports["enable_remote_snapshot_annotations"] != "true" {
		t.Errorf("proxy plugin: %+v", cfg.Proxy)
	}
	unpack := map[string]bool{}
	for _, u := range cfg.Plugins["io.containerd.transfer.v1.local"].Unpack {
		if u.Platform != "linux/"+runtime.GOARCH {
			t.Errorf("unpack platform %q", u.Platform)
		}
		unpack[u.Snapshotter] = true
	}
	if !unpack["overlayfs"] || !unpack[LazySnapshotterName] {
		t.Errorf("unpack snapshotters %v, want overlayfs and %s", unpack, LazySnapshotterName)
	}

	// Without a lazy snapshotter: no proxy plugin, overlayfs unpack only.
	s.Snapshotter = nil
	cfg.Proxy, cfg.Plugins = nil, nil
	if err := toml.Unmarshal([]byte(s.containerdConfig()), &cfg); err != nil {
		t.Fatal(err)
	}
	if len(cfg.Proxy) != 0 || len(cfg.Plugins["io.containerd.transfer.v1.local"].Unpack) != 1 {
		t.Errorf("plain config has proxy %v, unpack %v", cfg.Proxy, cfg.Plugins["io.containerd.transfer.v1.local"].Unpack)
	}
}

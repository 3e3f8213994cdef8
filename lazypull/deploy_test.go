package lazypull

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

const deployDir = "../deploy"

// TestContainerdDropIn checks the containerd drop-in: TOML, version 3, the
// proxy plugin "stargz" pointing at the daemon's default socket and root
// with remote snapshot annotations on, and the transfer unpack
// configuration for stargz and overlayfs.
func TestContainerdDropIn(t *testing.T) {
	dropIn := filepath.Join(deployDir, "containerd", "conf.d", "lazybase-stargz.toml")
	var cfg struct {
		Version      int `toml:"version"`
		ProxyPlugins map[string]struct {
			Type    string            `toml:"type"`
			Address string            `toml:"address"`
			Exports map[string]string `toml:"exports"`
		} `toml:"proxy_plugins"`
	}
	b, err := os.ReadFile(dropIn)
	if err != nil {
		t.Fatal(err)
	}
	if err := toml.Unmarshal(b, &cfg); err != nil {
		t.Fatalf("%s: %v", dropIn, err)
	}
	if cfg.Version != 3 {
		t.Errorf("version %d: containerd v2 wants 3", cfg.Version)
	}
	pp, ok := cfg.ProxyPlugins["stargz"]
	if !ok {
		t.Fatalf("no proxy plugin named stargz: %+v", cfg.ProxyPlugins)
	}
	def := DefaultConfig()
	if pp.Type != "snapshot" || pp.Address != def.Socket {
		t.Errorf("proxy plugin %+v: want type snapshot at %s", pp, def.Socket)
	}
	if pp.Exports["root"] != def.Root || pp.Exports["enable_remote_snapshot_annotations"] != "true" {
		t.Errorf("exports %v", pp.Exports)
	}

	var raw map[string]any
	if err := toml.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	plugins, _ := raw["plugins"].(map[string]any)
	transfer, _ := plugins["io.containerd.transfer.v1.local"].(map[string]any)
	unpack, _ := transfer["unpack_config"].([]any)
	found := map[string]bool{}
	for _, u := range unpack {
		m, _ := u.(map[string]any)
		if m["platform"] == "linux/amd64" {
			found[m["snapshotter"].(string)] = true
		}
	}
	if !found["stargz"] || !found["overlayfs"] {
		t.Errorf("unpack_config %v: want linux/amd64 for stargz and overlayfs", unpack)
	}
}

func decodeTOMLFile(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := toml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

func table(t *testing.T, m map[string]any, keys ...string) map[string]any {
	t.Helper()
	for _, k := range keys {
		next, ok := m[k].(map[string]any)
		if !ok {
			t.Fatalf("no table %s", strings.Join(keys, "."))
		}
		m = next
	}
	return m
}

func TestBuildkitdConfigs(t *testing.T) {
	def := DefaultConfig()
	cd := decodeTOMLFile(t, filepath.Join(deployDir, "buildkitd", "buildkitd.toml"))
	w := table(t, cd, "worker", "containerd")
	if w["enabled"] != true || w["snapshotter"] != "stargz" {
		t.Errorf("containerd worker %v: want enabled with snapshotter stargz", w)
	}
	if table(t, cd, "worker", "oci")["enabled"] != false {
		t.Error("OCI worker not disabled in buildkitd.toml")
	}

	oci := decodeTOMLFile(t, filepath.Join(deployDir, "buildkitd", "buildkitd-oci.toml"))
	o := table(t, oci, "worker", "oci")
	if o["enabled"] != true || o["snapshotter"] != "stargz" || o["proxySnapshotterPath"] != def.Socket {
		t.Errorf("OCI worker %v: want snapshotter stargz through %s", o, def.Socket)
	}
	if table(t, oci, "worker", "containerd")["enabled"] != false {
		t.Error("containerd worker not disabled in buildkitd-oci.toml")
	}
}

func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(deployDir, "systemd", "lazybase-snapshotter.service"))
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string]map[string]string{}
	var cur string
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			cur = strings.Trim(line, "[]")
			sections[cur] = map[string]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || cur == "" {
				t.Fatalf("line %d: %q is not key=value in a section", i+1, line)
			}
			sections[cur][k] = v
		}
	}
	svc := sections["Service"]
	if !strings.Contains(svc["ExecStart"], "lazybase snapshotter --config ") {
		t.Errorf("ExecStart %q", svc["ExecStart"])
	}
	if svc["KillSignal"] != "SIGTERM" || svc["Restart"] == "" {
		t.Errorf("service %v", svc)
	}
	if sections["Unit"]["Before"] != "containerd.service" || sections["Install"]["WantedBy"] == "" {
		t.Errorf("unit ordering %v / install %v", sections["Unit"], sections["Install"])
	}
}

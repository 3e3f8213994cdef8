package harness

import (
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/lazybase/lazybase/e2e/shaper"
)

// TestBuildkitConfigWorkers: the containerd worker by default, on the lazy
// snapshotter with WithBuildkitLazy; WithBuildkitOCI enables the OCI worker
// alone, with the harness's runc and the chosen snapshotter.
func TestBuildkitConfigWorkers(t *testing.T) {
	p, err := shaper.New("http://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	type worker struct {
		Enabled     bool   `toml:"enabled"`
		Snapshotter string `toml:"snapshotter"`
		Binary      string `toml:"binary"`
		Address     string `toml:"address"`
	}
	var cfg struct {
		Root   string `toml:"root"`
		Worker struct {
			OCI        worker `toml:"oci"`
			Containerd worker `toml:"containerd"`
		} `toml:"worker"`
	}
	for _, tc := range []struct {
		name              string
		opts              []Option
		oci, containerd   bool
		wantSnapshotter   string
		wantWorkerBinary  string
		wantContainerdSoc string
	}{
		{"containerd", []Option{WithBuildkit()}, false, true, "overlayfs", "", "/tmp/lzb-e2e-x/containerd.sock"},
		{"containerd lazy", []Option{WithLazySnapshotter(Lazybase), WithBuildkitLazy()}, false, true, LazySnapshotterName, "", "/tmp/lzb-e2e-x/containerd.sock"},
		{"oci stargz", []Option{WithBuildkitOCI("stargz")}, true, false, "stargz", "/usr/sbin/runc", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := makeOptions(tc.opts...)
			if err != nil {
				t.Fatal(err)
			}
			s := &Stack{Dir: "/tmp/lzb-e2e-x", opts: o, bins: &binaries{runc: "/usr/sbin/runc"},
				Registry:   &Registry{Direct: "127.0.0.1:2", Proxy: p},
				Containerd: &Containerd{Address: "/tmp/lzb-e2e-x/containerd.sock"}}
			text, sn := s.buildkitConfig("/tmp/lzb-e2e-x/buildkit", "/tmp/lzb-e2e-x/buildkitd.sock")
			cfg.Worker.OCI, cfg.Worker.Containerd = worker{}, worker{}
			if err := toml.Unmarshal([]byte(text), &cfg); err != nil {
				t.Fatalf("config does not parse: %v\n%s", err, text)
			}
			if sn != tc.wantSnapshotter || cfg.Root != "/tmp/lzb-e2e-x/buildkit" {
				t.Errorf("snapshotter %q root %q", sn, cfg.Root)
			}
			w := cfg.Worker.Containerd
			if tc.oci {
				w = cfg.Worker.OCI
			}
			if cfg.Worker.OCI.Enabled != tc.oci || cfg.Worker.Containerd.Enabled != tc.containerd ||
				w.Snapshotter != tc.wantSnapshotter || w.Binary != tc.wantWorkerBinary || w.Address != tc.wantContainerdSoc {
				t.Errorf("workers %+v\n%s", cfg.Worker, text)
			}
		})
	}
	if _, err := makeOptions(WithLazySnapshotter(Lazybase), WithBuildkitLazy(), WithBuildkitOCI("stargz")); err == nil {
		t.Error("the containerd and OCI workers together were accepted")
	}
}

// TestBuildkitConfigRegistries: buildkitd reaches the Stack's registry, and
// the second one when WithSecondRegistry runs it, over plain HTTP, at the
// proxy and directly; a duplicate host would make the TOML invalid.
func TestBuildkitConfigRegistries(t *testing.T) {
	p1, err := shaper.New("http://127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	p2, err := shaper.New("http://127.0.0.1:3")
	if err != nil {
		t.Fatal(err)
	}
	if err := p1.Start(); err != nil {
		t.Fatal(err)
	}
	defer p1.Close()
	if err := p2.Start(); err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	for _, second := range []bool{false, true} {
		s := &Stack{Dir: "/tmp/lzb-e2e-x", opts: &options{}, bins: &binaries{},
			Registry:   &Registry{Direct: "127.0.0.1:2", Proxy: p1},
			Containerd: &Containerd{Address: "/tmp/lzb-e2e-x/containerd.sock"}}
		want := []string{p1.Addr(), "127.0.0.1:2"}
		if second {
			s.Registry2 = &Registry{Direct: "127.0.0.1:4", Proxy: p2}
			want = append(want, p2.Addr(), "127.0.0.1:4")
		}
		text, _ := s.buildkitConfig("/tmp/lzb-e2e-x/buildkit", "/tmp/lzb-e2e-x/buildkitd.sock")
		var cfg struct {
			Registry map[string]struct {
				HTTP bool `toml:"http"`
			} `toml:"registry"`
		}
		if err := toml.Unmarshal([]byte(text), &cfg); err != nil {
			t.Fatalf("second=%v: config does not parse: %v\n%s", second, err, text)
		}
		if len(cfg.Registry) != len(want) {
			t.Errorf("second=%v: %d registry tables, want %d:\n%s", second, len(cfg.Registry), len(want), text)
		}
		for _, h := range want {
			if !cfg.Registry[h].HTTP {
				t.Errorf("second=%v: registry %s not plain HTTP:\n%s", second, h, text)
			}
		}
	}
}

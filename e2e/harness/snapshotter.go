package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// LazySnapshotterName is the proxy snapshotter's name in containerd's
// config: BuildKit passes lazy-pull labels only to a snapshotter of this name.
const LazySnapshotterName = "stargz"

// Snapshotter is the Stack's lazy snapshotter daemon.
type Snapshotter struct {
	Kind    SnapshotterKind
	Address string // gRPC unix socket
	Root    string // snapshotter root; its FUSE mounts live below it

	bin  string
	args []string
	proc *process
}

func (s *Stack) startSnapshotter(ctx context.Context) (*Snapshotter, error) {
	sn := &Snapshotter{
		Kind:    s.opts.lazy,
		Address: s.path("snapshotter.sock"),
		Root:    s.path("snapshotter"),
	}
	if err := os.MkdirAll(sn.Root, 0o700); err != nil {
		return nil, err
	}
	var args []string
	var bin string
	switch sn.Kind {
	case Upstream:
		var err error
		if bin, err = goBuild(ctx, modulePath+"/e2e/stargzd"); err != nil {
			return nil, err
		}
		cfgPath := s.path("stargz.toml")
		if err := os.WriteFile(cfgPath, []byte(s.opts.lazyConfig+"\n"), 0o600); err != nil {
			return nil, err
		}
		args = []string{"-address", sn.Address, "-root", sn.Root, "-config", cfgPath, "-log-level", "info"}
	case Lazybase:
		var err error
		if bin, err = goBuild(ctx, modulePath+"/cmd/lazybase"); err != nil {
			return nil, err
		}
		if out, err := runCmd(ctx, s.env(), bin, "snapshotter", "--help"); err != nil {
			return nil, fmt.Errorf("lazybase has no working snapshotter verb yet: %w\n%s", err, out)
		}
		cfgPath, err := s.lazybaseConfig()
		if err != nil {
			return nil, err
		}
		args = []string{"snapshotter", "--address", sn.Address, "--root", sn.Root, "--config", cfgPath}
	default:
		return nil, fmt.Errorf("unknown lazy snapshotter %q", sn.Kind)
	}
	sn.bin, sn.args = bin, args
	if err := s.runSnapshotter(ctx, sn); err != nil {
		return nil, err
	}
	return sn, nil
}

// LazybaseConfigEnv names the lazybase daemon's configuration file, as
// `lazybase snapshotter` reads it.
const LazybaseConfigEnv = "LAZYBASE_SNAPSHOTTER_CONFIG"

// lazybaseConfig writes the lazybase daemon's configuration under the
// Stack's directory: WithLazybaseConfig's TOML, else the file
// $LAZYBASE_SNAPSHOTTER_CONFIG names, else the defaults; with
// guard.containerd_address set to the Stack's containerd (which starts
// after the daemon; the guard connects when it first needs it) unless the
// configuration names one.
func (s *Stack) lazybaseConfig() (string, error) {
	text := s.opts.lazybaseTOML
	if f := s.opts.lazybaseTOMLFunc; f != nil {
		text = f(s.Registry)
	}
	if text == "" {
		if p := os.Getenv(LazybaseConfigEnv); p != "" {
			b, err := os.ReadFile(p)
			if err != nil {
				return "", fmt.Errorf("lazybase config: %w", err)
			}
			text = string(b)
		}
	}
	cfg := map[string]any{}
	if err := toml.Unmarshal([]byte(text), &cfg); err != nil {
		return "", fmt.Errorf("lazybase config: %w", err)
	}
	s.lazybaseMirror(cfg)
	guard, _ := cfg["guard"].(map[string]any)
	if guard == nil {
		guard = map[string]any{}
		cfg["guard"] = guard
	}
	if _, ok := guard["containerd_address"]; !ok {
		guard["containerd_address"] = s.path("containerd.sock")
	}
	b, err := toml.Marshal(cfg)
	if err != nil {
		return "", fmt.Errorf("lazybase config: %w", err)
	}
	path := s.path("lazybase.toml")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return "", err
	}
	return path, nil
}

func (s *Stack) runSnapshotter(ctx context.Context, sn *Snapshotter) error {
	// Never mistake the stale socket of a stopped daemon for a ready one.
	if err := os.Remove(sn.Address); err != nil && !os.IsNotExist(err) {
		return err
	}
	p, err := s.spawn("snapshotter-"+string(sn.Kind), sn.bin, sn.args...)
	if err != nil {
		return err
	}
	sn.proc = p
	return waitFor(ctx, p, 2*time.Minute, "snapshotter socket", func() error {
		conn, err := net.Dial("unix", sn.Address)
		if err != nil {
			return err
		}
		return conn.Close()
	})
}

// RestartSnapshotter stops the lazy snapshotter daemon (by PID, SIGTERM) and
// starts it again on the same root and socket, waiting until it serves.
func (s *Stack) RestartSnapshotter(ctx context.Context) error {
	sn := s.Snapshotter
	if sn == nil {
		return fmt.Errorf("restart snapshotter: the stack runs none")
	}
	if err := sn.proc.stop(30 * time.Second); err != nil {
		return fmt.Errorf("stopping %s: %w", sn.proc.name, err)
	}
	if err := s.runSnapshotter(ctx, sn); err != nil {
		return err
	}
	if s.Containerd == nil {
		return nil
	}
	// containerd's connection to the stopped daemon may sit in backoff
	// for a few seconds more; wait until containerd reaches it again.
	// (StartSnapshotter does not wait.)
	if err := waitFor(ctx, sn.proc, 30*time.Second, "containerd to reach the restarted snapshotter", func() error {
		_, err := s.Containerd.Ctr(ctx, "snapshots", "--snapshotter", LazySnapshotterName, "ls")
		return err
	}); err != nil {
		return err
	}
	if sn.Kind != Lazybase {
		return nil
	}
	// The lazybase daemon listens first and restores the previous
	// daemon's lazy mounts in the background: wait until it is done, as
	// the upstream daemon is when it starts listening.
	return waitFor(ctx, sn.proc, 2*time.Minute, "the restarted snapshotter to restore its lazy mounts", func() error {
		out, _, err := s.Lazybase(ctx, "snapshotter", "status", "--json", "--status-socket", sn.StatusSocket())
		if err != nil {
			return err
		}
		var st struct {
			Restore *struct {
				Pending int `json:"pending"`
			} `json:"restore"`
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			return fmt.Errorf("status: %w", err)
		}
		if st.Restore != nil && st.Restore.Pending > 0 {
			return fmt.Errorf("%d lazy mounts not restored yet", st.Restore.Pending)
		}
		return nil
	})
}

// FUSEMounts returns the FUSE mounts under the snapshotter's root: one per
// lazily mounted layer.
func (sn *Snapshotter) FUSEMounts() ([]Mount, error) {
	ms, err := Mounts(sn.Root)
	if err != nil {
		return nil, err
	}
	var out []Mount
	for _, m := range ms {
		if strings.HasPrefix(m.FSType, "fuse") {
			out = append(out, m)
		}
	}
	return out, nil
}

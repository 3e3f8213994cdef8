//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/lazypull"
)

// TestDeploySystemdUnits runs `systemd-analyze verify` on every unit and
// drop-in under deploy/systemd, in a scratch root (--root) holding
// systemd's own units, the lazybase binary built from this checkout at the
// path ExecStart names, and a containerd.service for the containerd
// drop-in to apply to. verify exits 0 on unknown keys, so any diagnostic it
// prints fails the test too.
func TestDeploySystemdUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed (Debian package systemd)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	repo, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bins, err := harness.BuilderBinaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	unitDir := filepath.Join(root, "etc", "systemd", "system")
	if err := os.MkdirAll(filepath.Join(root, "usr", "lib", "systemd"), 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(ctx, "cp", "-a", "/usr/lib/systemd/system", filepath.Join(root, "usr", "lib", "systemd")+"/").CombinedOutput(); err != nil {
		t.Fatalf("copying systemd's units: %v\n%s", err, out)
	}
	copyFile(t, bins["lazybase"], filepath.Join(root, "usr", "local", "bin", "lazybase"))
	copyFile(t, bins["containerd"], filepath.Join(root, "usr", "local", "bin", "containerd"))
	writeFile(t, filepath.Join(unitDir, "containerd.service"), `[Unit]
Description=containerd container runtime
After=network.target local-fs.target

[Service]
ExecStart=/usr/local/bin/containerd
Type=notify
Delegate=yes
KillMode=process

[Install]
WantedBy=multi-user.target
`)

	var units []string
	src := filepath.Join(repo, "deploy", "systemd")
	err = filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		copyFile(t, p, filepath.Join(unitDir, rel))
		if !strings.Contains(rel, string(filepath.Separator)) {
			units = append(units, "/etc/systemd/system/"+rel)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(units) == 0 {
		t.Fatalf("no units in %s", src)
	}
	// containerd.service carries the drop-ins of containerd.service.d.
	units = append(units, "/etc/systemd/system/containerd.service")
	for _, u := range units {
		cmd := exec.CommandContext(ctx, analyze, "verify", "--root="+root, u)
		var stderr bytes.Buffer
		cmd.Stdout = &stderr
		cmd.Stderr = &stderr
		err := cmd.Run()
		if err != nil || strings.TrimSpace(stderr.String()) != "" {
			t.Errorf("systemd-analyze verify %s: %v\n%s", u, err, stderr.String())
		} else {
			t.Logf("systemd-analyze verify %s: ok", u)
		}
	}
}

// TestDeployContainerdDropIn starts containerd v2 with a main config that
// imports deploy/containerd/conf.d/lazybase-stargz.toml unchanged (as
// /etc/containerd/config.toml imports conf.d/*.toml on a node), and checks
// that containerd comes up with the proxy snapshotter "stargz" loaded and
// the drop-in's proxy plugin and unpack configuration merged into its
// effective config. (The builder image test runs the same file as
// /etc/containerd/conf.d/lazybase-stargz.toml and builds through it.)
func TestDeployContainerdDropIn(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("e2e: needs root (containerd)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	repo, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bins, err := harness.BuilderBinaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dropIn := filepath.Join(repo, "deploy", "containerd", "conf.d", "lazybase-stargz.toml")
	// A short directory: unix socket paths stay under 108 bytes.
	dir, err := os.MkdirTemp("", "lzb-dropin-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	confD := filepath.Join(dir, "conf.d")
	copyFile(t, dropIn, filepath.Join(confD, "lazybase-stargz.toml"))
	sock := filepath.Join(dir, "containerd.sock")
	q := func(s string) string { return fmt.Sprintf("%q", s) }
	cfg := fmt.Sprintf(`version = 3
root = %s
state = %s
imports = [%s]
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime", "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.sandbox.controller.v1.shim", "io.containerd.nri.v1.nri", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %s
[ttrpc]
  address = %s
[plugins."io.containerd.internal.v1.opt"]
  path = %s
`, q(filepath.Join(dir, "root")), q(filepath.Join(dir, "state")), q(filepath.Join(confD, "*.toml")),
		q(sock), q(sock+".ttrpc"), q(filepath.Join(dir, "opt")))
	cfgPath := filepath.Join(dir, "config.toml")
	writeFile(t, cfgPath, cfg)

	// The effective configuration holds the drop-in's tables.
	dump, err := exec.CommandContext(ctx, bins["containerd"], "--config", cfgPath, "config", "dump").Output()
	if err != nil {
		t.Fatalf("containerd config dump: %v", err)
	}
	var eff struct {
		Imports      []string `toml:"imports"`
		ProxyPlugins map[string]struct {
			Type    string            `toml:"type"`
			Address string            `toml:"address"`
			Exports map[string]string `toml:"exports"`
		} `toml:"proxy_plugins"`
		Plugins map[string]any `toml:"plugins"`
	}
	if err := toml.Unmarshal(dump, &eff); err != nil {
		t.Fatalf("config dump: %v\n%s", err, dump)
	}
	pp, ok := eff.ProxyPlugins["stargz"]
	if !ok || pp.Type != "snapshot" || pp.Address != "/run/lazybase/snapshotter.sock" || pp.Exports["enable_remote_snapshot_annotations"] != "true" {
		t.Errorf("effective proxy_plugins %+v: want stargz from the drop-in", eff.ProxyPlugins)
	}
	transfer, _ := eff.Plugins["io.containerd.transfer.v1.local"].(map[string]any)
	unpack, _ := transfer["unpack_config"].([]any)
	var snapshotters []string
	for _, u := range unpack {
		if m, ok := u.(map[string]any); ok {
			snapshotters = append(snapshotters, fmt.Sprint(m["snapshotter"]))
		}
	}
	if !strings.Contains(strings.Join(snapshotters, ","), "stargz") {
		t.Errorf("effective unpack_config %v: want stargz", unpack)
	}
	t.Logf("effective config: imports %v, unpack snapshotters %v", eff.Imports, snapshotters)

	// containerd starts with it and loads the proxy snapshotter.
	logPath := filepath.Join(dir, "containerd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bins["containerd"], "--config", cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// exited is closed when containerd has exited, with its error in
	// waitErr; closing rather than sending lets both the wait below and
	// the cleanup see it.
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = syscall.Kill(cmd.Process.Pid, syscall.SIGKILL)
			<-exited
			t.Errorf("containerd (pid %d) needed SIGKILL", cmd.Process.Pid)
		}
	})
	ctr := func(args ...string) (string, error) {
		out, err := exec.CommandContext(ctx, bins["ctr"], append([]string{"--address", sock}, args...)...).Output()
		return string(out), err
	}
	waitCtx, stopWaiting := context.WithCancel(ctx)
	defer stopWaiting()
	err = eventually.Wait(waitCtx, 60*time.Second, func() error {
		select {
		case <-exited:
			stopWaiting()
			return fmt.Errorf("containerd exited: %v", waitErr)
		default:
		}
		conn, err := net.Dial("unix", sock)
		if err != nil {
			return err
		}
		conn.Close()
		_, err = ctr("version")
		return err
	})
	if err != nil {
		log, _ := os.ReadFile(logPath)
		t.Fatalf("containerd with the drop-in not answering: %v\n%s", err, log)
	}
	record(t, "dropin-containerd-start", time.Since(start))
	out, err := ctr("plugins", "ls")
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 4 && f[0] == "io.containerd.snapshotter.v1" && f[1] == "stargz" {
			found = true
			if f[len(f)-1] != "ok" {
				t.Errorf("proxy snapshotter stargz: %q", l)
			}
		}
	}
	if !found {
		t.Errorf("no snapshotter stargz among containerd's plugins:\n%s", out)
	}
}

// TestDeploySnapshotterConfigs loads the snapshotter configurations the
// deployments ship with the daemon's own loader (unknown keys and invalid
// values are errors): the builder image's deploy/builder/snapshotter.toml,
// the DaemonSet ConfigMap's snapshotter.toml, and the documented defaults
// and example under deploy/containerd; all name the root and socket of the
// containerd drop-in's proxy plugin.
func TestDeploySnapshotterConfigs(t *testing.T) {
	repo, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(repo, "deploy", "containerd", "conf.d", "lazybase-stargz.toml"))
	if err != nil {
		t.Fatal(err)
	}
	var dropIn struct {
		ProxyPlugins map[string]struct {
			Address string            `toml:"address"`
			Exports map[string]string `toml:"exports"`
		} `toml:"proxy_plugins"`
	}
	if err := toml.Unmarshal(b, &dropIn); err != nil {
		t.Fatal(err)
	}
	stargz := dropIn.ProxyPlugins["stargz"]

	cm, err := os.ReadFile(filepath.Join(repo, "deploy", "kubernetes", "snapshotter-configmap.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	fromConfigMap := filepath.Join(t.TempDir(), "configmap-snapshotter.toml")
	writeFile(t, fromConfigMap, blockScalar(t, string(cm), "snapshotter.toml"))

	for _, p := range []string{
		filepath.Join(repo, "deploy", "builder", "snapshotter.toml"), fromConfigMap,
		filepath.Join(repo, "deploy", "containerd", "lazybase.defaults.toml"),
		filepath.Join(repo, "deploy", "containerd", "lazybase.toml"),
	} {
		cfg, err := lazypull.LoadConfig(p)
		if err != nil {
			t.Errorf("%s: %v", p, err)
			continue
		}
		if err := cfg.Validate(); err != nil {
			t.Errorf("%s: %v", p, err)
		}
		if cfg.Root != stargz.Exports["root"] || cfg.Socket != stargz.Address {
			t.Errorf("%s: root %q socket %q; the drop-in has root %q address %q", p, cfg.Root, cfg.Socket, stargz.Exports["root"], stargz.Address)
		}
		if !cfg.Guard.Enable || cfg.Guard.ContainerdAddress != "/run/containerd/containerd.sock" {
			t.Errorf("%s: guard %+v", p, cfg.Guard)
		}
	}
}

// blockScalar returns the literal block (key: |) named key of a YAML
// document whose block lines are indented by four spaces, as in the
// ConfigMaps under deploy/kubernetes.
func blockScalar(t *testing.T, doc, key string) string {
	t.Helper()
	var out []string
	in := false
	for _, l := range strings.Split(doc, "\n") {
		if !in {
			in = strings.TrimSpace(l) == key+": |"
			continue
		}
		if l != "" && !strings.HasPrefix(l, "    ") {
			break
		}
		out = append(out, strings.TrimPrefix(l, "    "))
	}
	if !in {
		t.Fatalf("no block %q", key)
	}
	return strings.TrimRight(strings.Join(out, "\n"), "\n") + "\n"
}

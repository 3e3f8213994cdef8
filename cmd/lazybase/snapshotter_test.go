package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/eventually"
)

func runLazybase(ctx context.Context, args ...string) (string, error) {
	cmd := newRootCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(ctx)
	return out.String(), err
}

func TestSnapshotterRejectsInvalidConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "c.toml")
	if err := os.WriteFile(p, []byte("[fetch]\ntimeout = \"2h\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := runLazybase(t.Context(), "snapshotter", "--config", p)
	if err == nil || !strings.Contains(err.Error(), "key fetch.timeout:") {
		t.Fatalf("got %v, want an error naming fetch.timeout", err)
	}
	// The environment names the file when --config is absent.
	t.Setenv(configEnv, p)
	_, err = runLazybase(t.Context(), "snapshotter", "--root", dir, "--address", filepath.Join(dir, "s.sock"))
	if err == nil || !strings.Contains(err.Error(), "key fetch.timeout:") {
		t.Fatalf("with $%s: got %v, want an error naming fetch.timeout", configEnv, err)
	}
	// A relative --root is made absolute, an empty one is rejected.
	t.Setenv(configEnv, "")
	_, err = runLazybase(t.Context(), "snapshotter", "--root", "", "--address", filepath.Join(dir, "s.sock"))
	if err == nil || !strings.Contains(err.Error(), "key root:") {
		t.Fatalf("empty --root: got %v", err)
	}
}

func TestSnapshotterStatusNoDaemon(t *testing.T) {
	_, err := runLazybase(t.Context(), "snapshotter", "status", "--socket", filepath.Join(t.TempDir(), "none.sock"))
	if err == nil || !strings.Contains(err.Error(), "none.sock.status") {
		t.Fatalf("got %v, want an error naming the status socket", err)
	}
}

// TestSnapshotterServeAndStatus runs the daemon verb in-process, asks it
// for its status through the status verb, and stops it like SIGTERM does.
func TestSnapshotterServeAndStatus(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: the daemon checks that overlayfs mounts work")
	}
	root := t.TempDir()
	sockDir, err := os.MkdirTemp("", "lbcli")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "sn.sock")
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		_, err := runLazybase(ctx, "snapshotter", "--root", root, "--address", sock)
		done <- err
	}()
	eventually.Require(t, 20*time.Second, "daemon listening on "+sock+".status", func() error {
		select {
		case err := <-done:
			t.Fatalf("daemon exited before it listened: %v", err)
		default:
		}
		_, err := os.Stat(sock + ".status")
		return err
	})
	fi, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want 0660", fi.Mode().Perm())
	}
	out, err := runLazybase(t.Context(), "snapshotter", "status", "--socket", sock)
	if err != nil || !strings.HasPrefix(out, "IMAGE") {
		t.Errorf("status: %q, %v", out, err)
	}
	t.Logf("status:\n%s", out)
	// The account follows the table: CPU seconds with fuse_and_other,
	// registry bytes, bytes written.
	for _, want := range []string{"cpu seconds (process ", "guard 0.", "fuse_and_other ", "registry bytes: guard ", "disk bytes written: guard "} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	out, err = runLazybase(t.Context(), "snapshotter", "status", "--socket", sock, "--json")
	if err != nil || !strings.Contains(out, `"layers": []`) || !strings.Contains(out, `"cpu_seconds": {`) {
		t.Errorf("status --json: %q, %v", out, err)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("daemon: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not stop")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Errorf("socket left after stop: %v", err)
	}
}

// TestSnapshotterLogLevelFlag: the root's --log-level overrides the
// config file's log_level in the daemon's configuration (so --log-level
// trace turns on FUSE request tracing, TestUpstreamFUSETracing in
// lazypull), the file's level holds without the flag, and a level the
// daemon does not know is refused naming log_level.
func TestSnapshotterLogLevelFlag(t *testing.T) {
	p := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(p, []byte("log_level = \"debug\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv(configEnv, "")
	for _, tc := range []struct {
		name    string
		args    []string
		want    string
		wantErr string
	}{
		{"flag trace over file", []string{"--config", p, "--log-level", "trace"}, "trace", ""},
		{"flag error over file", []string{"--log-level", "error", "--config", p}, "error", ""},
		{"file without flag", []string{"--config", p}, "debug", ""},
		{"defaults without either", nil, "info", ""},
		{"flag trace without file", []string{"--log-level", "trace"}, "trace", ""},
		{"flag level the daemon refuses", []string{"--config", p, "--log-level", "fatal"}, "", "key log_level:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cmd, _, err := newRootCmd().Find([]string{"snapshotter"})
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.ParseFlags(tc.args); err != nil {
				t.Fatal(err)
			}
			cfg, err := snapshotterConfig(cmd)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("got %v, want an error containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if cfg.LogLevel != tc.want {
				t.Errorf("log_level = %q, want %q", cfg.LogLevel, tc.want)
			}
		})
	}
}

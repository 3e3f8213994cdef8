package main

import (
	"context"
	"fmt"
	"io"
	stdlog "log"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/internal/eventually"
)

func TestGuardNoDaemon(t *testing.T) {
	_, err := runLazybase(t.Context(), "guard", "--socket", filepath.Join(t.TempDir(), "none.sock"), "r.example/a:b")
	if err == nil || !strings.Contains(err.Error(), "none.sock.status") {
		t.Fatalf("got %v, want an error naming the status socket", err)
	}
}

func TestGuardArguments(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"guard"}, "no image: give image references or --dockerfile"},
		{[]string{"guard", "--target", "x", "r.example/a"}, "--target, --build-arg and --platform need --dockerfile"},
		{[]string{"guard", "--dockerfile", "/nonexistent/Dockerfile"}, "/nonexistent/Dockerfile: no such file"},
	} {
		_, err := runLazybase(t.Context(), tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: got %v, want %q", tc.args, err, tc.want)
		}
	}
}

func writeDockerfile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "Dockerfile")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestGuardDockerfileBad: a Dockerfile BuildKit's parser rejects fails
// before the daemon is asked, naming the file and the line.
func TestGuardDockerfileBad(t *testing.T) {
	p := writeDockerfile(t, "FROM debian AS build\nRUN true\nFORM build\n")
	_, err := runLazybase(t.Context(), "guard", "--socket", filepath.Join(t.TempDir(), "none.sock"), "--dockerfile", p)
	if err == nil || !strings.HasPrefix(err.Error(), p+":3: unknown instruction: FORM") {
		t.Fatalf("got %v, want the file and line 3 named", err)
	}
}

// TestGuardDockerfileScratch: an exported stage FROM scratch has nothing
// to guard; the daemon is not asked.
func TestGuardDockerfileScratch(t *testing.T) {
	p := writeDockerfile(t, "FROM golang AS build\nRUN go build\nFROM scratch\nCOPY --from=build /x /x\n")
	out, err := runLazybase(t.Context(), "guard", "--socket", filepath.Join(t.TempDir(), "none.sock"), "--dockerfile", p)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "stage 1 is FROM scratch: no base image to guard") {
		t.Errorf("output %q", out)
	}
}

// startDaemon runs `lazybase snapshotter` in-process with the TOML config
// body and returns its snapshots socket; the daemon stops at cleanup.
func startDaemon(t *testing.T, config string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the daemon checks that overlayfs mounts work")
	}
	root := t.TempDir()
	sockDir, err := os.MkdirTemp("", "lbguard")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "sn.sock")
	cfg := filepath.Join(root, "c.toml")
	if err := os.WriteFile(cfg, []byte(config), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := runLazybase(ctx, "snapshotter", "--config", cfg, "--root", filepath.Join(root, "r"), "--address", sock)
		done <- err
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("daemon: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("daemon did not stop")
		}
	})
	eventually.Require(t, 20*time.Second, "daemon listening", func() error {
		_, err := os.Stat(sock + ".status")
		return err
	})
	return sock
}

// TestGuardNotMounted asks a running daemon to guard an image it never
// mounted, by reference and through a Dockerfile: both fail naming the
// image and the namespace.
func TestGuardNotMounted(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	ref := u.Host + "/lazybase/never-mounted:v1"
	img, err := random.Image(1000, 2)
	if err != nil {
		t.Fatal(err)
	}
	r, _ := name.ParseReference(ref)
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
	sock := startDaemon(t, fmt.Sprintf("[guard]\ncontainerd_address = %q\n", filepath.Join(t.TempDir(), "no-containerd.sock")))

	out, err := runLazybase(t.Context(), "guard", "--socket", sock, "--timeout", "30s", ref)
	if err == nil || !strings.Contains(err.Error(), "image "+ref+": not mounted by this daemon in namespace buildkit") {
		t.Fatalf("got %v (output %q), want not mounted by this daemon", err, out)
	}
	p := writeDockerfile(t, "ARG REG=r.example\nFROM ${REG}/lazybase/never-mounted:v1 AS base\nFROM base\n")
	out, err = runLazybase(t.Context(), "guard", "--socket", sock, "--namespace", "ci", "--dockerfile", p, "--build-arg", "REG="+u.Host)
	if err == nil || !strings.Contains(err.Error(), "image "+ref+": not mounted by this daemon in namespace ci") {
		t.Fatalf("got %v (output %q), want not mounted by this daemon", err, out)
	}
	if !strings.Contains(out, "stage 1 is built on "+ref+" (line 2)") {
		t.Errorf("output %q does not name the Dockerfile's base", out)
	}
}

func TestGuardDisabled(t *testing.T) {
	sock := startDaemon(t, "[guard]\nenable = false\n")
	_, err := runLazybase(t.Context(), "guard", "--socket", sock, "r.example/a:b")
	if err == nil || !strings.Contains(err.Error(), "export guard disabled") {
		t.Fatalf("got %v, want export guard disabled", err)
	}
}

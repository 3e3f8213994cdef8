package lazypull

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"
	"golang.org/x/sys/unix"

	"github.com/lazybase/lazybase/exportguard"
)

// unixClient is an HTTP client that dials the unix socket at path.
func unixClient(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}}
}

// TestTCPListenerServesOnlyMetrics: metrics_address answers GET /metrics
// and 404 to status, guard and barrier for every method; those stay on
// the status socket, whose mode limits who may connect.
func TestTCPListenerServesOnlyMetrics(t *testing.T) {
	requireFUSE(t)
	td := startDaemon(t, "", func(c *Config) { c.MetricsAddress = "127.0.0.1:0" })
	addr := td.d.MetricsAddr()
	if addr == nil {
		t.Fatal("no metrics address while serving")
	}
	base := "http://" + addr.String()

	resp, err := http.Get(base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(b), "lazybase_snapshotter_lazy_mounts_total") {
		t.Fatalf("TCP GET /metrics: %s, %d bytes", resp.Status, len(b))
	}

	methods := []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions}
	for _, path := range []string{"/status", "/guard", exportguard.BarrierPath, "/", "/debug/pprof/"} {
		for _, m := range methods {
			req, err := http.NewRequest(m, base+path, strings.NewReader(`{"namespace":"default","images":["docker.io/library/alpine:3"]}`))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("TCP %s %s: %v", m, path, err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusNotFound {
				t.Errorf("TCP %s %s: %s, want 404", m, path, resp.Status)
			}
		}
	}

	// The status socket still serves all of them.
	uc := unixClient(td.cfg.statusSocket())
	for _, path := range []string{"/status", "/guard", "/metrics"} {
		resp, err := uc.Get("http://lazybase" + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("status socket GET %s: %s", path, resp.Status)
		}
	}
	resp, err = uc.Post("http://lazybase"+exportguard.BarrierPath, "application/json", strings.NewReader(`{"namespace":"default","images":[]}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	// The barrier handler itself answers (it rejects an empty image list).
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(b), "barrier request needs") {
		t.Errorf("status socket POST %s: %s %q", exportguard.BarrierPath, resp.Status, b)
	}
	if st, err := FetchStatus(context.Background(), td.cfg.statusSocket()); err != nil || st.Layers == nil {
		t.Errorf("FetchStatus: %+v, %v", st, err)
	}
}

// answers checks that the daemon still serves its snapshots API and its
// status socket.
func (td *testDaemon) answers(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "default"), 10*time.Second)
	defer cancel()
	if err := td.sn.Walk(ctx, func(context.Context, snapshots.Info) error { return nil }); err != nil {
		t.Errorf("snapshots API on %s: %v", td.cfg.Socket, err)
	}
	if _, err := FetchStatus(ctx, td.cfg.statusSocket()); err != nil {
		t.Errorf("status socket: %v", err)
	}
}

// TestSecondDaemonRefused: a daemon whose socket or root a running daemon
// uses fails to start with an error naming the socket or root, and the
// running daemon keeps serving both its sockets, also after the refused
// one is gone.
func TestSecondDaemonRefused(t *testing.T) {
	requireFUSE(t)
	td := startDaemon(t, "", nil)
	for _, tc := range []struct {
		name   string
		mutate func(*Config)
		want   string
	}{
		{"same socket", func(c *Config) { c.Root = t.TempDir() }, td.cfg.Socket},
		{"same root", func(c *Config) { c.Socket = filepath.Join(t.TempDir(), "other.sock") }, td.cfg.Root},
		{"same status socket", func(c *Config) {
			c.Root = t.TempDir()
			c.Socket = filepath.Join(t.TempDir(), "other.sock")
			c.StatusSocket = td.cfg.statusSocket()
		}, td.cfg.statusSocket()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := td.cfg
			tc.mutate(&cfg)
			d, err := NewDaemon(context.Background(), cfg)
			if err == nil {
				d.Close()
				t.Fatal("second daemon started")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not name %s", err, tc.want)
			}
			if !errors.Is(err, errLocked) && !errors.Is(err, errSocketInUse) {
				t.Errorf("error %q is neither errLocked nor errSocketInUse", err)
			}
			td.answers(t)
		})
	}
	// Serve's own check, for a daemon that got past NewDaemon before the
	// socket was taken: listening fails and leaves the live socket alone.
	if _, err := listenUnix(td.cfg.Socket, 0o600); !errors.Is(err, errSocketInUse) {
		t.Errorf("listenUnix on a live socket: %v", err)
	}
	td.answers(t)
}

// TestForeignLiveSocketRefused: a socket another program serves is not
// taken over, and the daemon does not mount or lock anything.
func TestForeignLiveSocketRefused(t *testing.T) {
	requireFUSE(t)
	dir, err := os.MkdirTemp("", "lbsock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "sn.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	cfg := DefaultConfig()
	cfg.Root = t.TempDir()
	cfg.Socket = sock
	_, err = NewDaemon(context.Background(), cfg)
	if !errors.Is(err, errSocketInUse) || !strings.Contains(err.Error(), sock) {
		t.Fatalf("NewDaemon on a foreign live socket: %v", err)
	}
	c, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("foreign socket no longer answers: %v", err)
	}
	c.Close()
	// The refused daemon released its locks: a daemon on the same root
	// and another socket starts.
	startDaemon(t, cfg.Root, nil).answers(t)
}

// staleSocket leaves a socket file at path that no process listens on.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false)
	l.Close()
	if _, err := net.Dial("unix", path); !errors.Is(err, unix.ECONNREFUSED) {
		t.Fatalf("socket %s not stale: %v", path, err)
	}
}

// TestStaleSocketReplaced: sockets left by a daemon that died are
// replaced, and a daemon's exit removes only the sockets it created.
func TestStaleSocketReplaced(t *testing.T) {
	requireFUSE(t)
	dir, err := os.MkdirTemp("", "lbsock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	sock := filepath.Join(dir, "sn.sock")
	staleSocket(t, sock)
	staleSocket(t, sock+".status")
	td := startDaemon(t, "", func(c *Config) { c.Socket = sock })
	// startDaemon waits for the status socket file, which the stale one
	// already is: wait until both sockets accept.
	for _, p := range []string{sock, sock + ".status"} {
		deadline := time.Now().Add(10 * time.Second)
		for {
			c, err := net.Dial("unix", p)
			if err == nil {
				c.Close()
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("daemon does not serve %s: %v", p, err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	td.answers(t)

	// Someone replaced the status socket while the daemon ran: the
	// daemon's exit leaves the newcomer's socket in place.
	if err := os.Remove(sock + ".status"); err != nil {
		t.Fatal(err)
	}
	staleSocket(t, sock+".status")
	var before unix.Stat_t
	if err := unix.Lstat(sock+".status", &before); err != nil {
		t.Fatal(err)
	}
	td.conn.Close()
	td.cancel()
	td.cancel = nil
	if err := <-td.done; err != nil {
		t.Fatalf("Serve: %v", err)
	}
	var after unix.Stat_t
	if err := unix.Lstat(sock+".status", &after); err != nil || after.Ino != before.Ino {
		t.Errorf("the daemon removed a socket it did not create: %v", err)
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the daemon left its own socket %s: %v", sock, err)
	}
}

// TestStartStopLogsNoError: a daemon that starts and stops without any
// snapshot logs nothing at warning level or above (it used to log
// "failed to cleanup: bucket does not exist" on every stop), and neither
// does a restart on the same root.
func TestStartStopLogsNoError(t *testing.T) {
	requireFUSE(t)
	hook := new(logtest.Hook)
	old := logrus.StandardLogger().ReplaceHooks(logrus.LevelHooks{})
	defer logrus.StandardLogger().ReplaceHooks(old)
	logrus.AddHook(hook)
	root := t.TempDir()
	for range 2 {
		td := startDaemon(t, root, nil)
		td.answers(t)
		td.stop(t)
	}
	for _, e := range hook.AllEntries() {
		if e.Level <= logrus.WarnLevel {
			msg, _ := e.String()
			t.Errorf("logged at %s: %s", e.Level, msg)
		}
	}
}

// TestLockFile: a second lock on the same file fails naming the holder's
// pid, and closing the first releases it.
func TestLockFile(t *testing.T) {
	p := filepath.Join(t.TempDir(), "lazybase.lock")
	a, err := lockFile(p)
	if err != nil {
		t.Fatal(err)
	}
	_, err = lockFile(p)
	if !errors.Is(err, errLocked) || !strings.Contains(err.Error(), p) {
		t.Fatalf("second lock: %v", err)
	}
	if !strings.Contains(err.Error(), "pid ") {
		t.Errorf("error %q does not name the holder", err)
	}
	a.Close()
	b, err := lockFile(p)
	if err != nil {
		t.Fatalf("lock after release: %v", err)
	}
	b.Close()
}

// TestCheckSocketFree: only a missing path or a stale socket is free.
func TestCheckSocketFree(t *testing.T) {
	dir, err := os.MkdirTemp("", "lbsock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	if err := checkSocketFree(filepath.Join(dir, "missing.sock")); err != nil {
		t.Errorf("missing: %v", err)
	}
	stale := filepath.Join(dir, "stale.sock")
	staleSocket(t, stale)
	if err := checkSocketFree(stale); err != nil {
		t.Errorf("stale: %v", err)
	}
	live := filepath.Join(dir, "live.sock")
	l, err := net.Listen("unix", live)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := checkSocketFree(live); !errors.Is(err, errSocketInUse) {
		t.Errorf("live: %v", err)
	}
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := checkSocketFree(file); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("regular file: %v", err)
	}
}

// TestSecondProcessRefused runs `lazybase snapshotter` processes: a second
// one on the socket or the root of a running one exits with an error
// naming it, and the first keeps answering; after the first is killed
// with SIGKILL, its sockets are stale and a new daemon replaces them.
func TestSecondProcessRefused(t *testing.T) {
	requireFUSE(t)
	dir := t.TempDir()
	bin := buildLazybase(t, dir)
	sockDir, err := os.MkdirTemp("", "lbsock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "sn.sock")
	root := filepath.Join(dir, "root")
	p1 := startDaemonProc(t, bin, root, sock, "")
	ctx, cancel := context.WithTimeout(namespaces.WithNamespace(context.Background(), "default"), time.Minute)
	defer cancel()
	answers := func(what string) {
		t.Helper()
		if err := dialSnapshotter(t, sock).Walk(ctx, func(context.Context, snapshots.Info) error { return nil }); err != nil {
			t.Errorf("%s: snapshots API: %v", what, err)
		}
		if _, err := FetchStatus(ctx, sock+".status"); err != nil {
			t.Errorf("%s: status socket: %v", what, err)
		}
	}
	answers("first daemon")

	for _, tc := range []struct{ name, root, sock, want string }{
		{"same socket", filepath.Join(dir, "root2"), sock, sock},
		{"same root", root, filepath.Join(sockDir, "other.sock"), root},
	} {
		out, err := exec.CommandContext(ctx, bin, "snapshotter", "--root", tc.root, "--address", tc.sock).CombinedOutput()
		if err == nil {
			t.Fatalf("%s: second daemon exited 0:\n%s", tc.name, out)
		}
		if !strings.Contains(string(out), tc.want) || !strings.Contains(string(out), "in use by another lazybase snapshotter") {
			t.Errorf("%s: second daemon's error does not name %s:\n%s", tc.name, tc.want, out)
		}
		t.Logf("%s: %s", tc.name, bytes.TrimSpace(out))
		answers("after a refused " + tc.name + " daemon")
	}

	if err := p1.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-p1.done
	for _, p := range []string{sock, sock + ".status"} {
		if _, err := net.Dial("unix", p); !errors.Is(err, unix.ECONNREFUSED) {
			t.Fatalf("socket %s after SIGKILL: %v, want a stale socket", p, err)
		}
	}
	var logBuf bytes.Buffer
	p3 := exec.Command(bin, "snapshotter", "--root", root, "--address", sock)
	p3.Stdout, p3.Stderr = &logBuf, &logBuf
	p3.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := p3.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p3.Wait() }()
	defer func() {
		if p3.ProcessState == nil {
			_ = p3.Process.Kill()
			<-done
		}
	}()
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("unix", sock+".status")
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon did not replace the stale sockets: %v\n%s", err, logBuf.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	answers("daemon on stale sockets")
	if err := p3.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("exit after SIGTERM: %v\n%s", err, logBuf.String())
	}
	for _, p := range []string{sock, sock + ".status"} {
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket %s left after SIGTERM: %v", p, err)
		}
	}
}

package mirror

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
)

// mountCounter counts cross-repository mount requests and how many the
// registry granted (201 Created).
type mountCounter struct {
	inner          http.RoundTripper
	tried, granted atomic.Int64
	destUploads    atomic.Int64 // blob uploads committed into mirror/src/app
}

func (m *mountCounter) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := m.inner.RoundTrip(r)
	if r.Method == http.MethodPut && strings.HasPrefix(r.URL.Path, "/v2/mirror/src/app/blobs/uploads/") {
		m.destUploads.Add(1)
	}
	if r.Method == http.MethodPost && r.URL.Query().Get("mount") != "" && r.URL.Query().Get("from") != "" {
		m.tried.Add(1)
		if err == nil && resp.StatusCode == http.StatusCreated {
			m.granted.Add(1)
		}
	}
	return resp, err
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startDistribution runs Debian's docker-registry (distribution 2.8) on
// loopback, with notifications sent to notifyURL.
func startDistribution(t *testing.T, notifyURL, token string) string {
	t.Helper()
	bin, err := exec.LookPath("docker-registry")
	if err != nil {
		t.Skip("docker-registry (Debian package docker-registry) is not installed: " + err.Error())
	}
	dir := t.TempDir()
	port := freePort(t)
	cfg := fmt.Sprintf(`version: 0.1
log: {level: error}
storage:
  filesystem: {rootdirectory: %s}
http:
  addr: 127.0.0.1:%d
notifications:
  endpoints:
    - name: lazybase
      url: %s
      headers:
        Authorization: [Bearer %s]
      timeout: 2s
      threshold: 10
      backoff: 200ms
`, filepath.Join(dir, "data"), port, notifyURL, token)
	cfgFile := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "serve", cfgFile)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("docker-registry output:\n%s", out.String())
		}
	})
	host := fmt.Sprintf("127.0.0.1:%d", port)
	eventually.Require(t, 10*time.Second, "registry on "+host+" starts", func() error {
		resp, err := http.Get("http://" + host + "/v2/")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("GET /v2/: %s", resp.Status)
		}
		return nil
	})
	return host
}

// TestDistributionMountsAndNotifications runs against a real distribution
// registry: converted blobs are mounted from the records repository into
// the destination (cross-repository mounts), and a push notification sent
// by the registry itself triggers the conversion of the pushed image.
func TestDistributionMountsAndNotifications(t *testing.T) {
	var srvp atomic.Pointer[Server]
	notify := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		srv := srvp.Load()
		if srv == nil {
			w.WriteHeader(http.StatusAccepted)
			return
		}
		srv.Handler().ServeHTTP(w, r)
	}))
	defer notify.Close()
	token := "distribution-notify-token-0123456789"
	host := startDistribution(t, notify.URL+"/events", token)

	// Two images sharing a base layer, pushed before the server listens.
	base, _ := testimage.EntriesLayer(testimage.Files("usr/lib/base.bin", pseudoRandom(3, 128<<10)))
	for i := range 2 {
		u, _ := testimage.EntriesLayer(testimage.Files("app.txt", fmt.Sprintf("app %d\n", i)))
		img, err := testimage.Image(testimage.LinuxAMD64, base, u)
		if err != nil {
			t.Fatal(err)
		}
		ref, _ := name.ParseReference(fmt.Sprintf("%s/src/app:1.%d", host, i))
		if err := remote.Write(ref, img); err != nil {
			t.Fatal(err)
		}
	}
	c, err := ParseConfig([]byte(fmt.Sprintf("destination = %q\nretry_initial = \"5ms\"\n[[source]]\nrepository = %q\n", host+"/mirror", host+"/src/app")))
	if err != nil {
		t.Fatal(err)
	}
	mc := &mountCounter{inner: http.DefaultTransport}
	m := newMirror(t, c, WithTransport(mc))
	rep, err := m.Run(context.Background())
	if err != nil || !rep.OK() || rep.Converted != 2 {
		t.Fatalf("%v %+v", err, rep)
	}
	// Three distinct layers, each mounted from the records repository into
	// mirror/src/app (the shared one once, or twice when both pushes race
	// to it); only the two configs are uploaded.
	if g := mc.granted.Load(); g < 3 || g > 4 || g != mc.tried.Load() {
		t.Errorf("mounts granted %d of %d tried, want 3 or 4 of as many", g, mc.tried.Load())
	}
	if u := mc.destUploads.Load(); u != 2 {
		t.Errorf("%d blobs uploaded into the destination, want 2 (the configs)", u)
	}

	// Now the registry's own notification drives a conversion.
	srv, err := NewServer(m, WithQueue(8, 8), WithWorkers(1), WithToken([]byte(token)))
	if err != nil {
		t.Fatal(err)
	}
	srvp.Store(srv)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)
	u, _ := testimage.EntriesLayer(testimage.Files("app.txt", "app pushed later\n"))
	img, _ := testimage.Image(testimage.LinuxAMD64, base, u)
	ref, _ := name.ParseReference(host + "/src/app:1.9")
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
	dest, _ := name.ParseReference(host + "/mirror/src/app:1.9")
	eventually.Require(t, 30*time.Second, "the pushed image is mirrored after its notification", func() error {
		_, err := remote.Head(dest)
		return err
	})
	out, err := remote.Image(dest)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(out); err != nil {
		t.Fatal(err)
	}
	// The base layer comes from its conversion record; only the new layer
	// is converted.
	metrics := get(t, notify.URL+"/metrics")
	if !strings.Contains(metrics, "lazybase_mirror_unauthorized_requests_total 0") {
		t.Errorf("distribution's notifications (Authorization from its endpoint headers) were refused:\n%s", metrics)
	}
	if !strings.Contains(metrics, `lazybase_mirror_layers_total{source="record"} 1`) || !strings.Contains(metrics, `lazybase_mirror_layers_total{source="converted"} 1`) {
		t.Errorf("the base layer was not reused:\n%s", metrics)
	}
}

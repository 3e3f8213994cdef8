package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/mirror"
)

func writeMirrorConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "mirror.toml")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestMirrorCLIConvertsSkipsPlansAndShards: a run converts the newest two
// tags, prints each image's summary and the run's, and writes the same
// JSON report to --report and stdout; a second run skips both; --dry-run
// lists them; shards 0/2 and 1/2 split them.
func TestMirrorCLIConvertsSkipsPlansAndShards(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	src := testimage.NewRegistry(t)
	dst := testimage.NewRegistry(t)
	for i := range 3 {
		img, err := testimage.SeedImage(uint64(i%2), testimage.LinuxAMD64, testimage.WithoutLargeFiles())
		if err != nil {
			t.Fatal(err)
		}
		src.Push(t, fmt.Sprintf("base/os:1.%d", i), img)
	}
	cfg := writeMirrorConfig(t, fmt.Sprintf(`
destination = "%s/m"
tag_suffix = "-esgz"
retry_initial = "5ms"
[[source]]
repository = "%s/base/os"
tags = ["1.*"]
newest = 2
`, dst.Host, src.Host))
	reportFile := filepath.Join(t.TempDir(), "report.json")
	stdout, stderr, err := runCLI(ctx, t, "mirror", "--config", cfg, "--json", "--report", reportFile)
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	var rep mirror.Report
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Converted != 2 || len(rep.Images) != 2 {
		t.Fatalf("report %+v", rep)
	}
	for _, ir := range rep.Images {
		if !strings.HasSuffix(ir.Destination, "-esgz") || !strings.Contains(ir.Destination, "/m/base/os:1.") || strings.HasSuffix(ir.Source, ":1.0") {
			t.Errorf("image %+v", ir)
		}
	}
	for _, ir := range rep.Images {
		if !strings.Contains(stderr, ir.Summary()+"\n") {
			t.Errorf("no summary line %q on stderr:\n%s", ir.Summary(), stderr)
		}
	}
	if !strings.Contains(stderr, "mirror: "+rep.Summary()+"\n") {
		t.Errorf("no run summary %q on stderr:\n%s", rep.Summary(), stderr)
	}
	if b, err := os.ReadFile(reportFile); err != nil || string(b) != stdout {
		t.Errorf("report file differs from --json output: %v\n%s", err, b)
	}
	// Again: everything skipped, exit status zero.
	stdout, stderr, err = runCLI(ctx, t, "mirror", "--config", cfg, "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	rep = mirror.Report{}
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil || rep.Skipped != 2 || rep.Converted != 0 {
		t.Fatalf("second run %+v %v", rep, err)
	}
	for _, ir := range rep.Images {
		if !strings.Contains(stderr, ir.Summary()+"\n") {
			t.Errorf("no summary line %q on stderr:\n%s", ir.Summary(), stderr)
		}
	}
	// --dry-run lists the jobs and converts nothing.
	stdout, _, err = runCLI(ctx, t, "mirror", "--config", cfg, "--dry-run")
	if err != nil {
		t.Fatal(err)
	}
	var jobs []mirror.Job
	if err := json.Unmarshal([]byte(stdout), &jobs); err != nil || len(jobs) != 2 || jobs[0].Tag != "1.2" {
		t.Fatalf("dry run: %v %s", err, stdout)
	}
	// Shards 0/2 and 1/2 split the two images.
	total := 0
	for i := range 2 {
		stdout, _, err = runCLI(ctx, t, "mirror", "--config", cfg, "--json", "--shard", fmt.Sprintf("%d/2", i))
		if err != nil {
			t.Fatal(err)
		}
		var r mirror.Report
		if err := json.Unmarshal([]byte(stdout), &r); err != nil {
			t.Fatal(err)
		}
		total += len(r.Images)
	}
	if total != 2 {
		t.Errorf("shards covered %d images, want 2", total)
	}
}

// TestMirrorCLIExitsNonZeroOnBadConfigSourceOrShard: config errors name
// the key, a source that cannot be listed fails the run, and --shard is
// checked.
func TestMirrorCLIExitsNonZeroOnBadConfigSourceOrShard(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	// A config error names the key.
	cfg := writeMirrorConfig(t, "destination = \"127.0.0.1:1/m\"\nformatt = \"x\"\n[[source]]\nrepository = \"127.0.0.1:1/a\"\n")
	if _, _, err := runCLI(ctx, t, "mirror", "--config", cfg); err == nil || !strings.Contains(err.Error(), "formatt") {
		t.Fatalf("err = %v", err)
	}
	cfg = writeMirrorConfig(t, "destination = \"127.0.0.1:1/m\"\nlevel = 42\n[[source]]\nrepository = \"127.0.0.1:1/a\"\n")
	if _, _, err := runCLI(ctx, t, "mirror", "--config", cfg); err == nil || !strings.Contains(err.Error(), "level") {
		t.Fatalf("err = %v", err)
	}
	// A source that cannot be listed makes the exit status non-zero.
	dst := testimage.NewRegistry(t)
	cfg = writeMirrorConfig(t, fmt.Sprintf("destination = %q\nretries = 0\n[[source]]\nrepository = %q\n", dst.Host+"/m", dst.Host+"/missing"))
	_, stderr, err := runCLI(ctx, t, "mirror", "--config", cfg)
	if err == nil || !strings.Contains(stderr, "missing") {
		t.Fatalf("err = %v\n%s", err, stderr)
	}
	if _, _, err := runCLI(ctx, t, "mirror", "--config", cfg, "--shard", "2/2"); err == nil || !strings.Contains(err.Error(), "--shard") {
		t.Fatalf("err = %v", err)
	}
}

// TestMirrorServeRefusesToStartWithoutAuth: serve refuses to start
// without a token, and refuses no_auth on a listener that is not loopback.
// (The token's sources and lengths: mirror.TestServeOptionsReadTokenWithoutShowingIt.)
func TestMirrorServeRefusesToStartWithoutAuth(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	base := "destination = \"127.0.0.1:1/m\"\nrecord_key_env = \"LB_TEST_RECORD_KEY\"\n[[source]]\nrepository = \"127.0.0.1:1/a\"\n"
	t.Setenv("LB_TEST_RECORD_KEY", "record-key-0123456789abcdef")
	for _, tc := range []struct {
		name, serve, listen, want string
	}{
		{"no token", "", "127.0.0.1:0", "serve.token_file or serve.token_env"},
		{"no_auth on all interfaces", "no_auth = true\n", ":0", "not a loopback address"},
		{"no_auth on a routable address", "no_auth = true\n", "0.0.0.0:0", "not a loopback address"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := writeMirrorConfig(t, base+"[serve]\n"+tc.serve)
			_, _, err := runCLI(ctx, t, "mirror", "serve", "--config", cfg, "--listen", tc.listen)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// TestMirrorServeDrainsOnShutdown runs serve with a token from the
// environment, sends a notification, and stops the server at once: the job
// answered 202 is done before serve returns, and no state is left.
func TestMirrorServeDrainsOnShutdown(t *testing.T) {
	isolate(t)
	src := testimage.NewRegistry(t)
	dst := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(1, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src.Push(t, "base/os:1.0", img)
	token := "serve-token-0123456789abcdef"
	t.Setenv("LB_TEST_TOKEN", token)
	state := filepath.Join(t.TempDir(), "state.json")
	cfg := writeMirrorConfig(t, fmt.Sprintf(`
destination = "%s/m"
retry_initial = "5ms"
[[source]]
repository = "%s/base/os"
[serve]
token_env = "LB_TEST_TOKEN"
grace_period = "60s"
state_file = %q
`, dst.Host, src.Host, state))
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	var stderr string
	go func() {
		var err error
		_, stderr, err = runCLI(ctx, t, "mirror", "serve", "--config", cfg, "--listen", addr)
		errc <- err
	}()
	ev := `{"events":[{"action":"push","target":{"repository":"base/os","tag":"1.0"}}]}`
	post := func(auth string) int {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/events", strings.NewReader(ev))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return -1
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	eventually.Require(t, 10*time.Second, "serve answers unauthenticated notifications with 401", func() error {
		if code := post(""); code != http.StatusUnauthorized {
			return fmt.Errorf("got %d", code)
		}
		return nil
	})
	if code := post("Bearer " + token); code != http.StatusAccepted {
		t.Fatalf("authenticated notification: %d", code)
	}
	cancel()
	select {
	case err := <-errc:
		if err != nil {
			t.Fatalf("%v\n%s", err, stderr)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("serve did not stop")
	}
	testimage.RemoteImage(t, dst.Host+"/m/base/os:1.0")
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state file left after a complete drain: %v", err)
	}
}

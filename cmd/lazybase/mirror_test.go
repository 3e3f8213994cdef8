package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

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

func TestMirrorCLI(t *testing.T) {
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
	if n := strings.Count(stderr, "converted "); n < 2 {
		t.Errorf("want one summary line per image:\n%s", stderr)
	}
	if b, err := os.ReadFile(reportFile); err != nil || !json.Valid(b) {
		t.Errorf("report file: %v", err)
	}
	// Again: everything skipped, exit status zero.
	stdout, stderr, err = runCLI(ctx, t, "mirror", "--config", cfg, "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil || rep.Skipped != 2 {
		t.Fatalf("second run %+v %v", rep, err)
	}
	if !strings.Contains(stderr, "skipped ") {
		t.Errorf("stderr:\n%s", stderr)
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

func TestMirrorCLIFailures(t *testing.T) {
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

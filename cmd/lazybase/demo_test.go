package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

func TestDemoSmall(t *testing.T) {
	isolate(t)
	stdout, stderr, err := runCLI(context.Background(), t, "demo", "--small")
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, stderr)
	}
	checkDemoOutput(t, stdout, 2)
}

func TestDemoSourceDir(t *testing.T) {
	isolate(t)
	src := t.TempDir()
	for i := 0; i < 30; i++ {
		p := filepath.Join(src, fmt.Sprintf("pkg%d", i%4), fmt.Sprintf("file%02d.go", i))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		body := strings.Repeat(fmt.Sprintf("package pkg%d // line of file %d\n", i%4, i), 200+i*50)
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("pkg0/file00.go", filepath.Join(src, "link.go")); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCLI(context.Background(), t, "demo", "--source", src, "--format", "zstd-chunked")
	if err != nil {
		t.Fatalf("demo: %v\n%s", err, stderr)
	}
	checkDemoOutput(t, stdout, 2)
	if !strings.Contains(stdout, "second layer from "+src) || !strings.Contains(stdout, ":zstdchunked") {
		t.Errorf("stdout:\n%s", stdout)
	}
	// 30 files, their 4 directories and the symlink, under usr/local/go/src.
	if !regexp.MustCompile(`layer 2 \S+ opens with .* VerifyTOC ok, 4[0-9] entries`).MatchString(stdout) {
		t.Errorf("second layer entries:\n%s", stdout)
	}
}

func checkDemoOutput(t *testing.T, stdout string, layers int) {
	t.Helper()
	for _, want := range []string{
		"registry at http://127.0.0.1:",
		"verified: validate.Image passes on the pushed image",
		"ready for lazy pull: 127.0.0.1:",
	} {
		if !strings.Contains(stdout, want) {
			t.Errorf("no %q in:\n%s", want, stdout)
		}
	}
	if n := strings.Count(stdout, "VerifyTOC ok"); n != layers {
		t.Errorf("%d layers verified, want %d:\n%s", n, layers, stdout)
	}
	if n := len(regexp.MustCompile(`(?m)^[0-9]+\s+sha256:[0-9a-f]{12}\s.*sha256:[0-9a-f]{64}$`).FindAllString(stdout, -1)); n != layers {
		t.Errorf("%d layer rows with a TOC digest, want %d:\n%s", n, layers, stdout)
	}
}

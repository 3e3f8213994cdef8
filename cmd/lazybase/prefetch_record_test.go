package main

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
)

func TestPrefetchRecordArgs(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	dir := t.TempDir()
	out := filepath.Join(dir, "p.json")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no dash", []string{"prefetch", "record", "--image", "r", "--access-dir", dir, "-o", out, "go", "version"}, "follows --"},
		{"no command", []string{"prefetch", "record", "--image", "r", "--access-dir", dir, "-o", out, "--"}, "follows --"},
		{"no image", []string{"prefetch", "record", "--access-dir", dir, "-o", out, "--", "true"}, `"image"`},
		{"no access dir", []string{"prefetch", "record", "--image", "r", "-o", out, "--", "true"}, `"access-dir"`},
		{"access dir missing", []string{"prefetch", "record", "--image", "r", "--access-dir", filepath.Join(dir, "absent"), "-o", out, "--", "true"}, "access_record_dir"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := runCLI(ctx, t, tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to name %s", err, tc.want)
			}
		})
	}
}

func TestPrefetchRecordNoContainerd(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	dir := t.TempDir()
	sock := filepath.Join(dir, "none.sock")
	_, _, err := runCLI(ctx, t, "prefetch", "record", "--image", "127.0.0.1:1/x:y", "--containerd", sock,
		"--access-dir", dir, "-o", filepath.Join(dir, "p.json"), "--timeout", "5s", "--", "true")
	if err == nil || !strings.Contains(err.Error(), "127.0.0.1:1/x:y") && !strings.Contains(err.Error(), sock) {
		t.Errorf("err %v, want it to name the socket or image", err)
	}
}

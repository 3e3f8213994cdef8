package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
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

// TestPrefetchRecordMountFlags drives the command: bad mount flags fail
// before containerd is dialled, naming the flag's value.
func TestPrefetchRecordMountFlags(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	dir := t.TempDir()
	sock := filepath.Join(dir, "none.sock")
	base := []string{"prefetch", "record", "--image", "127.0.0.1:1/x:y", "--containerd", sock,
		"--access-dir", dir, "-o", filepath.Join(dir, "p.json"), "--timeout", "5s"}
	for _, tc := range []struct {
		flags []string
		want  string
	}{
		{[]string{"-v", "rel:/src"}, `--volume "rel:/src"`},
		{[]string{"--volume", dir + "/absent:/src:ro"}, `--volume "` + dir + `/absent:/src:ro"`},
		{[]string{"--mount", "type=tmpfs,dst=/x"}, `--mount "type=tmpfs,dst=/x"`},
		{[]string{"-w", "rel"}, `--workdir "rel"`},
		{[]string{"-e", "=v"}, `--env "=v"`},
	} {
		args := append(append(slices.Clone(base), tc.flags...), "--", "true")
		_, _, err := runCLI(ctx, t, args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: err %v, want it to name %s", tc.flags, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), sock) {
			t.Errorf("%v: dialled containerd before checking the flags: %v", tc.flags, err)
		}
	}
	// Good flags get as far as containerd.
	_, _, err := runCLI(ctx, t, append(base, "-v", dir+":/src:ro", "--mount", "type=bind,src="+dir+",dst=/d", "-w", "/src", "-e", "A=b", "--", "true")...)
	if err == nil || strings.Contains(err.Error(), "--") {
		t.Errorf("good flags: err %v, want a containerd error", err)
	}
}

// TestPrefetchRecordRegistryConfig: --registry-config is read before
// containerd is dialled; a file that is missing or that the snapshotter
// would refuse fails naming the flag.
func TestPrefetchRecordRegistryConfig(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.toml")
	if err := os.WriteFile(bad, []byte("[registry]\nconfig_path = [\"relative/dir\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, path string }{
		{"missing", filepath.Join(dir, "none.toml")},
		{"invalid", bad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := runCLI(ctx, t, "prefetch", "record", "--image", "unresolvable.invalid/x:y",
				"--containerd", filepath.Join(dir, "none.sock"), "--registry-config", tc.path,
				"--access-dir", dir, "-o", filepath.Join(dir, "p.json"), "--timeout", "5s", "--", "true")
			if err == nil || !strings.Contains(err.Error(), "--registry-config") {
				t.Errorf("err %v, want it to name --registry-config", err)
			}
		})
	}
}

package main

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	specs "github.com/opencontainers/runtime-spec/specs-go"
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

func TestPrefetchRecordRunSpec(t *testing.T) {
	src := t.TempDir()
	file := filepath.Join(src, "main.go")
	if err := os.WriteFile(file, []byte("package main\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_TEST_PASSED", "from-host")
	o := recordOptions{
		volumes: []string{src + ":/src:ro", file + ":/work/main.go"},
		mounts:  []string{"type=bind,src=" + src + ",dst=/data/,readonly", "type=bind,source=" + src + ",target=/rw,ro=false"},
		workdir: "/src/",
		env:     []string{"GOCACHE=/tmp/gocache", "EMPTY=", "A=b=c", "LAZYBASE_TEST_PASSED"},
	}
	rs, err := parseRunSpec(o)
	if err != nil {
		t.Fatal(err)
	}
	want := []specs.Mount{
		{Type: "bind", Source: src, Destination: "/src", Options: []string{"rbind", "ro"}},
		{Type: "bind", Source: file, Destination: "/work/main.go", Options: []string{"rbind", "rw"}},
		{Type: "bind", Source: src, Destination: "/data", Options: []string{"rbind", "ro"}},
		{Type: "bind", Source: src, Destination: "/rw", Options: []string{"rbind", "rw"}},
	}
	if !reflect.DeepEqual(rs.mounts, want) {
		t.Errorf("mounts\n got %+v\nwant %+v", rs.mounts, want)
	}
	if rs.workdir != "/src" {
		t.Errorf("workdir %q", rs.workdir)
	}
	wantEnv := []string{"GOCACHE=/tmp/gocache", "EMPTY=", "A=b=c", "LAZYBASE_TEST_PASSED=from-host"}
	if !slices.Equal(rs.env, wantEnv) {
		t.Errorf("env %q, want %q", rs.env, wantEnv)
	}
	if rs, err := parseRunSpec(recordOptions{}); err != nil || rs.mounts != nil || rs.env != nil || rs.workdir != "" {
		t.Errorf("no flags: %+v, %v", rs, err)
	}
}

func TestPrefetchRecordRunSpecBad(t *testing.T) {
	src := t.TempDir()
	absent := filepath.Join(src, "absent")
	for _, tc := range []struct {
		name string
		o    recordOptions
		want []string // the error names all of these
	}{
		{"volume relative source", recordOptions{volumes: []string{"src:/src"}}, []string{`--volume "src:/src"`, "absolute"}},
		{"volume relative destination", recordOptions{volumes: []string{src + ":src"}}, []string{"--volume", `destination "src"`, "absolute"}},
		{"volume missing source", recordOptions{volumes: []string{absent + ":/src"}}, []string{"--volume", absent, "no such file"}},
		{"volume one part", recordOptions{volumes: []string{src}}, []string{"--volume", "SRC:DST"}},
		{"volume four parts", recordOptions{volumes: []string{src + ":/a:ro:x"}}, []string{"--volume", "SRC:DST"}},
		{"volume bad option", recordOptions{volumes: []string{src + ":/src:rx"}}, []string{"--volume", `"rx"`}},
		{"volume on root", recordOptions{volumes: []string{src + ":/"}}, []string{"--volume", "root"}},
		{"mount not bind", recordOptions{mounts: []string{"type=volume,src=" + src + ",dst=/src"}}, []string{"--mount", `type "volume"`}},
		{"mount no type", recordOptions{mounts: []string{"src=" + src + ",dst=/src"}}, []string{"--mount", "type=bind"}},
		{"mount no dst", recordOptions{mounts: []string{"type=bind,src=" + src}}, []string{"--mount", "dst=DST"}},
		{"mount relative source", recordOptions{mounts: []string{"type=bind,src=./x,dst=/src"}}, []string{"--mount", `source "./x"`}},
		{"mount missing source", recordOptions{mounts: []string{"type=bind,src=" + absent + ",dst=/src"}}, []string{"--mount", absent}},
		{"mount unknown field", recordOptions{mounts: []string{"type=bind,src=" + src + ",dst=/src,bind-propagation=shared"}}, []string{"--mount", `"bind-propagation"`}},
		{"mount bad ro", recordOptions{mounts: []string{"type=bind,src=" + src + ",dst=/src,ro=maybe"}}, []string{"--mount", "ro=maybe"}},
		{"mount empty value", recordOptions{mounts: []string{"type=bind,src=,dst=/src"}}, []string{"--mount", "src: empty"}},
		{"two mounts on one path", recordOptions{volumes: []string{src + ":/src"}, mounts: []string{"type=bind,src=" + src + ",dst=/src/"}}, []string{"two bind mounts on /src"}},
		{"relative workdir", recordOptions{workdir: "src"}, []string{`--workdir "src"`, "absolute"}},
		{"env no name", recordOptions{env: []string{"=x"}}, []string{`--env "=x"`, "empty variable name"}},
		{"env unset", recordOptions{env: []string{"LAZYBASE_TEST_SURELY_UNSET"}}, []string{"--env", "not set"}},
		{"env space", recordOptions{env: []string{"A B=c"}}, []string{"--env", "white space"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseRunSpec(tc.o)
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %s", err, w)
				}
			}
		})
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

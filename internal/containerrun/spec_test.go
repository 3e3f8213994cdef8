package containerrun

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

func TestParseFlagsResolvesMountsEnvWorkdir(t *testing.T) {
	src := t.TempDir()
	file := filepath.Join(src, "main.go")
	if err := os.WriteFile(file, []byte("package main\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_TEST_PASSED", "from-host")
	f := Flags{
		Volumes: []string{src + ":/src:ro", file + ":/work/main.go"},
		Mounts:  []string{"type=bind,src=" + src + ",dst=/data/,readonly", "type=bind,source=" + src + ",target=/rw,ro=false"},
		Workdir: "/src/",
		Env:     []string{"GOCACHE=/tmp/gocache", "EMPTY=", "A=b=c", "LAZYBASE_TEST_PASSED"},
	}
	rs, err := ParseFlags(f)
	if err != nil {
		t.Fatal(err)
	}
	want := []specs.Mount{
		{Type: "bind", Source: src, Destination: "/src", Options: []string{"rbind", "ro"}},
		{Type: "bind", Source: file, Destination: "/work/main.go", Options: []string{"rbind", "rw"}},
		{Type: "bind", Source: src, Destination: "/data", Options: []string{"rbind", "ro"}},
		{Type: "bind", Source: src, Destination: "/rw", Options: []string{"rbind", "rw"}},
	}
	if !reflect.DeepEqual(rs.Mounts, want) {
		t.Errorf("mounts\n got %+v\nwant %+v", rs.Mounts, want)
	}
	if rs.Workdir != "/src" {
		t.Errorf("workdir %q", rs.Workdir)
	}
	wantEnv := []string{"GOCACHE=/tmp/gocache", "EMPTY=", "A=b=c", "LAZYBASE_TEST_PASSED=from-host"}
	if !slices.Equal(rs.Env, wantEnv) {
		t.Errorf("env %q, want %q", rs.Env, wantEnv)
	}
	if rs, err := ParseFlags(Flags{}); err != nil || rs.Mounts != nil || rs.Env != nil || rs.Workdir != "" {
		t.Errorf("no flags: %+v, %v", rs, err)
	}
}

func TestParseFlagsRefusesBadForms(t *testing.T) {
	src := t.TempDir()
	absent := filepath.Join(src, "absent")
	for _, tc := range []struct {
		name string
		f    Flags
		want []string // the error names all of these
	}{
		{"volume relative source", Flags{Volumes: []string{"src:/src"}}, []string{`--volume "src:/src"`, "absolute"}},
		{"volume relative destination", Flags{Volumes: []string{src + ":src"}}, []string{"--volume", `destination "src"`, "absolute"}},
		{"volume missing source", Flags{Volumes: []string{absent + ":/src"}}, []string{"--volume", absent, "no such file"}},
		{"volume one part", Flags{Volumes: []string{src}}, []string{"--volume", "SRC:DST"}},
		{"volume four parts", Flags{Volumes: []string{src + ":/a:ro:x"}}, []string{"--volume", "SRC:DST"}},
		{"volume bad option", Flags{Volumes: []string{src + ":/src:rx"}}, []string{"--volume", `"rx"`}},
		{"volume on root", Flags{Volumes: []string{src + ":/"}}, []string{"--volume", "root"}},
		{"mount not bind", Flags{Mounts: []string{"type=volume,src=" + src + ",dst=/src"}}, []string{"--mount", `type "volume"`}},
		{"mount no type", Flags{Mounts: []string{"src=" + src + ",dst=/src"}}, []string{"--mount", "type=bind"}},
		{"mount no dst", Flags{Mounts: []string{"type=bind,src=" + src}}, []string{"--mount", "dst=DST"}},
		{"mount relative source", Flags{Mounts: []string{"type=bind,src=./x,dst=/src"}}, []string{"--mount", `source "./x"`}},
		{"mount missing source", Flags{Mounts: []string{"type=bind,src=" + absent + ",dst=/src"}}, []string{"--mount", absent}},
		{"mount unknown field", Flags{Mounts: []string{"type=bind,src=" + src + ",dst=/src,bind-propagation=shared"}}, []string{"--mount", `"bind-propagation"`}},
		{"mount bad ro", Flags{Mounts: []string{"type=bind,src=" + src + ",dst=/src,ro=maybe"}}, []string{"--mount", "ro=maybe"}},
		{"mount empty value", Flags{Mounts: []string{"type=bind,src=,dst=/src"}}, []string{"--mount", "src: empty"}},
		{"two mounts on one path", Flags{Volumes: []string{src + ":/src"}, Mounts: []string{"type=bind,src=" + src + ",dst=/src/"}}, []string{"two bind mounts on /src"}},
		{"relative workdir", Flags{Workdir: "src"}, []string{`--workdir "src"`, "absolute"}},
		{"env no name", Flags{Env: []string{"=x"}}, []string{`--env "=x"`, "empty variable name"}},
		{"env unset", Flags{Env: []string{"LAZYBASE_TEST_SURELY_UNSET"}}, []string{"--env", "not set"}},
		{"env space", Flags{Env: []string{"A B=c"}}, []string{"--env", "white space"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseFlags(tc.f)
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

// TestParseVolumeAndMountAgree checks that the short and long forms of the
// same bind mount resolve to the same mount.
func TestParseVolumeAndMountAgree(t *testing.T) {
	src := t.TempDir()
	for _, tc := range []struct{ volume, mount string }{
		{src + ":/src", "type=bind,src=" + src + ",dst=/src"},
		{src + ":/src:rw", "type=bind,src=" + src + ",dst=/src,rw"},
		{src + ":/src:ro", "type=bind,source=" + src + ",destination=/src,ro"},
		{src + "/:/src/", "type=bind,src=" + src + ",target=/src,readonly=false"},
	} {
		v, err := ParseVolume(tc.volume)
		if err != nil {
			t.Fatalf("%s: %v", tc.volume, err)
		}
		m, err := ParseMount(tc.mount)
		if err != nil {
			t.Fatalf("%s: %v", tc.mount, err)
		}
		if !reflect.DeepEqual(v, m) {
			t.Errorf("%s gives %+v, %s gives %+v", tc.volume, v, tc.mount, m)
		}
	}
}

// TestRunRefusesBadOptions checks that Run refuses bad options and an
// empty command before it dials containerd.
func TestRunRefusesBadOptions(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, tc := range []struct {
		name string
		args []string
		opts []Option
		want string
	}{
		{"no command", nil, []Option{WithAddress(sock)}, "no command"},
		{"zero timeout", []string{"true"}, []Option{WithAddress(sock), WithTimeout(0)}, "must be positive"},
		{"empty address", []string{"true"}, []Option{WithAddress("")}, "empty containerd address"},
		{"empty snapshotter", []string{"true"}, []Option{WithAddress(sock), WithSnapshotter("")}, "empty snapshotter"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := Run(context.Background(), "127.0.0.1:1/x:y", tc.args, tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), sock) {
				t.Errorf("err %v, want it to say %q without dialling %s", err, tc.want, sock)
			}
		})
	}
}

//go:build e2e

package e2e

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/prefetch"
)

// TestPrefetchRecord records a profile with `lazybase prefetch record` from
// `go version` in the lazily pulled golang-like image, then converts the
// source gzip image with it: the go binary comes before the landmark.
func TestPrefetchRecord(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir := t.TempDir()
	access := filepath.Join(dir, "access")
	cfg := filepath.Join(dir, "snapshotter.toml")
	if err := os.WriteFile(cfg, []byte("access_record_dir = \""+access+"\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_SNAPSHOTTER_CONFIG", cfg)
	s := harness.Start(ctx, t, harness.WithLazySnapshotter(harness.Lazybase))
	_, golang := publishAll(ctx, t, s)
	lazyRef := s.Registry.Ref(repoGolang, tagEStargz)

	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "lazybase")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/lazybase")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	profile := filepath.Join(dir, "profile.json")
	run := exec.CommandContext(ctx, bin, "prefetch", "record", "--image", lazyRef,
		"--containerd", s.Containerd.Address, "--namespace", s.Containerd.Namespace,
		"--snapshotter", harness.LazySnapshotterName, "--access-dir", access, "-o", profile,
		"--", "go", "version")
	out, err := run.CombinedOutput()
	if err != nil {
		t.Fatalf("prefetch record: %v\n%s", err, out)
	}
	t.Logf("prefetch record:\n%s", out)
	p, err := prefetch.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	const goBin = "usr/local/go/bin/go"
	var found bool
	for _, l := range p.Layers {
		for i, f := range l.Files {
			if trimSlash(f.Path) == goBin {
				found = true
				if f.Size == 0 {
					t.Errorf("%s: size 0", goBin)
				}
				t.Logf("layer %s: %s is file %d of %d", l.Digest, goBin, i+1, len(l.Files))
			}
		}
	}
	if !found {
		t.Fatalf("profile has no %s:\n%+v", goBin, p.Layers)
	}

	// A failing command: the profile is still written, the error names
	// the status.
	failed := filepath.Join(dir, "failed.json")
	out, err = exec.CommandContext(ctx, bin, "prefetch", "record", "--image", lazyRef,
		"--containerd", s.Containerd.Address, "--namespace", s.Containerd.Namespace,
		"--access-dir", access, "-o", failed, "--", "sh", "-c", "go version; exit 3").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "status 3") {
		t.Errorf("failing command: %v\n%s", err, out)
	}
	if _, err := prefetch.LoadProfile(failed); err != nil {
		t.Errorf("failing command: no profile: %v", err)
	}
	// An image that is not eStargz is not lazily mounted: nothing recorded.
	out, err = exec.CommandContext(ctx, bin, "prefetch", "record", "--image", s.Registry.Ref(repoGolang, tagGzip),
		"--containerd", s.Containerd.Address, "--namespace", s.Containerd.Namespace,
		"--access-dir", access, "-o", filepath.Join(dir, "gzip.json"), "--", "go", "version").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "lazily mounted") {
		t.Errorf("gzip image: %v\n%s", err, out)
	}

	c, err := convert.New(convert.WithPrefetch(p))
	if err != nil {
		t.Fatal(err)
	}
	res, err := c.Image(ctx, golang.gzip)
	if err != nil {
		t.Fatal(err)
	}
	layers, err := res.Image.Layers()
	if err != nil {
		t.Fatal(err)
	}
	var ok bool
	for _, l := range layers {
		names, err := tarNames(l.Uncompressed)
		if err != nil {
			t.Fatal(err)
		}
		land := slices.Index(names, ".prefetch.landmark")
		g := slices.Index(names, goBin)
		if g < 0 {
			continue
		}
		if land < 0 || g > land {
			t.Errorf("converted layer: %s at %d, landmark at %d", goBin, g, land)
		}
		ok = true
	}
	if !ok {
		t.Errorf("no converted layer holds %s", goBin)
	}
}

func trimSlash(s string) string {
	for len(s) > 0 && s[0] == '/' {
		s = s[1:]
	}
	return s
}

func tarNames(open func() (io.ReadCloser, error)) ([]string, error) {
	rc, err := open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var names []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return names, nil
		}
		if err != nil {
			return nil, err
		}
		names = append(names, trimSlash(h.Name))
	}
}

// TestPrefetchRecordMirrored records a profile of an image named by a host
// that does not resolve, mirrored to the harness registry: with
// --registry-config naming a configuration whose [registry.mirrors] has
// the mirror, the pull and the --resolve manifest read both go to the
// mirror, and the profile is tied to the eStargz image and the gzip image
// it was converted from.
func TestPrefetchRecordMirrored(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir := t.TempDir()
	access := filepath.Join(dir, "access")
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithLazybaseConfig("access_record_dir = \""+access+"\"\n"),
		harness.WithRegistryMirror(unresolvableHost, harness.MirrorsTable),
	)
	_, golang := publishAll(ctx, t, s)
	ref := unresolvableHost + "/" + repoGolang + ":" + tagEStargz
	cfg := filepath.Join(dir, "registry.toml")
	toml := "[registry.mirrors]\n\"" + unresolvableHost + "\" = [{ host = \"" + s.Registry.Host() + "\" }]\n"
	if err := os.WriteFile(cfg, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}

	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "lazybase")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/lazybase")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	profile := filepath.Join(dir, "profile.json")
	out, err := exec.CommandContext(ctx, bin, "prefetch", "record", "--image", ref, "--registry-config", cfg,
		"--containerd", s.Containerd.Address, "--namespace", s.Containerd.Namespace,
		"--snapshotter", harness.LazySnapshotterName, "--access-dir", access, "-o", profile,
		"--", "go", "version").CombinedOutput()
	if err != nil {
		t.Fatalf("prefetch record --registry-config: %v\n%s", err, out)
	}
	p, err := prefetch.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	esgz, err := golang.estargz.Digest()
	if err != nil {
		t.Fatal(err)
	}
	src, err := golang.gzip.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if p.Image != ref || p.Digest != esgz.String() || p.SourceDigest != src.String() {
		t.Errorf("profile of %s at %s from %s, want %s at %s from %s", p.Image, p.Digest, p.SourceDigest, ref, esgz, src)
	}
	for _, l := range p.Layers {
		if l.SourceDigest == "" || l.Size == 0 {
			t.Errorf("layer %s not resolved: source %q, size %d", l.Digest, l.SourceDigest, l.Size)
		}
	}
}

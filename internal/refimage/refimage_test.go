package refimage

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
)

func TestAptMirrorFindsTheSuiteInDeb822AndOneLineSources(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "sources.list.d"), 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("sources.list.d/a.sources", `Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Enabled: no

Types: deb-src deb
# comment
URIs: http://mirror.example/debian/
Suites: bookworm bookworm-updates
Components: main
`)
	write("sources.list.d/other.list.disabled", "deb http://ignored.example/debian bookworm main\n")
	if got, err := aptMirror(dir, "bookworm"); err != nil || got != "http://mirror.example/debian" {
		t.Fatalf("deb822: got %q, %v", got, err)
	}
	write("sources.list", "# deb http://commented.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main\n")
	if got, err := aptMirror(dir, "bookworm"); err != nil || got != "http://one.example/debian" {
		t.Fatalf("one-line: got %q, %v", got, err)
	}
	if _, err := aptMirror(dir, "trixie"); err == nil {
		t.Fatal("no error for a suite without a mirror")
	}
}

func TestBuildRejectsUnknownKindAndNonHTTPMirror(t *testing.T) {
	if _, err := Build(context.Background(), Kind("alpine"), WithCacheDir(t.TempDir()), WithMirror("http://x.example/debian")); err == nil {
		t.Error("unknown kind accepted")
	}
	if _, err := Build(context.Background(), Debian, WithMirror("ftp://x.example")); err == nil {
		t.Error("ftp mirror accepted")
	}
}

// needBuilder skips unless reference images can be built here.
func needBuilder(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("building reference images needs root (debootstrap)")
	}
	if _, err := findDebootstrap(); err != nil {
		t.Skipf("building reference images needs debootstrap: %v", err)
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("building the golang-like image needs the go command")
	}
}

// tarStats reads a layer's uncompressed tar, checks its diffID and returns
// its size, non-directory entries and names, and the contents of the files
// named in keep.
func tarStats(t *testing.T, l v1.Layer, keep ...string) (int64, int, map[string]*tar.Header, map[string][]byte) {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	h := sha256.New()
	cr := &countingHash{h: h}
	tr := tar.NewReader(io.TeeReader(rc, cr))
	files := 0
	names := map[string]*tar.Header{}
	kept := map[string][]byte{}
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		names[hdr.Name] = hdr
		if contains(keep, hdr.Name) {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			kept[hdr.Name] = b
		}
		if hdr.Typeflag != tar.TypeDir {
			files++
		}
	}
	if _, err := io.Copy(io.Discard, io.TeeReader(rc, cr)); err != nil {
		t.Fatal(err)
	}
	diffID, _ := l.DiffID()
	if got := hex.EncodeToString(h.Sum(nil)); got != diffID.Hex {
		t.Errorf("layer diffID %s, content hashes to %s", diffID, got)
	}
	return cr.n, files, names, kept
}

func TestBuildGolangGivesACachedTwoLayerOCIImage(t *testing.T) {
	needBuilder(t)
	ctx := context.Background()
	start := time.Now()
	img, err := Build(ctx, Golang)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("golang-like image %s in %s (%v)", img.Digest, img.Dir, time.Since(start))

	start = time.Now()
	again, err := Build(ctx, Golang)
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("cached build took %v, want well under a second", d)
	} else {
		t.Logf("cached build took %v", d)
	}
	if again.Digest != img.Digest || again.Dir != img.Dir {
		t.Errorf("second build gave %s in %s, first %s in %s", again.Digest, again.Dir, img.Digest, img.Dir)
	}
	if d, err := again.Image.Digest(); err != nil || d != img.Digest {
		t.Errorf("opened image digest %s (%v), want %s", d, err, img.Digest)
	}

	deb, err := Build(ctx, Debian)
	if err != nil {
		t.Fatal(err)
	}

	start = time.Now()
	if err := validate.Image(img.Image); err != nil {
		t.Fatalf("validate.Image: %v", err)
	}
	t.Logf("validate.Image took %v (too slow for every cache hit)", time.Since(start))
	mt, _ := img.Image.MediaType()
	m, err := img.Image.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if mt != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON {
		t.Errorf("media types %s / %s, want OCI", mt, m.Config.MediaType)
	}
	cfg, err := img.Image.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != runtime.GOARCH {
		t.Errorf("platform %s/%s", cfg.OS, cfg.Architecture)
	}
	if !containsPrefix(cfg.Config.Env, "PATH=/usr/local/go/bin:") || !contains(cfg.Config.Env, "GOROOT=/usr/local/go") {
		t.Errorf("env %v", cfg.Config.Env)
	}
	if len(cfg.History) < 2 {
		t.Errorf("history %v", cfg.History)
	}
	layers, err := img.Image.Layers()
	if err != nil || len(layers) != 2 {
		t.Fatalf("%d layers (%v), want 2", len(layers), err)
	}
	debLayers, err := deb.Image.Layers()
	if err != nil || len(debLayers) != 1 {
		t.Fatalf("debian: %d layers (%v), want 1", len(debLayers), err)
	}
	d0, _ := layers[0].Digest()
	dd, _ := debLayers[0].Digest()
	if d0 != dd {
		t.Errorf("golang base layer %s, debian layer %s", d0, dd)
	}
	var total int64
	var files int
	for i, l := range layers {
		if mt, _ := l.MediaType(); mt != types.OCILayer {
			t.Errorf("layer %d media type %s", i, mt)
		}
		n, f, names, kept := tarStats(t, l, "etc/shadow")
		shadow := string(kept["etc/shadow"])
		total += n
		files += f
		t.Logf("layer %d: %d bytes uncompressed, %d files", i, n, f)
		switch i {
		case 0:
			for _, want := range []string{"etc/debian_version", "usr/bin/bash", "var/lib/dpkg/status", "var/lib/apt/lists/"} {
				if names[want] == nil {
					t.Errorf("debian layer lacks %s", want)
				}
			}
			for name, h := range names {
				if strings.HasPrefix(name, "var/lib/apt/lists/") && h.Typeflag == tar.TypeReg {
					t.Errorf("debian layer keeps apt list %s", name)
				}
				if strings.HasPrefix(name, "var/log/") && h.Typeflag == tar.TypeReg {
					t.Errorf("debian layer keeps log %s", name)
				}
				if strings.HasPrefix(name, "var/cache/apt/archives/") && strings.HasSuffix(name, ".deb") {
					t.Errorf("debian layer keeps package %s", name)
				}
				if name == "etc/shadow" && !strings.Contains(shadow, ":"+strconv.FormatInt(Epoch.Unix()/86400, 10)+":") {
					t.Errorf("etc/shadow does not date password changes at the epoch:\n%s", shadow)
				}
				if h.ModTime.After(Epoch) {
					t.Errorf("%s: mtime %v after the epoch", name, h.ModTime)
				}
			}
		case 1:
			if h := names["usr/local/go/bin/go"]; h == nil || h.Typeflag != tar.TypeReg || h.Mode&0o111 == 0 {
				t.Errorf("go layer: usr/local/go/bin/go is %+v", h)
			}
			if names["usr/local/go/VERSION"] == nil {
				t.Error("go layer lacks usr/local/go/VERSION")
			}
		}
	}
	if total < minGolangBytes || files < minGolangFiles {
		t.Errorf("golang-like image has %d bytes and %d files, want at least %d and %d", total, files, minGolangBytes, minGolangFiles)
	}
	if m.Annotations[AnnotationUncompressedSize] != strconv.FormatInt(total, 10) || m.Annotations[AnnotationFiles] != strconv.Itoa(files) {
		t.Errorf("annotations %v, counted %d bytes %d files", m.Annotations, total, files)
	}
}

// TestBuildRebuildsADamagedCachedImageOnce copies the cache into a new
// directory, damages the golang-like image there and builds it twice at
// once: the damage is found, one build rebuilds it (from the cached
// debian-like image) and both get the original digest.
func TestBuildRebuildsADamagedCachedImageOnce(t *testing.T) {
	needBuilder(t)
	ctx := context.Background()
	img, err := Build(ctx, Golang)
	if err != nil {
		t.Fatal(err)
	}
	deb, err := Build(ctx, Debian)
	if err != nil {
		t.Fatal(err)
	}
	cache := t.TempDir()
	for _, dir := range []string{filepath.Dir(deb.Dir), filepath.Dir(img.Dir)} {
		if out, err := exec.Command("cp", "-a", dir, cache).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v: %s", err, out)
		}
	}
	m, _ := img.Image.Manifest()
	damaged := filepath.Join(cache, filepath.Base(filepath.Dir(img.Dir)), "layout", "blobs", "sha256", m.Layers[1].Digest.Hex)
	if err := os.Truncate(damaged, m.Layers[1].Size/2); err != nil {
		t.Fatal(err)
	}
	// A killed build leaves its directory behind: it must go.
	stale := filepath.Join(cache, ".tmp-"+filepath.Base(filepath.Dir(img.Dir))+"-killed")
	if err := os.MkdirAll(filepath.Join(stale, "layout"), 0o755); err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	results := make([]*Image, 2)
	errs := make([]error, 2)
	for i := range results {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i], errs[i] = Build(ctx, Golang, WithCacheDir(cache))
		}()
	}
	wg.Wait()
	for i := range results {
		if errs[i] != nil {
			t.Fatalf("build %d: %v", i, errs[i])
		}
		if results[i].Digest != img.Digest {
			t.Errorf("rebuilt image %s, original %s: the Go layer is not reproducible", results[i].Digest, img.Digest)
		}
	}
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale build directory still there: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(cache, ".tmp-*"))
	if len(left) != 0 {
		t.Errorf("build directories left: %v", left)
	}
}

func containsPrefix(list []string, p string) bool {
	for _, s := range list {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

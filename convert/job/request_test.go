package job_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/sirupsen/logrus"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// TestRunPrefetchAndPlatformOfImage converts a single image with a
// prefetch list and its own platform selected (the prefetched file comes
// first, behind the prefetch landmark), then with another platform
// (refused, nothing written), then to a digest (refused before converting).
func TestRunPrefetchAndPlatformOfImage(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(8, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/pf/app:v1", reg.Host+"/pf/app:out"
	testimage.PushRef(t, src, img)
	list := filepath.Join(t.TempDir(), "prefetch.json")
	if err := os.WriteFile(list, []byte(`{"version":1,"files":["etc/hostname"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	pf, err := prefetch.Load(list)
	if err != nil {
		t.Fatal(err)
	}
	rep := mustRun(ctx, t, src, dst, func(r *job.Request) {
		r.Prefetch, r.Platforms = pf, []v1.Platform{{OS: "linux", Architecture: "amd64"}}
	})
	if got := rep.Images[0].Layers[1].PrefetchFiles; got != 1 {
		t.Errorf("second layer: %d prefetched files, want 1", got)
	}
	v := verify(ctx, t, reg.Host, dst, rep)
	if v.Layers[1].Landmark != estargz.PrefetchLandmark {
		t.Errorf("second layer: landmark %s", v.Layers[1].Landmark)
	}

	_, err = run(ctx, t, src, reg.Host+"/pf/app:arm", func(r *job.Request) { r.Platforms = []v1.Platform{{OS: "linux", Architecture: "arm64"}} })
	if err == nil || !strings.Contains(err.Error(), "linux/amd64") || !strings.Contains(err.Error(), src) {
		t.Errorf("platform mismatch: %v", err)
	}
	if testimage.TagExists(t, reg.Host+"/pf/app:arm") {
		t.Error("tag written for a platform mismatch")
	}
	d, _ := img.Digest()
	converted := 0
	_, err = run(ctx, t, src, reg.Host+"/pf/app@"+d.String(), func(r *job.Request) {
		r.Progress = func(convert.Event) { converted++ }
	})
	if err == nil || !strings.Contains(err.Error(), "must be a tag") || converted != 0 {
		t.Errorf("digest destination: %v (%d layer events)", err, converted)
	}
}

// TestRunProfileAppliesOnlyToItsImage converts with a prefetch profile of
// this image (its file is prefetched) and of another image (ignored, with
// a warning in the context's log).
func TestRunProfileAppliesOnlyToItsImage(t *testing.T) {
	isolate(t)
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(9, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/pf/prof:v1"
	testimage.PushRef(t, src, img)
	layers, _ := img.Layers()
	second, _ := layers[1].Digest()
	d, _ := img.Digest()
	for _, tc := range []struct {
		name, digest string
		want         int
	}{
		{"this image", d.String(), 1},
		{"another image", "sha256:" + strings.Repeat("ab", 32), 0},
	} {
		p := &prefetch.Profile{
			Version: prefetch.ProfileVersion,
			Kind:    prefetch.ProfileKind,
			Digest:  tc.digest,
			Layers: []prefetch.Layer{{Digest: second.String(), Runs: 1, Files: []prefetch.File{
				{Path: "etc/hostname", Size: 1, Count: 1, RankSum: 0},
			}}},
		}
		var logs bytes.Buffer
		logger := logrus.New()
		logger.SetOutput(&logs)
		ctx := log.WithLogger(context.Background(), logrus.NewEntry(logger))
		rep := mustRun(ctx, t, src, reg.Host+"/pf/prof:out", func(r *job.Request) { r.Prefetch = p })
		if got := rep.Images[0].Layers[1].PrefetchFiles; got != tc.want {
			t.Errorf("%s: %d prefetched files, want %d", tc.name, got, tc.want)
		}
		if warned := strings.Contains(logs.String(), "another image"); warned != (tc.want == 0) {
			t.Errorf("%s: warning about another image: %v\n%s", tc.name, warned, logs.String())
		}
	}
}

// TestRunRefusesOwnSource converts an image onto the name it was read by:
// refused with ErrOverwritesSource (the source keeps its tag, layouts keep
// their index.json) unless Overwrite, which moves the tag.
func TestRunRefusesOwnSource(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(41, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	srcDigest, _ := img.Digest()
	testimage.PushRef(t, reg.Host+"/lib/self:v1", img)
	testimage.PushRef(t, reg.Host+"/lib/self:latest", img)
	t.Chdir(t.TempDir())
	mustRun(ctx, t, reg.Host+"/lib/self:v1", "oci:lay:v1")
	if err := os.MkdirAll("single", 0o755); err != nil {
		t.Fatal(err)
	}
	mustRun(ctx, t, reg.Host+"/lib/self:v1", "oci:single:only")
	layoutIndex := func(dir string) string {
		b, err := os.ReadFile(filepath.Join(dir, "index.json"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, tc := range []struct {
		name     string
		src, dst string
	}{
		{"registry-same-tag", reg.Host + "/lib/self:v1", reg.Host + "/lib/self:v1"},
		{"registry-implicit-latest", reg.Host + "/lib/self", reg.Host + "/lib/self:latest"},
		{"layout-same-tag", "oci:lay:v1", "oci:lay:v1"},
		{"layout-other-spelling", "oci:lay:v1", "oci:./sub/../lay:v1"},
		{"layout-untagged-source-resolved", "oci:single", "oci:single:only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.MkdirAll("sub", 0o755)
			beforeLay, beforeSingle := layoutIndex("lay"), layoutIndex("single")
			_, err := run(ctx, t, tc.src, tc.dst)
			if !errors.Is(err, job.ErrOverwritesSource) || !strings.Contains(err.Error(), "is the source") {
				t.Fatalf("converting %s to %s: %v, want ErrOverwritesSource", tc.src, tc.dst, err)
			}
			if d, _ := testimage.RemoteImage(t, reg.Host+"/lib/self:v1").Digest(); d != srcDigest {
				t.Errorf("source tag moved to %s", d)
			}
			if layoutIndex("lay") != beforeLay || layoutIndex("single") != beforeSingle {
				t.Errorf("a layout's index.json changed")
			}
		})
	}
	rep := mustRun(ctx, t, reg.Host+"/lib/self:v1", reg.Host+"/lib/self:v1", func(r *job.Request) { r.Overwrite = true })
	if d, _ := testimage.RemoteImage(t, reg.Host+"/lib/self:v1").Digest(); d.String() != rep.Digest || d == srcDigest {
		t.Errorf("after Overwrite the tag names %s, report says %s (source %s)", d, rep.Digest, srcDigest)
	}
	mustRun(ctx, t, reg.Host+"/lib/self:latest", reg.Host+"/lib/self:esgz")
}

// TestRunTamperedLayoutConfig converts a layout whose config blob was
// changed after it was written: the job fails naming the config.
func TestRunTamperedLayoutConfig(t *testing.T) {
	isolate(t)
	img, err := testimage.SeedImage(42, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{imageio.AnnotationRefName: "v1"})); err != nil {
		t.Fatal(err)
	}
	cfg, _ := img.ConfigName()
	cp := filepath.Join(dir, "blobs", "sha256", cfg.Hex)
	b, err := os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cp, bytes.Replace(b, []byte(`"amd64"`), []byte(`"arm64"`), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	_, err = run(context.Background(), t, "oci:"+dir+":v1", "oci:"+out+":v1")
	if err == nil || !strings.Contains(err.Error(), cfg.String()) || !strings.Contains(err.Error(), "digest mismatch") {
		t.Fatalf("converting a tampered config: %v, want a digest mismatch naming %s", err, cfg)
	}
	if _, err := os.Stat(filepath.Join(out, "index.json")); err == nil {
		t.Errorf("destination written from a tampered source")
	}
}

// TestRunTamperedRegistryConfig converts from a registry that serves other
// bytes for the config blob: the job fails naming the source and the
// config, and the destination is not written.
func TestRunTamperedRegistryConfig(t *testing.T) {
	isolate(t)
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(43, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/lib/tampered:v1"
	testimage.PushRef(t, src, img)
	cfg, _ := img.ConfigName()
	reg.Corrupt(cfg)
	dst := reg.Host + "/lib/tampered:esgz"
	_, err = run(context.Background(), t, src, dst)
	if err == nil || !strings.Contains(err.Error(), cfg.String()) || !strings.Contains(err.Error(), src) {
		t.Fatalf("converting with a tampered config: %v, want an error naming %s and %s", err, src, cfg)
	}
	reg.Corrupt(v1.Hash{})
	if testimage.TagExists(t, dst) {
		t.Error("destination written from a tampered source")
	}
}

// TestRunWithCallerLayersAndUpToDate runs jobs the way the mirror does:
// with the caller's LayerFunc (given each layer's prefetch files) and an
// UpToDate check. An up-to-date destination is reported with its digest and
// nothing is converted or written.
func TestRunWithCallerLayersAndUpToDate(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(44, testimage.LinuxARM64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/own/app:v1", reg.Host+"/own/app:esgz"
	testimage.PushRef(t, src, img)
	list := &prefetch.List{Version: prefetch.ListVersion, Files: []string{"etc/hostname"}}
	conv, err := convert.New(convert.WithTempDir(t.TempDir()), convert.WithPrefetch(list))
	if err != nil {
		t.Fatal(err)
	}
	defer conv.Close()
	var (
		calls atomic.Int64
		mu    sync.Mutex
		files [][]string
	)
	layer := func(ctx context.Context, l v1.Layer, desc v1.Descriptor, diffID v1.Hash, f []string) (convert.ConvertedLayer, error) {
		calls.Add(1)
		mu.Lock()
		files = append(files, f)
		mu.Unlock()
		return conv.LayerFunc()(ctx, l, desc, diffID)
	}
	upToDate := func(ctx context.Context, d imageio.Ref, s *imageio.Source) (string, bool, error) {
		m, err := remoteImageOrNil(t, d.String())
		if m == nil || err != nil {
			return "", false, err
		}
		man, _ := m.Manifest()
		dg, _ := m.Digest()
		return dg.String(), man.Annotations[convert.AnnotationSourceManifest] == s.Descriptor.Digest.String(), nil
	}
	req := func(r *job.Request) {
		r.Layer, r.UpToDate, r.Prefetch = layer, upToDate, list
		// A single image of another platform than selected is converted.
		r.Platforms, r.AnyImagePlatform = []v1.Platform{{OS: "linux", Architecture: "amd64"}}, true
	}
	rep := mustRun(ctx, t, src, dst, req)
	if rep.UpToDate || calls.Load() != 2 || rep.Images[0].Layers[1].PrefetchFiles != 1 {
		t.Fatalf("first run: up to date %v, %d layer calls, report %+v", rep.UpToDate, calls.Load(), rep.Images)
	}
	if len(files) != 2 || strings.Join(files[0], ",")+strings.Join(files[1], ",") != "etc/hostnameetc/hostname" {
		t.Errorf("prefetch files given to the LayerFunc: %q", files)
	}
	checkImage(t, testimage.RemoteImage(t, dst), rep.Images[0])
	again := mustRun(ctx, t, src, dst, req)
	if !again.UpToDate || again.Digest != rep.Digest || calls.Load() != 2 || len(again.Images) != 0 {
		t.Errorf("second run: up to date %v, digest %s (first %s), %d layer calls", again.UpToDate, again.Digest, rep.Digest, calls.Load())
	}
	b, err := json.Marshal(again)
	if err != nil || strings.Contains(string(b), "pToDate") {
		t.Errorf("UpToDate in the JSON report: %s (%v)", b, err)
	}
}

// remoteImageOrNil returns the image ref names, or nil if there is none.
func remoteImageOrNil(t *testing.T, ref string) (v1.Image, error) {
	if !testimage.TagExists(t, ref) {
		return nil, nil
	}
	return testimage.RemoteImage(t, ref), nil
}

// TestParsePlatforms checks the platform specs a request is built from.
func TestParsePlatforms(t *testing.T) {
	got, err := job.ParsePlatforms("linux/arm64/v8,linux/s390x", " ", "linux/amd64")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got[0].String() != "linux/arm64/v8" || got[1].String() != "linux/s390x" || got[2].String() != "linux/amd64" {
		t.Errorf("parsed %v", got)
	}
	for _, bad := range []string{"linux", "/amd64", "linux/"} {
		if p, err := job.ParsePlatforms(bad); err == nil || !strings.Contains(err.Error(), "os/arch") && !strings.Contains(err.Error(), bad) {
			t.Errorf("%q: %v, %v; want an error naming it", bad, p, err)
		}
	}
}

// TestRunRefusesBadRequests checks the requests refused before any I/O.
func TestRunRefusesBadRequests(t *testing.T) {
	isolate(t)
	for _, tc := range []struct {
		name   string
		change func(*job.Request)
		want   string
	}{
		{"format", func(r *job.Request) { r.Format = "lz4" }, "lz4"},
		{"level", func(r *job.Request) { r.Level = 12 }, "level"},
		{"jobs", func(r *job.Request) { r.Jobs = -1 }, "jobs"},
		{"destination digest", func(r *job.Request) { r.Destination = "127.0.0.1:1/x@sha256:" + strings.Repeat("0", 64) }, "must be a tag"},
		{"source path", func(r *job.Request) { r.Source = "127.0.0.1:1/lib//x:v1" }, "empty path component"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := run(context.Background(), t, "127.0.0.1:1/x:v1", "127.0.0.1:1/x:out", tc.change)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to name %s", err, tc.want)
			}
			if rep == nil || rep.SourceDigest != "" {
				t.Errorf("report %+v, want one without a source digest", rep)
			}
		})
	}
}

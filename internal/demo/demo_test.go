package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
)

// checkLayers checks what every report holds for each layer.
func checkLayers(t *testing.T, rep *Report, wantVerified bool) {
	t.Helper()
	if len(rep.Layers) != 2 || rep.Sample.Layers != 2 {
		t.Fatalf("%d layers, sample of %d, want 2", len(rep.Layers), rep.Sample.Layers)
	}
	var tot job.Totals
	for i, l := range rep.Layers {
		if l.Digest == l.SourceDigest || l.Size <= 0 || l.SourceSize <= 0 || l.Reused {
			t.Errorf("layer %d: %s (%d bytes) from %s (%d bytes), reused %v", i+1, l.Digest, l.Size, l.SourceDigest, l.SourceSize, l.Reused)
		}
		if got := float64(l.Size) / float64(l.SourceSize); l.Ratio != got {
			t.Errorf("layer %d: ratio %v, want %v", i+1, l.Ratio, got)
		}
		if _, err := digest.Parse(l.TOCDigest); err != nil {
			t.Errorf("layer %d: TOC digest %q: %v", i+1, l.TOCDigest, err)
		}
		// Opening lazily reads the footer and the TOC: a few requests, a
		// part of the blob.
		if l.OpenRequests < 1 || l.OpenRequests > 4 || l.OpenBytes <= 0 || l.OpenBytes >= l.Size {
			t.Errorf("layer %d: opened with %d requests, %d of %d bytes", i+1, l.OpenRequests, l.OpenBytes, l.Size)
		}
		if l.Landmark != estargz.NoPrefetchLandmark {
			t.Errorf("layer %d: landmark %q, want %q (no prefetch list)", i+1, l.Landmark, estargz.NoPrefetchLandmark)
		}
		if l.EStargzVerified != wantVerified {
			t.Errorf("layer %d: VerifyEStargz ran: %v, want %v", i+1, l.EStargzVerified, wantVerified)
		}
		tot.SourceBytes += l.SourceSize
		tot.OutputBytes += l.Size
		tot.SourceUncompressedSize += l.SourceUncompressedSize
	}
	got := rep.Conversion.Totals
	if got.SourceBytes != tot.SourceBytes || got.OutputBytes != tot.OutputBytes || got.Layers != 2 || got.Images != 1 ||
		got.SourceUncompressedSize != tot.SourceUncompressedSize || tot.SourceBytes != rep.Sample.CompressedSize ||
		tot.SourceUncompressedSize != rep.Sample.UncompressedSize {
		t.Errorf("totals %+v, layers sum to %+v, sample %+v", got, tot, rep.Sample)
	}
	if rep.Digest.String() != rep.Conversion.Digest || rep.Conversion.Source != rep.Source || rep.Conversion.Destination != rep.Destination {
		t.Errorf("report %s -> %s@%s, conversion %s -> %s@%s", rep.Source, rep.Destination, rep.Digest,
			rep.Conversion.Source, rep.Conversion.Destination, rep.Conversion.Digest)
	}
	if !strings.HasPrefix(rep.Registry, "127.0.0.1:") || rep.Source != rep.Registry+"/demo/sample:gzip" ||
		!strings.HasPrefix(rep.Destination, rep.Registry+"/demo/sample:") {
		t.Errorf("registry %s, source %s, destination %s", rep.Registry, rep.Source, rep.Destination)
	}
}

func TestRunSmallVerifiesEveryLayer(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	var stages []Stage
	rep, err := Run(context.Background(), WithSmall(true), WithNotify(func(s Stage, _ *Report) { stages = append(stages, s) }))
	if err != nil {
		t.Fatal(err)
	}
	checkLayers(t, rep, true)
	if fmt.Sprint(stages) != fmt.Sprint([]Stage{StageRegistry, StagePublished}) {
		t.Errorf("stages %v", stages)
	}
	// 3 files under /etc and 200 generated in the base, 50 in the top.
	if rep.Sample.Files != 253 || rep.Sample.SourceDir != "" || rep.Format != convert.FormatEStargz {
		t.Errorf("sample %+v, format %s", rep.Sample, rep.Format)
	}
	// The base: etc/ with 3 files and a symlink, many/ with 2
	// directories of 200 files (testimage.ManyFiles), and the landmark.
	if want := 1 + 4 + 1 + 2 + 200 + 1; rep.Layers[0].Entries != want {
		t.Errorf("base layer: %d entries, want %d", rep.Layers[0].Entries, want)
	}
}

func TestRunSourceDirZstdChunked(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
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
	rep, err := Run(context.Background(), WithSource(src), WithFormat(convert.FormatZstdChunked))
	if err != nil {
		t.Fatal(err)
	}
	// VerifyEStargz reads gzip only: zstd layers are checked by digest.
	checkLayers(t, rep, false)
	if rep.Sample.SourceDir != src || rep.Sample.Files != 203+30 || !strings.HasSuffix(rep.Destination, ":zstdchunked") {
		t.Errorf("sample %+v, destination %s", rep.Sample, rep.Destination)
	}
	// usr/local/go/src, its 4 package directories, 30 files, the symlink
	// and the landmark.
	if want := 4 + 4 + 30 + 1 + 1; rep.Layers[1].Entries != want {
		t.Errorf("second layer: %d entries, want %d", rep.Layers[1].Entries, want)
	}
}

// TestRunRefusesBadOptions checks that Run refuses options that exclude
// each other, bad values, and a source directory that does not exist.
func TestRunRefusesBadOptions(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	absent := filepath.Join(t.TempDir(), "absent")
	for _, tc := range []struct {
		name string
		opts []Option
		want string
	}{
		{"small with a source", []Option{WithSmall(true), WithSource(t.TempDir())}, "source directory"},
		{"zero max bytes", []Option{WithMaxBytes(0)}, "must be positive"},
		{"negative jobs", []Option{WithSmall(true), WithJobs(-1)}, "must not be negative"},
		{"absent source", []Option{WithSource(absent)}, absent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Run(context.Background(), tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to name %s", err, tc.want)
			}
		})
	}
}

// TestVerifyRefusesReportNotMatchingRegistry converts an image with the
// convert job and checks that Verify accepts the job's report and refuses
// a report that does not match what the registry holds.
func TestVerifyRefusesReportNotMatchingRegistry(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(3, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Push(t, "demo/app:gzip", img).String()
	dst := reg.Host + "/demo/app:estargz"
	client, err := imageio.New()
	if err != nil {
		t.Fatal(err)
	}
	good, err := job.Run(ctx, job.Request{Source: src, Destination: dst, Client: client})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Verify(ctx, client, reg.Host, dst, good)
	if err != nil {
		t.Fatalf("the job's own report: %v", err)
	}
	if len(rep.Layers) != 2 || rep.Layers[0].Landmark != estargz.NoPrefetchLandmark || !rep.Layers[1].EStargzVerified {
		t.Errorf("verified layers %+v", rep.Layers)
	}
	lie := func(change func(*job.Report)) *job.Report {
		b, err := json.Marshal(good)
		if err != nil {
			t.Fatal(err)
		}
		var c job.Report
		if err := json.Unmarshal(b, &c); err != nil {
			t.Fatal(err)
		}
		change(&c)
		return &c
	}
	for _, tc := range []struct {
		name string
		rep  *job.Report
		want string
	}{
		{"wrong manifest digest", lie(func(c *job.Report) { c.Digest = "sha256:" + strings.Repeat("0", 64) }), "registry holds"},
		{"wrong TOC digest", lie(func(c *job.Report) { c.Images[0].Layers[1].TOCDigest = digest.FromString("x").String() }),
			"conversion reported " + digest.FromString("x").String()},
		{"a layer too few", lie(func(c *job.Report) { c.Images[0].Layers = c.Images[0].Layers[:1] }), "conversion reported 1 layers"},
		{"two images", lie(func(c *job.Report) { c.Images = append(c.Images, c.Images[0]) }), "2 images, want 1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Verify(ctx, client, reg.Host, dst, tc.rep)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to name %s", err, tc.want)
			}
		})
	}
}

package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/lazybase/lazybase/internal/refimage"
	"github.com/lazybase/lazybase/internal/testimage"
)

// TestMain lets the test binary play the child process convbench re-executes.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && strings.HasPrefix(os.Args[1], "-child-") {
		if err := run(context.Background(), os.Args[1:], os.Stdout, os.Stderr); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestMedianIndex(t *testing.T) {
	for _, c := range []struct {
		xs   []float64
		want int
	}{
		{[]float64{5}, 0},
		{[]float64{3, 1, 2}, 2},
		{[]float64{9, 1, 4, 2}, 3},
	} {
		if got := medianIndex(c.xs); got != c.want {
			t.Errorf("medianIndex(%v) = %d, want %d", c.xs, got, c.want)
		}
	}
}

// TestMeasureSmallImage runs both halves of the benchmark, the child process
// included, on a small synthetic image.
func TestMeasureSmallImage(t *testing.T) {
	img, err := testimage.SeedImage(7, v1.Platform{OS: "linux", Architecture: "amd64"}, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "layout")
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	dgst, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	ref := &refimage.Image{Kind: "seed", Dir: dir, Digest: dgst, Image: img}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cfg := &config{runs: 2, baselineRuns: 1, registry: true}
	var progress bytes.Buffer
	m, err := measure(context.Background(), cfg, self, ref, &progress)
	if err != nil {
		t.Fatalf("%v\n%s", err, progress.String())
	}
	man, _ := img.Manifest()
	if m.layers != len(man.Layers) || len(m.baseLayers) != m.layers || len(m.lazyLayers) != m.layers {
		t.Errorf("layers: %d, baseline %d, lazybase %d, want %d", m.layers, len(m.baseLayers), len(m.lazyLayers), len(man.Layers))
	}
	var want int64
	layers, _ := img.Layers()
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(rc)
		rc.Close()
		if err != nil {
			t.Fatal(err)
		}
		want += int64(len(b))
	}
	if m.input != want {
		t.Errorf("input %d bytes, want %d", m.input, want)
	}
	if m.baseOutput <= 0 || m.lazyOutput <= 0 || m.baseSeconds <= 0 || m.lazySeconds <= 0 {
		t.Errorf("empty figures: %+v", m)
	}
	if m.lazyRSS < 1<<20 || m.lazyRSS > 4<<30 {
		t.Errorf("peak RSS %d bytes is implausible", m.lazyRSS)
	}
	if len(m.lazyDigests) != 1 || len(m.lazyRunTimes) != 2 {
		t.Errorf("lazybase runs %v gave digests %v", m.lazyRunTimes, m.lazyDigests)
	}
	if m.job == nil || len(m.jobRunTimes) != 2 || m.job.Seconds <= 0 || m.job.OutputBytes != m.lazyOutput {
		t.Errorf("registry to registry runs %v, median %+v, want 2 runs of %d output bytes", m.jobRunTimes, m.job, m.lazyOutput)
	}
	// The job pushes exactly what the library makes.
	if len(m.jobDigests) != 1 || !m.jobDigests[m.lazyDigest] {
		t.Errorf("registry to registry pushed %v, the library made %s", m.jobDigests, m.lazyDigest)
	}
	var out bytes.Buffer
	report(&out, cfg, []*measurement{m})
	for _, want := range []string{"seed-like", "speed", "size", "peak RSS", "targets (issue 2)", "registry to registry", "target (issue 16)"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
	t.Logf("\n%s", out.String())
}

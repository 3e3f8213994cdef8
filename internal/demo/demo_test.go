package demo

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

// libraryConvert converts with the convert package and writes with
// imageio, as 'lazybase convert' does, without its progress display.
func libraryConvert(t *testing.T, format convert.Format) ConvertFunc {
	return func(ctx context.Context, src, dst string) (*Conversion, error) {
		client, err := imageio.New()
		if err != nil {
			return nil, err
		}
		srcRef, err := client.ParseRef(src)
		if err != nil {
			return nil, err
		}
		dstRef, err := client.ParseRef(dst)
		if err != nil {
			return nil, err
		}
		conv, err := convert.New(convert.WithFormat(format))
		if err != nil {
			return nil, err
		}
		defer conv.Close()
		source, err := client.Open(ctx, srcRef)
		if err != nil {
			return nil, err
		}
		t0 := time.Now()
		res, err := conv.Image(ctx, source.Image)
		if err != nil {
			return nil, err
		}
		c := &Conversion{Digest: res.Digest, ConvertSeconds: time.Since(t0).Seconds()}
		if _, err := client.Write(ctx, dstRef, res.Image, res.Platform); err != nil {
			return nil, err
		}
		for _, l := range res.Layers {
			c.Layers = append(c.Layers, ConvertedLayer{
				SourceDigest: l.Source.Digest, SourceSize: l.Source.Size, SourceUncompressedSize: l.SourceUncompressedSize,
				Digest: l.Output.Digest, Size: l.Output.Size, TOCDigest: l.TOCDigest, Seconds: l.Seconds, Reused: l.Reused,
			})
		}
		return c, nil
	}
}

// checkLayers checks what every report holds for each layer.
func checkLayers(t *testing.T, rep *Report, wantVerified bool) {
	t.Helper()
	if len(rep.Layers) != 2 || rep.Sample.Layers != 2 {
		t.Fatalf("%d layers, sample of %d, want 2", len(rep.Layers), rep.Sample.Layers)
	}
	var tot Totals
	for i, l := range rep.Layers {
		if l.Digest == l.SourceDigest || l.Size <= 0 || l.SourceSize <= 0 || l.Reused {
			t.Errorf("layer %d: %s (%d bytes) from %s (%d bytes), reused %v", i+1, l.Digest, l.Size, l.SourceDigest, l.SourceSize, l.Reused)
		}
		if got := float64(l.Size) / float64(l.SourceSize); l.Ratio != got {
			t.Errorf("layer %d: ratio %v, want %v", i+1, l.Ratio, got)
		}
		if err := l.TOCDigest.Validate(); err != nil {
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
	if rep.Totals.SourceBytes != tot.SourceBytes || rep.Totals.OutputBytes != tot.OutputBytes ||
		rep.Totals.SourceUncompressedSize != tot.SourceUncompressedSize || tot.SourceBytes != rep.Sample.CompressedSize {
		t.Errorf("totals %+v, layers sum to %+v, sample %+v", rep.Totals, tot, rep.Sample)
	}
	if !strings.HasPrefix(rep.Registry, "127.0.0.1:") || rep.Source != rep.Registry+"/demo/sample:gzip" ||
		!strings.HasPrefix(rep.Destination, rep.Registry+"/demo/sample:") {
		t.Errorf("registry %s, source %s, destination %s", rep.Registry, rep.Source, rep.Destination)
	}
}

func TestRunSmallVerifiesEveryLayer(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	var stages []Stage
	rep, err := Run(context.Background(), WithSmall(true), WithConvert(libraryConvert(t, convert.FormatEStargz)),
		WithNotify(func(s Stage, _ *Report) { stages = append(stages, s) }))
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
	// The base: etc/ with 3 files and a symlink, usr/share/demo/ with 16
	// directories of 200 files, and the landmark.
	if want := 1 + 4 + 3 + 16 + 200 + 1; rep.Layers[0].Entries != want {
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
	rep, err := Run(context.Background(), WithSource(src), WithFormat(convert.FormatZstdChunked),
		WithConvert(libraryConvert(t, convert.FormatZstdChunked)))
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

// TestRunRefuses checks bad options and a conversion whose report does
// not match what the registry holds.
func TestRunRefuses(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
	good := libraryConvert(t, convert.FormatEStargz)
	lie := func(change func(*Conversion)) ConvertFunc {
		return func(ctx context.Context, src, dst string) (*Conversion, error) {
			c, err := good(ctx, src, dst)
			if err == nil {
				change(c)
			}
			return c, err
		}
	}
	absent := filepath.Join(t.TempDir(), "absent")
	for _, tc := range []struct {
		name string
		opts []Option
		want string
	}{
		{"no conversion step", []Option{WithSmall(true)}, "WithConvert"},
		{"small with a source", []Option{WithSmall(true), WithSource(t.TempDir()), WithConvert(good)}, "source directory"},
		{"zero max bytes", []Option{WithMaxBytes(0), WithConvert(good)}, "must be positive"},
		{"absent source", []Option{WithSource(absent), WithConvert(good)}, absent},
		{"wrong manifest digest", []Option{WithSmall(true), WithConvert(lie(func(c *Conversion) {
			c.Digest = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("0", 64)}
		}))}, "registry holds"},
		{"wrong TOC digest", []Option{WithSmall(true), WithConvert(lie(func(c *Conversion) {
			c.Layers[1].TOCDigest = digest.FromString("x").String()
		}))}, "conversion reported " + digest.FromString("x").String()},
		{"a layer too few", []Option{WithSmall(true), WithConvert(lie(func(c *Conversion) {
			c.Layers = c.Layers[:1]
		}))}, "conversion reported 1 layers"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Run(context.Background(), tc.opts...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err %v, want it to name %s", err, tc.want)
			}
		})
	}
}

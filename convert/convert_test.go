package convert_test

import (
	"context"
	"encoding/json"
	"io"
	"os"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
	digest "github.com/opencontainers/go-digest"
)

// newConverter returns a Converter with its temporary files under the
// test's directory (unless opts say otherwise), closed, with its error
// checked, when the test ends.
func newConverter(t testing.TB, opts ...convert.Option) *convert.Converter {
	t.Helper()
	c, err := convert.New(append([]convert.Option{convert.WithTempDir(t.TempDir())}, opts...)...)
	if err != nil {
		t.Fatalf("convert.New: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("closing converter: %v", err)
		}
	})
	return c
}

func seedImage(t *testing.T, seed uint64) v1.Image {
	t.Helper()
	img, err := testimage.SeedImage(seed, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// checkConverted verifies everything a converted image promises.
func checkConverted(t *testing.T, src v1.Image, res *convert.ImageResult) {
	t.Helper()
	if err := validate.Image(res.Image); err != nil {
		t.Fatalf("validate.Image: %v", err)
	}
	m, err := res.Image.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	sm, err := src.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	srcDigest, _ := src.Digest()
	if m.MediaType != types.OCIManifestSchema1 || m.Config.MediaType != types.OCIConfigJSON {
		t.Errorf("media types %s / %s, want OCI", m.MediaType, m.Config.MediaType)
	}
	if got := m.Annotations[convert.AnnotationSourceManifest]; got != srcDigest.String() {
		t.Errorf("source manifest annotation %q, want %s", got, srcDigest)
	}
	for k, v := range sm.Annotations {
		if k == convert.AnnotationSourceManifest {
			continue // describes the source; rewritten on every conversion
		}
		if m.Annotations[k] != v {
			t.Errorf("manifest annotation %s=%q lost (got %q)", k, v, m.Annotations[k])
		}
	}
	if d, _ := res.Image.Digest(); d != res.Digest {
		t.Errorf("result digest %s, image digest %s", res.Digest, d)
	}
	cfg, err := res.Image.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	scfg, _ := src.ConfigFile()
	if len(cfg.History) != len(scfg.History) || cfg.Config.Labels["org.example.testimage"] != "yes" ||
		cfg.Architecture != scfg.Architecture || cfg.OS != scfg.OS {
		t.Errorf("config not kept: history %d/%d labels %v platform %s/%s",
			len(cfg.History), len(scfg.History), cfg.Config.Labels, cfg.OS, cfg.Architecture)
	}
	if len(m.Layers) != len(sm.Layers) {
		t.Fatalf("%d layers, source has %d", len(m.Layers), len(sm.Layers))
	}
	for i, desc := range m.Layers {
		if desc.MediaType != types.OCILayer {
			t.Errorf("layer %d media type %s", i, desc.MediaType)
		}
		toc := desc.Annotations[convert.AnnotationTOCDigest]
		if toc == "" || desc.Annotations[convert.AnnotationUncompressedSize] == "" {
			t.Errorf("layer %d lacks annotations: %v", i, desc.Annotations)
		}
		l, err := res.Image.LayerByDigest(desc.Digest)
		if err != nil {
			t.Fatal(err)
		}
		blob := readAll(t, l)
		sr := io.NewSectionReader(bytesReaderAt(blob), 0, int64(len(blob)))
		r, err := estargz.Open(sr)
		if err != nil {
			t.Fatalf("layer %d: estargz.Open: %v", i, err)
		}
		if _, err := r.VerifyTOC(digest.Digest(toc)); err != nil {
			t.Fatalf("layer %d: VerifyTOC: %v", i, err)
		}
		v, err := convert.VerifyEStargz(bytesReaderAt(blob), int64(len(blob)), digest.Digest(toc))
		if err != nil {
			t.Fatalf("layer %d: VerifyEStargz: %v", i, err)
		}
		if v.DiffID.String() != cfg.RootFS.DiffIDs[i].String() {
			t.Errorf("layer %d: diffID %s, config says %s", i, v.DiffID, cfg.RootFS.DiffIDs[i])
		}
		if res.Layers[i].Output.Digest != desc.Digest || res.Layers[i].Source.Digest != sm.Layers[i].Digest {
			t.Errorf("layer %d: result %+v does not match manifest", i, res.Layers[i])
		}
	}
}

type bytesReaderAt []byte

func (b bytesReaderAt) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(b)) {
		return 0, io.EOF
	}
	n := copy(p, b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func readAll(t *testing.T, l v1.Layer) []byte {
	t.Helper()
	rc, err := l.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestImageFromRegistryConvertsAndValidatesWhenPushed converts an image read
// from a registry; the result, pushed back, passes validate.Image.
func TestImageFromRegistryConvertsAndValidatesWhenPushed(t *testing.T) {
	reg := testimage.NewRegistry(t)
	src := seedImage(t, 1)
	ref := reg.Push(t, "base/image:1", src)
	img := reg.Image(t, ref)
	c := newConverter(t)
	res, err := c.Image(context.Background(), img)
	if err != nil {
		t.Fatal(err)
	}
	checkConverted(t, src, res)
	// What went to the registry can be pushed back and validates there too.
	dst := reg.Ref(t, "base/image:esgz")
	if err := remote.Write(dst, res.Image); err != nil {
		t.Fatal(err)
	}
	pushed := reg.Image(t, dst)
	if err := validate.Image(pushed); err != nil {
		t.Fatalf("pushed image: %v", err)
	}
}

// countingLayer counts how a converter reads a layer.
type countingLayer struct {
	v1.Layer
	compressed, uncompressed *atomic.Int64
}

func (l countingLayer) Compressed() (io.ReadCloser, error) {
	l.compressed.Add(1)
	return l.Layer.Compressed()
}

func (l countingLayer) Uncompressed() (io.ReadCloser, error) {
	l.uncompressed.Add(1)
	return l.Layer.Uncompressed()
}

func TestEachBlobReadAndDecompressedOnce(t *testing.T) {
	reg := testimage.NewRegistry(t)
	// Two platforms whose images share their first layer, plus a copy of
	// one image: every distinct blob must be read and decompressed once.
	a := seedImage(t, 7)
	idx, err := testimage.Index(a, seedImage(t, 8))
	if err != nil {
		t.Fatal(err)
	}
	ref := reg.PushIndex(t, "shared/index:1", idx)
	ridx, err := remote.Index(ref, testimage.NoRetry()...)
	if err != nil {
		t.Fatal(err)
	}
	c := newConverter(t)
	if _, err := c.Index(context.Background(), ridx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Image(context.Background(), reg.Image(t, reg.Push(t, "shared/copy:1", a))); err != nil {
		t.Fatal(err)
	}
	unique := map[v1.Hash]bool{}
	for _, img := range []v1.Image{a, seedImage(t, 8)} {
		ls, _ := img.Layers()
		for _, l := range ls {
			d, _ := l.Digest()
			unique[d] = true
		}
	}
	for d := range unique {
		if n := reg.BlobReads(d); n != 1 {
			t.Errorf("blob %s fetched %d times, want 1", d, n)
		}
	}
	st := c.Stats()
	if st.BlobReads != int64(len(unique)) || st.Decompressions != int64(len(unique)) || st.Converted != int64(len(unique)) {
		t.Errorf("stats %+v, want %d reads, decompressions and conversions", st, len(unique))
	}

	// The converter never asks a layer for its uncompressed stream: it
	// decompresses the one compressed read itself.
	var comp, uncomp atomic.Int64
	l, err := testimage.EntriesLayer(testimage.Entries(3, testimage.WithoutLargeFiles()))
	if err != nil {
		t.Fatal(err)
	}
	c2 := newConverter(t)
	for range 3 {
		if _, err := c2.Layer(context.Background(), countingLayer{l, &comp, &uncomp}, v1.Hash{}); err != nil {
			t.Fatal(err)
		}
	}
	if comp.Load() != 1 || uncomp.Load() != 0 || c2.Stats().Decompressions != 1 {
		t.Errorf("Compressed() %d, Uncompressed() %d, decompressions %d; want 1, 0, 1",
			comp.Load(), uncomp.Load(), c2.Stats().Decompressions)
	}
}

func manifestDigests(t *testing.T, res *convert.ImageResult) []string {
	t.Helper()
	out := []string{res.Digest.String()}
	for _, l := range res.Layers {
		out = append(out, l.Output.Digest.String(), l.DiffID.String(), l.TOCDigest)
	}
	return out
}

func TestDeterministicWhateverTheParallelism(t *testing.T) {
	for _, format := range []convert.Format{convert.FormatEStargz, convert.FormatZstdChunked} {
		t.Run(string(format), func(t *testing.T) {
			src := seedImage(t, 11)
			var want []string
			for i, cfg := range []struct{ procs, workers, jobs int }{{1, 1, 1}, {4, 8, 3}, {2, 3, 1}} {
				prev := runtime.GOMAXPROCS(cfg.procs)
				c := newConverter(t, convert.WithFormat(format), convert.WithWorkers(cfg.workers), convert.WithJobs(cfg.jobs))
				res, err := c.Image(context.Background(), src)
				runtime.GOMAXPROCS(prev)
				if err != nil {
					t.Fatal(err)
				}
				got := manifestDigests(t, res)
				if i == 0 {
					want = got
					continue
				}
				if !equal(got, want) {
					t.Errorf("GOMAXPROCS=%d workers=%d jobs=%d: digests %v, want %v", cfg.procs, cfg.workers, cfg.jobs, got, want)
				}
			}
		})
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestIndexPlatforms(t *testing.T) {
	idx, err := testimage.SeedIndex(21, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	c := newConverter(t)
	all, err := c.Index(context.Background(), idx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all.Images) != 2 || len(all.Skipped) != 0 {
		t.Fatalf("converted %d images, skipped %v; want 2, none", len(all.Images), all.Skipped)
	}
	if err := validate.Index(all.Index); err != nil {
		t.Fatalf("validate.Index: %v", err)
	}
	im, _ := all.Index.IndexManifest()
	for i, d := range im.Manifests {
		if d.Platform == nil || d.Platform.Architecture != all.Images[i].Platform.Architecture {
			t.Errorf("manifest %d platform %v, image platform %v", i, d.Platform, all.Images[i].Platform)
		}
	}
	if d, _ := all.Index.Digest(); d != all.Digest {
		t.Errorf("digest %s, index digest %s", all.Digest, d)
	}

	c = newConverter(t, convert.WithPlatforms(testimage.LinuxARM64))
	arm, err := c.Index(context.Background(), idx)
	if err != nil {
		t.Fatal(err)
	}
	if len(arm.Images) != 1 || arm.Images[0].Platform.Architecture != "arm64" || len(arm.Skipped) != 1 {
		t.Fatalf("arm64 only: images %d skipped %v", len(arm.Images), arm.Skipped)
	}
	if arm.Images[0].Digest != all.Images[1].Digest {
		t.Errorf("selected image %s differs from the same image converted with the rest %s", arm.Images[0].Digest, all.Images[1].Digest)
	}

	c = newConverter(t, convert.WithPlatforms(v1.Platform{OS: "linux", Architecture: "s390x"}))
	if _, err := c.Index(context.Background(), idx); err == nil {
		t.Error("no error when no platform matches")
	}
}

// TestReconvertedImageReusesLayersAndForceGivesSameBytes converts an image,
// then its output: every layer is reused and diff_ids are unchanged; forced,
// the layers are rebuilt to the same bytes.
func TestReconvertedImageReusesLayersAndForceGivesSameBytes(t *testing.T) {
	src := seedImage(t, 31)
	first, err := newConverter(t).Image(context.Background(), src)
	if err != nil {
		t.Fatal(err)
	}
	again, err := newConverter(t).Image(context.Background(), first.Image)
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range again.Layers {
		if !l.Reused || l.Output.Digest != first.Layers[i].Output.Digest {
			t.Errorf("layer %d: reused=%v digest %s, want reuse of %s", i, l.Reused, l.Output.Digest, first.Layers[i].Output.Digest)
		}
	}
	cfg1, _ := first.Image.ConfigFile()
	cfg2, _ := again.Image.ConfigFile()
	if !equalHashes(cfg1.RootFS.DiffIDs, cfg2.RootFS.DiffIDs) {
		t.Errorf("diff_ids changed on reuse: %v vs %v", cfg1.RootFS.DiffIDs, cfg2.RootFS.DiffIDs)
	}
	checkConverted(t, first.Image, again)

	// Forced, the layers are rebuilt from their tar streams; the old TOC and
	// landmark are dropped, so the result is the same bytes again.
	forced, err := newConverter(t, convert.WithForce(true)).Image(context.Background(), first.Image)
	if err != nil {
		t.Fatal(err)
	}
	for i, l := range forced.Layers {
		if l.Reused {
			t.Errorf("layer %d reused despite force", i)
		}
		if l.Output.Digest != first.Layers[i].Output.Digest {
			t.Errorf("layer %d: rebuilt %s, first conversion %s", i, l.Output.Digest, first.Layers[i].Output.Digest)
		}
	}
}

func equalHashes(a, b []v1.Hash) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestImageResultEncodesAsJSON encodes an ImageResult: its digest, output
// layer digests and TOC digests come out under their JSON names.
func TestImageResultEncodesAsJSON(t *testing.T) {
	res, err := newConverter(t).Image(context.Background(), seedImage(t, 41))
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(res)
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Digest string `json:"digest"`
		Layers []struct {
			Output struct {
				Digest string `json:"digest"`
			} `json:"output"`
			TOCDigest string `json:"tocDigest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Digest != res.Digest.String() || len(back.Layers) != 2 || back.Layers[0].TOCDigest == "" {
		t.Errorf("JSON result %s", b)
	}
}

func TestCloseRemovesTemporaryFiles(t *testing.T) {
	dir := t.TempDir()
	c, err := convert.New(convert.WithTempDir(dir))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Image(context.Background(), seedImage(t, 51)); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 0 {
		t.Errorf("%d entries left in the temp dir", len(ents))
	}
	if _, err := c.Image(context.Background(), seedImage(t, 51)); err == nil {
		t.Error("closed converter converted")
	}
}

func TestOptionsRejectBadValues(t *testing.T) {
	for name, opt := range map[string]convert.Option{
		"level":    convert.WithCompressionLevel(12),
		"format":   convert.WithFormat("squashfs"),
		"chunk":    convert.WithChunkSize(0),
		"jobs":     convert.WithJobs(0),
		"workers":  convert.WithWorkers(-1),
		"temp dir": convert.WithTempDir(""),
		"zstd lvl": func() convert.Option { return convert.WithCompressionLevel(0) }(),
	} {
		if _, err := convert.New(opt); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

func TestCloseWaitsForConversionsUnderWay(t *testing.T) {
	c, err := convert.New(convert.WithTempDir(t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	tarball := testimage.MustTar(testimage.Entries(61))
	src := newHeldLayer(testimage.GzipLayer(tarball))
	done := make(chan error, 1)
	go func() {
		_, err := c.Layer(context.Background(), src, v1.Hash{})
		done <- err
	}()
	<-src.started // the conversion is reading its blob, held there
	// Closing now must neither panic nor pull files from under the
	// conversion: it waits for it.
	closed := make(chan error, 1)
	go func() { closed <- c.Close() }()
	select {
	case err := <-closed:
		t.Fatalf("Close returned (%v) while a conversion was held under way", err)
	case <-time.After(50 * time.Millisecond): // a bound on a wrong return, not synchronization
	}
	src.release()
	if err := <-closed; err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Errorf("conversion under way during Close: %v", err)
	}
	if _, err := c.Layer(context.Background(), src, v1.Hash{}); err == nil {
		t.Error("closed converter converted")
	}
}

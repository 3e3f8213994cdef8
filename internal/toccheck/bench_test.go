package toccheck_test

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"

	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/internal/toccheck"
)

// bigLayer is a real eStargz blob of 16,384 TOC entries: 512 directories
// of 31 small files each, as in a large base image's usr layer.
func bigLayer(b *testing.B) []byte {
	b.Helper()
	var es []testimage.Entry
	for d := 0; d < 512; d++ {
		dir := fmt.Sprintf("usr/lib/pkg%03d/", d)
		es = append(es, testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: dir, Mode: 0o755, ModTime: testimage.Epoch}})
		for f := 0; f < 31; f++ {
			data := []byte(fmt.Sprintf("file %d of %d\n", f, d))
			es = append(es, testimage.Entry{
				Header: &tar.Header{Typeflag: tar.TypeReg, Name: fmt.Sprintf("%smodule_%02d.py", dir, f), Mode: 0o644, Size: int64(len(data)), ModTime: testimage.Epoch},
				Data:   data,
			})
		}
	}
	tb, err := testimage.Tar(es)
	if err != nil {
		b.Fatal(err)
	}
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb), 0, int64(len(tb))))
	if err != nil {
		b.Fatal(err)
	}
	defer blob.Close()
	raw, err := io.ReadAll(blob)
	if err != nil {
		b.Fatal(err)
	}
	return raw
}

// BenchmarkCheck16k measures what the daemon adds to a lazy mount: finding,
// decompressing, decoding and validating a 16k-entry TOC.
func BenchmarkCheck16k(b *testing.B) {
	raw := bigLayer(b)
	sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
	f, err := toccheck.Check(sr, 0, decs)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(len(f.TOC.Entries)), "entries")
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := toccheck.Check(sr, 0, decs); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStargzOpen16k measures, for comparison, what stargz's memory
// metadata reader spends opening the same blob.
func BenchmarkStargzOpen16k(b *testing.B) {
	raw := bigLayer(b)
	sr := io.NewSectionReader(bytes.NewReader(raw), 0, int64(len(raw)))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := memorymetadata.NewReader(sr, zstdDecompressor()); err != nil {
			b.Fatal(err)
		}
	}
}

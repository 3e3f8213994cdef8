package lazypull

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/containerd/stargz-snapshotter/metadata"
	memorymetadata "github.com/containerd/stargz-snapshotter/metadata/memory"

	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/internal/toccheck"
)

// countingReaderAt counts the reads that reach the blob.
type countingReaderAt struct {
	r     io.ReaderAt
	reads atomic.Int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.r.ReadAt(p, off)
}

func section(b []byte) (*io.SectionReader, *countingReaderAt) {
	c := &countingReaderAt{r: bytes.NewReader(b)}
	return io.NewSectionReader(c, 0, int64(len(b))), c
}

// storeOpts are the options stargz's layer resolver gives the store.
var storeOpts = []metadata.Option{metadata.WithDecompressors(new(zstdchunked.Decompressor))}

func TestTOCCheckingStoreOpensGoodLayers(t *testing.T) {
	tb, err := testimage.Tar(testimage.Entries(3, testimage.WithoutLargeFiles()))
	if err != nil {
		t.Fatal(err)
	}
	l, err := testimage.EStargz(tb)
	if err != nil {
		t.Fatal(err)
	}
	var checks atomic.Int64
	store := tocCheckingStore(memorymetadata.NewReader, tocCheck{onCheck: func() { checks.Add(1) }})

	// Without the check: the reads stargz's reader makes on its own.
	plainSR, plain := section(l.Blob)
	if _, err := memorymetadata.NewReader(plainSR, storeOpts...); err != nil {
		t.Fatal(err)
	}
	sr, checked := section(l.Blob)
	r, err := store(sr, storeOpts...)
	if err != nil {
		t.Fatal(err)
	}
	// The check reads the footer and the TOC once; the reader then reads
	// them from memory: no more blob reads than without the check.
	if got, want := checked.reads.Load(), plain.reads.Load(); got > want {
		t.Errorf("%d blob reads with the check, %d without", got, want)
	}
	etc, _, err := r.GetChild(r.RootID(), "etc")
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.GetChild(etc, "os-release"); err != nil {
		t.Fatal(err)
	}
	// Clone over the same blob (stargz's prefetch and background fetch)
	// compares the footer and TOC bytes with the checked ones instead of
	// decoding and validating them again, and still works.
	if n := checks.Load(); n != 1 {
		t.Fatalf("opening the layer ran %d checks, want 1", n)
	}
	checks.Store(0)
	c, err := r.Clone(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))))
	if err != nil {
		t.Fatal(err)
	}
	if n := checks.Load(); n != 0 {
		t.Errorf("Clone over the checked bytes ran %d checks, want 0", n)
	}
	// A blob whose TOC bytes differ from the checked ones is checked.
	other, err := testimage.EStargz(mustTar(t))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Clone(io.NewSectionReader(bytes.NewReader(other.Blob), 0, int64(len(other.Blob)))); err != nil {
		t.Logf("Clone over another blob: %v", err)
	}
	if n := checks.Load(); n != 1 {
		t.Errorf("Clone over another blob ran %d checks, want 1", n)
	}
	if _, ok := c.(*checkedReader); !ok {
		t.Errorf("Clone returned %T, want a checking reader", c)
	}
	if _, _, err := c.GetChild(c.RootID(), "etc"); err != nil {
		t.Fatal(err)
	}
}

func TestTOCCheckingStoreRefusesHostileLayers(t *testing.T) {
	hostile, err := testimage.HostileLayers(toccheck.DefaultMaxEntries + 1)
	if err != nil {
		t.Fatal(err)
	}
	good, err := testimage.EStargz(mustTar(t))
	if err != nil {
		t.Fatal(err)
	}
	var innerCalls atomic.Int64
	inner := func(sr *io.SectionReader, opts ...metadata.Option) (metadata.Reader, error) {
		innerCalls.Add(1)
		return memorymetadata.NewReader(sr, opts...)
	}
	store := tocCheckingStore(inner, tocCheck{})
	goodSR, _ := section(good.Blob)
	r, err := store(goodSR, storeOpts...)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range hostile {
		t.Run(h.Name, func(t *testing.T) {
			before := innerCalls.Load()
			sr, _ := section(h.Layer.Blob)
			_, err := store(sr, storeOpts...)
			if err == nil {
				t.Fatal("store opened it")
			}
			if !errors.Is(err, toccheck.ErrInvalid) || !strings.Contains(err.Error(), h.Problem) {
				t.Errorf("error %v, want an invalid TOC saying %q", err, h.Problem)
			}
			if innerCalls.Load() != before {
				t.Error("stargz's reader saw the blob")
			}
			// The blob may change under a reader (Clone is given the
			// fully fetched blob): the check runs again.
			if _, err := r.Clone(io.NewSectionReader(bytes.NewReader(h.Layer.Blob), 0, int64(len(h.Layer.Blob)))); !errors.Is(err, toccheck.ErrInvalid) {
				t.Errorf("Clone over it: %v, want an invalid TOC", err)
			}
			// stargz flattens the store's error (%v) on its way to Mount.
			flat := fmt.Errorf("failed to resolve layer %q from %q: %v: %w", "sha256:x", "ref", err, errors.New("failed to resolve target"))
			if !isInvalidTOC(flat) {
				t.Errorf("isInvalidTOC(%v) = false", flat)
			}
		})
	}
	if isInvalidTOC(errors.New("failed to resolve layer: connection refused")) {
		t.Error("a registry error counts as an invalid TOC")
	}
}

func mustTar(t *testing.T) []byte {
	t.Helper()
	b, err := testimage.Tar(testimage.Files("etc/hello.txt", "hello\n"))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

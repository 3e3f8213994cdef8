package convert_test

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// pipedLayer serves an uncompressed layer through a pipe the test feeds,
// so the test can look at the converter's spool while it waits for more.
type pipedLayer struct {
	*testimage.Layer
	r *io.PipeReader
}

func (l *pipedLayer) Compressed() (io.ReadCloser, error) { return l.r, nil }

// spoolSize returns the size of the spool file in the converter's temp dir.
func spoolSize(t *testing.T, tmp string) int64 {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(tmp, "lazybase-convert-*", "src-*.tar"))
	if len(files) != 1 {
		t.Fatalf("spool files: %q, want one", files)
	}
	fi, err := os.Stat(files[0])
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// TestSpoolLimit converts a 4 MiB layer with a prefetch list under spool
// limits it exceeds (bytes, then entries): the spool file never grows past
// the byte limit plus a header, the layer comes out in source order exactly
// as without a list, and the result says the list was not applied. Within
// the limits the list is applied.
func TestSpoolLimit(t *testing.T) {
	ctx := context.Background()
	es := testimage.ManyFiles(61, 256, 32<<10) // ~4 MiB
	tarball := testimage.MustTar(es)
	list := &prefetch.List{Version: prefetch.ListVersion, Files: []string{es[len(es)-1].Header.Name}}
	plain := newConverter(t)
	want, err := plain.Layer(ctx, testimage.NewLayer(tarball, types.OCIUncompressedLayer), v1.Hash{})
	if err != nil {
		t.Fatal(err)
	}
	wantBlob, _ := convertedBlob(t, want)

	const limit = 1 << 20
	for _, tc := range []struct {
		name      string
		bytes     int64
		entries   int
		exceeded  bool
		feedCheck bool // look at the spool while the converter waits
	}{
		{name: "bytes", bytes: limit, entries: 1 << 20, exceeded: true, feedCheck: true},
		{name: "entries", bytes: 1 << 30, entries: 16, exceeded: true},
		{name: "within", bytes: int64(len(tarball)) + 1, entries: len(es) + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			c := newConverter(t, convert.WithTempDir(tmp), convert.WithPrefetch(list), convert.WithSpoolLimit(tc.bytes, tc.entries))
			pr, pw := io.Pipe()
			src := &pipedLayer{Layer: testimage.NewLayer(tarball, types.OCIUncompressedLayer), r: pr}
			type result struct {
				l   *convert.Layer
				err error
			}
			done := make(chan result, 1)
			go func() {
				l, err := c.Layer(ctx, src, v1.Hash{})
				done <- result{l, err}
			}()
			// io.Pipe hands bytes over only as they are read: once Write
			// returns, the converter has read all but the last KiB.
			if _, err := pw.Write(tarball[:len(tarball)-1024]); err != nil {
				t.Fatal(err)
			}
			if tc.feedCheck {
				if got := spoolSize(t, tmp); got > tc.bytes+4096 {
					t.Errorf("spool holds %d bytes, limit %d", got, tc.bytes)
				}
			}
			pw.Write(tarball[len(tarball)-1024:])
			pw.Close()
			res := <-done
			if res.err != nil {
				t.Fatal(res.err)
			}
			r := res.l.Result()
			if r.SpoolExceeded != tc.exceeded {
				t.Errorf("SpoolExceeded %v, want %v", r.SpoolExceeded, tc.exceeded)
			}
			blob, _ := convertedBlob(t, res.l)
			if tc.exceeded {
				if r.Prefetch != 0 {
					t.Errorf("%d files prefetched beyond the spool limit", r.Prefetch)
				}
				if !bytes.Equal(blob, wantBlob) {
					t.Errorf("output differs from the conversion without a prefetch list")
				}
			} else if r.Prefetch != 1 || bytes.Equal(blob, wantBlob) {
				t.Errorf("within the limits: %d files prefetched, output same as without list: %v", r.Prefetch, bytes.Equal(blob, wantBlob))
			}
			checkLayerTree(t, treeOfTar(t, tarball), res.l, convert.DefaultChunkSize)
		})
	}
	if _, err := convert.New(convert.WithSpoolLimit(0, 1)); err == nil {
		t.Error("WithSpoolLimit(0, 1) accepted")
	}
}

package convert_test

import (
	"archive/tar"
	"bytes"
	"context"
	"testing"
	"time"

	digest "github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
)

// TestHardlinkAttrsAccepted converts hardlinks whose headers differ from
// their target's only in what containerd's unpack does not apply to the
// shared file, and checks the lazy tree equals the source's.
func TestHardlinkAttrsAccepted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	before1970 := time.Date(1960, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		es   []testimage.Entry
	}{
		{"same attributes", entriesWith(hdr(tar.TypeLink, "hl", "ok.txt"))},
		{"same xattr", entriesWith(withXattr(hdr(tar.TypeReg, "x", ""), "user.a", "1"), withXattr(hdr(tar.TypeLink, "hl", "x"), "user.a", "1"))},
		{"xattr only on the target", entriesWith(withXattr(hdr(tar.TypeReg, "x", ""), "user.a", "1"), hdr(tar.TypeLink, "hl", "x"))},
		// containerd does not set trusted.* xattrs.
		{"trusted xattr on the link", entriesWith(withXattr(hdr(tar.TypeLink, "hl", "ok.txt"), "trusted.md5", "x"))},
		// chmod is skipped for a symlink.
		{"mode of a hardlinked symlink", entriesWith(withMode(hdr(tar.TypeSymlink, "s", "ok.txt"), 0o777), withMode(hdr(tar.TypeLink, "hl", "s"), 0o644))},
		// Both times are clamped to 1970-01-01 by containerd.
		{"two times before 1970", entriesWith(withMtime(hdr(tar.TypeReg, "old", ""), before1970), withMtime(hdr(tar.TypeLink, "hl", "old"), before1970.Add(time.Hour)))},
		{"link type bits in mode", entriesWith(withMode(hdr(tar.TypeLink, "hl", "ok.txt"), 0o100644))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, e := range tt.es {
				if e.Header.PAXRecords != nil || e.Header.ModTime.Unix() < 0 {
					e.Header.Format = tar.FormatPAX
				}
			}
			tarball := testimage.MustTar(tt.es)
			c := newConverter(t)
			l, err := c.Layer(ctx, testimage.GzipLayer(tarball), testimage.SHA256(tarball))
			if err != nil {
				t.Fatal(err)
			}
			blob, desc := convertedBlob(t, l)
			if _, _, err := openOutput(blob, desc); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestModtimeZero checks that mtime 0 (SOURCE_DATE_EPOCH=0 images) is
// written to the TOC as 1970-01-01, which stargz's reader shows as Unix
// time 0 rather than as Go's zero time, deterministically, and that the
// output verifies.
func TestModtimeZero(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	epoch := time.Unix(0, 0)
	es := []testimage.Entry{
		withMtime(hdr(tar.TypeDir, "d/", ""), epoch),
		withMtime(hdr(tar.TypeReg, "d/f", ""), epoch),
		withMtime(hdr(tar.TypeLink, "d/hl", "d/f"), epoch),
		withMtime(hdr(tar.TypeSymlink, "d/s", "f"), time.Unix(0, 300_000_000)),
		withMtime(hdr(tar.TypeReg, "d/later", ""), testimage.Epoch),
	}
	es[3].Header.Format = tar.FormatPAX
	tarball := testimage.MustTar(es)
	for _, f := range formats {
		t.Run(string(f), func(t *testing.T) {
			var digests []string
			for range 2 {
				c := newConverter(t, convert.WithFormat(f))
				l, err := c.Layer(ctx, testimage.GzipLayer(tarball), testimage.SHA256(tarball))
				if err != nil {
					t.Fatal(err)
				}
				blob, desc := convertedBlob(t, l)
				digests = append(digests, desc.Digest.String())
				r, _, err := openOutput(blob, desc)
				if err != nil {
					t.Fatal(err)
				}
				for _, name := range []string{"d", "d/f", "d/hl", "d/s"} {
					e, ok := r.Lookup(name)
					if !ok {
						t.Fatalf("%s: not in the TOC", name)
					}
					if e.ModTime3339 != "1970-01-01T00:00:00Z" || e.ModTime().IsZero() || e.ModTime().Unix() != 0 {
						t.Errorf("%s: TOC modtime %q read as %v, want 1970-01-01T00:00:00Z, Unix 0", name, e.ModTime3339, e.ModTime())
					}
				}
				if e, _ := r.Lookup("d/later"); e == nil || !e.ModTime().Equal(testimage.Epoch) {
					t.Errorf("d/later: modtime %v, want %v", e, testimage.Epoch)
				}
				if f == convert.FormatEStargz {
					v, err := convert.VerifyEStargz(bytes.NewReader(blob), int64(len(blob)), digest.Digest(desc.Annotations[convert.AnnotationTOCDigest]))
					if err != nil {
						t.Fatalf("VerifyEStargz: %v", err)
					}
					if d, _ := l.DiffID(); v.DiffID.String() != d.String() {
						t.Errorf("verified diffID %s, converter says %s", v.DiffID, d)
					}
				}
			}
			if digests[0] != digests[1] {
				t.Errorf("two conversions differ: %s and %s", digests[0], digests[1])
			}
		})
	}
}

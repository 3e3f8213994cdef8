package convert_test

import (
	"archive/tar"
	"context"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestLowerSymlinks converts images where an upper layer places entries
// under a path a lower layer left as a symbolic link. containerd's unpack
// follows the link; a lazy mount would show a directory in its place: the
// image is refused, naming the upper layer and the entry. Where the link is
// replaced, whited out or hidden by an opaque directory first, the views
// agree and the image converts.
func TestLowerSymlinks(t *testing.T) {
	ctx := context.Background()
	gz := func(es ...testimage.Entry) v1.Layer { return mustGzipLayer(t, es) }
	esgz := func(es ...testimage.Entry) v1.Layer {
		l, err := testimage.EStargz(testimage.MustTar(es))
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	link := hdr(tar.TypeSymlink, "lib", "usr/lib")
	for _, tc := range []struct {
		name   string
		layers []v1.Layer
		bad    int    // index of the layer to blame, -1 when the image is fine
		entry  string // entry the error names
	}{
		{"file-under-lower-link", []v1.Layer{gz(link), gz(hdr(tar.TypeReg, "lib/x", ""))}, 1, "lib/x"},
		{"deep-under-lower-link", []v1.Layer{gz(hdr(tar.TypeDir, "usr/", ""), hdr(tar.TypeSymlink, "usr/lib64", "lib")), gz(hdr(tar.TypeReg, "usr/lib64/sub/f", ""))}, 1, "usr/lib64/sub/f"},
		{"link-two-layers-down", []v1.Layer{gz(link), gz(hdr(tar.TypeReg, "other", "")), gz(hdr(tar.TypeReg, "lib/x", ""))}, 2, "lib/x"},
		{"child-before-dir-entry", []v1.Layer{gz(link), gz(hdr(tar.TypeReg, "lib/x", ""), hdr(tar.TypeDir, "lib/", ""))}, 1, "lib/x"},
		{"reused-estargz-link", []v1.Layer{esgz(link), gz(hdr(tar.TypeReg, "lib/x", ""))}, 1, "lib/x"},
		{"reused-estargz-upper", []v1.Layer{gz(link), esgz(hdr(tar.TypeReg, "lib/x", ""))}, 1, "lib/x"},
		{"link-replaced-by-dir", []v1.Layer{gz(link), gz(hdr(tar.TypeDir, "lib/", ""), hdr(tar.TypeReg, "lib/x", ""))}, -1, ""},
		{"link-whited-out", []v1.Layer{gz(link), gz(hdr(tar.TypeReg, ".wh.lib", "")), gz(hdr(tar.TypeReg, "lib/x", ""))}, -1, ""},
		{"link-under-opaque-dir", []v1.Layer{gz(hdr(tar.TypeDir, "d/", ""), hdr(tar.TypeSymlink, "d/lib", "x")), gz(hdr(tar.TypeDir, "d/", ""), hdr(tar.TypeReg, "d/.wh..wh..opq", "")), gz(hdr(tar.TypeReg, "d/lib/x", ""))}, -1, ""},
		{"unrelated", []v1.Layer{gz(link), gz(hdr(tar.TypeReg, "libx/y", ""), hdr(tar.TypeReg, "lib", ""))}, -1, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, err := testimage.Image(testimage.LinuxAMD64, tc.layers...)
			if err != nil {
				t.Fatal(err)
			}
			c := newConverter(t)
			res, err := c.Image(ctx, img)
			if tc.bad < 0 {
				if err != nil {
					t.Fatalf("Image: %v", err)
				}
				if err := validate.Image(res.Image, validate.Fast); err != nil {
					t.Fatal(err)
				}
				return
			}
			dgst, _ := tc.layers[tc.bad].Digest()
			checkBadError(t, err, dgst, badLayer{mention: []string{tc.entry, "lower layer"}})
			checkNamesImage(t, err, img)
			if res != nil {
				t.Errorf("Image returned a result with the error")
			}
			if tc.bad > 0 {
				// The lower layers are not to blame.
				for _, l := range tc.layers[:tc.bad] {
					d, _ := l.Digest()
					if strings.Contains(err.Error(), d.String()) {
						t.Errorf("error blames the lower layer %s", d)
					}
				}
			}
		})
	}
}

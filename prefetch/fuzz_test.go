package prefetch

import (
	"bytes"
	"path"
	"reflect"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// FuzzParseProfile: ParseProfile never panics; what it accepts marshals back
// to a profile it accepts again unchanged, and every file it hands the
// converter is a clean relative path.
func FuzzParseProfile(f *testing.F) {
	b, err := sample().Marshal()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add([]byte(`{"version":1,"kind":"lazybase.prefetch.profile","layers":[]}`))
	f.Add([]byte(`{"version":1,"kind":"lazybase.prefetch.profile","rules":{"include":["**/x"]},"layers":[{"diffID":"` + diffA + `","runs":2,"files":[{"path":"/../a//b/./c","size":3,"count":2,"rankSum":1}]}]}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		p, err := ParseProfile(in)
		if err != nil {
			if p != nil {
				t.Fatal("profile returned with an error")
			}
			return
		}
		out, err := p.Marshal()
		if err != nil {
			t.Fatalf("Marshal of an accepted profile: %v", err)
		}
		q, err := ParseProfile(out)
		if err != nil {
			t.Fatalf("re-parsing %s: %v", out, err)
		}
		if !reflect.DeepEqual(p, q) {
			t.Fatalf("round trip changed the profile:\n%+v\n%+v", p, q)
		}
		out2, _ := q.Marshal()
		if !bytes.Equal(out, out2) {
			t.Fatal("marshalling is not stable")
		}
		for _, l := range p.Layers {
			for _, k := range []string{l.Digest, l.DiffID} {
				h, err := v1.NewHash(k)
				if err != nil {
					continue
				}
				for _, f := range p.PrefetchFiles(h, h) {
					if f == "" || strings.HasPrefix(f, "/") || path.Clean(f) != f || f == "." || strings.HasPrefix(f, "../") {
						t.Fatalf("PrefetchFiles gave %q, not a clean relative path", f)
					}
				}
			}
		}
		// Merging with itself fails only when sums leave the allowed range.
		if _, err := Merge(p, q); err != nil && !strings.Contains(err.Error(), "out of range") {
			t.Fatalf("merging an accepted profile with itself: %v", err)
		}
	})
}

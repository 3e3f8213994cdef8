package mirror

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// goFiles are the files of the second layer of the shared-layer test's
// image B, and their sizes.
var goFiles = map[string]int{"go/g0": 8 << 10, "go/g1": 8 << 10, "go/g2": 8 << 10}

// sharedImages pushes lib/a:1, whose one layer is the closed-loop layer,
// and lib/b:1, that layer and one of goFiles (a base image and an image
// built on it).
func sharedImages(t *testing.T, src *server) {
	t.Helper()
	base := loopLayer(t)
	var entries []string
	for i, f := range []string{"go/g0", "go/g1", "go/g2"} {
		entries = append(entries, f, pseudoRandom(uint64(100+i), goFiles[f]))
	}
	top, err := testimage.EntriesLayer(testimage.Files(entries...))
	if err != nil {
		t.Fatal(err)
	}
	for repo, layers := range map[string][]v1.Layer{"lib/a": {base}, "lib/b": {base, top}} {
		img, err := testimage.Image(testimage.LinuxAMD64, layers...)
		if err != nil {
			t.Fatal(err)
		}
		ref, _ := name.ParseReference(src.host + "/" + repo + ":1")
		if err := remote.Write(ref, img); err != nil {
			t.Fatal(err)
		}
	}
}

// converted is an image the mirror wrote.
type converted struct {
	img    v1.Image
	desc   v1.Descriptor
	layers []v1.Descriptor
}

func readConverted(t *testing.T, dest string) converted {
	t.Helper()
	ref, _ := name.ParseReference(dest)
	d, err := remote.Get(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := d.Image()
	if err != nil {
		t.Fatal(err)
	}
	man, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	return converted{img: img, desc: d.Descriptor, layers: man.Layers}
}

// sharedProfile is what a builder records for layers of a converted
// image in one run: files per converted layer, in first-access order.
func sharedProfile(image string, files map[v1.Hash][]string) *prefetch.Profile {
	p := &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Image: image, LastRecord: time.Now().UTC().Truncate(time.Second)}
	for digest, fs := range files {
		l := prefetch.Layer{Digest: digest.String(), Runs: 1}
		for i, f := range fs {
			size := loopFiles[f]
			if size == 0 {
				size = goFiles[f]
			}
			l.Files = append(l.Files, prefetch.File{Path: f, Size: int64(size), Count: 1, RankSum: int64(i)})
		}
		p.Layers = append(p.Layers, l)
	}
	slices.SortFunc(p.Layers, func(a, b prefetch.Layer) int {
		if a.Digest < b.Digest {
			return -1
		}
		return 1
	})
	return p
}

// TestMirrorSharedLayerProfiles: a profile published against an image
// changes the prefetch list of a layer it shares with another mirrored
// image in both, so that the layer keeps one converted form (converted
// once); nothing changes when nothing new is published; a material change
// published against the other image converts both again, alike.
func TestMirrorSharedLayerProfiles(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	sharedImages(t, src)
	c, err := ParseConfig([]byte(fmt.Sprintf(`
destination = "%s/mirror"
retry_initial = "5ms"
retry_max = "20ms"
[[source]]
repository = "%s/lib/a"
[[source]]
repository = "%s/lib/b"
`, dst.host, src.host, src.host)))
	if err != nil {
		t.Fatal(err)
	}
	images := 2
	run := func(step string) (*Report, converted, converted) {
		t.Helper()
		rep, err := newMirror(t, c).Run(context.Background())
		if err != nil || !rep.OK() || len(rep.Images) != images {
			t.Fatalf("%s: %v, %+v", step, err, rep)
		}
		for _, ir := range rep.Images {
			t.Logf("%s: %s", step, ir.Summary())
		}
		// lib/a:1, lib/b:1, then lib/a:2.
		key := func(ir ImageReport) string {
			repo, tag, _ := strings.Cut(path.Base(ir.Destination), ":")
			return tag + " " + repo
		}
		slices.SortStableFunc(rep.Images, func(x, y ImageReport) int { return strings.Compare(key(x), key(y)) })
		a, b := readConverted(t, rep.Images[0].Destination), readConverted(t, rep.Images[1].Destination)
		if len(a.layers) != 1 || len(b.layers) != 2 {
			t.Fatalf("%s: %d and %d layers", step, len(a.layers), len(b.layers))
		}
		if a.layers[0].Digest != b.layers[0].Digest {
			t.Fatalf("%s: the shared layer has two converted forms: %s in lib/a, %s in lib/b", step, a.layers[0].Digest, b.layers[0].Digest)
		}
		return rep, a, b
	}
	statuses := func(rep *Report) []string {
		var out []string
		for _, ir := range rep.Images {
			out = append(out, ir.Status)
		}
		return out
	}
	sorted := func(s []string) []string { slices.Sort(s); return s }

	// 1: no profile yet.
	_, _, b1 := run("first run")

	// 2: a builder of lib/b published what it read from both layers:
	// both images are converted again, the shared layer once, with
	// the same list.
	publish(t, c.Destination+"/lib/b:1", b1.desc, sharedProfile("lib/b", map[v1.Hash][]string{
		b1.layers[0].Digest: {"app/f3", "app/f1"},
		b1.layers[1].Digest: {"go/g1"},
	}))
	rep2, a2, b2 := run("second run")
	if got := statuses(rep2); !slices.Equal(got, []string{StatusConverted, StatusConverted}) || !rep2.Images[0].Profiles.Reconverted {
		t.Fatalf("second run: statuses %q, %+v", got, rep2.Images[0].Profiles)
	}
	if rep2.Layers.Converted != 2 {
		t.Errorf("second run converted %d layers, want 2 (the shared one once)", rep2.Layers.Converted)
	}
	if got, want := prefetched(t, a2.img), []string{"app/f3", "app/f1"}; !slices.Equal(got, want) {
		t.Fatalf("lib/a prefetches %q, want %q", got, want)
	}
	if got, want := prefetchedLayer(t, b2.img, 1), []string{"go/g1"}; !slices.Equal(got, want) {
		t.Fatalf("lib/b's second layer prefetches %q, want %q", got, want)
	}

	// 3: nothing new: nothing converted, nothing pushed.
	dst.reset()
	rep3, a3, b3 := run("third run")
	if got := statuses(rep3); !slices.Equal(got, []string{StatusSkipped, StatusSkipped}) {
		t.Fatalf("third run: statuses %q", got)
	}
	if puts := dst.puts(); puts != 0 {
		t.Errorf("third run made %d PUT/POST/PATCH requests, want 0", puts)
	}
	if a3.desc.Digest != a2.desc.Digest || b3.desc.Digest != b2.desc.Digest {
		t.Fatal("third run changed a conversion")
	}

	// 4: a small change of the shared layer, published against lib/b
	// (500 of 20980 bytes): both kept.
	publish(t, c.Destination+"/lib/b:1", b3.desc, sharedProfile("lib/b", map[v1.Hash][]string{
		b3.layers[0].Digest: {"app/f3", "app/f1", "etc/small"},
	}))
	rep4, _, _ := run("fourth run")
	if got := statuses(rep4); !slices.Equal(got, []string{StatusSkipped, StatusSkipped}) {
		t.Fatalf("fourth run: statuses %q", got)
	}

	// A new image containing the shared layer (lib/a:2, lib/a:1
	// pushed again) is converted with the layer's current list, not
	// the slightly changed merge: the same conversion, nothing
	// converted.
	ref1, _ := name.ParseReference(src.host + "/lib/a:1")
	img1, err := remote.Image(ref1)
	if err != nil {
		t.Fatal(err)
	}
	ref2, _ := name.ParseReference(src.host + "/lib/a:2")
	if err := remote.Write(ref2, img1); err != nil {
		t.Fatal(err)
	}
	images = 3
	rep4, _, _ = run("fourth run, new tag")
	if got := statuses(rep4); !slices.Equal(got, []string{StatusSkipped, StatusSkipped, StatusConverted}) {
		t.Fatalf("fourth run, new tag: statuses %q", got)
	}
	if rep4.Images[2].Digest != a3.desc.Digest.String() || rep4.Layers.Converted != 0 {
		t.Fatalf("lib/a:2 converted to %s (%d layers converted), want lib/a:1's %s and none", rep4.Images[2].Digest, rep4.Layers.Converted, a3.desc.Digest)
	}

	// 5: a material change of the shared layer, published against
	// lib/a:1: the three converted again, alike; lib/b's own layer
	// keeps its list (the merged runs are carried forward).
	publish(t, c.Destination+"/lib/a:1", a3.desc, sharedProfile("lib/a", map[v1.Hash][]string{
		a3.layers[0].Digest: {"app/f5", "app/f6", "app/f7"},
	}))
	rep5, a5, b5 := run("fifth run")
	if got := statuses(rep5); !slices.Equal(got, []string{StatusConverted, StatusConverted, StatusConverted}) || !rep5.Images[1].Profiles.Reconverted {
		t.Fatalf("fifth run: statuses %q, %+v", got, rep5.Images[1].Profiles)
	}
	if rep5.Images[2].Digest != a5.desc.Digest.String() {
		t.Errorf("fifth run: lib/a:2 is %s, lib/a:1 %s", rep5.Images[2].Digest, a5.desc.Digest)
	}
	if a5.layers[0].Digest == a3.layers[0].Digest {
		t.Fatal("fifth run kept the shared layer's conversion")
	}
	if got, want := sorted(prefetched(t, a5.img)), []string{"app/f1", "app/f3", "app/f5", "app/f6", "app/f7", "etc/small"}; !slices.Equal(got, want) {
		t.Fatalf("fifth conversion of lib/a prefetches %q, want %q", got, want)
	}
	if b5.layers[1].Digest != b3.layers[1].Digest {
		t.Errorf("fifth run changed lib/b's own layer: %s, was %s", b5.layers[1].Digest, b3.layers[1].Digest)
	}

	// 6: nothing new again.
	dst.reset()
	rep6, _, _ := run("sixth run")
	if got := statuses(rep6); !slices.Equal(got, []string{StatusSkipped, StatusSkipped, StatusSkipped}) {
		t.Fatalf("sixth run: statuses %q", got)
	}
	if puts := dst.puts(); puts != 0 {
		t.Errorf("sixth run made %d PUT/POST/PATCH requests, want 0", puts)
	}
}

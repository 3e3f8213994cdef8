package mirror

import (
	"archive/tar"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// loopFiles are the files of the closed-loop test image's one layer and
// their sizes.
var loopFiles = func() map[string]int {
	m := map[string]int{"etc/small": 500}
	for i := range 10 {
		m[fmt.Sprintf("app/f%d", i)] = 10 << 10
	}
	return m
}()

// pushLoopImage pushes the closed-loop test image to src as lib/a:1.
func pushLoopImage(t *testing.T, src *server) {
	t.Helper()
	img, err := testimage.Image(testimage.LinuxAMD64, loopLayer(t))
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(src.host + "/lib/a:1")
	if err := remote.Write(ref, img); err != nil {
		t.Fatal(err)
	}
}

// loopLayer is the layer of loopFiles.
func loopLayer(t *testing.T) v1.Layer {
	t.Helper()
	var entries []string
	names := make([]string, 0, len(loopFiles))
	for f := range loopFiles {
		names = append(names, f)
	}
	slices.Sort(names)
	for i, f := range names {
		entries = append(entries, f, pseudoRandom(uint64(i+1), loopFiles[f]))
	}
	l, err := testimage.EntriesLayer(testimage.Files(entries...))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func loopConfig(t *testing.T, src, dst *server, extra string) *Config {
	t.Helper()
	c, err := ParseConfig([]byte(fmt.Sprintf(`
destination = "%s/mirror"
retry_initial = "5ms"
retry_max = "20ms"
%s
[[source]]
repository = "%s/lib/a"
`, dst.host, extra, src.host)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// runLoop runs a new mirror process once and returns its one image's
// report.
func runLoop(t *testing.T, c *Config) ImageReport {
	t.Helper()
	rep, err := newMirror(t, c).Run(context.Background())
	if err != nil || !rep.OK() || len(rep.Images) != 1 {
		t.Fatalf("run: %v, %+v", err, rep)
	}
	return rep.Images[0]
}

// destination returns the image the mirror wrote, its manifest descriptor
// and its one layer's descriptor.
func destination(t *testing.T, ir ImageReport) (v1.Image, v1.Descriptor, v1.Descriptor) {
	t.Helper()
	ref, _ := name.ParseReference(ir.Destination)
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
	if len(man.Layers) != 1 {
		t.Fatalf("destination has %d layers", len(man.Layers))
	}
	return img, d.Descriptor, man.Layers[0]
}

// prefetched returns the regular files placed before the prefetch
// landmark of an image's one layer, in order; nil when the layer has the
// no-prefetch landmark.
func prefetched(t *testing.T, img v1.Image) []string {
	t.Helper()
	return prefetchedLayer(t, img, 0)
}

// prefetchedLayer is prefetched for layer i of an image.
func prefetchedLayer(t *testing.T, img v1.Image, i int) []string {
	t.Helper()
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := ls[i].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var out []string
	for {
		h, err := tr.Next()
		if err != nil {
			t.Fatalf("no landmark in the converted layer (%v); files %q", err, out)
		}
		switch h.Name {
		case estargz.PrefetchLandmark:
			return out
		case estargz.NoPrefetchLandmark:
			return nil
		}
		if h.Typeflag == tar.TypeReg {
			out = append(out, h.Name)
		}
	}
}

// builderProfile is what a builder records for files of a converted
// layer in one run, in first-access order.
func builderProfile(image string, layer v1.Descriptor, files ...string) *prefetch.Profile {
	l := prefetch.Layer{Digest: layer.Digest.String(), Runs: 1}
	for i, f := range files {
		l.Files = append(l.Files, prefetch.File{Path: f, Size: int64(loopFiles[f]), Count: 1, RankSum: int64(i)})
	}
	return &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Image: image, LastRecord: time.Now().UTC().Truncate(time.Second), Layers: []prefetch.Layer{l}}
}

// publish pushes a profile as a builder publishes it: an artifact whose
// subject is the converted image's manifest, pushed by digest.
func publish(t *testing.T, dest string, subject v1.Descriptor, p *prefetch.Profile) v1.Hash {
	t.Helper()
	img, err := profileArtifact(p, subject, p.LastRecord, nil)
	if err != nil {
		t.Fatal(err)
	}
	return pushArtifact(t, dest, img)
}

func pushArtifact(t *testing.T, dest string, img v1.Image) v1.Hash {
	t.Helper()
	ref, _ := name.ParseReference(dest)
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref.Context().Digest(d.String()), img); err != nil {
		t.Fatal(err)
	}
	return d
}

// rawArtifact is an artifact manifest written as given, with its blobs.
type rawArtifact struct {
	manifest []byte
	blobs    map[v1.Hash][]byte
}

func (a rawArtifact) RawManifest() ([]byte, error)        { return a.manifest, nil }
func (a rawArtifact) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

// pushRaw pushes blobs and a manifest that change made of a valid
// artifact's manifest.
func pushRaw(t *testing.T, dest string, subject v1.Descriptor, blob []byte, change func(m *v1.Manifest)) v1.Hash {
	t.Helper()
	ref, _ := name.ParseReference(dest)
	repo := ref.Context()
	for _, b := range [][]byte{blob, []byte("{}")} {
		if err := remote.WriteLayer(repo, static.NewLayer(b, types.OCIEmptyJSON)); err != nil {
			t.Fatal(err)
		}
	}
	d, _, _ := v1.SHA256(strings.NewReader(string(blob)))
	m := v1.Manifest{
		SchemaVersion: 2, MediaType: types.OCIManifestSchema1, ArtifactType: prefetch.ArtifactType,
		Config:      v1.Descriptor{MediaType: types.OCIEmptyJSON, Size: 2, Digest: sha256Of([]byte("{}"))},
		Layers:      []v1.Descriptor{{MediaType: prefetch.ArtifactType, Size: int64(len(blob)), Digest: d}},
		Subject:     &subject,
		Annotations: map[string]string{prefetch.AnnotationCreated: time.Now().UTC().Format(time.RFC3339)},
	}
	change(&m)
	raw, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	h, _, _ := v1.SHA256(strings.NewReader(string(raw)))
	if err := remote.Put(repo.Digest(h.String()), rawArtifact{manifest: raw}); err != nil {
		t.Fatal(err)
	}
	return h
}

// TestMirrorClosedPrefetchLoop follows an image through the closed loop,
// against a registry with the referrers API and one with only the
// tag-schema fallback: converted unprofiled, re-converted with what
// builders publish, kept when nothing or little changed, re-converted on
// a big change without losing what was published against the first
// conversion, and hostile artifacts skipped.
func TestMirrorClosedPrefetchLoop(t *testing.T) {
	for _, api := range []bool{true, false} {
		t.Run(fmt.Sprintf("referrersAPI=%v", api), func(t *testing.T) {
			src, dst := newServer(t), newServer(t, registry.WithReferrersSupport(api))
			pushLoopImage(t, src)
			c := loopConfig(t, src, dst, "")

			// 1: no profile yet.
			r1 := runLoop(t, c)
			if r1.Status != StatusConverted || r1.Profiles == nil || r1.Profiles.Found != 0 || r1.Profiles.Published != "" {
				t.Fatalf("first run: %+v %+v", r1, r1.Profiles)
			}
			img1, desc1, layer1 := destination(t, r1)
			if got := prefetched(t, img1); got != nil {
				t.Fatalf("first conversion prefetches %q, want nothing", got)
			}

			// 2: a builder published what it read from the first
			// conversion: converted again with it.
			publish(t, r1.Destination, desc1, builderProfile(r1.Destination, layer1, "app/f3", "app/f1"))
			r2 := runLoop(t, c)
			if r2.Status != StatusConverted || !r2.Profiles.Reconverted || r2.Profiles.Found != 1 || r2.Profiles.Used != 1 || r2.Profiles.Published == "" {
				t.Fatalf("second run: %+v %+v", r2, r2.Profiles)
			}
			t.Logf("second run: %s", r2.Summary())
			img2, desc2, layer2 := destination(t, r2)
			if desc2.Digest == desc1.Digest {
				t.Fatal("second run left the first conversion")
			}
			if got, want := prefetched(t, img2), []string{"app/f3", "app/f1"}; !slices.Equal(got, want) {
				t.Fatalf("second conversion prefetches %q, want %q", got, want)
			}

			// 3: nothing new: nothing converted, nothing pushed.
			dst.reset()
			r3 := runLoop(t, c)
			if r3.Status != StatusSkipped || r3.Profiles.Reconverted || r3.Digest != desc2.Digest.String() || r3.Profiles.Change != 0 {
				t.Fatalf("third run: %+v %+v", r3, r3.Profiles)
			}
			if puts := dst.puts(); puts != 0 {
				t.Errorf("third run made %d PUT/POST/PATCH requests, want 0", puts)
			}

			// A forced conversion with the same profile gives the same
			// digest; its merged profile folds the first in, so the
			// builder's run is not counted twice.
			rep, err := newMirror(t, c, WithForce(true)).Run(context.Background())
			if err != nil || !rep.OK() || rep.Images[0].Digest != desc2.Digest.String() || rep.Images[0].Profiles.Published == r2.Profiles.Published {
				t.Fatalf("forced run: %v %+v", err, rep)
			}
			r3 = runLoop(t, c)
			if r3.Status != StatusSkipped || r3.Profiles.Found != 1 || r3.Profiles.Used != 1 {
				t.Fatalf("run after the forced one: %+v %+v", r3, r3.Profiles)
			}

			// 4: a small change (500 of 20980 bytes): kept.
			publish(t, r2.Destination, desc2, builderProfile(r2.Destination, layer2, "app/f3", "app/f1", "etc/small"))
			r4 := runLoop(t, c)
			if r4.Status != StatusSkipped || r4.Profiles.Reconverted || r4.Profiles.Change <= 0 || r4.Profiles.Change >= 0.1 || r4.Profiles.Found != 2 || r4.Profiles.Used != 2 {
				t.Fatalf("fourth run: %+v %+v", r4, r4.Profiles)
			}
			t.Logf("fourth run: %s", r4.Summary())

			// 5: a big change: converted again, and what was published
			// against the first conversion still counts.
			publish(t, r2.Destination, desc2, builderProfile(r2.Destination, layer2, "app/f5", "app/f6", "app/f7"))
			r5 := runLoop(t, c)
			if r5.Status != StatusConverted || !r5.Profiles.Reconverted || r5.Profiles.Change < 0.1 {
				t.Fatalf("fifth run: %+v %+v", r5, r5.Profiles)
			}
			img5, desc5, _ := destination(t, r5)
			got := prefetched(t, img5)
			slices.Sort(got)
			if want := []string{"app/f1", "app/f3", "app/f5", "app/f6", "app/f7", "etc/small"}; !slices.Equal(got, want) {
				t.Fatalf("fifth conversion prefetches %q, want %q", got, want)
			}

			// 6: hostile artifacts against the current conversion:
			// skipped, nothing converted.
			good, _ := builderProfile(r5.Destination, layer2, "app/f9").Marshal()
			pushRaw(t, r5.Destination, desc5, good, func(m *v1.Manifest) { m.Layers[0].Size = prefetch.MaxArtifactBytes + 1 })
			pushRaw(t, r5.Destination, desc5, []byte(`{"version":1,"kind":`), func(*v1.Manifest) {})
			pushRaw(t, r5.Destination, desc5, good, func(m *v1.Manifest) { m.ArtifactType = "application/vnd.example.sbom+json" })
			corrupt, _ := builderProfile(r5.Destination, layer2, "app/f8", "app/f0", "app/f2", "app/f4").Marshal()
			pushRaw(t, r5.Destination, desc5, corrupt, func(*v1.Manifest) {})
			cd, _, _ := v1.SHA256(strings.NewReader(string(corrupt)))
			dst.mu.Lock()
			dst.fault = func(r *http.Request) string {
				if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, "/blobs/"+cd.String()) {
					return "corrupt"
				}
				return ""
			}
			dst.mu.Unlock()
			// The artifacts went through the referrers API, or the
			// tag-schema fallback where the registry has none.
			dref, _ := name.ParseReference(r5.Destination)
			tags, err := remote.List(dref.Context())
			if err != nil {
				t.Fatal(err)
			}
			if fallback := slices.ContainsFunc(tags, func(s string) bool { return strings.HasPrefix(s, "sha256-") }); fallback == api {
				t.Errorf("referrers API %v, yet tags %q", api, tags)
			}
			r6 := runLoop(t, c)
			if r6.Status != StatusSkipped || r6.Profiles.Reconverted || r6.Profiles.Skipped != 3 || r6.Profiles.Found != 1 {
				t.Fatalf("sixth run: %+v %+v", r6, r6.Profiles)
			}
			t.Logf("sixth run: %s", r6.Summary())
		})
	}
}

// TestMirrorProfilesOff: with from_registry = false published profiles
// are neither read nor published.
func TestMirrorProfilesOff(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	pushLoopImage(t, src)
	c := loopConfig(t, src, dst, "[profiles]\nfrom_registry = false\n")
	r1 := runLoop(t, c)
	_, desc1, layer1 := destination(t, r1)
	publish(t, r1.Destination, desc1, builderProfile(r1.Destination, layer1, "app/f3"))
	r2 := runLoop(t, c)
	if r2.Status != StatusSkipped || r2.Profiles != nil {
		t.Fatalf("second run: %+v", r2)
	}
}

func TestProfilesConfig(t *testing.T) {
	const base = "destination = 'r.example/m'\n[[source]]\nrepository = 'r.example/a'\n"
	c, err := ParseConfig([]byte(base))
	if err != nil {
		t.Fatal(err)
	}
	p := c.Profiles
	if !*p.FromRegistry || *p.MinChange != DefaultProfileMinChange || p.MaxAge != "720h0m0s" || p.HalfLife != "168h0m0s" || p.MaxArtifacts != prefetch.MaxArtifactsPerImage {
		t.Errorf("defaults: %+v", p)
	}
	c, err = ParseConfig([]byte(base + "[profiles]\nfrom_registry = false\nmin_change = 0\nmax_age = '0s'\nhalf_life = '1h'\nmax_artifacts = 3\nmin_fraction = 0.5\nlayer_bytes = 10\nimage_bytes = 20\n"))
	if err != nil {
		t.Fatal(err)
	}
	if p := c.Profiles; *p.FromRegistry || *p.MinChange != 0 || p.MaxArtifacts != 3 || p.LayerBytes != 10 || p.ImageBytes != 20 {
		t.Errorf("set: %+v", p)
	}
	if w := c.Profiles.weighting(time.Unix(0, 0)); w.MaxAge != 0 || w.HalfLife != time.Hour || w.MinFraction != 0.5 {
		t.Errorf("weighting %+v", w)
	}
	for _, tc := range []struct{ doc, key string }{
		{"min_change = 1.5", "profiles.min_change"},
		{"min_change = -0.1", "profiles.min_change"},
		{"min_fraction = 2.0", "profiles.min_fraction"},
		{"max_age = 'soon'", "profiles.max_age"},
		{"half_life = '-1h'", "profiles.half_life"},
		{"max_artifacts = 65", "profiles.max_artifacts"},
		{"max_artifacts = -1", "profiles.max_artifacts"},
		{"layer_bytes = -1", "profiles.layer_bytes"},
		{"unknown = 1", "profiles.unknown"},
	} {
		if _, err := ParseConfig([]byte(base + "[profiles]\n" + tc.doc + "\n")); err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%s: err = %v, want one naming %s", tc.doc, err, tc.key)
		}
	}
}

// TestMirrorClosedPrefetchLoopIndex: a profile a builder published for one
// platform of a multi-platform conversion applies to the source layers
// every platform shares, and the mirror's merged profile, published on
// every platform, counts once.
func TestMirrorClosedPrefetchLoopIndex(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	base := loopLayer(t)
	var imgs []v1.Image
	for _, p := range []v1.Platform{testimage.LinuxAMD64, testimage.LinuxARM64} {
		u, err := testimage.EntriesLayer(testimage.Files("app/arch", p.Architecture+"\n"))
		if err != nil {
			t.Fatal(err)
		}
		img, err := testimage.Image(p, base, u)
		if err != nil {
			t.Fatal(err)
		}
		imgs = append(imgs, img)
	}
	idx, err := testimage.Index(imgs...)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(src.host + "/lib/a:1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	c := loopConfig(t, src, dst, "")
	children := func(ir ImageReport) ([]v1.Image, []v1.Descriptor) {
		t.Helper()
		dref, _ := name.ParseReference(ir.Destination)
		idx, err := remote.Index(dref)
		if err != nil {
			t.Fatal(err)
		}
		im, err := idx.IndexManifest()
		if err != nil {
			t.Fatal(err)
		}
		var out []v1.Image
		for _, d := range im.Manifests {
			img, err := idx.Image(d.Digest)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, img)
		}
		return out, im.Manifests
	}

	r1 := runLoop(t, c)
	imgs1, descs1 := children(r1)
	if len(imgs1) != 2 {
		t.Fatalf("first conversion has %d platforms", len(imgs1))
	}
	man, err := imgs1[0].Manifest()
	if err != nil {
		t.Fatal(err)
	}
	publish(t, r1.Destination, descs1[0], builderProfile(r1.Destination, man.Layers[0], "app/f4", "app/f2"))

	r2 := runLoop(t, c)
	if r2.Status != StatusConverted || !r2.Profiles.Reconverted || r2.Profiles.Found != 1 {
		t.Fatalf("second run: %+v %+v", r2, r2.Profiles)
	}
	imgs2, _ := children(r2)
	for i, img := range imgs2 {
		if got, want := prefetched(t, img), []string{"app/f4", "app/f2"}; !slices.Equal(got, want) {
			t.Errorf("platform %d prefetches %q, want %q", i, got, want)
		}
	}
	r3 := runLoop(t, c)
	if r3.Status != StatusSkipped || r3.Profiles.Found != 1 || r3.Profiles.Used != 1 || r3.Profiles.Change != 0 {
		t.Fatalf("third run: %+v %+v", r3, r3.Profiles)
	}
}

// TestMirrorProfilesWithStatic: the profile of prefetch_dir is merged with
// the published ones and its rules win; a simple list there is used alone.
func TestMirrorProfilesWithStatic(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	pushLoopImage(t, src)
	srcLayer, err := loopLayer(t).Digest()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	static := &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind,
		Rules:  prefetch.Rules{Exclude: []string{"app/f1"}},
		Layers: []prefetch.Layer{{Digest: srcLayer.String(), Runs: 1, Files: []prefetch.File{{Path: "app/f0", Size: 10 << 10, Count: 1}}}}}
	b, err := static.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "lib_a.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	c := loopConfig(t, src, dst, fmt.Sprintf("prefetch_dir = %q", dir))

	r1 := runLoop(t, c)
	img1, desc1, layer1 := destination(t, r1)
	if got := prefetched(t, img1); !slices.Equal(got, []string{"app/f0"}) {
		t.Fatalf("first conversion prefetches %q, want the static profile's", got)
	}
	publish(t, r1.Destination, desc1, builderProfile(r1.Destination, layer1, "app/f3", "app/f1"))
	r2 := runLoop(t, c)
	if r2.Status != StatusConverted || !r2.Profiles.Reconverted {
		t.Fatalf("second run: %+v %+v", r2, r2.Profiles)
	}
	img2, _, _ := destination(t, r2)
	if got, want := prefetched(t, img2), []string{"app/f0", "app/f3"}; !slices.Equal(got, want) {
		t.Fatalf("second conversion prefetches %q, want %q (static first, its exclude applied)", got, want)
	}
	if r3 := runLoop(t, c); r3.Status != StatusSkipped || r3.Profiles.Change != 0 {
		t.Fatalf("third run: %+v %+v", r3, r3.Profiles)
	}

	if err := os.WriteFile(filepath.Join(dir, "lib_a.json"), []byte(`{"version":1,"files":["app/f9"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	r4 := runLoop(t, c)
	if r4.Status != StatusSkipped || !strings.Contains(r4.Profiles.Reason, "prefetch list") || r4.Profiles.Found != 0 {
		t.Fatalf("with a list: %+v %+v", r4, r4.Profiles)
	}
}

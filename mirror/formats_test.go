package mirror

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// TestMirrorIndexPlatformsAndZstd mirrors a two-platform index keeping one
// platform, in zstd:chunked, and checks the result is what convert.Index
// makes with the same options.
func TestMirrorIndexPlatformsAndZstd(t *testing.T) {
	ctx := context.Background()
	src, dst := newServer(t), newServer(t)
	idx, err := testimage.SeedIndex(7, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := name.ParseReference(src.host + "/multi/os:1")
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatal(err)
	}
	c, err := ParseConfig([]byte(fmt.Sprintf(`destination = %q
format = "zstd-chunked"
level = 5
[[source]]
repository = %q
platforms = ["linux/arm64"]
`, dst.host+"/m", src.host+"/multi/os")))
	if err != nil {
		t.Fatal(err)
	}
	m := newMirror(t, c)
	rep, err := m.Run(ctx)
	if err != nil || !rep.OK() || rep.Converted != 1 {
		t.Fatalf("%v %+v", err, rep)
	}
	conv, err := convert.New(convert.WithFormat(convert.FormatZstdChunked), convert.WithCompressionLevel(5),
		convert.WithPlatforms(v1.Platform{OS: "linux", Architecture: "arm64"}))
	if err != nil {
		t.Fatal(err)
	}
	defer conv.Close()
	want, err := conv.Index(ctx, idx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Images[0].Digest != want.Digest.String() {
		t.Errorf("mirror wrote %s, convert.Index makes %s", rep.Images[0].Digest, want.Digest)
	}
	dref, _ := name.ParseReference(dst.host + "/m/multi/os:1")
	out, err := remote.Index(dref)
	if err != nil {
		t.Fatal(err)
	}
	// (validate.Index would decompress zstd layers as gzip: the digest
	// comparison with convert.Index above stands for it.)
	im, _ := out.IndexManifest()
	if len(im.Manifests) != 1 || im.Manifests[0].Platform.Architecture != "arm64" {
		t.Errorf("index manifests %+v", im.Manifests)
	}
	// Up to date on the next run.
	rep, err = newMirror(t, c).Run(ctx)
	if err != nil || rep.Skipped != 1 {
		t.Fatalf("%v %+v", err, rep)
	}
}

// TestMirrorPrefetchDir applies a prefetch list found by repository name;
// a layer shared with an image without a list is converted once per list.
func TestMirrorPrefetchDir(t *testing.T) {
	ctx := context.Background()
	src, dst := newServer(t), newServer(t)
	layers := imageSet(t, src, 16<<10)
	dir := t.TempDir()
	list := `{"version": 1, "files": ["etc/os-release", "app/unique.txt"]}`
	if err := os.WriteFile(filepath.Join(dir, "lib_a.json"), []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}
	c := testConfig(t, src, dst, fmt.Sprintf("prefetch_dir = %q", dir))
	m := newMirror(t, c)
	rep, err := m.Run(ctx)
	if err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	// lib/a's base layer (with a list) and lib/b's (without) differ.
	if got := m.Stats().Converted; got != int64(len(layers))+1 {
		t.Errorf("converted %d layers, want %d", got, len(layers)+1)
	}
	l, err := prefetch.ParseList([]byte(list))
	if err != nil {
		t.Fatal(err)
	}
	withList, _ := convert.New(convert.WithPrefetch(l))
	defer withList.Close()
	without, _ := convert.New()
	defer without.Close()
	for _, ir := range rep.Images {
		sref, _ := name.ParseReference(ir.Source)
		simg, err := remote.Image(sref)
		if err != nil {
			t.Fatal(err)
		}
		conv := without
		if sref.Context().RepositoryStr() == "lib/a" {
			conv = withList
		}
		want, err := conv.Image(ctx, simg)
		if err != nil {
			t.Fatal(err)
		}
		if ir.Digest != want.Digest.String() {
			t.Errorf("%s: mirror wrote %s, convert makes %s", ir.Source, ir.Digest, want.Digest)
		}
	}
	// A broken list fails the images it applies to, and only those.
	if err := os.WriteFile(filepath.Join(dir, "lib_b.1.3.json"), []byte(`{"version": 9}`), 0o644); err != nil {
		t.Fatal(err)
	}
	c = testConfig(t, src, dst, fmt.Sprintf("prefetch_dir = %q\nimage_attempts = 1", dir))
	rep, err = newMirror(t, c, WithForce(true)).Run(ctx)
	if err != nil || rep.Failed != 1 || rep.Converted != 9 {
		t.Fatalf("%v %+v", err, rep)
	}
}

// TestTempFilesReleasedWhenRunOrImageEnds: converted layers live in
// temporary files until the run (or, for MirrorImage as serve uses it, the
// image) is done.
func TestTempFilesReleasedWhenRunOrImageEnds(t *testing.T) {
	ctx := context.Background()
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	tmp := t.TempDir()
	m := newMirror(t, testConfig(t, src, dst, fmt.Sprintf("temp_dir = %q", tmp)))
	empty := func(when string) {
		t.Helper()
		ents, err := os.ReadDir(tmp)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != 0 {
			t.Errorf("%s: %d entries left in temp_dir", when, len(ents))
		}
	}
	for _, tag := range []string{"1.0", "1.1"} {
		j, ok := m.JobFor("", "lib/a", tag)
		if !ok {
			t.Fatal("no job")
		}
		if r := m.MirrorImage(ctx, j); r.Status != StatusConverted {
			t.Fatalf("%+v", r)
		}
		empty("after MirrorImage " + tag)
	}
	rep, err := m.Run(ctx)
	if err != nil || !rep.OK() || rep.Skipped != 2 || rep.Converted != 8 {
		t.Fatalf("%v %+v", err, rep)
	}
	empty("after Run")
	// The two single images converted the base layer once between them.
	if got := m.Stats().Converted; got != 12 {
		t.Errorf("converted %d layers in all, want 12", got)
	}
}

// TestMirrorWriteBackWithSuffix converts into the source repositories under
// TAG-esgz and never takes its own output as a source.
func TestMirrorWriteBackWithSuffix(t *testing.T) {
	ctx := context.Background()
	src := newServer(t)
	imageSet(t, src, 16<<10)
	c, err := ParseConfig([]byte(fmt.Sprintf(`tag_suffix = "-esgz"
records_repository = %q
[[source]]
repository = %q
`, src.host+"/records", src.host+"/lib/a")))
	if err != nil {
		t.Fatal(err)
	}
	rep, err := newMirror(t, c).Run(ctx)
	if err != nil || !rep.OK() || rep.Converted != 5 {
		t.Fatalf("%v %+v", err, rep)
	}
	for _, ir := range rep.Images {
		if ir.Destination != ir.Source+"-esgz" {
			t.Errorf("%s -> %s", ir.Source, ir.Destination)
		}
	}
	m := newMirror(t, c)
	jobs, errs := m.Plan(ctx)
	if len(errs) > 0 || len(jobs) != 5 {
		t.Fatalf("second plan: %d jobs %v", len(jobs), errs)
	}
	if _, ok := m.JobFor("", "lib/a", "1.0-esgz"); ok {
		t.Error("a pushed -esgz tag was taken as a source")
	}
	rep, err = m.Run(ctx)
	if err != nil || rep.Skipped != 5 {
		t.Fatalf("%v %+v", err, rep)
	}
}

// TestMirrorPrefetchProfiles applies a prefetch profile found in the prefetch
// directory when it was recorded for the image being mirrored, and ignores a
// profile recorded for another image.
func TestMirrorPrefetchProfiles(t *testing.T) {
	ctx := context.Background()
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	digestOf := func(tag string) v1.Hash {
		ref, _ := name.ParseReference(src.host + "/lib/a:" + tag)
		d, err := remote.Head(ref)
		if err != nil {
			t.Fatal(err)
		}
		return d.Digest
	}
	dir := t.TempDir()
	writeProfile := func(file string, digest v1.Hash) *prefetch.Profile {
		p := &prefetch.Profile{
			Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Digest: digest.String(),
			Layers: []prefetch.Layer{{Runs: 1, Files: []prefetch.File{{Path: "etc/os-release", Size: 8, Count: 1}}}},
		}
		// The profile covers the base layer, which every lib/a image shares.
		ref, _ := name.ParseReference(src.host + "/lib/a:1.0")
		img, err := remote.Image(ref)
		if err != nil {
			t.Fatal(err)
		}
		ls, _ := img.Layers()
		base, _ := ls[0].Digest()
		p.Layers[0].Digest = base.String()
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, file), b, 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	own := writeProfile("lib_a.1.0.json", digestOf("1.0"))
	writeProfile("lib_a.1.1.json", digestOf("1.0")) // recorded for 1.0, found for 1.1

	c := testConfig(t, src, dst, fmt.Sprintf("prefetch_dir = %q", dir))
	rep, err := newMirror(t, c).Run(ctx)
	if err != nil || !rep.OK() {
		t.Fatalf("%v %+v", err, rep)
	}
	withProfile, _ := convert.New(convert.WithPrefetch(own))
	defer withProfile.Close()
	without, _ := convert.New()
	defer without.Close()
	for _, ir := range rep.Images {
		sref, _ := name.ParseReference(ir.Source)
		if sref.Context().RepositoryStr() != "lib/a" || (sref.Identifier() != "1.0" && sref.Identifier() != "1.1") {
			continue
		}
		simg, err := remote.Image(sref)
		if err != nil {
			t.Fatal(err)
		}
		conv := without
		if sref.Identifier() == "1.0" {
			conv = withProfile
		}
		want, err := conv.Image(ctx, simg)
		if err != nil {
			t.Fatal(err)
		}
		if ir.Digest != want.Digest.String() {
			t.Errorf("%s: mirror wrote %s, want %s (profile applied only to its own image)", ir.Source, ir.Digest, want.Digest)
		}
	}
}

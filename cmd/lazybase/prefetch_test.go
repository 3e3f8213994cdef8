package main

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

const (
	pfLayerA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	pfLayerB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

// writeAccessRecords appends to an access record file as the snapshotter
// does: one JSON object per line, path, layer and size of each first access,
// each later than the lines before.
func writeAccessRecords(t *testing.T, dir, image string, entries ...any) {
	t.Helper()
	file := filepath.Join(dir, prefetch.RecordFileName(image))
	old, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	n := strings.Count(string(old), "\n")
	b := strings.Builder{}
	b.Write(old)
	t0 := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	for i := 0; i < len(entries); i += 3 {
		line, err := json.Marshal(prefetch.AccessRecord{
			Time: t0.Add(time.Duration(n+i/3) * time.Second), Image: image,
			Layer: entries[i].(string), Path: entries[i+1].(string), Size: int64(entries[i+2].(int)),
		})
		if err != nil {
			t.Fatal(err)
		}
		b.Write(line)
		b.WriteByte('\n')
	}
	if err := os.WriteFile(file, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
}

func TestPrefetchCollectAndShow(t *testing.T) {
	ctx := context.Background()
	const img = "registry.example/golang:1.22"
	dir, out := t.TempDir(), filepath.Join(t.TempDir(), "golang.json")
	writeAccessRecords(t, dir, img,
		pfLayerA, "/usr/local/go/bin/go", 1000,
		pfLayerB, "/etc/os-release", 100,
		pfLayerA, "/usr/local/go/src/README.md", 10,
		pfLayerA, "/usr/local/go/pkg/tool/compile", 2000,
	)
	if _, stderr, err := runCLI(ctx, t, "prefetch", "collect", "--from", dir, "-o", out); err != nil {
		t.Fatalf("collect: %v\n%s", err, stderr)
	}
	p, err := prefetch.LoadProfile(out)
	if err != nil {
		t.Fatal(err)
	}
	if p.Image != img || len(p.Layers) != 2 || p.Layers[0].Runs != 1 || len(p.Layers[0].Files) != 3 {
		t.Fatalf("collected profile %+v", p)
	}

	// A second build reads some of the same files: merged into the profile
	// in place, with rules given on the command line.
	writeAccessRecords(t, dir, img,
		pfLayerA, "/usr/local/go/pkg/tool/compile", 2000,
		pfLayerA, "/usr/local/go/bin/go", 1000,
	)
	if _, stderr, err := runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--image", img, "--merge", out, "-o", out,
		"--exclude", "**/*.md", "--layer-bytes", "2500"); err != nil {
		t.Fatalf("collect --merge: %v\n%s", err, stderr)
	}
	if p, err = prefetch.LoadProfile(out); err != nil {
		t.Fatal(err)
	}
	a := p.Layers[0]
	if a.Runs != 2 || a.Files[0].Path != "usr/local/go/bin/go" || a.Files[0].Count != 2 {
		t.Fatalf("merged layer %+v", a)
	}
	// Collecting again with no new records counts nothing twice.
	before, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--merge", out, "-o", out); err != nil {
		t.Fatalf("collect --merge again: %v\n%s", err, stderr)
	}
	if after, err := os.ReadFile(out); err != nil || string(after) != string(before) {
		t.Errorf("collecting the same records again changed the profile:\n%s\n%s", before, after)
	}
	// go (0+1)/2, compile (2+0)/2 with equal counts: go first (seen first).
	if got, want := p.PrefetchFiles(v1.Hash{}, mustHash(t, pfLayerA)), []string{"usr/local/go/bin/go"}; !slices.Equal(got, want) {
		t.Errorf("after rules, layer A prefetches %q, want %q (README excluded, compile over the budget)", got, want)
	}

	// prefetch merge of the profile with itself: runs and counts double.
	twice := filepath.Join(t.TempDir(), "twice.json")
	if _, stderr, err := runCLI(ctx, t, "prefetch", "merge", "-o", twice, out, out); err != nil {
		t.Fatalf("merge: %v\n%s", err, stderr)
	}
	if m, err := prefetch.LoadProfile(twice); err != nil || m.Layers[0].Runs != 4 || m.Layers[0].Files[0].Count != 4 || !slices.Equal(m.Rules.Exclude, []string{"**/*.md"}) {
		t.Errorf("merged twice: %+v, %v", m, err)
	}
	if _, _, err := runCLI(ctx, t, "prefetch", "merge", "-o", twice, out, filepath.Join(t.TempDir(), "absent.json")); err == nil || !strings.Contains(err.Error(), "absent.json") {
		t.Errorf("merge with a missing profile: %v", err)
	}

	// Show: per layer, kept files of recorded ones, bytes, share unknown
	// without a layer size, and known with one.
	stdout, stderr, err := runCLI(ctx, t, "prefetch", "show", out)
	if err != nil {
		t.Fatalf("show: %v\n%s", err, stderr)
	}
	for _, want := range []string{"image:  " + img, "digest: unknown", pfLayerA, "1 of 3", "1.0 kB", "unknown", "total", "2 of 4", `exclude ["**/*.md"]`} {
		if !strings.Contains(stdout, want) {
			t.Errorf("show output lacks %q:\n%s", want, stdout)
		}
	}
	p.Layers[0].Size = 4000
	p.Layers[1].Size = 1000
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(out, b, 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, _, err = runCLI(ctx, t, "prefetch", "show", out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"25.0% of 4.0 kB", "10.0% of 1.0 kB", "22.0% of 5.0 kB"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("show output lacks %q:\n%s", want, stdout)
		}
	}
	stdout, _, err = runCLI(ctx, t, "prefetch", "show", "--files", out)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout, "usr/local/go/bin/go  1.0 kB  read in 2 of 2 runs") || !strings.Contains(stdout, "etc/os-release") || strings.Contains(stdout, "README") {
		t.Errorf("show --files:\n%s", stdout)
	}
	stdout, _, err = runCLI(ctx, t, "prefetch", "show", "--json", out)
	if err != nil {
		t.Fatal(err)
	}
	var rep showReport
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("show --json: %v\n%s", err, stdout)
	}
	if len(rep.Layers) != 2 || rep.Layers[0].Bytes != 1000 || rep.Layers[0].Files != 1 || rep.Layers[0].RecordedFiles != 3 ||
		rep.Layers[0].Share == nil || *rep.Layers[0].Share != 0.25 || rep.Totals.Bytes != 1100 || rep.Totals.Share == nil || *rep.Totals.Share != 0.22 {
		t.Errorf("show --json %s", stdout)
	}
}

func mustHash(t *testing.T, s string) v1.Hash {
	t.Helper()
	h, err := v1.NewHash(s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestPrefetchBadInputs(t *testing.T) {
	ctx := context.Background()
	dir, tmp := t.TempDir(), t.TempDir()
	writeAccessRecords(t, dir, "registry.example/a:1", pfLayerA, "/bin/sh", 10)
	writeAccessRecords(t, dir, "registry.example/b:1", pfLayerB, "/bin/sh", 10)
	corrupt := filepath.Join(tmp, "corrupt.json")
	if err := os.WriteFile(corrupt, []byte(`{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"digest":"sha256:nothex","runs":1,"files":[]}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	list := filepath.Join(tmp, "list.json")
	if err := os.WriteFile(list, []byte(`{"version":1,"files":["etc/hostname"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(tmp, "out.json")
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"collect without --from", []string{"prefetch", "collect", "-o", out}, []string{`"from" not set`}},
		{"collect without -o", []string{"prefetch", "collect", "--from", dir}, []string{`"output" not set`}},
		{"collect of two images without --image", []string{"prefetch", "collect", "--from", dir, "-o", out}, []string{"2 images", "registry.example_a_1"}},
		{"collect of an image without records", []string{"prefetch", "collect", "--from", dir, "--image", "registry.example/c:1", "-o", out}, []string{"registry.example_c_1.jsonl"}},
		{"collect merging a corrupt profile", []string{"prefetch", "collect", "--from", dir, "--image", "registry.example/a:1", "--merge", corrupt, "-o", out}, []string{"--merge", corrupt, "sha256:nothex"}},
		{"collect merging a profile of another image", []string{"prefetch", "collect", "--from", dir, "--image", "registry.example/b:1", "--merge", out + ".a", "-o", out}, []string{"registry.example/a:1"}},
		{"collect with a bad glob", []string{"prefetch", "collect", "--from", dir, "--image", "registry.example/a:1", "--include", "[", "-o", out}, []string{"glob"}},
		{"show a corrupt profile", []string{"prefetch", "show", corrupt}, []string{corrupt, "layer 0"}},
		{"show a list", []string{"prefetch", "show", list}, []string{list, "kind"}},
		{"show a missing file", []string{"prefetch", "show", out + ".missing"}, []string{"no such file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == "collect merging a profile of another image" {
				if _, stderr, err := runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--image", "registry.example/a:1", "-o", out+".a"); err != nil {
					t.Fatalf("collect: %v\n%s", err, stderr)
				}
			}
			_, _, err := runCLI(ctx, t, tc.args...)
			if err == nil {
				t.Fatalf("%v succeeded", tc.args)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("%v: %v, want it to mention %q", tc.args, err, w)
				}
			}
			if _, err := os.Stat(out); err == nil {
				t.Errorf("%s written by a failed command", out)
			}
		})
	}
}

func TestConvertWithPrefetchProfile(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	base := testimage.GzipLayer(testimage.MustTar(testimage.Files("etc/os-release", "ID=test\n", "bin/sh", "sh")))
	app := testimage.GzipLayer(testimage.MustTar(testimage.Files("app/main", "main", "app/lib.so", "lib", "app/data", "data")))
	img, err := testimage.Image(testimage.LinuxAMD64, base, app)
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/pf/profile:v1", reg.Host+"/pf/profile:out"
	testimage.PushRef(t, src, img)
	appDigest, err := app.Digest()
	if err != nil {
		t.Fatal(err)
	}
	p := &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Image: src,
		Layers: []prefetch.Layer{{Digest: appDigest.String(), Runs: 1, Files: []prefetch.File{
			{Path: "/app/lib.so", Size: 3, Count: 1, RankSum: 0},
			{Path: "app/absent", Size: 3, Count: 1, RankSum: 1},
			{Path: "app/main", Size: 4, Count: 1, RankSum: 2},
		}}}}
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "profile.json")
	if err := os.WriteFile(file, b, 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", "--prefetch", file, src, dst)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	if got := []int{rep.Images[0].Layers[0].PrefetchFiles, rep.Images[0].Layers[1].PrefetchFiles}; !slices.Equal(got, []int{0, 2}) {
		t.Errorf("prefetched files per layer %v, want [0 2]", got)
	}
	if !strings.Contains(stderr, "does not hold") {
		t.Errorf("no warning about app/absent:\n%s", stderr)
	}

	// A corrupt profile stops the conversion before it starts, naming the file.
	if err := os.WriteFile(file, b[:len(b)/2], 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err = runCLI(ctx, t, "convert", "--prefetch", file, src, reg.Host+"/pf/profile:corrupt")
	if err == nil || !strings.Contains(err.Error(), "--prefetch") || !strings.Contains(err.Error(), file) {
		t.Errorf("corrupt profile: %v", err)
	}
	if testimage.TagExists(t, reg.Host+"/pf/profile:corrupt") {
		t.Error("tag written with a corrupt profile")
	}
}

// TestPrefetchRecordedOnConvertedImage runs the loop of issue 6 without the
// snapshotter: convert an image, record accesses to its converted layers as
// the snapshotter does, collect them with --resolve, and convert the source
// again with the profile: the profiled files are prefetched from the right
// source layers.
func TestPrefetchRecordedOnConvertedImage(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	base := testimage.GzipLayer(testimage.MustTar(testimage.Files("etc/os-release", "ID=test\n", "bin/sh", "sh")))
	app := testimage.GzipLayer(testimage.MustTar(testimage.Files("app/main", "main", "app/lib.so", "lib", "app/data", "data")))
	img, err := testimage.Image(testimage.LinuxAMD64, base, app)
	if err != nil {
		t.Fatal(err)
	}
	src, lazy := reg.Host+"/loop/app:v1", reg.Host+"/loop/app:lazy"
	testimage.PushRef(t, src, img)
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", src, lazy)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	conv := parseReport(t, stdout)
	lb, la := conv.Images[0].Layers[0], conv.Images[0].Layers[1]

	dir, profile := t.TempDir(), filepath.Join(t.TempDir(), "app.json")
	writeAccessRecords(t, dir, lazy,
		la.Digest, "/app/lib.so", 3,
		lb.Digest, "/bin/sh", 2,
		la.Digest, "/app/main", 4,
	)
	if _, stderr, err := runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--resolve", "-o", profile); err != nil {
		t.Fatalf("collect --resolve: %v\n%s", err, stderr)
	}
	p, err := prefetch.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	if p.Digest != conv.Images[0].Digest || p.SourceDigest != conv.Images[0].SourceDigest {
		t.Errorf("profile digest %s source %s, want %s and %s", p.Digest, p.SourceDigest, conv.Images[0].Digest, conv.Images[0].SourceDigest)
	}
	if len(p.Layers) != 2 || p.Layers[0].SourceDigest != la.SourceDigest || p.Layers[1].SourceDigest != lb.SourceDigest ||
		p.Layers[0].Size != la.UncompressedSize || p.Layers[1].Size != lb.UncompressedSize {
		t.Fatalf("resolved layers %+v; converted %+v %+v", p.Layers, la, lb)
	}
	if _, ok := p.ForImage(src, mustHash(t, conv.Images[0].SourceDigest)); !ok {
		t.Error("the resolved profile is not for its source image")
	}
	stdout, _, err = runCLI(ctx, t, "prefetch", "show", profile)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(stdout, "converted from: "+p.SourceDigest) || strings.Contains(stdout, "unknown (") {
		t.Errorf("show of a resolved profile:\n%s", stdout)
	}

	stdout, stderr, err = runCLI(ctx, t, "convert", "--json", "--prefetch", profile, src, reg.Host+"/loop/app:profiled")
	if err != nil {
		t.Fatalf("convert --prefetch: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	if got := []int{rep.Images[0].Layers[0].PrefetchFiles, rep.Images[0].Layers[1].PrefetchFiles}; !slices.Equal(got, []int{1, 2}) {
		t.Errorf("prefetched files per layer %v, want [1 2]", got)
	}

	// Records of layers the image does not hold cannot be resolved.
	dir = t.TempDir()
	writeAccessRecords(t, dir, lazy, pfLayerA, "/bin/sh", 2)
	_, _, err = runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--resolve", "-o", filepath.Join(t.TempDir(), "x.json"))
	if err == nil || !strings.Contains(err.Error(), "none of the 1 recorded layers") {
		t.Errorf("collect --resolve of foreign layers: %v", err)
	}
}

// TestPrefetchResolveThroughRegistryConfig: collect --resolve with
// --registry-config reads the manifest of an image named by a host that
// does not resolve from the mirror the snapshotter's [registry.mirrors]
// names; without the configuration the same profile does not resolve.
func TestPrefetchResolveThroughRegistryConfig(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	base := testimage.GzipLayer(testimage.MustTar(testimage.Files("etc/os-release", "ID=test\n", "bin/sh", "sh")))
	img, err := testimage.Image(testimage.LinuxAMD64, base)
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/mirrored/app:v1"
	testimage.PushRef(t, src, img)
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", src, reg.Host+"/mirrored/app:lazy")
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	conv := parseReport(t, stdout)
	l := conv.Images[0].Layers[0]

	const unresolvable = "unresolvable.invalid"
	dir, profile := t.TempDir(), filepath.Join(t.TempDir(), "app.json")
	writeAccessRecords(t, dir, unresolvable+"/mirrored/app:lazy", l.Digest, "/bin/sh", 2)
	cfg := filepath.Join(t.TempDir(), "snapshotter.toml")
	toml := "[registry.mirrors]\n\"" + unresolvable + "\" = [{ host = \"" + reg.Host + "\" }]\n"
	if err := os.WriteFile(cfg, []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--resolve", "--registry-config", cfg, "-o", profile); err != nil {
		t.Fatalf("collect --resolve --registry-config: %v\n%s", err, stderr)
	}
	p, err := prefetch.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	if p.Digest != conv.Images[0].Digest || p.SourceDigest != conv.Images[0].SourceDigest ||
		p.Layers[0].SourceDigest != l.SourceDigest || p.Layers[0].Size != l.UncompressedSize {
		t.Errorf("profile %s from %s, layer %+v; converted %s from %s, layer %+v",
			p.Digest, p.SourceDigest, p.Layers[0], conv.Images[0].Digest, conv.Images[0].SourceDigest, l)
	}

	_, _, err = runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--resolve", "-o", filepath.Join(t.TempDir(), "x.json"))
	if err == nil || !strings.Contains(err.Error(), unresolvable) {
		t.Errorf("collect --resolve without the configuration: %v, want an error naming %s", err, unresolvable)
	}
	_, _, err = runCLI(ctx, t, "prefetch", "collect", "--from", dir, "--resolve", "--registry-config", filepath.Join(dir, "none.toml"), "-o", filepath.Join(t.TempDir(), "x.json"))
	if err == nil || !strings.Contains(err.Error(), "--registry-config") {
		t.Errorf("collect --resolve with a missing configuration: %v", err)
	}
}

package prefetch

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

const (
	digestA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	diffA   = "sha256:a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0a0"
	digestB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
	digestC = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc"
	imgDgst = "sha256:dddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd"
)

func hash(t testing.TB, s string) v1.Hash {
	t.Helper()
	if s == "" {
		return v1.Hash{}
	}
	h, err := v1.NewHash(s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func sample() *Profile {
	return &Profile{
		Version: ProfileVersion, Kind: ProfileKind,
		Image: "registry.example/golang:1.22", Digest: imgDgst,
		Rules: Rules{Exclude: []string{"**/*.md"}, LayerBytes: 1 << 20},
		Layers: []Layer{
			{Digest: digestA, DiffID: diffA, Size: 4000, Runs: 2, Files: []File{
				{Path: "usr/local/go/bin/go", Size: 1000, Count: 2, RankSum: 0},
				{Path: "etc/os-release", Size: 100, Count: 1, RankSum: 3},
				{Path: "usr/share/doc/README.md", Size: 10, Count: 2, RankSum: 4},
			}},
			{Digest: digestB, Runs: 1, Files: []File{{Path: "lib/libc.so.6", Size: 2000, Count: 1}}},
		},
	}
}

func TestProfileRoundTrip(t *testing.T) {
	p := sample()
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	got, err := ParseProfile(b)
	if err != nil {
		t.Fatalf("ParseProfile(Marshal()): %v\n%s", err, b)
	}
	if !reflect.DeepEqual(got, p) {
		t.Errorf("round trip changed the profile:\n got %+v\nwant %+v", got, p)
	}
	b2, err := got.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, b2) {
		t.Errorf("marshalling is not stable:\n%s\n%s", b, b2)
	}
	for _, want := range []string{`"version": 1`, `"kind": "lazybase.prefetch.profile"`, `"diffID": "` + diffA + `"`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("marshalled profile lacks %s:\n%s", want, b)
		}
	}
}

func TestParseProfileErrors(t *testing.T) {
	layer := func(files string) string {
		return `{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"digest":"` + digestA + `","runs":1,"files":[` + files + `]}]}`
	}
	for _, tc := range []struct{ name, in, want string }{
		{"not json", `{"version":1,`, "decoding"},
		{"empty", ``, "decoding"},
		{"trailing data", `{"version":1,"kind":"lazybase.prefetch.profile","layers":[]} {}`, "trailing data"},
		{"unknown field", `{"version":1,"kind":"lazybase.prefetch.profile","layer":[]}`, `unknown field "layer"`},
		{"key in another case", `{"version":1,"kind":"lazybase.prefetch.profile","Layers":[]}`, `top level: unknown key "Layers"`},
		{"nested key in another case", layer(`{"Path":"a","size":1,"count":1,"rankSum":0}`), `layers[0].files[0]: unknown key "Path"`},
		{"key twice", `{"version":1,"kind":"lazybase.prefetch.profile","rules":{"minCount":1,"minCount":2}}`, `rules: key "minCount" given twice`},
		{"wrong version", `{"version":2,"kind":"lazybase.prefetch.profile"}`, "unsupported version 2"},
		{"no kind", `{"version":1}`, `no "kind": not a profile`},
		{"a list", `{"version":1,"files":["a"]}`, `no "kind": not a profile`},
		{"empty kind", `{"version":1,"kind":""}`, `kind "" is not`},
		{"wrong kind", `{"version":1,"kind":"other"}`, `kind "other" is not`},
		{"bad image", `{"version":1,"kind":"lazybase.prefetch.profile","image":"UPPER/case:x"}`, "image"},
		{"bad image digest", `{"version":1,"kind":"lazybase.prefetch.profile","digest":"sha256:xyz"}`, "digest"},
		{"bad glob", `{"version":1,"kind":"lazybase.prefetch.profile","rules":{"include":["usr/["]}}`, "glob"},
		{"negative budget", `{"version":1,"kind":"lazybase.prefetch.profile","rules":{"layerBytes":-1}}`, "negative"},
		{"layer without digest", `{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"runs":1,"files":[]}]}`, "neither digest nor diffID"},
		{"bad layer digest", `{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"digest":"md5:00","runs":1,"files":[]}]}`, "layer 0"},
		{"layer twice", `{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"digest":"` + digestA + `","runs":1,"files":[]},{"diffID":"` + digestA + `","runs":1,"files":[]}]}`, "listed twice"},
		{"empty path", layer(`{"path":"","size":1,"count":1,"rankSum":0}`), "empty path"},
		{"root path", layer(`{"path":"/..","size":1,"count":1,"rankSum":0}`), "root directory"},
		{"NUL in path", layer(`{"path":"a\u0000b","size":1,"count":1,"rankSum":0}`), "NUL"},
		{"file twice", layer(`{"path":"a","size":1,"count":1,"rankSum":0},{"path":"/a","size":1,"count":1,"rankSum":1}`), "listed twice"},
		{"zero count", layer(`{"path":"a","size":1,"count":0,"rankSum":0}`), "count 0"},
		{"count above runs", layer(`{"path":"a","size":1,"count":2,"rankSum":0}`), "above the layer's 1 runs"},
		{"negative size", layer(`{"path":"a","size":-1,"count":1,"rankSum":0}`), "negative size"},
		{"size not a number", layer(`{"path":"a","size":"1","count":1,"rankSum":0}`), "decoding"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseProfile([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseProfile(%s) = %v, want an error with %q", tc.in, err, tc.want)
			}
		})
	}
}

func TestLoadProfileNamesTheFile(t *testing.T) {
	file := filepath.Join(t.TempDir(), "golang.profile.json")
	if err := os.WriteFile(file, []byte(`{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"digest":"`+digestA+`","runs":1,"files":[{"path":"a","size":1,"count":5,"rankSum":0}]}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := LoadProfile(file)
	if err == nil || !strings.Contains(err.Error(), file) || !strings.Contains(err.Error(), `file "a": count 5`) {
		t.Fatalf("LoadProfile = %v, want an error naming %s and the file entry", err, file)
	}
	if _, err := Load(file); err == nil || !strings.Contains(err.Error(), file) {
		t.Fatalf("Load = %v, want an error naming %s", err, file)
	}
}

func TestParseProfileNormalizesPaths(t *testing.T) {
	in := `{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"digest":"` + digestA + `","runs":1,"files":[
		{"path":"/usr/bin/../bin/go","size":1,"count":1,"rankSum":0},
		{"path":"./etc//os-release","size":1,"count":1,"rankSum":1},
		{"path":"../../lib/x.so","size":1,"count":1,"rankSum":2}]}]}`
	p, err := ParseProfile([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"usr/bin/go", "etc/os-release", "lib/x.so"}
	if got := p.PrefetchFiles(v1.Hash{}, hash(t, digestA)); !slices.Equal(got, want) {
		t.Errorf("PrefetchFiles = %q, want %q", got, want)
	}
}

func TestLoadListOrProfile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	list := write("list.json", `{"version":1,"layers":{"`+digestA+`":["/bin/sh"]},"files":["etc/passwd"]}`)
	b, err := sample().Marshal()
	if err != nil {
		t.Fatal(err)
	}
	prof := write("profile.json", string(b))
	other := write("other.json", `{"version":1,"kind":"something-else"}`)
	listWithBadField := write("bad-list.json", `{"version":1,"layer":{}}`)

	s, err := Load(list)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.(*List); !ok {
		t.Errorf("Load(list) = %T, want *List", s)
	}
	if got, want := s.PrefetchFiles(v1.Hash{}, hash(t, digestA)), []string{"bin/sh", "etc/passwd"}; !slices.Equal(got, want) {
		t.Errorf("list PrefetchFiles = %q, want %q", got, want)
	}
	s, err = Load(prof)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := s.(*Profile); !ok {
		t.Errorf("Load(profile) = %T, want *Profile", s)
	}
	if got, want := s.PrefetchFiles(hash(t, diffA), v1.Hash{}), []string{"usr/local/go/bin/go", "etc/os-release"}; !slices.Equal(got, want) {
		t.Errorf("profile PrefetchFiles = %q, want %q", got, want)
	}
	if _, err := Load(other); err == nil || !strings.Contains(err.Error(), `unknown kind "something-else"`) {
		t.Errorf("Load(other kind) = %v", err)
	}
	if _, err := Load(listWithBadField); err == nil || !strings.Contains(err.Error(), "bad-list.json") {
		t.Errorf("Load(bad list) = %v", err)
	}
	if _, err := Load(filepath.Join(dir, "absent.json")); err == nil {
		t.Error("Load(absent file) succeeded")
	}
}

func TestMatchDoubleStarSpansDirectories(t *testing.T) {
	for _, tc := range []struct {
		glob, path string
		want       bool
	}{
		{"usr/bin/go", "usr/bin/go", true},
		{"usr/bin/*", "usr/bin/go", true},
		{"usr/*", "usr/bin/go", false},
		{"usr/**", "usr/bin/go", true},
		{"usr/**", "usr", true},
		{"**/*.so", "lib/x.so", true},
		{"**/*.so", "x.so", true},
		{"**/*.so", "usr/lib/a/b/x.so.6", false},
		{"**/*.so*", "usr/lib/a/b/x.so.6", true},
		{"usr/**/go", "usr/local/go/bin/go", true},
		{"usr/**/go", "usr/go", true},
		{"usr/**/go", "usr/local/go/bin/gofmt", false},
		{"/etc/*", "etc/passwd", true},
		{"**", "anything/at/all", true},
		{"e?c/[a-p]*", "etc/passwd", true},
		{"e?c/[q-z]*", "etc/passwd", false},
	} {
		if got := Match(tc.glob, tc.path); got != tc.want {
			t.Errorf("Match(%q, %q) = %v, want %v", tc.glob, tc.path, got, tc.want)
		}
	}
}

func TestRulesAndBudgets(t *testing.T) {
	layers := []Layer{
		{Digest: digestA, Runs: 3, Files: []File{
			{Path: "bin/sh", Size: 100, Count: 3},
			{Path: "usr/share/doc/a.md", Size: 10, Count: 3},
			{Path: "usr/lib/libc.so", Size: 500, Count: 1},
			{Path: "etc/hosts", Size: 1, Count: 2},
		}},
		{Digest: digestB, Runs: 3, Files: []File{
			{Path: "usr/local/go/bin/go", Size: 300, Count: 3},
			{Path: "usr/local/go/pkg/x.a", Size: 50, Count: 3},
		}},
	}
	for _, tc := range []struct {
		name  string
		rules Rules
		want  [][]string
	}{
		{"none", Rules{}, [][]string{{"bin/sh", "usr/share/doc/a.md", "usr/lib/libc.so", "etc/hosts"}, {"usr/local/go/bin/go", "usr/local/go/pkg/x.a"}}},
		{"include", Rules{Include: []string{"usr/**"}}, [][]string{{"usr/share/doc/a.md", "usr/lib/libc.so"}, {"usr/local/go/bin/go", "usr/local/go/pkg/x.a"}}},
		{"exclude", Rules{Exclude: []string{"**/*.md", "**/*.a"}}, [][]string{{"bin/sh", "usr/lib/libc.so", "etc/hosts"}, {"usr/local/go/bin/go"}}},
		{"include and exclude", Rules{Include: []string{"usr/**"}, Exclude: []string{"usr/share/**"}}, [][]string{{"usr/lib/libc.so"}, {"usr/local/go/bin/go", "usr/local/go/pkg/x.a"}}},
		{"min count", Rules{MinCount: 2}, [][]string{{"bin/sh", "usr/share/doc/a.md", "etc/hosts"}, {"usr/local/go/bin/go", "usr/local/go/pkg/x.a"}}},
		// The budget stops a layer at the first file that does not fit,
		// even when a later, smaller one would.
		{"layer budget", Rules{LayerBytes: 350}, [][]string{{"bin/sh", "usr/share/doc/a.md"}, {"usr/local/go/bin/go", "usr/local/go/pkg/x.a"}}},
		{"layer budget exact", Rules{LayerBytes: 611}, [][]string{{"bin/sh", "usr/share/doc/a.md", "usr/lib/libc.so", "etc/hosts"}, {"usr/local/go/bin/go", "usr/local/go/pkg/x.a"}}},
		{"image budget", Rules{ImageBytes: 920}, [][]string{{"bin/sh", "usr/share/doc/a.md", "usr/lib/libc.so", "etc/hosts"}, {"usr/local/go/bin/go"}}},
		{"image budget spent by the first layer", Rules{ImageBytes: 150}, [][]string{{"bin/sh", "usr/share/doc/a.md"}, nil}},
		{"budget after exclusion", Rules{Exclude: []string{"usr/lib/**"}, LayerBytes: 120}, [][]string{{"bin/sh", "usr/share/doc/a.md", "etc/hosts"}, nil}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &Profile{Version: ProfileVersion, Kind: ProfileKind, Rules: tc.rules, Layers: layers}
			if err := p.Validate(); err != nil {
				t.Fatal(err)
			}
			for i, d := range []string{digestA, digestB} {
				if got := p.PrefetchFiles(v1.Hash{}, hash(t, d)); !slices.Equal(got, tc.want[i]) {
					t.Errorf("layer %d: PrefetchFiles = %q, want %q", i, got, tc.want[i])
				}
			}
		})
	}
}

func TestPrefetchFilesMatchesLayers(t *testing.T) {
	p := sample()
	want := []string{"usr/local/go/bin/go", "etc/os-release"} // README.md excluded
	for _, tc := range []struct {
		name           string
		diffID, digest string
		want           []string
	}{
		{"by digest", "", digestA, want},
		{"by diffID", diffA, digestC, want},
		{"diffID given as digest", "", diffA, want},
		{"second layer", "", digestB, []string{"lib/libc.so.6"}},
		{"unknown layer", digestC, digestC, nil},
		{"nothing known", "", "", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := p.PrefetchFiles(hash(t, tc.diffID), hash(t, tc.digest)); !slices.Equal(got, tc.want) {
				t.Errorf("PrefetchFiles = %q, want %q", got, tc.want)
			}
		})
	}
	var nilProfile *Profile
	if got := nilProfile.PrefetchFiles(v1.Hash{}, hash(t, digestA)); got != nil {
		t.Errorf("nil profile PrefetchFiles = %q", got)
	}
}

func TestForImage(t *testing.T) {
	named := sample() // registry.example/golang:1.22 at imgDgst
	refOnly := sample()
	refOnly.Digest = ""
	anonymous := sample()
	anonymous.Image, anonymous.Digest = "", ""
	dockerHub := sample()
	dockerHub.Image, dockerHub.Digest = "golang:1.22", ""
	for _, tc := range []struct {
		name   string
		p      *Profile
		ref    string
		digest string
		want   bool
	}{
		{"same digest", named, "", imgDgst, true},
		{"same digest, other reference", named, "registry.example/other:1", imgDgst, true},
		{"other digest", named, "registry.example/golang:1.22", digestC, false},
		{"same reference, digest unknown", named, "registry.example/golang:1.22", "", true},
		{"other reference, digest unknown", named, "registry.example/golang:1.23", "", false},
		{"profile without digest, other reference", refOnly, "registry.example/python:3", imgDgst, false},
		{"profile without digest, same reference", refOnly, "registry.example/golang:1.22", imgDgst, true},
		{"docker hub short name", dockerHub, "index.docker.io/library/golang:1.22", "", true},
		{"nothing known", named, "", "", true},
		{"profile names no image", anonymous, "registry.example/python:3", digestC, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, ok := tc.p.ForImage(tc.ref, hash(t, tc.digest))
			if ok != tc.want {
				t.Fatalf("ForImage(%q, %q) ok = %v, want %v", tc.ref, tc.digest, ok, tc.want)
			}
			if ok && s.PrefetchFiles(v1.Hash{}, hash(t, digestA)) == nil {
				t.Error("the source ForImage returned prefetches nothing")
			}
			if !ok && s != nil {
				t.Errorf("ForImage returned a source %v with ok false", s)
			}
		})
	}
}

// Every field of a fully populated profile is a key the strict reader knows.
func TestKeysCoverTheFormat(t *testing.T) {
	p := sample()
	p.SourceDigest = digestC
	p.LastRecord = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	p.Rules = Rules{Include: []string{"a"}, Exclude: []string{"b"}, MinCount: 1, LayerBytes: 1, ImageBytes: 1}
	p.Layers[0].SourceDigest = digestC
	p.Layers[0].Files[0].RankSum = 1
	b, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	var all map[string]any
	if err := json.Unmarshal(b, &all); err != nil {
		t.Fatal(err)
	}
	if len(all) != len(profileShape.obj) {
		t.Errorf("the profile has %d keys, the strict reader knows %d", len(all), len(profileShape.obj))
	}
	if _, err := ParseProfile(b); err != nil {
		t.Fatalf("a fully populated profile: %v", err)
	}
}

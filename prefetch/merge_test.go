package prefetch

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func paths(l Layer) []string {
	var out []string
	for _, f := range l.Files {
		out = append(out, f.Path)
	}
	return out
}

func run(image, digest string, files ...string) *Profile {
	l := Layer{Digest: digest, Runs: 1}
	for i, f := range files {
		l.Files = append(l.Files, File{Path: f, Size: int64(len(f)), Count: 1, RankSum: int64(i)})
	}
	return &Profile{Version: ProfileVersion, Kind: ProfileKind, Image: image, Layers: []Layer{l}}
}

func TestMergeOrderAndCounts(t *testing.T) {
	const img = "registry.example/golang:1.22"
	runs := []*Profile{
		run(img, digestA, "a", "b", "c"),
		run(img, digestA, "b", "a", "d"),
		run(img, digestA, "a", "c", "b"),
		run(img, digestB, "x"),
	}
	m, err := Merge(runs...)
	if err != nil {
		t.Fatal(err)
	}
	if m.Image != img || len(m.Layers) != 2 || m.Layers[0].Digest != digestA || m.Layers[1].Digest != digestB {
		t.Fatalf("merged image %q layers %+v", m.Image, m.Layers)
	}
	l := m.Layers[0]
	if l.Runs != 3 {
		t.Errorf("runs = %d, want 3", l.Runs)
	}
	// Mean ranks: a (0+1+0)/3, b (1+0+2)/3 = 1, c (2+1)/2 = 1.5, d 2/1.
	if got, want := paths(l), []string{"a", "b", "c", "d"}; !slices.Equal(got, want) {
		t.Errorf("order %q, want %q", got, want)
	}
	counts := map[string]int{}
	for _, f := range l.Files {
		counts[f.Path] = f.Count
	}
	if want := map[string]int{"a": 3, "b": 3, "c": 2, "d": 1}; !mapsEqual(counts, want) {
		t.Errorf("counts %v, want %v", counts, want)
	}

	// Equal mean ranks: the higher count first, then first appearance.
	m2, err := Merge(run(img, digestA, "p", "q"), run(img, digestA, "q", "p"), run(img, digestA, "r", "s", "p"))
	if err != nil {
		t.Fatal(err)
	}
	// p (0+1+2)/3 = 1, q (1+0)/2 = 0.5, r 0, s 1: r, q, p (count 3), s (count 1).
	if got, want := paths(m2.Layers[0]), []string{"r", "q", "p", "s"}; !slices.Equal(got, want) {
		t.Errorf("tie order %q, want %q", got, want)
	}
}

func mapsEqual(a, b map[string]int) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

func TestMergeIsDeterministicAndAssociative(t *testing.T) {
	const img = "registry.example/golang:1.22"
	runs := []*Profile{
		run(img, digestA, "a", "b", "c", "e"),
		run(img, digestA, "c", "b", "a"),
		run(img, digestB, "y", "x"),
		run(img, digestA, "e", "a"),
		run(img, digestB, "x", "z"),
	}
	var first []byte
	for i := range 5 {
		m, err := Merge(runs...)
		if err != nil {
			t.Fatal(err)
		}
		b, err := m.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			first = b
		} else if !bytes.Equal(first, b) {
			t.Fatalf("merge %d gave different bytes:\n%s\n%s", i, first, b)
		}
	}
	// Folding runs one at a time into a profile gives the same profile as
	// merging them all at once.
	acc, err := Merge(runs[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range runs[1:] {
		if acc, err = Merge(acc, r); err != nil {
			t.Fatal(err)
		}
	}
	b, err := acc.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(first, b) {
		t.Errorf("incremental merge differs from merging at once:\n%s\n%s", first, b)
	}
}

func TestMergeKeepsRulesAndFillsLayers(t *testing.T) {
	a := run("", digestA, "a")
	a.Rules = Rules{Exclude: []string{"**/*.md"}}
	b := run("registry.example/x:1", "", "b")
	b.Layers[0].DiffID = diffA
	b.Layers[0].Digest = digestA
	b.Layers[0].Size = 1234
	b.Digest = imgDgst
	b.Rules = Rules{MinCount: 3}
	m, err := Merge(a, b)
	if err != nil {
		t.Fatal(err)
	}
	if m.Image != "registry.example/x:1" || m.Digest != imgDgst {
		t.Errorf("image %q digest %q", m.Image, m.Digest)
	}
	if !slices.Equal(m.Rules.Exclude, []string{"**/*.md"}) || m.Rules.MinCount != 0 {
		t.Errorf("rules %+v, want the first profile's", m.Rules)
	}
	if len(m.Layers) != 1 || m.Layers[0].DiffID != diffA || m.Layers[0].Size != 1234 || m.Layers[0].Runs != 2 {
		t.Errorf("layers %+v", m.Layers)
	}
}

func TestMergeRejectsOtherImages(t *testing.T) {
	a := run("registry.example/golang:1.22", digestA, "a")
	if _, err := Merge(a, run("registry.example/python:3", digestA, "a")); err == nil || !strings.Contains(err.Error(), "python") {
		t.Errorf("merging profiles of two references: %v", err)
	}
	a.Digest = imgDgst
	b := run("registry.example/golang:1.22", digestA, "a")
	b.Digest = digestC
	if _, err := Merge(a, b); err == nil || !strings.Contains(err.Error(), digestC) {
		t.Errorf("merging profiles of two digests: %v", err)
	}
	bad := run("", digestA, "a")
	bad.Layers[0].Files[0].Count = 9
	if _, err := Merge(a, bad); err == nil || !strings.Contains(err.Error(), "profile 1") {
		t.Errorf("merging an invalid profile: %v", err)
	}
}

func writeRecords(t *testing.T, dir, image string, recs []AccessRecord, tail string) string {
	t.Helper()
	var buf bytes.Buffer
	for _, r := range recs {
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		buf.Write(append(b, '\n'))
	}
	buf.WriteString(tail)
	file := filepath.Join(dir, RecordFileName(image))
	if err := os.WriteFile(file, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

func records(image string, entries ...string) []AccessRecord {
	// entries: layer digest, path, layer digest, path, ...
	var out []AccessRecord
	t0 := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	for i := 0; i < len(entries); i += 2 {
		out = append(out, AccessRecord{Time: t0.Add(time.Duration(i) * time.Millisecond), Image: image, Layer: entries[i], Path: entries[i+1], Size: int64(10 * (i + 1))})
	}
	return out
}

func TestRecordFileName(t *testing.T) {
	for in, want := range map[string]string{
		"":                                       "unknown.jsonl",
		"registry.example:5000/golang:1.22":      "registry.example_5000_golang_1.22.jsonl",
		"docker.io/library/golang@sha256:abc-de": "docker.io_library_golang_sha256_abc-de.jsonl",
	} {
		if got := RecordFileName(in); got != want {
			t.Errorf("RecordFileName(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCollectDir(t *testing.T) {
	ctx := context.Background()
	const img = "registry.example/golang:1.22"
	dir := t.TempDir()
	// Two runs over layer A (the second starts where /bin/sh comes again),
	// one over B, interleaved as the snapshotter writes them.
	writeRecords(t, dir, img, records(img,
		digestA, "/bin/sh",
		digestB, "/usr/local/go/bin/go",
		digestA, "/etc/passwd",
		digestA, "/lib/libc.so.6",
		digestA, "/bin/sh",
		digestA, "/lib/libc.so.6",
	), `{"time":"2026-11-23T12:00:01Z","image":"`+img+`","layer":"`+digestA+`","pa`)

	p, err := CollectDir(ctx, dir, "", time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Image != img || len(p.Layers) != 2 {
		t.Fatalf("profile image %q, %d layers", p.Image, len(p.Layers))
	}
	a := p.Layers[0]
	if a.Digest != digestA || a.Runs != 2 {
		t.Errorf("layer A: digest %s runs %d, want %s and 2", a.Digest, a.Runs, digestA)
	}
	// bin/sh rank 0+0, libc (2+1)/2, passwd 1/1.
	if got, want := paths(a), []string{"bin/sh", "etc/passwd", "lib/libc.so.6"}; !slices.Equal(got, want) {
		t.Errorf("layer A files %q, want %q", got, want)
	}
	// The records give bin/sh sizes 10 and 90: the largest is kept.
	if a.Files[0].Count != 2 || a.Files[0].Size != 90 {
		t.Errorf("bin/sh: %+v, want count 2, size 90", a.Files[0])
	}
	if b := p.Layers[1]; b.Digest != digestB || b.Runs != 1 || !slices.Equal(paths(b), []string{"usr/local/go/bin/go"}) {
		t.Errorf("layer B: %+v", b)
	}

	// Records up to the profile's last one are not collected again.
	if want := time.Date(2026, 11, 23, 12, 0, 0, 10e6, time.UTC); !p.LastRecord.Equal(want) {
		t.Errorf("LastRecord %s, want %s", p.LastRecord, want)
	}
	again, err := CollectDir(ctx, dir, img, p.LastRecord)
	if err != nil || len(again.Layers) != 0 {
		t.Errorf("CollectDir since the last record: %+v, %v; want no layers", again, err)
	}
	later, err := CollectDir(ctx, dir, img, p.LastRecord.Add(-3*time.Millisecond))
	if err != nil || len(later.Layers) != 1 || !slices.Equal(paths(later.Layers[0]), []string{"bin/sh", "lib/libc.so.6"}) {
		t.Errorf("CollectDir of the last two records: %+v, %v", later, err)
	}

	// With a second image in the directory, the image must be named.
	const other = "registry.example/python:3"
	writeRecords(t, dir, other, records(other, digestC, "/usr/bin/python3"), "")
	if _, err := CollectDir(ctx, dir, "", time.Time{}); err == nil || !strings.Contains(err.Error(), "2 images") {
		t.Errorf("CollectDir of two images without --image: %v", err)
	}
	p2, err := CollectDir(ctx, dir, other, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	if p2.Image != other || len(p2.Layers) != 1 || p2.Layers[0].Digest != digestC {
		t.Errorf("python profile %+v", p2)
	}
	if _, err := CollectDir(ctx, dir, "registry.example/absent:1", time.Time{}); err == nil {
		t.Error("CollectDir of an image without records succeeded")
	}
	if _, err := CollectDir(ctx, t.TempDir(), "", time.Time{}); err == nil || !strings.Contains(err.Error(), "no *.jsonl") {
		t.Errorf("CollectDir of an empty directory: %v", err)
	}
}

func TestReadAccessRecordsErrors(t *testing.T) {
	ctx := context.Background()
	good := `{"time":"2026-11-23T12:00:00Z","image":"x","layer":"` + digestA + `","path":"/a","size":1}`
	for _, tc := range []struct{ name, in, want string }{
		{"bad json in the middle", good + "\n{not json}\n" + good + "\n", "line 2"},
		{"bad layer", `{"layer":"nope","path":"/a"}` + "\n", `line 1: layer "nope"`},
		{"no path", `{"layer":"` + digestA + `"}` + "\n", "line 1: path: empty path"},
		{"negative size", `{"layer":"` + digestA + `","path":"/a","size":-2}` + "\n", "negative size"},
		{"bad last line with newline", good + "\n{\n", "line 2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadAccessRecords(ctx, strings.NewReader(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ReadAccessRecords = %v, want an error with %q", err, tc.want)
			}
		})
	}
	recs, err := ReadAccessRecords(ctx, strings.NewReader("\n"+good+"\n\n"+good+"\n"+`{"layer":"sha2`))
	if err != nil || len(recs) != 2 || recs[0].Path != "a" {
		t.Fatalf("ReadAccessRecords with blank lines and an unfinished last line = %+v, %v", recs, err)
	}
}

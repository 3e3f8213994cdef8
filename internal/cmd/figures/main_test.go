package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazybase/lazybase/internal/benchfig"
)

func TestRunRegeneratesBetweenMarkers(t *testing.T) {
	dir := t.TempDir()
	begin, end := benchfig.Markers(benchfig.ExportBenchName)
	readme := filepath.Join(dir, "README.md")
	doc := "intro\n" + begin + "\nhand-typed figures\n" + end + "\noutro\n"
	if err := os.WriteFile(readme, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := run(dir, readme, false); err == nil || !strings.Contains(err.Error(), "no figures") {
		t.Errorf("run without JSON: error %v, want no figures", err)
	}
	data, err := json.Marshal(benchfig.ExportBench{Benchmark: "TestExportBench", CPUs: 2, Links: []benchfig.Link{{
		Name:     "1 Gbit/s, 20 ms RTT",
		Variants: []benchfig.Variant{{Key: "a", What: "overlayfs", Median: benchfig.Run{TotalSeconds: 20}}},
		Targets:  []benchfig.Target{benchfig.NewTarget("(c)/(a) build and push", "ratio", 0.5, 0.6)},
	}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "exportbench.json"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	changed, err := run(dir, readme, true)
	if err != nil || len(changed) != 1 {
		t.Fatalf("check of a stale README: changed %v, error %v; want exportbench", changed, err)
	}
	if b, _ := os.ReadFile(readme); string(b) != doc {
		t.Errorf("-check wrote the README")
	}
	if changed, err = run(dir, readme, false); err != nil || len(changed) != 1 {
		t.Fatalf("run: changed %v, error %v", changed, err)
	}
	b, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	got := string(b)
	if strings.Contains(got, "hand-typed") || !strings.Contains(got, "| (a) overlayfs | 20.00 s |") ||
		!strings.HasPrefix(got, "intro\n"+begin+"\n") || !strings.HasSuffix(got, "\n"+end+"\noutro\n") {
		t.Errorf("regenerated README:\n%s", got)
	}
	if changed, err = run(dir, readme, true); err != nil || len(changed) != 0 {
		t.Errorf("check after regenerating: changed %v, error %v; want up to date", changed, err)
	}

	// A README without the markers is refused and left alone.
	bare := filepath.Join(dir, "BARE.md")
	if err := os.WriteFile(bare, []byte("no markers\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := run(dir, bare, false); err == nil || !strings.Contains(err.Error(), "found 0 times") {
		t.Errorf("run on a file without markers: error %v", err)
	}
	// So is unreadable JSON.
	if err := os.WriteFile(filepath.Join(dir, "exportbench.json"), []byte("{"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := run(dir, readme, false); err == nil || !strings.Contains(err.Error(), "exportbench.json") {
		t.Errorf("run with broken JSON: error %v, want one naming the file", err)
	}
}

//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/benchfig"
)

// benchOutEnv names the directory benchmarks write their figures to as
// JSON (default: bench/ under $LAZYBASE_CACHE, else .cache/bench in the
// checkout). `make figures` reads it to regenerate the README's figures.
const benchOutEnv = "LAZYBASE_BENCH_OUT"

// benchOutDir returns the directory benchmark figures go to.
func benchOutDir() (string, error) {
	if d := os.Getenv(benchOutEnv); d != "" {
		return d, nil
	}
	root, err := harness.RepoRoot()
	if err != nil {
		return "", err
	}
	return filepath.Join(harness.CacheDir(root), "bench"), nil
}

// writeFigures writes v as indented JSON to NAME.json in the benchmark
// output directory ($LAZYBASE_BENCH_OUT) and logs the path; the file is
// replaced atomically, so a reader never sees half of it. A benchmark
// calls it once, with everything the README's figures for NAME need;
// `make figures` renders them. It fails the test if the file cannot be
// written.
func writeFigures(t testing.TB, name string, v any) string {
	t.Helper()
	if !benchfig.ValidName(name) {
		t.Fatalf("figures name %q: want lower-case letters, digits and dashes", name)
	}
	dir, err := benchOutDir()
	if err != nil {
		t.Fatalf("figures %s: %v", name, err)
	}
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatalf("figures %s: encoding: %v", name, err)
	}
	path := filepath.Join(dir, name+".json")
	if err := writeFileAtomic(path, append(b, '\n')); err != nil {
		t.Fatalf("figures %s: %v", name, err)
	}
	t.Logf("figures: %s written to %s (render them into README.md with `make figures BENCH_OUT=%s`)", name, path, dir)
	return path
}

// writeFileAtomic writes b to path through a temporary file in the same
// directory, creating the directory if needed.
func writeFileAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return fmt.Errorf("writing %s: %w", path, err)
	}
	return nil
}

// TestWriteFigures writes figures into $LAZYBASE_BENCH_OUT and reads them
// back; it needs no daemon.
func TestWriteFigures(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "out")
	t.Setenv(benchOutEnv, dir)
	type fig struct {
		Ratio float64 `json:"ratio"`
	}
	path := writeFigures(t, "demo-figures", fig{Ratio: 0.58})
	if path != filepath.Join(dir, "demo-figures.json") {
		t.Errorf("written to %s, want demo-figures.json in %s", path, dir)
	}
	writeFigures(t, "demo-figures", fig{Ratio: 0.61})
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var got fig
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatalf("reading back %s: %v", path, err)
	}
	if got.Ratio != 0.61 {
		t.Errorf("read back %+v, want the second write's 0.61", got)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("%s holds %d entries, want only demo-figures.json", dir, len(ents))
	}
}

// TestExportBenchTargets checks the targets TestExportBench prints from
// its medians: only those whose variants ran, each bound as the issue
// sets it.
func TestExportBenchTargets(t *testing.T) {
	med := map[string]benchfig.Run{
		"a":      {TotalSeconds: 20, ExportSeconds: 1},
		"b":      {TotalSeconds: 15},
		"c":      {TotalSeconds: 12, ExportSeconds: 1.2, FetchedBytes: 150},
		"c-lazy": {TotalSeconds: 15},
		"w":      {TotalSeconds: 11},
	}
	got := map[string]string{}
	for _, tg := range exportBenchTargets(med, 140) {
		got[tg.Name] = fmt.Sprintf("%.3f<=%.3f %s", tg.Value, tg.Limit, tg.Verdict())
	}
	want := map[string]string{
		"(c)/(a)":                              "0.600<=0.600 PASS",
		"(c)/(b)":                              "0.800<=0.800 PASS",
		"(c-lazy)/(a)":                         "0.750<=0.700 MISS",
		"(c)/(w)":                              "1.091<=1.100 PASS",
		"export (c)/(a)":                       "1.200<=1.000 MISS",
		"bytes fetched by (c) / eStargz bases": "150.000<=140.000 MISS",
	}
	if len(got) != len(want) {
		t.Errorf("targets %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("target %s: %q, want %q", k, got[k], v)
		}
	}
	delete(med, "w")
	delete(med, "b")
	for _, tg := range exportBenchTargets(med, 140) {
		if strings.Contains(tg.Name, "(w)") || strings.Contains(tg.Name, "(b)") {
			t.Errorf("target %s without its variant", tg.Name)
		}
	}
}

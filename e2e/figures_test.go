//go:build e2e

package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/lazybase/lazybase/e2e/harness"
)

// benchOutEnv names the directory benchmarks write their figures to as
// JSON (default: bench/ under $LAZYBASE_CACHE, else .cache/bench in the
// checkout). `make figures` reads it to regenerate the README's figures.
const benchOutEnv = "LAZYBASE_BENCH_OUT"

// figureName is what writeFigures accepts as a name: it becomes a file
// name and the README's marker (<!-- figures:NAME:begin -->).
var figureName = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)

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
	if !figureName.MatchString(name) {
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

package convert_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/tmpsweep"
)

// TestNewSweepsLeftoverTempDirs leaves temporary directories of converters
// in a temp dir: one of a killed run (unlocked, old), one of a live
// converter (locked, old), one just made (unlocked, fresh). A new Converter
// there removes only the first; its own directory is locked against
// sweeps until Close.
func TestNewSweepsLeftoverTempDirs(t *testing.T) {
	tmp := t.TempDir()
	past := time.Now().Add(-2 * tmpsweep.MinAge)
	mk := func(name string, aged bool) string {
		p := filepath.Join(tmp, name)
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(p, "layer-1"), []byte("half a layer"), 0o644); err != nil {
			t.Fatal(err)
		}
		if aged {
			if err := os.Chtimes(p, past, past); err != nil {
				t.Fatal(err)
			}
		}
		return p
	}
	dead := mk("lazybase-convert-dead", true)
	live := mk("lazybase-convert-live", true)
	fresh := mk("lazybase-convert-fresh", false)
	other := mk("not-ours", true)
	lock, err := tmpsweep.LockDir(live)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close()

	c, err := convert.New(convert.WithTempDir(tmp))
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]bool{dead: false, live: true, fresh: true, other: true} {
		if _, err := os.Stat(p); (err == nil) != want {
			t.Errorf("%s: exists %v, want %v", filepath.Base(p), err == nil, want)
		}
	}
	// The new converter's own directory is locked: a sweep keeps it even
	// when it looks old.
	own, _ := filepath.Glob(filepath.Join(tmp, "lazybase-convert-*"))
	for _, p := range own {
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
	}
	lock.Close() // the live one's owner goes away
	removed, err := tmpsweep.Sweep(t.Context(), tmp, "lazybase-convert-*", tmpsweep.MinAge)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 2 || !slices.Contains(removed, live) || !slices.Contains(removed, fresh) {
		t.Errorf("second sweep removed %q, want %s and %s only", removed, live, fresh)
	}
	for _, p := range own {
		if p == live || p == fresh {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the live converter's directory was swept: %v", err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

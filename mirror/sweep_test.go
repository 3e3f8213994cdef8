package mirror

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/tmpsweep"
)

// TestRunSweepsLeftoversOfKilledRuns leaves in temp_dir what a killed run
// leaves (a converter directory with a converted layer in it, untouched
// for longer than tmpsweep.MinAge) next to a fresh one and a file of
// another program: a run whose every image is up to date (so it needs no
// converter) still removes the leftover at start, and only it.
func TestRunSweepsLeftoversOfKilledRuns(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 1024)
	tmp := t.TempDir()
	cfg := testConfig(t, src, dst, fmt.Sprintf("temp_dir = %q", tmp))
	if rep, err := newMirror(t, cfg).Run(context.Background()); err != nil || !rep.OK() {
		t.Fatalf("first run: %v %+v", err, rep)
	}
	old := filepath.Join(tmp, "lazybase-convert-111")
	fresh := filepath.Join(tmp, "lazybase-convert-222")
	other := filepath.Join(tmp, "other-program")
	for _, d := range []string{old, fresh} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "layer"), make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(other, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	past := time.Now().Add(-2 * tmpsweep.MinAge)
	for _, p := range []string{old, other} {
		if err := os.Chtimes(p, past, past); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := newMirror(t, cfg).Run(context.Background())
	if err != nil || !rep.OK() || rep.Skipped != 10 {
		t.Fatalf("second run: %v %s", err, rep.Summary())
	}
	if rep.Swept != 1 {
		t.Errorf("report says %d swept, want 1", rep.Swept)
	}
	if _, err := os.Stat(old); !os.IsNotExist(err) {
		t.Errorf("leftover of a killed run still there: %v", err)
	}
	for _, p := range []string{fresh, other} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s removed: %v", p, err)
		}
	}
}

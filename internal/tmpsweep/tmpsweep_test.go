package tmpsweep

import (
	"bufio"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// old sets p's modification time to well past MinAge.
func old(t *testing.T, p string) {
	t.Helper()
	past := time.Now().Add(-2 * MinAge)
	if err := os.Chtimes(p, past, past); err != nil {
		t.Fatal(err)
	}
}

func TestSweepRemovesOnlyAgedUnlockedMatches(t *testing.T) {
	elsewhere := filepath.Join(t.TempDir(), "target")
	if err := os.WriteFile(elsewhere, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	mk := func(dir, name string, isDir, aged bool) string {
		p := filepath.Join(dir, name)
		if isDir {
			if err := os.MkdirAll(filepath.Join(p, "sub"), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(p, "sub", "f"), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		} else if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		if aged {
			old(t, p)
		}
		return p
	}
	for _, tc := range []struct {
		name    string
		isDir   bool
		aged    bool
		locked  bool
		symlink bool
		removed bool
	}{
		{name: "tmp-dead-file", aged: true, removed: true},
		{name: "tmp-dead-dir", isDir: true, aged: true, removed: true},
		{name: "tmp-fresh-file"},
		{name: "tmp-fresh-dir", isDir: true},
		{name: "tmp-live-file", aged: true, locked: true},
		{name: "tmp-live-dir", isDir: true, aged: true, locked: true},
		{name: "tmp-symlink", symlink: true},
		{name: "other-dead-file", aged: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir() // each case alone: a sweep sees only it
			var p string
			if tc.symlink {
				p = filepath.Join(dir, tc.name)
				if err := os.Symlink(elsewhere, p); err != nil {
					t.Fatal(err)
				}
				old(t, elsewhere)
			} else {
				p = mk(dir, tc.name, tc.isDir, tc.aged)
			}
			if tc.locked {
				f, err := os.Open(p)
				if err != nil {
					t.Fatal(err)
				}
				defer f.Close()
				if err := Lock(f); err != nil {
					t.Fatal(err)
				}
			}
			removed, err := Sweep(context.Background(), dir, "tmp-*", MinAge)
			if err != nil {
				t.Fatal(err)
			}
			_, statErr := os.Lstat(p)
			gone := os.IsNotExist(statErr)
			if gone != tc.removed || slices.Contains(removed, p) != tc.removed {
				t.Errorf("removed %v (reported %q), want removed %v", gone, removed, tc.removed)
			}
		})
	}
	if b, err := os.ReadFile(elsewhere); err != nil || string(b) != "keep" {
		t.Errorf("symlink target touched: %q %v", b, err)
	}
	if _, err := Sweep(context.Background(), filepath.Join(t.TempDir(), "missing"), "tmp-*", MinAge); err != nil {
		t.Errorf("missing dir: %v", err)
	}
}

// TestSweepKilledOwner locks a file from a child process: the sweep keeps
// the file while the child lives and removes it once the child is killed.
func TestSweepKilledOwner(t *testing.T) {
	if p := os.Getenv("TMPSWEEP_HOLD"); p != "" {
		f, err := os.Open(p)
		if err != nil {
			os.Exit(2)
		}
		if err := Lock(f); err != nil {
			os.Exit(3)
		}
		os.Stdout.WriteString("locked\n")
		time.Sleep(time.Minute)
		os.Exit(0)
	}
	dir := t.TempDir()
	p := filepath.Join(dir, "tmp-owned")
	if err := os.WriteFile(p, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestSweepKilledOwner$")
	cmd.Env = append(os.Environ(), "TMPSWEEP_HOLD="+p)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if line, err := bufio.NewReader(out).ReadString('\n'); err != nil || line != "locked\n" {
		t.Fatalf("child: %q %v", line, err)
	}
	old(t, p)
	if removed, _ := Sweep(context.Background(), dir, "tmp-*", MinAge); len(removed) != 0 {
		t.Fatalf("swept %q while its owner lives", removed)
	}
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	removed, err := Sweep(context.Background(), dir, "tmp-*", MinAge)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != p {
		t.Fatalf("after the owner was killed swept %q, want %s", removed, p)
	}
}

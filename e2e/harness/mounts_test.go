package harness

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestUnescapeDecodesMountinfoOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/tmp/a\040b`:  "/tmp/a b",
		`/plain`:       "/plain",
		`/x\011y\134z`: "/x\ty\\z",
		`/end\04`:      `/end\04`,
	} {
		if got := unescape(in); got != want {
			t.Errorf("unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestUnmountUnder mounts nested tmpfs mounts, one of them busy, and checks
// that unmountUnder removes them all and nothing outside the directory.
func TestUnmountUnder(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	dir := t.TempDir()
	outer := filepath.Join(dir, "a b")
	inner := filepath.Join(outer, "inner")
	if err := os.MkdirAll(outer, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", outer, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount tmpfs: %v", err)
	}
	if err := os.Mkdir(inner, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", inner, "tmpfs", 0, "size=1m"); err != nil {
		t.Fatal(err)
	}
	// A file held open keeps the inner mount busy: only a lazy unmount works.
	f, err := os.Create(filepath.Join(inner, "busy"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()

	ms, err := Mounts(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 {
		t.Fatalf("Mounts(%s) = %v, want 2", dir, ms)
	}
	n, err := unmountUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("unmounted %d, want 2", n)
	}
	if ms, _ := Mounts(dir); len(ms) != 0 {
		t.Errorf("left mounted: %v", ms)
	}
}

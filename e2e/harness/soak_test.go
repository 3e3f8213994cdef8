package harness

import (
	"os"
	"path/filepath"
	"testing"
)

func TestMetricValue(t *testing.T) {
	text := `# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
go_goroutines_total_bogus 7
lazybase_snapshotter_mounted_layers{kind="x"} 3
process_resident_memory_bytes 1.2345e+07
bad_value abc
`
	for _, tc := range []struct {
		name string
		want float64
		ok   bool
	}{
		{"go_goroutines", 42, true},
		{"process_resident_memory_bytes", 12345000, true},
		{"lazybase_snapshotter_mounted_layers", 0, false}, // labelled only
		{"go_gorout", 0, false},                           // a prefix is not a name
		{"bad_value", 0, false},
		{"absent", 0, false},
	} {
		got, ok := MetricValue(text, tc.name)
		if ok != tc.ok || got != tc.want {
			t.Errorf("MetricValue(%q) = %v, %v; want %v, %v", tc.name, got, ok, tc.want, tc.ok)
		}
	}
}

func TestDiskUsage(t *testing.T) {
	dir := t.TempDir()
	if n, err := DiskUsage(filepath.Join(dir, "missing")); err != nil || n != 0 {
		t.Errorf("missing path: %d, %v; want 0, nil", n, err)
	}
	empty, err := DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	body := make([]byte, 1<<20)
	for i := range body {
		body[i] = byte(i)
	}
	f := filepath.Join(dir, "sub", "f")
	if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(f, body, 0o644); err != nil {
		t.Fatal(err)
	}
	one, err := DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if one-empty < 1<<20 {
		t.Errorf("a 1 MiB file added %d bytes, want at least %d", one-empty, 1<<20)
	}
	// A hard link is counted once, as du does.
	if err := os.Link(f, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	linked, err := DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if linked-one >= 1<<20 {
		t.Errorf("a hard link added %d bytes: counted twice", linked-one)
	}
}

func TestProcessRSS(t *testing.T) {
	n, err := ProcessRSS(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if n <= 0 {
		t.Errorf("own RSS %d, want > 0", n)
	}
	if _, err := ProcessRSS(1 << 30); err == nil {
		t.Error("RSS of a PID that cannot exist: no error")
	}
}

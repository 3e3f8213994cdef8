package harness

import (
	"crypto/sha256"
	"os"
	"testing"
	"time"
)

// TestProcessCPU: the test's own CPU time grows by about the CPU it burns.
func TestProcessCPU(t *testing.T) {
	before, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// Burn CPU until the process's CPU time has grown by 100ms; on a shared
	// machine that takes longer than 100ms of wall time, so the loop is
	// bounded by a generous wall-time cap instead of a fixed length.
	buf := make([]byte, 1<<20)
	var after time.Duration
	for start := time.Now(); time.Since(start) < 30*time.Second; {
		for range 20 {
			sha256.Sum256(buf)
		}
		if after, err = ProcessCPU(os.Getpid()); err != nil {
			t.Fatal(err)
		}
		if after-before >= 100*time.Millisecond {
			break
		}
	}
	if d := after - before; d < 100*time.Millisecond {
		t.Errorf("CPU time grew by %s over 30s of busy loop", d)
	}
	if _, err := ProcessCPU(1 << 30); err == nil {
		t.Error("CPU time of a PID that cannot exist: no error")
	}
}

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
	start := time.Now()
	buf := make([]byte, 1<<20)
	for time.Since(start) < 300*time.Millisecond {
		sha256.Sum256(buf)
	}
	after, err := ProcessCPU(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// At least a third of the busy wall time: the machine may be shared.
	if d := after - before; d < 100*time.Millisecond {
		t.Errorf("CPU time grew by %s over a 300ms busy loop", d)
	}
	if _, err := ProcessCPU(1 << 30); err == nil {
		t.Error("CPU time of a PID that cannot exist: no error")
	}
}

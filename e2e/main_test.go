//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
)

// timings collects the figures the tests measure, printed as one summary
// line when the run ends.
var timings struct {
	sync.Mutex
	order []string
	val   map[string]time.Duration
}

// record notes a timing for the summary and logs it on t.
func record(t testing.TB, name string, d time.Duration) {
	t.Helper()
	t.Logf("timing: %s = %s", name, d.Round(time.Millisecond))
	timings.Lock()
	defer timings.Unlock()
	if timings.val == nil {
		timings.val = map[string]time.Duration{}
	}
	if _, ok := timings.val[name]; !ok {
		timings.order = append(timings.order, name)
	}
	timings.val[name] = d
}

func TestMain(m *testing.M) {
	start := time.Now()
	code := m.Run()
	timings.Lock()
	var parts []string
	for _, k := range timings.order {
		parts = append(parts, fmt.Sprintf("%s=%s", k, timings.val[k].Round(time.Millisecond)))
	}
	timings.Unlock()
	sort.Strings(parts)
	fmt.Printf("e2e timings: total=%s %s\n", time.Since(start).Round(time.Second), strings.Join(parts, " "))
	cleanupImages()
	harness.Cleanup()
	os.Exit(code)
}

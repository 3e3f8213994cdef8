//go:build e2e

package e2e

import (
	"context"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
)

// TestShapedFullPull proves the shaping proxy works with the real daemons:
// a containerd pull of the gzip debian-like image through a 40 MiB/s link
// with 25 ms round trips takes at least size/bandwidth, every request is
// delayed by the RTT, and nothing is fetched after the pull.
func TestShapedFullPull(t *testing.T) {
	const (
		bandwidth = 40 << 20
		rtt       = 25 * time.Millisecond
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t, harness.WithBandwidth(bandwidth), harness.WithRTT(rtt))
	debian, _ := publishAll(ctx, t, s)
	var size int64
	for _, n := range layerSizes(t, debian.gzip) {
		size += n
	}

	p := s.Registry.Proxy
	p.SetPhase("pull")
	start := time.Now()
	if err := s.Containerd.Pull(ctx, s.Registry.Ref(repoDebian, tagGzip), ""); err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	record(t, "shaped-full-pull-debian", took)
	floor := time.Duration(float64(size) / bandwidth * float64(time.Second))
	if took < floor*9/10 {
		t.Errorf("pulling %d bytes at %d B/s took %s, want at least %s", size, bandwidth, took, floor)
	}
	for _, e := range p.Events() {
		if e.Duration < rtt {
			t.Errorf("%s %s took %s, less than the %s RTT", e.Method, e.Path, e.Duration, rtt)
		}
	}
	st := p.StatsFor("pull")
	for _, d := range layerDigests(t, debian.gzip) {
		if b := st.Blob(d); b.GETs != 1 || b.Repeated() != 0 {
			t.Errorf("layer %s: %d GETs, %d bytes repeated", d, b.GETs, b.Repeated())
		}
	}

	p.SetPhase("run")
	if _, err := s.Containerd.Run(ctx, s.Registry.Ref(repoDebian, tagGzip), "", "true", "true"); err != nil {
		t.Fatal(err)
	}
	if st := p.StatsFor("run"); st.Requests != 0 {
		t.Errorf("running the pulled image made %d registry requests", st.Requests)
	}
}

//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/lazypull"
)

// TestRestartScenarios runs one long-lived stack (containerd, buildkitd,
// lazybase snapshotter with the final base export-base and the builder
// base lazy-only) through the restarts a builder node sees, one after the
// other: buildkitd restarted; the snapshotter stopped with SIGTERM and
// started again; the snapshotter killed with SIGKILL while its guard
// transfers a final-base blob over a slow link; the snapshotter started
// while the registry is gone. After each, a build with an image push is
// started at once, as a user's next command would, and must succeed; the
// final base's blobs, committed by the guard before, must not be fetched
// from the registry again by the build or the export.
func TestRestartScenarios(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(guardConfig("export-base", "lazy-only")),
	)
	debian, _ := publishAll(ctx, t, s)
	sizes := layerSizes(t, debian.estargz)
	work := multiStageContext(t, s, tagEStargz)
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	p := s.Registry.Proxy
	ns := harness.BuildkitNamespace

	if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
		t.Fatalf("first build: %v\n%s", err, s.Logs(40))
	}
	materialized := func(t *testing.T) {
		t.Helper()
		var last map[string]exportguard.LayerStatus
		err := eventually.Wait(ctx, 3*time.Minute, func() error {
			last = guardStates(ctx, t, s)
			for d := range sizes {
				if l := last[d]; !l.Materialized {
					return fmt.Errorf("final base layer %s: %q %s", d, l.State, l.Error)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatalf("final base layers materialized: %v\n%+v\n%s", err, last, s.Logs(40))
		}
	}
	materialized(t)
	// The largest final-base layer: the one whose transfer a kill cuts.
	var big string
	for d, n := range sizes {
		if big == "" || n > sizes[big] {
			big = d
		}
	}
	content := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := s.Containerd.CtrNS(ctx, ns, append([]string{"content"}, args...)...)
		if err != nil {
			t.Fatalf("ctr content %v: %v", args, err)
		}
		return out
	}

	scenarios := []struct {
		name    string
		restart func(t *testing.T)
	}{
		{"buildkitd", func(t *testing.T) {
			if err := s.Buildkit.Restart(ctx); err != nil {
				t.Fatalf("restarting buildkitd: %v\n%s", err, s.Logs(40))
			}
		}},
		{"snapshotter-sigterm", func(t *testing.T) {
			if err := s.StopSnapshotter(); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if err := s.StartSnapshotter(ctx); err != nil {
				t.Fatalf("starting the snapshotter: %v\n%s", err, s.Logs(40))
			}
			record(t, "restart-snapshotter-listen", time.Since(start))
		}},
		{"snapshotter-kill9-mid-transfer", func(t *testing.T) {
			// The next daemon's guard finds the blob gone and fetches it
			// again, slowly; the kill cuts that transfer.
			content(t, "rm", big)
			// containerd links a blob still in its backing store into a
			// namespace again instead of taking the bytes: collect it
			// (deleting a lease with --sync runs the garbage collector).
			for _, args := range [][]string{{"leases", "create", "--id", "e2e-restart-gc"}, {"leases", "delete", "--sync", "e2e-restart-gc"}} {
				if out, err := s.Containerd.CtrNS(ctx, ns, args...); err != nil {
					t.Fatalf("ctr %v: %v\n%s", args, err, out)
				}
			}
			p.SetBandwidth(2 << 20)
			defer p.SetBandwidth(0)
			if err := s.StopSnapshotter(); err != nil {
				t.Fatal(err)
			}
			if err := s.StartSnapshotter(ctx); err != nil {
				t.Fatalf("starting the snapshotter: %v\n%s", err, s.Logs(40))
			}
			ingest := "exportguard-" + big
			err := eventually.Wait(ctx, 2*time.Minute, func() error {
				if !strings.Contains(content(t, "active"), ingest) {
					return fmt.Errorf("no ingest %s yet", ingest)
				}
				return nil
			})
			if err != nil {
				t.Fatalf("guard transfer of %s: %v\n%s", big, err, s.Logs(40))
			}
			time.Sleep(time.Second) // some bytes in
			if err := s.KillSnapshotter(); err != nil {
				t.Fatal(err)
			}
			if strings.Contains(content(t, "ls", "-q"), big) {
				t.Errorf("blob %s committed although its transfer was killed", big)
			}
			// What the killed transfer left: an ingest, not a blob.
			var left string
			for _, line := range strings.Split(content(t, "active"), "\n") {
				if strings.Contains(line, ingest) {
					left = line
				}
			}
			if left == "" {
				t.Fatalf("no ingest %s left by the killed transfer", ingest)
			}
			t.Logf("killed mid-transfer of %s (%d bytes): %s", big, sizes[big], strings.Join(strings.Fields(left), " "))
			p.SetBandwidth(0)
			p.SetPhase("kill9-resume")
			if err := s.StartSnapshotter(ctx); err != nil {
				t.Fatalf("starting the snapshotter after SIGKILL: %v\n%s", err, s.Logs(40))
			}
			// The next start finishes the transfer, from where it stopped.
			materialized(t)
			p.SetPhase("")
			resumed := p.StatsFor("kill9-resume").Blob(big).Bytes
			t.Logf("the restarted guard fetched %d of %d bytes", resumed, sizes[big])
			if resumed >= sizes[big] {
				t.Errorf("the restarted guard fetched %d bytes of a %d-byte blob: it started over", resumed, sizes[big])
			}
			if strings.Contains(content(t, "active"), ingest) {
				t.Errorf("ingest %s left after the transfer finished", ingest)
			}
		}},
		{"snapshotter-registry-down", func(t *testing.T) {
			if err := s.StopSnapshotter(); err != nil {
				t.Fatal(err)
			}
			p.SetDown(true)
			if err := s.StartSnapshotter(ctx); err != nil {
				p.SetDown(false)
				t.Fatalf("starting the snapshotter with the registry down: %v\n%s", err, s.Logs(40))
			}
			// The guard takes its committed blobs from the content store,
			// and the final base's lazy mounts are restored from them.
			materialized(t)
			err := eventually.Wait(ctx, time.Minute, func() error {
				st, err := lazypull.FetchStatus(ctx, s.Snapshotter.StatusSocket())
				if err != nil {
					return err
				}
				mounted := map[string]bool{}
				for _, l := range st.Layers {
					mounted[l.Layer] = true
				}
				for d := range sizes {
					if !mounted[d] {
						return fmt.Errorf("final base layer %s not restored (restore %+v)", d, st.Restore)
					}
				}
				return nil
			})
			p.SetDown(false)
			if err != nil {
				t.Fatalf("restore with the registry down: %v\n%s", err, s.Logs(40))
			}
		}},
	}
	for _, sc := range scenarios {
		t.Run(sc.name, func(t *testing.T) {
			sc.restart(t)
			p.SetPhase(sc.name)
			out := s.Registry.DirectRef("e2e/restart", sc.name)
			start := time.Now()
			_, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...)
			p.SetPhase("")
			if err != nil {
				t.Fatalf("build and push right after the restart: %v\n%s", err, s.Logs(40))
			}
			record(t, "restart-"+sc.name+"-build-push", time.Since(start))
			st := p.StatsFor(sc.name)
			var fetched int64
			for d := range sizes {
				fetched += st.Blob(d).Bytes
			}
			t.Logf("%s: build and push %s, %d final-base blob bytes from the registry", sc.name, time.Since(start).Round(time.Millisecond), fetched)
			if fetched != 0 {
				t.Errorf("%s: the build and export fetched %d bytes of the final base's blobs, committed by the guard before", sc.name, fetched)
			}
		})
	}
}

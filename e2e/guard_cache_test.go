//go:build e2e

package e2e

import (
	"context"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
)

var plainStep = regexp.MustCompile(`^#(\d+) (.*)$`)

// runStepCached reads buildctl's plain progress and reports whether the
// step running cmd was cached; found is false when no step ran cmd.
func runStepCached(progress, cmd string) (cached, found bool) {
	ids := map[string]bool{}
	for _, l := range strings.Split(progress, "\n") {
		m := plainStep.FindStringSubmatch(strings.TrimSpace(l))
		if m == nil {
			continue
		}
		if strings.Contains(m[2], "RUN "+cmd) {
			ids[m[1]] = true
			found = true
		}
		if ids[m[1]] && strings.TrimSpace(m[2]) == "CACHED" {
			cached = true
		}
	}
	return cached, found
}

// TestGuardCacheSurvival builds the multi-stage Dockerfile, restarts
// buildkitd (same configuration and root) and builds again: is the go
// build step cached? Three builders: overlayfs with the gzip images (the
// reference: it keeps its cache); lazybase with the builder base lazy-only
// (its blob never reaches the content store: BuildKit cannot use the cache
// of a lazy blob whose session is gone); lazybase with both bases guarded
// (`lazybase guard` before the restart): the cache must survive as on
// overlayfs.
func TestGuardCacheSurvival(t *testing.T) {
	const goBuild = "go build -o /out/hello main.go"
	type leg struct {
		name      string
		opts      []harness.Option
		tag       string
		guard     bool // lazybase guard both bases before the restart
		mustCache bool
	}
	legs := []leg{
		{name: "overlayfs", opts: []harness.Option{harness.WithBuildkit()}, tag: tagGzip, mustCache: true},
		{name: "lazy-only-builder-base", tag: tagEStargz, opts: []harness.Option{
			harness.WithLazySnapshotter(harness.Lazybase), harness.WithBuildkitLazy(),
			harness.WithLazybaseConfig(guardConfig("export-base", "lazy-only")),
		}},
		{name: "guarded", tag: tagEStargz, guard: true, mustCache: true, opts: []harness.Option{
			harness.WithLazySnapshotter(harness.Lazybase), harness.WithBuildkitLazy(),
			harness.WithLazybaseConfig(guardConfig("export-base", "lazy")),
		}},
	}
	for _, l := range legs {
		t.Run(l.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
			defer cancel()
			s := harness.Start(ctx, t, l.opts...)
			publishAll(ctx, t, s)
			work := multiStageContext(t, s, l.tag)
			args := []string{"build", "--progress=plain", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}

			start := time.Now()
			_, progress, err := s.Buildkit.BuildctlProgress(ctx, args...)
			if err != nil {
				t.Fatalf("%v\n%s", err, s.Logs(40))
			}
			record(t, "guard-cache-"+l.name+"-cold", time.Since(start))
			if cached, found := runStepCached(progress, goBuild); !found || cached {
				t.Fatalf("cold build: go build step found=%v cached=%v:\n%s", found, cached, progress)
			}
			if l.guard {
				start = time.Now()
				_, stderr, err := s.Lazybase(ctx, "guard", "--status-socket="+s.Snapshotter.StatusSocket(), "--timeout", "5m",
					s.Registry.Ref(repoDebian, tagEStargz), s.Registry.Ref(repoGolang, tagEStargz))
				if err != nil {
					t.Fatalf("%v\n%s", err, s.Logs(40))
				}
				record(t, "guard-cache-"+l.name+"-barrier", time.Since(start))
				t.Logf("lazybase guard:\n%s", stderr)
			}
			// Warm, before the restart: cached everywhere.
			_, progress, err = s.Buildkit.BuildctlProgress(ctx, args...)
			if err != nil {
				t.Fatalf("%v\n%s", err, s.Logs(40))
			}
			if cached, _ := runStepCached(progress, goBuild); !cached {
				t.Errorf("warm build before the restart did not cache the go build step:\n%s", progress)
			}

			start = time.Now()
			// --debug: buildkitd then logs the cache records it drops
			// when it starts.
			if err := s.Buildkit.Restart(ctx, "--debug"); err != nil {
				t.Fatalf("restarting buildkitd: %v\n%s", err, s.Logs(40))
			}
			record(t, "guard-cache-"+l.name+"-restart", time.Since(start))
			start = time.Now()
			_, progress, err = s.Buildkit.BuildctlProgress(ctx, args...)
			if err != nil {
				t.Fatalf("build after the restart: %v\n%s", err, s.Logs(40))
			}
			record(t, "guard-cache-"+l.name+"-after-restart", time.Since(start))
			cached, found := runStepCached(progress, goBuild)
			t.Logf("%s: after the buildkitd restart the go build step is cached=%v (found=%v)", l.name, cached, found)
			if !cached {
				logs, _ := s.BuildkitLog()
				dropped := 0
				for _, line := range strings.Split(logs, "\n") {
					if !strings.Contains(line, "could not load snapshot") {
						continue
					}
					if dropped++; dropped == 1 {
						if i := strings.Index(line, `\n`); i > 0 {
							line = line[:i]
						}
						t.Logf("buildkitd after the restart: %s", line)
					}
				}
				t.Logf("buildkitd dropped %d cache records when it started again", dropped)
			}
			if l.mustCache && !cached {
				t.Errorf("%s: the go build step ran again after the buildkitd restart:\n%s", l.name, progress)
			}
		})
	}
}

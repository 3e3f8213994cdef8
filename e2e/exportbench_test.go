//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/e2e/shaper"
	"github.com/lazybase/lazybase/internal/benchfig"
)

// exportBenchRunsEnv sets how many interleaved rounds TestExportBench makes
// on each link (default 3); it prints medians.
const exportBenchRunsEnv = "LAZYBASE_BENCH_RUNS"

// exportBenchVariantsEnv limits TestExportBench to some variants, e.g.
// "a,c-lazy" (default: all).
const exportBenchVariantsEnv = "LAZYBASE_BENCH_VARIANTS"

// exportBenchLinksEnv limits TestExportBench to some shaped links, by key:
// "1g" (1 Gbit/s, 20 ms) and "100m" (100 Mbit/s, 50 ms); default both.
const exportBenchLinksEnv = "LAZYBASE_BENCH_LINKS"

// exportBenchDaemonEnv is TOML added to the lazybase daemon's configuration
// in the (c) variants, e.g. "[local]\nenable = false".
const exportBenchDaemonEnv = "LAZYBASE_BENCH_DAEMON_TOML"

// exportBenchRounds is the default number of interleaved rounds per link.
const exportBenchRounds = 3

// benchPhases are the phases of one cold build-and-push, from buildctl's
// rawjson progress.
type benchPhases struct {
	total       time.Duration // buildctl's wall time
	firstRun    time.Duration // start to the start of the first RUN step
	build       time.Duration // start to the end of the last step before the export
	export      time.Duration // start of "exporting to image" to the end
	exportFrom  time.Time     // wall clock of the export's start
	exportSteps string        // the export's steps and their durations
}

// benchLink is one shaped link between the builders and the registry.
type benchLink struct {
	key, name string
	bandwidth int64 // bytes per second
	rtt       time.Duration
}

// benchLinks are the links TestExportBench measures, in order: the issue's
// 1 Gbit/s with 20 ms round trips, and a remote registry at 100 Mbit/s with
// 50 ms, where lazy pulls matter most.
var benchLinks = []benchLink{
	{"1g", "1 Gbit/s, 20 ms RTT", 125_000_000, 20 * time.Millisecond},
	{"100m", "100 Mbit/s, 50 ms RTT", 12_500_000, 50 * time.Millisecond},
}

// benchVariant is one of the set-ups.
type benchVariant struct {
	key, what string
	tag       string
	opts      func(l benchLink) []harness.Option
	// warm, when set, runs on the stack before the timed build.
	warm func(ctx context.Context, t *testing.T, s *harness.Stack)
	// bases, when set, replaces the reference images the variant
	// publishes and builds from.
	bases func(t *testing.T, debian, golang *refImage) (*refImage, *refImage)
}

// TestExportBench is the build-and-push benchmark: the cold
// build-and-push wall time of the multi-stage build (go build in a stage
// FROM the golang-like image, the program copied onto the debian-like
// image, pushed to the registry directly), for
//
//	(a) buildkitd's containerd worker on overlayfs with the gzip images,
//	(b) buildkitd's OCI worker on BuildKit's built-in stargz snapshotter
//	    with the eStargz images,
//	(c) buildkitd's containerd worker on the lazybase daemon with the export
//	    guard (final base export-base, builder base lazy-only) with the
//	    eStargz images,
//	(c-lazy) (c) with the builder base "lazy" rather than "lazy-only": the
//	    guard's transfer of its blob, promoted once the build reads it,
//	    serves the rest of the build locally,
//	(w) (a) on a builder that already has both gzip bases pulled and
//	    unpacked in its own cache (a warm-up build FROM each, with other
//	    steps, so the timed build's steps are not cached): no pull at all,
//	    the physical limit of any pull strategy.
//
// on two shaped links, 1 Gbit/s with 20 ms round trips and 100 Mbit/s with
// 50 ms (a remote registry). Each run starts its own stack (fresh daemons,
// caches and namespaces); the variants run in interleaved rounds (a, b, c,
// c-lazy, w, a, b, …), three by default.
//
// Per variant it prints the medians of: wall time, time to the first RUN,
// build, export, bytes fetched through the shaping proxy during the build
// and push, and the CPU time of the lazybase daemon, containerd and
// buildkitd meanwhile; per link the targets with PASS/MISS: (c)/(a) ≤ 0.6,
// (c)/(b) ≤ 0.8, (c-lazy)/(a) ≤ 0.7, (c)/(w) ≤ 1.10, export(c) ≤ export(a),
// bytes fetched by (c) ≤ the eStargz bases' compressed size. The targets
// are printed, not asserted; it asserts correctness: every push succeeds,
// the pushed images carry their base's layers and the same program, (c)
// fetches no final-base blob byte during its export and no blob twice,
// and (w) fetches no base layer byte. It writes everything as
// exportbench.json (writeFigures) for `make figures`, after each link.
//
// A round of the five variants took 1m47s–2m05s at 100 Mbit/s with load
// averages of 0.2–3 on 2 cores, 3 minutes at 1 Gbit/s with 8, and 5–9
// minutes at either with 15–20 (the warm-up of (w) and each stack's
// set-up and teardown included): the six rounds of `make e2e` add about
// 12–15 minutes on an idle machine, 25–45 on a loaded one.
//
//	LAZYBASE_BENCH_RUNS=1 LAZYBASE_BENCH_LINKS=1g LAZYBASE_BENCH_VARIANTS=a,c go test -tags e2e -run 'TestExportBench$' -v ./e2e/
func TestExportBench(t *testing.T) {
	runs := exportBenchRounds
	if v := os.Getenv(exportBenchRunsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive count", exportBenchRunsEnv, v)
		}
		runs = n
	}
	links := benchLinks
	if want := os.Getenv(exportBenchLinksEnv); want != "" {
		links = nil
		for _, l := range benchLinks {
			if listHas(want, l.key) {
				links = append(links, l)
			}
		}
		if len(links) == 0 {
			t.Fatalf("%s=%q names no link (1g, 100m)", exportBenchLinksEnv, want)
		}
	}
	policy := func(builderMode string) string {
		return fmt.Sprintf(`[[policy]]
match = "*/%s:*"
mode = "export-base"
[[policy]]
match = "*/%s:*"
mode = %q
%s
`, repoDebian, repoGolang, builderMode, os.Getenv(exportBenchDaemonEnv))
	}
	shaping := func(l benchLink) []harness.Option {
		return []harness.Option{harness.WithBandwidth(l.bandwidth), harness.WithRTT(l.rtt)}
	}
	lazybase := func(toml string) func(benchLink) []harness.Option {
		return func(l benchLink) []harness.Option {
			return append([]harness.Option{
				harness.WithLazySnapshotter(harness.Lazybase),
				harness.WithLazybaseConfig(toml),
				harness.WithBuildkitLazy(),
			}, shaping(l)...)
		}
	}
	overlayfs := func(l benchLink) []harness.Option {
		return append([]harness.Option{harness.WithBuildkit()}, shaping(l)...)
	}
	variants := []benchVariant{
		{key: "a", what: "overlayfs, gzip images (containerd worker)", tag: tagGzip, opts: overlayfs},
		{key: "b", what: "BuildKit's stargz snapshotter, eStargz images (OCI worker)", tag: tagEStargz, opts: func(l benchLink) []harness.Option {
			return append([]harness.Option{harness.WithBuildkitOCI("stargz")}, shaping(l)...)
		}},
		{key: "c", what: "lazybase + export guard, builder base lazy-only, eStargz images", tag: tagEStargz, opts: lazybase(policy("lazy-only"))},
		// The builder base "lazy": once the filesystem has fetched
		// PromoteAfterBytes of a layer, the guard fetches the whole blob in
		// one stream and the rest of the build reads it locally.
		{key: "c-lazy", what: "lazybase + export guard, builder base lazy, eStargz images", tag: tagEStargz, opts: lazybase(policy("lazy"))},
		{key: "w", what: "overlayfs, gzip bases already pulled and unpacked (no pull)", tag: tagGzip, opts: overlayfs, warm: warmBases},
		// (c) on bases converted with a prefetch profile of this build, as
		// the closed prefetch loop gives them (exportbench_profile_test.go).
		profiledVariant(lazybase(policy("lazy-only"))),
	}
	if want := os.Getenv(exportBenchVariantsEnv); want != "" {
		var vs []benchVariant
		for _, v := range variants {
			if listHas(want, v.key) {
				vs = append(vs, v)
			}
		}
		if len(vs) == 0 {
			t.Fatalf("%s=%q names no variant", exportBenchVariantsEnv, want)
		}
		variants = vs
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(runs*len(links)*len(variants))*10*time.Minute)
	defer cancel()
	if slices.ContainsFunc(variants, func(v benchVariant) bool { return v.key == benchProfiledKey }) {
		profiledBase(t, policy("lazy-only"))
	}

	debian, golang := referenceImages(t)
	estargzBase := distinctLayerBytes(t, debian.estargz, golang.estargz)
	gzipBase := distinctLayerBytes(t, debian.gzip, golang.gzip)
	fig := benchfig.ExportBench{Benchmark: "TestExportBench", CPUs: runtime.NumCPU(), LoadStart: loadAvg(t)}
	programs := map[string][]byte{}
	for _, l := range links {
		linkStart := time.Now()
		results := map[string][]benchfig.Run{}
		resetProfiledFigures()
		for round := 1; round <= runs; round++ {
			roundStart := time.Now()
			var line []string
			for _, v := range variants {
				load := loadAvg(t)[0]
				runStart := time.Now()
				var res benchfig.Run
				ok := t.Run(fmt.Sprintf("%s-%s-run%d", l.key, v.key, round), func(t *testing.T) {
					var prog []byte
					res, prog = benchOnce(ctx, t, l, v)
					if prev, ok := programs[v.key]; ok && !bytes.Equal(prev, prog) {
						t.Errorf("(%s) built a different program than in its first run", v.key)
					}
					programs[v.key] = prog
				})
				if !ok {
					t.FailNow()
				}
				res.Round, res.Load1, res.RunSeconds = round, load, time.Since(runStart).Seconds()
				results[v.key] = append(results[v.key], res)
				line = append(line, fmt.Sprintf("(%s) %.2f s [run %.0f s]", v.key, res.TotalSeconds, res.RunSeconds))
			}
			t.Logf("BENCH %s round %d of %d (%s): %s", l.name, round, runs, time.Since(roundStart).Round(time.Second), strings.Join(line, ", "))
		}
		fl := benchfig.Link{
			Name:             l.name,
			BitsPerSecond:    8 * l.bandwidth,
			RTTMillis:        float64(l.rtt) / float64(time.Millisecond),
			Rounds:           runs,
			Seconds:          time.Since(linkStart).Seconds(),
			EStargzBaseBytes: estargzBase,
			GzipBaseBytes:    gzipBase,
		}
		med := map[string]benchfig.Run{}
		for _, v := range variants {
			m := benchfig.MedianRun(results[v.key])
			med[v.key] = m
			fl.Variants = append(fl.Variants, benchfig.Variant{Key: v.key, What: v.what, Median: m, Runs: results[v.key]})
			t.Logf("BENCH %s (%s) %s: median of %d: total %.2f s, first RUN at %.2f s, build %.2f s, export %.2f s, fetched %.1f MB in %d requests, CPU: snapshotter %s, containerd %.2f s, buildkitd %.2f s",
				l.name, v.key, v.what, len(results[v.key]), m.TotalSeconds, m.FirstRunSeconds, m.BuildSeconds, m.ExportSeconds,
				float64(m.FetchedBytes)/1e6, m.Requests, cpuString(m.SnapshotterCPUSeconds), m.ContainerdCPUSeconds, m.BuildkitdCPUSeconds)
			prefix := "exportbench-"
			if l.key != "1g" {
				prefix += l.key + "-"
			}
			record(t, prefix+v.key+"-total", seconds(m.TotalSeconds))
			record(t, prefix+v.key+"-export", seconds(m.ExportSeconds))
		}
		reportProfiled(t, l.name, med)
		fl.Targets = exportBenchTargets(med, estargzBase)
		for _, tg := range fl.Targets {
			t.Logf("BENCH %s: %s", l.name, tg)
		}
		t.Logf("BENCH %s: %d rounds in %s", l.name, runs, time.Since(linkStart).Round(time.Second))
		fig.Links = append(fig.Links, fl)
		// After each link, so that a run stopped during the next one
		// keeps the tables it finished.
		fig.Date, fig.LoadEnd = time.Now().UTC(), loadAvg(t)
		writeFigures(t, benchfig.ExportBenchName, fig)
	}
	var first string
	for _, v := range variants {
		if first == "" {
			first = v.key
		} else if !bytes.Equal(programs[first], programs[v.key]) {
			t.Errorf("the pushed programs differ: (%s) %d bytes, (%s) %d", first, len(programs[first]), v.key, len(programs[v.key]))
		}
	}
}

// exportBenchTargets returns the targets on the medians of one
// link, for the variants that ran.
func exportBenchTargets(med map[string]benchfig.Run, estargzBase int64) []benchfig.Target {
	var out []benchfig.Target
	ratio := func(num, den, what string, limit float64, f func(benchfig.Run) float64) {
		n, okN := med[num]
		d, okD := med[den]
		if !okN || !okD || f(d) == 0 {
			return
		}
		out = append(out, benchfig.NewTarget(fmt.Sprintf("%s(%s)/(%s)", what, num, den), "ratio", f(n)/f(d), limit))
	}
	total := func(r benchfig.Run) float64 { return r.TotalSeconds }
	ratio("c", "a", "", 0.6, total)
	ratio("c", "b", "", 0.8, total)
	ratio("c-lazy", "a", "", 0.7, total)
	ratio("c", "w", "", 1.10, total)
	ratio(benchProfiledKey, "a", "", 0.6, total)
	ratio(benchProfiledKey, "w", "", 1.10, total)
	ratio("c", "a", "export ", 1, func(r benchfig.Run) float64 { return r.ExportSeconds })
	if c, ok := med["c"]; ok {
		out = append(out, benchfig.NewTarget("bytes fetched by (c) / eStargz bases", "bytes", float64(c.FetchedBytes), float64(estargzBase)))
	}
	return out
}

// listHas reports whether the comma-separated list holds key.
func listHas(list, key string) bool {
	for _, k := range strings.Split(list, ",") {
		if strings.TrimSpace(k) == key {
			return true
		}
	}
	return false
}

// distinctLayerBytes is the compressed size of the distinct layers of imgs.
func distinctLayerBytes(t testing.TB, imgs ...v1.Image) int64 {
	t.Helper()
	sizes := map[string]int64{}
	for _, img := range imgs {
		for d, n := range layerSizes(t, img) {
			sizes[d] = n
		}
	}
	var total int64
	for _, n := range sizes {
		total += n
	}
	return total
}

// loadAvg returns the machine's 1, 5 and 15 minute load averages.
func loadAvg(t testing.TB) [3]float64 {
	t.Helper()
	var l [3]float64
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		t.Logf("load average: %v", err)
		return l
	}
	f := strings.Fields(string(b))
	for i := 0; i < 3 && i < len(f); i++ {
		l[i], _ = strconv.ParseFloat(f[i], 64)
	}
	return l
}

func seconds(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

func cpuString(s *float64) string {
	if s == nil {
		return "-"
	}
	return fmt.Sprintf("%.2f s", *s)
}

func r(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

// warmBases gives buildkitd both gzip bases, pulled and unpacked into its
// own cache, as a builder that built from them before has: a build FROM
// each base that runs one step the timed build does not have, so that
// none of the timed build's steps is cached.
func warmBases(ctx context.Context, t *testing.T, s *harness.Stack) {
	t.Helper()
	dir := t.TempDir()
	dockerfile := "FROM " + s.Registry.Ref(repoGolang, tagGzip) + " AS golang\nRUN true\n\n" +
		"FROM " + s.Registry.Ref(repoDebian, tagGzip) + " AS debian\nRUN true\n"
	if err := os.WriteFile(filepath.Join(dir, "Dockerfile"), []byte(dockerfile), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, target := range []string{"golang", "debian"} {
		if _, err := s.Buildkit.Buildctl(ctx, "build", "--frontend", "dockerfile.v0",
			"--local", "context="+dir, "--local", "dockerfile="+dir, "--opt", "target="+target); err != nil {
			t.Fatalf("(w) warm-up build FROM the %s base: %v\n%s", target, err, s.Logs(30))
		}
	}
}

// benchOnce runs one cold build-and-push of variant v on a new stack behind
// link l and returns its figures and the program in the pushed image.
func benchOnce(ctx context.Context, t *testing.T, l benchLink, v benchVariant) (benchfig.Run, []byte) {
	s := harness.Start(ctx, t, v.opts(l)...)
	debian, golang := referenceImages(t)
	if v.bases != nil {
		debian, golang = v.bases(t, debian, golang)
	}
	// Only the form the variant builds from: half the publishing.
	publish(ctx, t, s, repoDebian, v.tag, pick(v.tag, debian))
	publish(ctx, t, s, repoGolang, v.tag, pick(v.tag, golang))
	baseImg, builderImg := pick(v.tag, debian), pick(v.tag, golang)
	if v.warm != nil {
		start := time.Now()
		v.warm(ctx, t, s)
		t.Logf("(%s) warm-up: %s, %.1f MB fetched", v.key, r(time.Since(start)), float64(s.Registry.Proxy.Stats().Bytes)/1e6)
	}
	work := multiStageContext(t, s, v.tag)
	out := s.Registry.DirectRef("e2e/bench-"+v.key, "latest")
	p := s.Registry.Proxy
	mark := p.Mark()
	p.SetPhase("bench")
	cpu := func(what string, pid int) func() time.Duration {
		return func() time.Duration {
			d, err := harness.ProcessCPU(pid)
			if err != nil {
				t.Fatalf("(%s) %s CPU: %v", v.key, what, err)
			}
			return d
		}
	}
	snapCPU := func() time.Duration { return 0 }
	if s.Snapshotter != nil {
		snapCPU = cpu("snapshotter", s.Snapshotter.Pid())
	}
	ctrdCPU, bkCPU := cpu("containerd", s.Containerd.Pid()), cpu("buildkitd", s.Buildkit.Pid())
	snap0, ctrd0, bk0 := snapCPU(), ctrdCPU(), bkCPU()
	start := time.Now()
	_, progress, err := s.Buildkit.BuildctlProgress(ctx, "build", "--progress=rawjson",
		"--frontend", "dockerfile.v0", "--local", "context="+work, "--local", "dockerfile="+work,
		"--output", "type=image,name="+out+",push=true,registry.insecure=true")
	end := time.Now()
	snap1, ctrd1, bk1 := snapCPU(), ctrdCPU(), bkCPU()
	p.SetPhase("")
	if err != nil {
		t.Fatalf("(%s) build and push: %v\n%s", v.key, err, s.Logs(30))
	}
	ph, err := parsePhases(progress, start, end)
	if err != nil {
		t.Fatalf("(%s) progress: %v", v.key, err)
	}
	events := p.Events()[mark:]
	all := shaper.Summarize(events)
	res := benchfig.Run{
		TotalSeconds:         ph.total.Seconds(),
		FirstRunSeconds:      ph.firstRun.Seconds(),
		BuildSeconds:         ph.build.Seconds(),
		ExportSeconds:        ph.export.Seconds(),
		FetchedBytes:         all.Bytes,
		Requests:             all.Requests,
		ContainerdCPUSeconds: (ctrd1 - ctrd0).Seconds(),
		BuildkitdCPUSeconds:  (bk1 - bk0).Seconds(),
	}
	if s.Snapshotter != nil {
		c := (snap1 - snap0).Seconds()
		res.SnapshotterCPUSeconds = &c
	}
	t.Logf("(%s) %s: total %s: first RUN at %s, build %s, export %s (%s); fetched %.1f MB in %d requests (%d for manifests); CPU: snapshotter %s, containerd %s, buildkitd %s",
		v.key, l.name, r(ph.total), r(ph.firstRun), r(ph.build), r(ph.export), ph.exportSteps, float64(all.Bytes)/1e6, all.Requests, all.Manifests,
		r(snap1-snap0), r(ctrd1-ctrd0), r(bk1-bk0))

	// What crossed the shaped link, per base layer, and during the export.
	var during []shaper.Event
	for _, e := range events {
		if !e.Time.Before(ph.exportFrom) {
			during = append(during, e)
		}
	}
	exp := shaper.Summarize(during)
	finalSizes := layerSizes(t, baseImg)
	for d, size := range finalSizes {
		b, e := all.Blob(d), exp.Blob(d)
		t.Logf("(%s) final base layer %s (%d bytes): %d bytes fetched (%.2fx), %d of them during the export", v.key, d, size, b.Bytes, float64(b.Bytes)/float64(size), e.Bytes)
	}
	builderSizes := layerSizes(t, builderImg)
	for d, size := range builderSizes {
		if _, shared := finalSizes[d]; shared {
			continue
		}
		b := all.Blob(d)
		t.Logf("(%s) builder base layer %s (%d bytes): %d bytes fetched (%.1f%% of it covered)", v.key, d, size, b.Bytes, 100*float64(b.Covered())/float64(size))
	}
	if v.warm != nil {
		// The bases were there before the build: not one layer byte.
		for _, sizes := range []map[string]int64{finalSizes, builderSizes} {
			for d := range sizes {
				if n := all.Blob(d).Bytes; n != 0 {
					t.Errorf("(%s) base layer %s: %d bytes fetched by a builder that had it", v.key, d, n)
				}
			}
		}
	}
	benchStep(t, v, ph, start, progress, events)
	if v.key == "c" || v.key == "c-lazy" || v.key == benchProfiledKey {
		// Each blob crosses the link at most once (plus the on-demand
		// reads before the guard's commit), and none during the export.
		sizes := layerSizes(t, builderImg)
		for d, size := range finalSizes {
			sizes[d] = size
			if n := exp.Blob(d).Bytes; n != 0 {
				t.Errorf("(%s) final base layer %s: %d bytes fetched during the export", v.key, d, n)
			}
		}
		for d, size := range sizes {
			if n := all.Blob(d).Bytes; n >= 2*size {
				t.Errorf("(%s) base layer %s: %d bytes fetched for %d: more than one download", v.key, d, n, size)
			}
		}
		if m, err := daemonMetrics(ctx, s.Snapshotter.Address+".status",
			"lazybase_blobsource_bytes_total", "lazybase_guard_promotions_total", "lazybase_exportguard_fetched_bytes_total"); err != nil {
			t.Logf("(%s) daemon metrics: %v", v.key, err)
		} else {
			t.Logf("(%s) daemon: %s", v.key, m)
		}
	}

	// The push: the base's layers and one layer with the program.
	ref, err := name.ParseReference(out)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("(%s) pushed image: %v", v.key, err)
	}
	pushed, base := layerDigests(t, img), layerDigests(t, baseImg)
	if len(pushed) != len(base)+1 {
		t.Fatalf("(%s) pushed layers %v, want the base's %v and one more", v.key, pushed, base)
	}
	for i := range base {
		if pushed[i] != base[i] {
			t.Errorf("(%s) pushed layer %d is %s, want the base's %s", v.key, i, pushed[i], base[i])
		}
	}
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	prog, err := fileInLayer(layers[len(layers)-1].Uncompressed, "usr/local/bin/hello")
	if err != nil {
		t.Fatalf("(%s) program in the pushed image: %v", v.key, err)
	}
	return res, prog
}

// pick returns img's form with tag.
func pick(tag string, img *refImage) v1.Image {
	if tag == tagEStargz {
		return img.estargz
	}
	return img.gzip
}

// fileInLayer returns the contents of the file at path in a layer tar.
func fileInLayer(open func() (io.ReadCloser, error), path string) ([]byte, error) {
	rc, err := open()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil, fmt.Errorf("%s not in the layer", path)
		}
		if err != nil {
			return nil, err
		}
		if strings.TrimPrefix(h.Name, "./") == path {
			return io.ReadAll(tr)
		}
	}
}

// rawVertex is the part of a BuildKit progress vertex the phases need.
type rawVertex struct {
	Digest    string     `json:"digest"`
	Name      string     `json:"name"`
	Started   *time.Time `json:"started"`
	Completed *time.Time `json:"completed"`
}

// rawStatus is the part of a BuildKit progress status (a step of a
// vertex) the phases need.
type rawStatus struct {
	ID        string     `json:"id"`
	Vertex    string     `json:"vertex"`
	Started   *time.Time `json:"started"`
	Completed *time.Time `json:"completed"`
}

// parsePhases reads buildctl's --progress=rawjson output (a stream of
// solve statuses) of a build that ran from start to end.
func parsePhases(progress string, start, end time.Time) (benchPhases, error) {
	type span struct {
		name       string
		start, end time.Time
	}
	spans := map[string]*span{}
	steps := map[string]*span{} // statuses, by vertex and id
	var stepOrder []string
	dec := json.NewDecoder(strings.NewReader(progress))
	for {
		var st struct {
			Vertexes []rawVertex `json:"vertexes"`
			Statuses []rawStatus `json:"statuses"`
		}
		err := dec.Decode(&st)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return benchPhases{}, fmt.Errorf("decoding rawjson: %w", err)
		}
		for _, v := range st.Vertexes {
			sp := spans[v.Digest]
			if sp == nil {
				sp = &span{name: v.Name}
				spans[v.Digest] = sp
			}
			if v.Started != nil && (sp.start.IsZero() || v.Started.Before(sp.start)) {
				sp.start = *v.Started
			}
			if v.Completed != nil && v.Completed.After(sp.end) {
				sp.end = *v.Completed
			}
		}
		for _, s := range st.Statuses {
			key := s.Vertex + "\x00" + s.ID
			sp := steps[key]
			if sp == nil {
				sp = &span{name: s.ID}
				steps[key] = sp
				stepOrder = append(stepOrder, key)
			}
			if s.Started != nil && (sp.start.IsZero() || s.Started.Before(sp.start)) {
				sp.start = *s.Started
			}
			if s.Completed != nil && s.Completed.After(sp.end) {
				sp.end = *s.Completed
			}
		}
	}
	ph := benchPhases{total: end.Sub(start)}
	var firstRun, buildEnd, exportStart time.Time
	exporting := map[string]bool{}
	for d, sp := range spans {
		switch {
		case strings.HasPrefix(sp.name, "exporting to"):
			exporting[d] = true
			if !sp.start.IsZero() && (exportStart.IsZero() || sp.start.Before(exportStart)) {
				exportStart = sp.start
			}
		default:
			if strings.Contains(sp.name, "] RUN ") && !sp.start.IsZero() && (firstRun.IsZero() || sp.start.Before(firstRun)) {
				firstRun = sp.start
			}
			if sp.end.After(buildEnd) {
				buildEnd = sp.end
			}
		}
	}
	if firstRun.IsZero() || exportStart.IsZero() || buildEnd.IsZero() {
		names := make([]string, 0, len(spans))
		for _, sp := range spans {
			names = append(names, sp.name)
		}
		sort.Strings(names)
		return ph, fmt.Errorf("no RUN step, build end or export among the vertices %q", names)
	}
	ph.firstRun = firstRun.Sub(start)
	ph.build = buildEnd.Sub(start)
	ph.exportFrom = exportStart
	ph.export = end.Sub(exportStart)
	var parts []string
	for _, key := range stepOrder {
		vertex, _, _ := strings.Cut(key, "\x00")
		if sp := steps[key]; exporting[vertex] && !sp.start.IsZero() && !sp.end.IsZero() {
			parts = append(parts, fmt.Sprintf("%s %s", sp.name, r(sp.end.Sub(sp.start))))
		}
	}
	ph.exportSteps = strings.Join(parts, ", ")
	return ph, nil
}

// daemonMetrics returns the lines of the lazybase daemon's metrics, from
// its status socket, that start with one of prefixes.
func daemonMetrics(ctx context.Context, socket string, prefixes ...string) (string, error) {
	c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", socket)
	}}}
	defer c.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lazybase/metrics", nil)
	if err != nil {
		return "", err
	}
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		for _, p := range prefixes {
			if strings.HasPrefix(l, p) {
				lines = append(lines, l)
				break
			}
		}
	}
	return strings.Join(lines, "; "), nil
}

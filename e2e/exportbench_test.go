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
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/e2e/shaper"
)

// exportBenchRunsEnv sets how many cold runs of each variant
// TestExportBench makes (default 1); it prints medians.
const exportBenchRunsEnv = "LAZYBASE_BENCH_RUNS"

// exportBenchVariantsEnv limits TestExportBench to some variants, e.g.
// "a,c-lazy" (default: all).
const exportBenchVariantsEnv = "LAZYBASE_BENCH_VARIANTS"

// exportBenchDaemonEnv is TOML added to the lazybase daemon's configuration
// in the (c) variants, e.g. "[local]\nenable = false".
const exportBenchDaemonEnv = "LAZYBASE_BENCH_DAEMON_TOML"

// benchPhases are the phases of one cold build-and-push, from buildctl's
// rawjson progress.
type benchPhases struct {
	total       time.Duration // buildctl's wall time
	firstRun    time.Duration // start to the start of the first RUN step
	build       time.Duration // start to the end of the last step before the export
	export      time.Duration // start of "exporting to image" to the end
	exportFrom  time.Time     // wall clock of the export's start
	exportSteps string        // the export's steps and their durations
	// snapCPU is the CPU time the lazybase daemon used during the build
	// and push (utime+stime); 0 in variants without it.
	snapCPU time.Duration
}

// benchVariant is one of the three set-ups.
type benchVariant struct {
	key, what string
	tag       string
	opts      func(t *testing.T) []harness.Option
}

// TestExportBench is the benchmark: on a 1 Gbit/s link with 20 ms
// round trips, the cold build-and-push wall time of the multi-stage build
// (go build in a stage FROM the golang-like image, the program copied onto
// the debian-like image) for
//
//	(a) buildkitd's containerd worker on overlayfs with the gzip images,
//	(b) buildkitd's OCI worker on BuildKit's built-in stargz snapshotter
//	    with the eStargz images,
//	(c) buildkitd's containerd worker on the lazybase daemon with the export
//	    guard (final base export-base, builder base lazy-only) with the
//	    eStargz images.
//
// It prints the phases (time to first RUN, build, export), the ratios c/a,
// c/b and export(c)/export(a), and PASS/MISS against the targets
// (c ≤ 0.6×a, c < b, export(c) ≤ export(a)); it asserts correctness only:
// every push succeeds, the pushed images carry their base's layers and the
// same program, and (c) fetches no final-base blob byte during its export.
// A variant (c-lazy) runs (c) with the builder base "lazy" rather than
// "lazy-only": the guard's transfer of its blob, promoted once the build
// reads it, then serves the rest of the build locally.
//
// Each run starts its own stack; one round of the four variants takes about
// 3–5 minutes here, so more than one run needs a longer -timeout:
//
//	LAZYBASE_BENCH_RUNS=3 go test -tags e2e -timeout 60m -run TestExportBench -v ./e2e/
func TestExportBench(t *testing.T) {
	const (
		bandwidth = 125_000_000 // 1 Gbit/s
		rtt       = 20 * time.Millisecond
	)
	runs := 1
	if v := os.Getenv(exportBenchRunsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive count", exportBenchRunsEnv, v)
		}
		runs = n
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(runs)*30*time.Minute)
	defer cancel()
	shaping := []harness.Option{harness.WithBandwidth(bandwidth), harness.WithRTT(rtt)}
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
	lazybase := func(toml string) func(*testing.T) []harness.Option {
		return func(*testing.T) []harness.Option {
			return append([]harness.Option{
				harness.WithLazySnapshotter(harness.Lazybase),
				harness.WithLazybaseConfig(toml),
				harness.WithBuildkitLazy(),
			}, shaping...)
		}
	}
	variants := []benchVariant{
		{"a", "overlayfs, gzip images (containerd worker)", tagGzip, func(*testing.T) []harness.Option {
			return append([]harness.Option{harness.WithBuildkit()}, shaping...)
		}},
		{"b", "BuildKit stargz snapshotter, eStargz images (OCI worker)", tagEStargz, func(*testing.T) []harness.Option {
			return append([]harness.Option{harness.WithBuildkitOCI("stargz")}, shaping...)
		}},
		{"c", "lazybase with the export guard, final base export-base, builder base lazy-only, eStargz images (containerd worker)", tagEStargz, lazybase(policy("lazy-only"))},
		// The builder base "lazy": once the filesystem has fetched
		// PromoteAfterBytes of a layer, the guard fetches the whole blob in
		// one stream and the rest of the build reads it locally.
		{"c-lazy", "lazybase with the export guard, final base export-base, builder base lazy, eStargz images (containerd worker)", tagEStargz, lazybase(policy("lazy"))},
		profiledVariant(shaping, policy("lazy-only")), // (c-prof): exportbench_profile_test.go
	}
	if want := os.Getenv(exportBenchVariantsEnv); want != "" {
		keep := map[string]bool{}
		for _, k := range strings.Split(want, ",") {
			keep[strings.TrimSpace(k)] = true
		}
		var vs []benchVariant
		for _, v := range variants {
			if keep[v.key] {
				vs = append(vs, v)
			}
		}
		if len(vs) == 0 {
			t.Fatalf("%s=%q names no variant", exportBenchVariantsEnv, want)
		}
		variants = vs
	}
	results := map[string][]benchPhases{}
	programs := map[string][]byte{}
	for run := 1; run <= runs; run++ {
		for _, v := range variants {
			ok := t.Run(fmt.Sprintf("%s-run%d", v.key, run), func(t *testing.T) {
				ph, prog := benchOnce(ctx, t, v)
				results[v.key] = append(results[v.key], ph)
				if prev, ok := programs[v.key]; ok && !bytes.Equal(prev, prog) {
					t.Errorf("(%s) built a different program than in its first run", v.key)
				}
				programs[v.key] = prog
			})
			if !ok {
				t.FailNow()
			}
		}
	}
	var first string
	for _, v := range variants {
		if first == "" {
			first = v.key
		} else if !bytes.Equal(programs[first], programs[v.key]) {
			t.Errorf("the pushed programs differ: (%s) %d bytes, (%s) %d", first, len(programs[first]), v.key, len(programs[v.key]))
		}
	}

	med := map[string]benchPhases{}
	for _, v := range variants {
		med[v.key] = medianPhases(results[v.key])
		m := med[v.key]
		t.Logf("BENCH (%s) %s: median of %d: total %s, first RUN at %s, build %s, export %s, snapshotter CPU %s",
			v.key, v.what, len(results[v.key]), r(m.total), r(m.firstRun), r(m.build), r(m.export), r(m.snapCPU))
		record(t, "exportbench-"+v.key+"-total", m.total)
		record(t, "exportbench-"+v.key+"-export", m.export)
	}
	a, okA := med["a"]
	b, okB := med["b"]
	for _, key := range []string{"c", "c-lazy", benchProfiledKey} {
		c, ok := med[key]
		if !ok {
			continue
		}
		if okA {
			ca := float64(c.total) / float64(a.total)
			ea := float64(c.export) / float64(a.export)
			t.Logf("BENCH 1Gbit/s 20ms: (%s)/(a) %.3f (target <= 0.6) %s; export(%s)/export(a) %.3f (target <= 1) %s",
				key, ca, verdict(ca <= 0.6), key, ea, verdict(ea <= 1))
		}
		if okB {
			cb := float64(c.total) / float64(b.total)
			t.Logf("BENCH 1Gbit/s 20ms: (%s)/(b) %.3f (target < 1) %s", key, cb, verdict(cb < 1))
		}
	}
	reportProfiled(t, med)
}

func r(d time.Duration) time.Duration { return d.Round(time.Millisecond) }

// benchOnce runs one cold build-and-push of variant v on a new stack and
// returns its phases and the program in the pushed image.
func benchOnce(ctx context.Context, t *testing.T, v benchVariant) (benchPhases, []byte) {
	s := harness.Start(ctx, t, v.opts(t)...)
	debian, golang := publishAll(ctx, t, s)
	golang = profiledBuilder(ctx, t, s, v, golang)
	baseImg := debian.gzip
	if v.tag == tagEStargz {
		baseImg = debian.estargz
	}
	work := multiStageContext(t, s, v.tag)
	out := s.Registry.DirectRef("e2e/bench-"+v.key, "latest")
	p := s.Registry.Proxy
	mark := p.Mark()
	p.SetPhase("bench")
	snapCPU := func() time.Duration { return 0 }
	if s.Snapshotter != nil {
		pid := s.Snapshotter.Pid()
		snapCPU = func() time.Duration {
			d, err := harness.ProcessCPU(pid)
			if err != nil {
				t.Fatalf("(%s) snapshotter CPU: %v", v.key, err)
			}
			return d
		}
	}
	cpuBefore := snapCPU()
	start := time.Now()
	_, progress, err := s.Buildkit.BuildctlProgress(ctx, "build", "--progress=rawjson",
		"--frontend", "dockerfile.v0", "--local", "context="+work, "--local", "dockerfile="+work,
		"--output", "type=image,name="+out+",push=true,registry.insecure=true")
	end := time.Now()
	cpuAfter := snapCPU()
	p.SetPhase("")
	if err != nil {
		t.Fatalf("(%s) build and push: %v\n%s", v.key, err, s.Logs(30))
	}
	ph, err := parsePhases(progress, start, end)
	if err != nil {
		t.Fatalf("(%s) progress: %v", v.key, err)
	}
	ph.snapCPU = cpuAfter - cpuBefore
	t.Logf("(%s) total %s: first RUN at %s, build %s, export %s (%s); snapshotter CPU %s", v.key, r(ph.total), r(ph.firstRun), r(ph.build), r(ph.export), ph.exportSteps, r(ph.snapCPU))

	// What crossed the shaped link, per base layer, and during the export.
	events := p.Events()[mark:]
	var during []shaper.Event
	for _, e := range events {
		if !e.Time.Before(ph.exportFrom) {
			during = append(during, e)
		}
	}
	all, exp := shaper.Summarize(events), shaper.Summarize(during)
	finalSizes := layerSizes(t, baseImg)
	for d, size := range finalSizes {
		b, e := all.Blob(d), exp.Blob(d)
		t.Logf("(%s) final base layer %s (%d bytes): %d bytes fetched (%.2fx), %d of them during the export", v.key, d, size, b.Bytes, float64(b.Bytes)/float64(size), e.Bytes)
	}
	builderImg := golang.gzip
	if v.tag == tagEStargz {
		builderImg = golang.estargz
	}
	for d, size := range layerSizes(t, builderImg) {
		if _, shared := finalSizes[d]; shared {
			continue
		}
		b := all.Blob(d)
		t.Logf("(%s) builder base layer %s (%d bytes): %d bytes fetched (%.1f%% of it covered)", v.key, d, size, b.Bytes, 100*float64(b.Covered())/float64(size))
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
	return ph, prog
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

// medianPhases returns the per-phase medians of runs.
func medianPhases(runs []benchPhases) benchPhases {
	pick := func(f func(benchPhases) time.Duration) time.Duration {
		ds := make([]time.Duration, len(runs))
		for i, p := range runs {
			ds[i] = f(p)
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		if n := len(ds); n%2 == 0 {
			return (ds[n/2-1] + ds[n/2]) / 2
		}
		return ds[len(ds)/2]
	}
	return benchPhases{
		total:    pick(func(p benchPhases) time.Duration { return p.total }),
		firstRun: pick(func(p benchPhases) time.Duration { return p.firstRun }),
		build:    pick(func(p benchPhases) time.Duration { return p.build }),
		export:   pick(func(p benchPhases) time.Duration { return p.export }),
		snapCPU:  pick(func(p benchPhases) time.Duration { return p.snapCPU }),
	}
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

//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/e2e/shaper"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/lazypull"
)

// timelineOutEnv names the directory benchmarks write their figures to;
// when unset, bench/ under $LAZYBASE_CACHE, else .cache/bench in the
// checkout (where the other benchmarks write their figures).
const timelineOutEnv = "LAZYBASE_BENCH_OUT"

// timelineFiguresEnv, set to 1, makes the figure benchmarks also write their
// figures into docs/figures of the checkout, for the README.
const timelineFiguresEnv = "LAZYBASE_WRITE_FIGURES"

// TestBuildTimeline runs the multi-stage build of TestExportBench's
// variant (c) once (1 Gbit/s, 20 ms; lazybase with the export guard,
// final base export-base, builder base lazy-only, eStargz images) and
// draws where its time went as an SVG timeline: BuildKit's pulls (FROM),
// RUN and other steps, the export and its steps from buildctl's rawjson
// progress; the lazybase daemon's background fetch and export guard
// transfer of each layer from its status socket; and when blobs crossed
// the shaped link, from the shaping proxy. It fails when a lane that must
// have something is empty: the RUN step, the guard's transfer of every
// layer of the exported base, the export.
//
// The SVG goes to $LAZYBASE_BENCH_OUT (else bench/ under the cache), and
// with LAZYBASE_WRITE_FIGURES=1 also to docs/figures/build-timeline.svg.
func TestBuildTimeline(t *testing.T) {
	const (
		bandwidth = 125_000_000 // 1 Gbit/s
		rtt       = 20 * time.Millisecond
	)
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	policy := fmt.Sprintf(`[[policy]]
match = "*/%s:*"
mode = "export-base"
[[policy]]
match = "*/%s:*"
mode = "lazy-only"
`, repoDebian, repoGolang)
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithLazybaseConfig(policy),
		harness.WithBuildkitLazy(),
		harness.WithBandwidth(bandwidth),
		harness.WithRTT(rtt),
	)
	debian, _ := publishAll(ctx, t, s)
	work := multiStageContext(t, s, tagEStargz)
	out := s.Registry.DirectRef("e2e/timeline", "latest")
	p := s.Registry.Proxy
	mark := p.Mark()
	start := time.Now()
	_, progress, err := s.Buildkit.BuildctlProgress(ctx, "build", "--progress=rawjson",
		"--frontend", "dockerfile.v0", "--local", "context="+work, "--local", "dockerfile="+work,
		"--output", "type=image,name="+out+",push=true,registry.insecure=true")
	end := time.Now()
	if err != nil {
		t.Fatalf("build and push: %v\n%s", err, s.Logs(30))
	}
	t.Logf("build and push took %s", end.Sub(start).Round(time.Millisecond))

	steps, err := harness.ParseBuildSteps(progress)
	if err != nil {
		t.Fatal(err)
	}
	statusSocket := s.Snapshotter.Address + ".status"
	lazy, err := lazypull.FetchStatus(ctx, statusSocket)
	if err != nil {
		t.Fatal(err)
	}
	guard, err := exportguard.FetchStatus(ctx, statusSocket)
	if err != nil {
		t.Fatal(err)
	}
	exported := map[string]bool{}
	for d := range layerSizes(t, debian.estargz) {
		exported[d] = true
	}
	tl := buildTimeline(steps, lazy, guard, p.Events()[mark:], exported, start, end)
	tl.Title = fmt.Sprintf("Build and push of the multi-stage Go build, lazybase with the export guard, 1 Gbit/s, 20 ms RTT: %.1f s", end.Sub(start).Seconds())
	tl.Notes = append(timelineNotes(tl, start, end), tl.Notes...)
	for _, n := range tl.Notes {
		t.Logf("TIMELINE %s", n)
	}
	for _, l := range tl.Lanes {
		var parts []string
		for _, sp := range l.Spans {
			parts = append(parts, fmt.Sprintf("%s %.2f–%.2f s", sp.Label, sp.Start.Sub(start).Seconds(), sp.End.Sub(start).Seconds()))
		}
		t.Logf("lane %s: %d spans: %s", l.Name, len(l.Spans), strings.Join(parts, "; "))
	}

	// What must be there.
	lane := func(name string) harness.Lane {
		for _, l := range tl.Lanes {
			if l.Name == name {
				return l
			}
		}
		t.Fatalf("no lane %q", name)
		return harness.Lane{}
	}
	if len(lane(laneRun).Spans) == 0 {
		t.Error("no RUN step in the build's progress")
	}
	if len(lane(laneExport).Spans) == 0 {
		t.Error("no export in the build's progress")
	}
	transferred := map[string]bool{}
	for _, l := range guard.Layers {
		if !l.TransferStarted.IsZero() && !l.TransferFinished.IsZero() && l.Materialized {
			transferred[l.Layer] = true
		}
	}
	for d := range layerSizes(t, debian.estargz) {
		if !transferred[d] {
			t.Errorf("exported base layer %s: no finished guard transfer in the daemon's status", d)
		}
	}

	var svg bytes.Buffer
	if err := tl.WriteSVG(&svg); err != nil {
		t.Fatal(err)
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := os.Getenv(timelineOutEnv)
	if dir == "" {
		dir = filepath.Join(harness.CacheDir(root), "bench")
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "build-timeline.svg")
	if err := os.WriteFile(path, svg.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("FIGURE build timeline: %s", path)
	if os.Getenv(timelineFiguresEnv) == "1" {
		doc := filepath.Join(root, "docs", "figures", "build-timeline.svg")
		if err := os.MkdirAll(filepath.Dir(doc), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(doc, svg.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("FIGURE build timeline written to %s", doc)
	}
}

// Lanes of the build timeline.
const (
	lanePull     = "BuildKit: FROM (pull)"
	laneRun      = "BuildKit: RUN"
	laneOther    = "BuildKit: other steps"
	laneExport   = "BuildKit: export, push"
	laneBgFetch  = "lazybase: background fetch"
	laneGuard    = "lazybase: guard transfer"
	laneLinkBase = "link: exported base's blobs"
	laneLinkRest = "link: builder base's blobs"
)

// buildTimeline puts one build's events on lanes: the build ran from start
// to end; steps are buildctl's, lazy and guard the daemon's status after
// the build, events the shaping proxy's record of the build; exported
// holds the layer digests of the exported base. Its one note says what
// crossed the link.
func buildTimeline(steps []harness.BuildStep, lazy *lazypull.Status, guard *exportguard.Status, events []shaper.Event, exported map[string]bool, start, end time.Time) harness.Timeline {
	lanes := map[string][]harness.Span{}
	clip := func(t time.Time) time.Time {
		if t.Before(start) {
			return start
		}
		return t
	}
	for _, st := range steps {
		sp := harness.Span{Label: st.Name, Start: clip(st.Started), End: clip(st.Completed)}
		switch {
		case strings.HasPrefix(st.Name, "exporting to"):
			lanes[laneExport] = append(lanes[laneExport], sp)
			for _, sub := range st.Statuses {
				lanes[laneExport] = append(lanes[laneExport], harness.Span{Label: sub.Name, Start: clip(sub.Started), End: clip(sub.Completed)})
			}
		case strings.Contains(st.Name, "] RUN "):
			sp.Label = strings.TrimSpace(st.Name[strings.Index(st.Name, "] RUN ")+2:])
			lanes[laneRun] = append(lanes[laneRun], sp)
		case strings.Contains(st.Name, "] FROM "):
			sp.Label = shortImage(st.Name[strings.Index(st.Name, "] FROM ")+7:])
			lanes[lanePull] = append(lanes[lanePull], sp)
		case strings.HasPrefix(st.Name, "[internal] load metadata for "):
			sp.Label = "resolve " + shortImage(strings.TrimPrefix(st.Name, "[internal] load metadata for "))
			lanes[lanePull] = append(lanes[lanePull], sp)
		default:
			lanes[laneOther] = append(lanes[laneOther], sp)
		}
	}
	// A layer mounted several times (BuildKit's chain and its own
	// mounts) is one span.
	seen := map[string]bool{}
	for _, l := range lazy.Layers {
		bf := l.BackgroundFetch
		if bf == nil || seen[l.Layer] {
			continue
		}
		seen[l.Layer] = true
		label := shortImage(l.Image) + " " + shortDigest(l.Layer)
		stop := bf.Finished
		switch {
		case bf.Declined:
			label += " (declined: guarded)"
		case stop.IsZero():
			label += " (still running)"
			stop = end
		}
		if stop.IsZero() || stop.Before(bf.Started) {
			stop = bf.Started
		}
		lanes[laneBgFetch] = append(lanes[laneBgFetch], harness.Span{Label: label, Start: clip(bf.Started), End: clip(stop)})
	}
	seen = map[string]bool{}
	for _, l := range guard.Layers {
		if l.TransferStarted.IsZero() || seen[l.Layer] {
			continue
		}
		seen[l.Layer] = true
		stop := l.TransferFinished
		label := shortImage(l.Image) + " " + shortDigest(l.Layer)
		if stop.IsZero() {
			label += " (still running)"
			stop = end
		}
		lanes[laneGuard] = append(lanes[laneGuard], harness.Span{Label: label, Start: clip(l.TransferStarted), End: clip(stop)})
	}
	var base, rest []shaper.Event
	for _, e := range events {
		if exported[e.Ref] {
			base = append(base, e)
		} else {
			rest = append(rest, e)
		}
	}
	lanes[laneLinkBase] = linkBusy(base, clip)
	lanes[laneLinkRest] = linkBusy(rest, clip)
	b, r := blobTraffic(base), blobTraffic(rest)
	note := fmt.Sprintf("On the link: exported base %.1f MB in %d GETs; builder base %.1f MB in %d GETs.", float64(b.bytes)/1e6, b.gets, float64(r.bytes)/1e6, r.gets)

	tl := harness.Timeline{Origin: start, Notes: []string{note}}
	for _, name := range []string{lanePull, laneOther, laneRun, laneBgFetch, laneGuard, laneLinkBase, laneLinkRest, laneExport} {
		tl.Lanes = append(tl.Lanes, harness.Lane{Name: name, Spans: lanes[name]})
	}
	return tl
}

// traffic is what a set of blob GETs sent.
type traffic struct {
	bytes int64
	gets  int
}

// blobTraffic counts the blob GETs among events and their body bytes.
func blobTraffic(events []shaper.Event) traffic {
	var t traffic
	for _, e := range events {
		if e.Kind == shaper.KindBlob && e.Method == "GET" {
			t.bytes += e.Bytes
			t.gets++
		}
	}
	return t
}

// timelineNotes sums up the timeline tl of a build that ran from start to
// end in a few lines: when the first RUN started, how long the RUN steps,
// the export and the background work took.
func timelineNotes(tl harness.Timeline, start, end time.Time) []string {
	spans := map[string][]harness.Span{}
	for _, l := range tl.Lanes {
		spans[l.Name] = l.Spans
	}
	sec := func(d time.Duration) string { return fmt.Sprintf("%.2f s", d.Seconds()) }
	sum := func(lane string) (first, last time.Time, busy time.Duration) {
		for _, sp := range spans[lane] {
			if first.IsZero() || sp.Start.Before(first) {
				first = sp.Start
			}
			if sp.End.After(last) {
				last = sp.End
			}
			busy += sp.End.Sub(sp.Start)
		}
		return first, last, busy
	}
	var notes []string
	if first, last, _ := sum(laneRun); !first.IsZero() {
		notes = append(notes, fmt.Sprintf("First RUN started %s after the build began; RUN steps ran %s (to %s).", sec(first.Sub(start)), sec(last.Sub(first)), sec(last.Sub(start))))
	}
	if first, last, _ := sum(laneExport); !first.IsZero() {
		notes = append(notes, fmt.Sprintf("Export (layers, manifest, push): %s, from %s to the end at %s.", sec(last.Sub(first)), sec(first.Sub(start)), sec(end.Sub(start))))
	}
	var bg []string
	for _, lane := range []string{laneGuard, laneBgFetch} {
		if first, last, busy := sum(lane); !first.IsZero() {
			bg = append(bg, fmt.Sprintf("%s %s–%s (%s busy)", strings.TrimPrefix(lane, "lazybase: "), sec(first.Sub(start)), sec(last.Sub(start)), sec(busy)))
		}
	}
	if len(bg) > 0 {
		notes = append(notes, "Beside the build: "+strings.Join(bg, "; ")+".")
	}
	return notes
}

// linkGap is the pause between blob transfers under which linkBusy merges
// them into one span, to keep the figure readable.
const linkGap = 250 * time.Millisecond

// linkBusy merges the blob GETs that sent bytes into the intervals when
// at least one was under way (pauses under linkGap bridged), each
// labelled with the bytes sent and the number of requests.
func linkBusy(events []shaper.Event, clip func(time.Time) time.Time) []harness.Span {
	type iv struct {
		start, end time.Time
		bytes      int64
		requests   int
	}
	var ivs []iv
	for _, e := range events {
		if e.Kind != shaper.KindBlob || e.Method != "GET" || e.Bytes <= 0 {
			continue
		}
		ivs = append(ivs, iv{clip(e.Time), clip(e.End()), e.Bytes, 1})
	}
	sort.Slice(ivs, func(i, j int) bool { return ivs[i].start.Before(ivs[j].start) })
	var merged []iv
	for _, v := range ivs {
		if n := len(merged); n > 0 && v.start.Sub(merged[n-1].end) < linkGap {
			if v.end.After(merged[n-1].end) {
				merged[n-1].end = v.end
			}
			merged[n-1].bytes += v.bytes
			merged[n-1].requests += v.requests
			continue
		}
		merged = append(merged, v)
	}
	var out []harness.Span
	for _, m := range merged {
		out = append(out, harness.Span{Label: fmt.Sprintf("%.1f MB, %d GETs", float64(m.bytes)/1e6, m.requests), Start: m.start, End: m.end})
	}
	return out
}

// shortImage returns the repository's last path element and the tag of an
// image reference, e.g. "golang:estargz".
func shortImage(ref string) string {
	ref, _, _ = strings.Cut(ref, "@")
	if i := strings.LastIndex(ref, "/"); i >= 0 {
		ref = ref[i+1:]
	}
	return ref
}

// shortDigest returns the first 12 hex digits of a digest.
func shortDigest(d string) string {
	_, hex, ok := strings.Cut(d, ":")
	if !ok || len(hex) < 12 {
		return d
	}
	return hex[:12]
}

//go:build e2e

package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/e2e/shaper"
	"github.com/lazybase/lazybase/internal/benchfig"
	"github.com/lazybase/lazybase/prefetch"
)

// benchProfiledKey is the key of TestExportBench's profiled variant.
const benchProfiledKey = "c-prof"

// profBench is the state of the profiled variant and the per-variant
// figures benchStep collects, in one test process (the bench's subtests
// run one at a time).
var profBench struct {
	sync.Mutex
	// img is the golang-like image converted with the profile, debian the
	// debian-like one converted with it (its only layer is golang's first:
	// the mirror gives a shared layer one prefetch list), prof the
	// profile, layers img's layer TOCs, reads the files the profile names
	// as access records of img's layers; set once per process.
	img    v1.Image
	debian v1.Image
	prof   *prefetch.Profile
	layers map[string]*proofLayer
	reads  []prefetch.AccessRecord
	// goBuild is the duration of the RUN go build step, fetched the blob
	// bytes fetched through the shaper (GET), per variant key and run.
	goBuild map[string][]time.Duration
	fetched map[string][]int64
	// runs are the prefetch measurements of the profiled runs.
	runs []*proofRun
}

// profiledVariant is TestExportBench's (c-prof): (c) with both bases
// converted with a prefetch profile recorded from the bench's own build,
// what the closed prefetch loop (builders publish their access records,
// the mirror merges them and converts the bases again, one prefetch list
// per shared layer) gives a builder. The profiled images are made by
// profiledBase before the rounds; the measured runs use opts, (c)'s
// daemon configuration and policy. What the build reads is the profile
// itself (the same build on the same base reads the same files), and
// benchStep tells from the proxy's record how much of it came through the
// prefetch.
func profiledVariant(opts func(benchLink) []harness.Option) benchVariant {
	return benchVariant{
		key:   benchProfiledKey,
		what:  "lazybase + export guard, builder base lazy-only, eStargz images converted with a prefetch profile of this build",
		tag:   tagEStargz,
		opts:  opts,
		bases: profiledBases,
	}
}

// profiledBase makes the profiled golang-like image once per process: from
// the cache ($LAZYBASE_CACHE/e2e/estargz-prof, keyed by the reference
// images' digests, the source that writes the bench's Dockerfile and
// program, and the converter's source), else by recording the bench's
// build on a setup stack (unshaped, the daemon configured as in (c) plus
// access_record_dir), turning the records into a profile
// (prefetch.FromRecords, Profile.Resolve against the eStargz image the
// build ran on) and converting the gzip image with it. It prints how long
// that took and the profile's size.
func profiledBase(t *testing.T, policy string) {
	t.Helper()
	profBench.Lock()
	done := profBench.img != nil
	profBench.Unlock()
	if done {
		return
	}
	debian, golang := referenceImages(t)
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	key, err := profiledKey(root, debian, golang)
	if err != nil {
		t.Fatalf("profiled image cache key: %v", err)
	}
	cacheDir := filepath.Join(harness.CacheDir(root), "e2e", "estargz-prof")
	dir := filepath.Join(cacheDir, "golang-"+key)
	img, prof, err := openProfiled(dir)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			t.Logf("profiled image cache %s: %v: making it again", dir, err)
		}
		start := time.Now()
		t.Run("setup", func(t *testing.T) {
			img, prof = recordProfiled(t, policy, debian, golang, cacheDir, dir)
		})
		if img == nil {
			t.FailNow()
		}
		t.Logf("BENCH (%s) setup: recorded, profiled and converted the builder base in %s (cached in %s)", benchProfiledKey, r(time.Since(start)), dir)
	} else {
		t.Logf("BENCH (%s) setup: profiled builder base from the cache %s", benchProfiledKey, dir)
	}
	files, bytes := profileSize(prof)
	t.Logf("BENCH (%s) profile: %d layers, %d files, %.1f MB", benchProfiledKey, len(prof.Layers), files, mb(bytes))
	layers := proofLayers(t, t.TempDir(), img)
	var landmarks int
	for _, l := range layers {
		if l.landmark > 0 {
			landmarks++
		}
	}
	if landmarks == 0 {
		t.Fatalf("(%s) the profiled builder base has no layer with a prefetch landmark", benchProfiledKey)
	}
	reads, err := profileReads(prof, img)
	if err != nil {
		t.Fatalf("(%s) %v", benchProfiledKey, err)
	}
	deb, err := openLayout(filepath.Join(dir, "debian"))
	if err != nil {
		t.Fatalf("(%s) profiled debian-like image in %s: %v", benchProfiledKey, dir, err)
	}
	profBench.Lock()
	profBench.img, profBench.debian, profBench.prof, profBench.layers, profBench.reads = img, deb, prof, layers, reads
	profBench.Unlock()
}

// profileReads returns the files prof names as access records of the
// layers of img, the image converted with it: each profile layer is
// matched to the layer of img converted from the same source layer.
func profileReads(prof *prefetch.Profile, img v1.Image) ([]prefetch.AccessRecord, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	bySource := map[string]string{}
	for _, l := range m.Layers {
		if src := l.Annotations[convert.AnnotationSourceLayer]; src != "" {
			bySource[src] = l.Digest.String()
		}
	}
	var out []prefetch.AccessRecord
	for _, l := range prof.Layers {
		d, ok := bySource[l.SourceDigest]
		if !ok {
			return nil, fmt.Errorf("profile layer %s (source %q): no layer of the profiled image was converted from it", l.Digest, l.SourceDigest)
		}
		for _, f := range l.Files {
			out = append(out, prefetch.AccessRecord{Layer: d, Path: f.Path, Size: f.Size})
		}
	}
	return out, nil
}

// profiledKey is the cache key of the profiled image.
func profiledKey(root string, debian, golang *refImage) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "exportbench-prof v2\n")
	for _, img := range []v1.Image{golang.gzip, golang.estargz, debian.gzip, debian.estargz} {
		d, err := img.Digest()
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s\n", d)
	}
	// baseline_test.go writes the bench's Dockerfile and program.
	files := []string{filepath.Join(root, "e2e", "baseline_test.go"), filepath.Join(root, "go.sum")}
	conv, err := filepath.Glob(filepath.Join(root, "convert", "*.go"))
	if err != nil {
		return "", err
	}
	files = append(files, conv...)
	sort.Strings(files)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") && filepath.Base(f) != "baseline_test.go" {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "%s %d\n", filepath.Base(f), len(b))
		h.Write(b)
	}
	return hex.EncodeToString(h.Sum(nil))[:16], nil
}

// openProfiled opens a cached profiled image and its profile.
func openProfiled(dir string) (v1.Image, *prefetch.Profile, error) {
	prof, err := prefetch.LoadProfile(filepath.Join(dir, "profile.json"))
	if err != nil {
		return nil, nil, err
	}
	img, err := openLayout(dir)
	if err != nil {
		return nil, nil, err
	}
	return img, prof, nil
}

// recordProfiled runs the bench's build once on a setup stack that records
// accesses, makes the profile from the records, converts golang's gzip
// image with it, and caches image and profile in dir.
func recordProfiled(t *testing.T, policy string, debian, golang *refImage, cacheDir, dir string) (v1.Image, *prefetch.Profile) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	access := filepath.Join(t.TempDir(), "access-record")
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithLazybaseConfig(fmt.Sprintf("access_record_dir = %q\n%s", access, policy)),
		harness.WithBuildkitLazy())
	publishAll(ctx, t, s)
	work := multiStageContext(t, s, tagEStargz)
	out := s.Registry.DirectRef("e2e/bench-prof-setup", "latest")
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, "build",
		"--frontend", "dockerfile.v0", "--local", "context="+work, "--local", "dockerfile="+work,
		"--output", "type=image,name="+out+",push=true,registry.insecure=true"); err != nil {
		t.Fatalf("(%s) setup build: %v\n%s", benchProfiledKey, err, s.Logs(30))
	}
	t.Logf("(%s) setup build, recording accesses: %s", benchProfiledKey, r(time.Since(start)))

	// The profile, as the mirror makes it from published records: every
	// record of the build, resolved against the eStargz image it ran on,
	// so that it applies to the gzip image it was converted from.
	prof, err := prefetch.FromRecords("", readAllAccessRecords(ctx, t, access))
	if err != nil {
		t.Fatalf("(%s) profile from the access records: %v", benchProfiledKey, err)
	}
	m, err := golang.estargz.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	d, err := golang.estargz.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if n := prof.Resolve(d, m); n == 0 {
		t.Fatalf("(%s) the access records name none of the builder base's layers %v", benchProfiledKey, layerDigests(t, golang.estargz))
	}
	for _, l := range prof.Layers {
		if l.SourceDigest == "" {
			t.Logf("(%s) profile layer %s (%d files) is not a layer of the builder base: it applies to nothing", benchProfiledKey, l.Digest, len(l.Files))
		}
	}
	if err := prof.Validate(); err != nil {
		t.Fatalf("(%s) profile: %v", benchProfiledKey, err)
	}
	img := convertedWith(ctx, t, golang.gzip, convert.WithPrefetch(prof))
	deb := convertedWith(ctx, t, debian.gzip, convert.WithPrefetch(prof))

	// Cache both; the converted layers live in the converter's spool,
	// which closes when this test ends.
	if err := os.MkdirAll(cacheDir, 0o755); err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp(cacheDir, ".tmp-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tmp)
	lp, err := layout.Write(tmp, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := lp.AppendImage(img); err != nil {
		t.Fatalf("caching the profiled image in %s: %v", tmp, err)
	}
	dp, err := layout.Write(filepath.Join(tmp, "debian"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.AppendImage(deb); err != nil {
		t.Fatalf("caching the profiled debian-like image in %s: %v", tmp, err)
	}
	b, err := prof.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "profile.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		t.Fatal(err)
	}
	cached, cachedProf, err := openProfiled(dir)
	if err != nil {
		t.Fatalf("profiled image cache %s: %v", dir, err)
	}
	return cached, cachedProf
}

// profileSize returns the number and total size of the files the profile
// names.
func profileSize(p *prefetch.Profile) (files int, bytes int64) {
	for _, l := range p.Layers {
		for _, f := range l.Files {
			files++
			bytes += f.Size
		}
	}
	return files, bytes
}

// profiledBases returns the reference images with the profiled images
// profiledBase made as their eStargz forms.
func profiledBases(t *testing.T, debian, golang *refImage) (*refImage, *refImage) {
	t.Helper()
	profBench.Lock()
	img, deb := profBench.img, profBench.debian
	profBench.Unlock()
	if img == nil || deb == nil {
		t.Fatalf("(%s) no profiled bases: TestExportBench makes them before the rounds", benchProfiledKey)
	}
	return &refImage{kind: debian.kind, gzip: debian.gzip, estargz: deb},
		&refImage{kind: golang.kind, gzip: golang.gzip, estargz: img}
}

// resetProfiledFigures forgets the go build steps and prefetch
// measurements of the previous link.
func resetProfiledFigures() {
	profBench.Lock()
	defer profBench.Unlock()
	profBench.goBuild, profBench.fetched, profBench.runs = nil, nil, nil
}

// benchStep notes, for any variant, the go build step's duration and the
// blob bytes fetched through the shaper, and for (c-prof) measures how the
// build's reads (the files of the profile, recorded from the same build)
// arrived, from the proxy's events of the builder base's blobs (prefetch:
// requests from offset 0 within the prefetch region sent before the first
// RUN started), as the prefetch proof does. start is the build's start, progress buildctl's rawjson
// output, events the proxy's record of the build and push.
func benchStep(t *testing.T, v benchVariant, ph benchPhases, start time.Time, progress string, events []shaper.Event) {
	t.Helper()
	step, err := runStep(progress, "RUN go build")
	if err != nil {
		t.Fatalf("(%s) go build step: %v", v.key, err)
	}
	var fetched int64
	for _, e := range events {
		if e.Kind == shaper.KindBlob && e.Method == "GET" {
			fetched += e.Bytes
		}
	}
	t.Logf("(%s) go build step %s; %.1f MB of blobs fetched", v.key, r(step), mb(fetched))
	profBench.Lock()
	if profBench.goBuild == nil {
		profBench.goBuild, profBench.fetched = map[string][]time.Duration{}, map[string][]int64{}
	}
	profBench.goBuild[v.key] = append(profBench.goBuild[v.key], step)
	profBench.fetched[v.key] = append(profBench.fetched[v.key], fetched)
	layers, reads := profBench.layers, profBench.reads
	profBench.Unlock()
	if v.key != benchProfiledKey {
		return
	}

	m := &proofRun{}
	onDemand := m.classifyFetches(t, v.key, layers, events, start.Add(ph.firstRun))
	m.classifyReads(t, v.key, layers, reads, onDemand)
	t.Logf("(%s) builder base: read %d files %.1f MB: via prefetch %.1f MB (%.1f%%), on demand %.1f MB, other %.1f MB | blob bytes: prefetch %.1f MB in %d req, on demand or background fetch %.1f MB in %d req, TOC/footer %.1f MB | prefetch regions %.1f of %.1f MB of layer blobs",
		v.key, m.readFiles, mb(m.readBytes), mb(m.prefetchedRead), 100*m.prefetchedShare(), mb(m.onDemandRead), mb(m.otherRead),
		mb(m.netPrefetch), m.reqPrefetch, mb(m.netOnDemand), m.reqOnDemand, mb(m.netMeta), mb(m.regionBytes), mb(m.blobBytes))
	if m.readBytes == 0 {
		t.Errorf("(%s) the profile names no file of the builder base", v.key)
	}
	if m.netPrefetch == 0 {
		t.Errorf("(%s) no prefetch request reached the registry before the first RUN", v.key)
	}
	profBench.Lock()
	profBench.runs = append(profBench.runs, m)
	profBench.Unlock()
}

// runStep returns the duration of the build step whose name contains
// step in buildctl's rawjson progress.
func runStep(progress, step string) (time.Duration, error) {
	var from, to time.Time
	dec := json.NewDecoder(strings.NewReader(progress))
	for {
		var st struct {
			Vertexes []rawVertex `json:"vertexes"`
		}
		err := dec.Decode(&st)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return 0, fmt.Errorf("decoding rawjson: %w", err)
		}
		for _, v := range st.Vertexes {
			if !strings.Contains(v.Name, step) {
				continue
			}
			if v.Started != nil && (from.IsZero() || v.Started.Before(from)) {
				from = *v.Started
			}
			if v.Completed != nil && v.Completed.After(to) {
				to = *v.Completed
			}
		}
	}
	if from.IsZero() || to.IsZero() {
		return 0, fmt.Errorf("no completed step %q in the progress", step)
	}
	return to.Sub(from), nil
}

// reportProfiled prints, after TestExportBench's medians med, the go build
// step and bytes fetched of every variant and (c-prof)'s figures: its
// ratios to (a), (c) and, when it ran, (w), the builder already holding its
// base (target ≤ 1.10), its go build step against (w)'s, a warm overlayfs
// (target ≤ 1.15), and the share of what the build read that came through
// the prefetch (target ≥ 90%).
func reportProfiled(t *testing.T, link string, med map[string]benchfig.Run) {
	t.Helper()
	profBench.Lock()
	defer profBench.Unlock()
	keys := make([]string, 0, len(profBench.goBuild))
	for k := range profBench.goBuild {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	step := map[string]time.Duration{}
	for _, k := range keys {
		step[k] = medianOf(profBench.goBuild[k])
		t.Logf("BENCH %s (%s) median of %d: go build step %s, blobs fetched %.1f MB",
			link, k, len(profBench.goBuild[k]), r(step[k]), mb(medianOf(profBench.fetched[k])))
		record(t, "exportbench-"+k+"-gobuild", step[k])
	}
	p, ok := med[benchProfiledKey]
	if !ok {
		return
	}
	for _, k := range []string{"a", "c", "w"} {
		o, ok := med[k]
		if !ok {
			continue
		}
		total := p.TotalSeconds / o.TotalSeconds
		steps := float64(step[benchProfiledKey]) / float64(step[k])
		switch k {
		case "w":
			t.Logf("BENCH %s: (%s)/(w) %.3f (target <= 1.10) %s; go build step (%s)/(w) %.3f (target <= 1.15) %s",
				link, benchProfiledKey, total, verdict(total <= 1.10), benchProfiledKey, steps, verdict(steps <= 1.15))
		default:
			t.Logf("BENCH %s: (%s)/(%s) %.3f; go build step (%s)/(%s) %.3f; first RUN at %.2f s vs %.2f s",
				link, benchProfiledKey, k, total, benchProfiledKey, k, steps, p.FirstRunSeconds, o.FirstRunSeconds)
		}
	}
	if len(profBench.runs) == 0 {
		return
	}
	shares := make([]float64, len(profBench.runs))
	for i, m := range profBench.runs {
		shares[i] = m.prefetchedShare()
	}
	share := medianOf(shares)
	t.Logf("BENCH %s: (%s) read through the prefetch, median of %d: %.1f%% (target >= 90%%) %s",
		link, benchProfiledKey, len(shares), 100*share, verdict(share >= 0.9))
}

// medianOf returns the median of xs (the mean of the middle two of an even
// count).
func medianOf[T int64 | float64 | time.Duration](xs []T) T {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[n/2]
}

// TestRunStep checks runStep on buildctl rawjson progress: the span of the
// named step's vertex, its earliest start to its latest completion across
// updates, and errors for a missing or unfinished step or bad JSON.
func TestRunStep(t *testing.T) {
	const progress = `{"vertexes":[{"digest":"sha256:1","name":"[build 1/4] FROM x","started":"2026-01-01T00:00:00Z","completed":"2026-01-01T00:00:01Z"}]}
{"vertexes":[{"digest":"sha256:2","name":"[build 4/4] RUN go build -o /out/hello main.go","started":"2026-01-01T00:00:02Z"}]}
{"vertexes":[{"digest":"sha256:2","name":"[build 4/4] RUN go build -o /out/hello main.go","started":"2026-01-01T00:00:02Z","completed":"2026-01-01T00:00:32.5Z"}]}
`
	for _, tc := range []struct {
		name, progress, step string
		want                 time.Duration
		wantErr              bool
	}{
		{"found", progress, "RUN go build", 30500 * time.Millisecond, false},
		{"other step", progress, "FROM x", time.Second, false},
		{"missing", progress, "RUN make", 0, true},
		{"unfinished", `{"vertexes":[{"digest":"sha256:2","name":"RUN go build","started":"2026-01-01T00:00:02Z"}]}`, "RUN go build", 0, true},
		{"bad json", `{"vertexes":[`, "RUN go build", 0, true},
		{"empty", "", "RUN go build", 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := runStep(tc.progress, tc.step)
			if (err != nil) != tc.wantErr {
				t.Fatalf("runStep: error %v, want error %t", err, tc.wantErr)
			}
			if got != tc.want {
				t.Errorf("runStep = %s, want %s", got, tc.want)
			}
		})
	}
}

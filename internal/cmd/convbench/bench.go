package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"syscall"
	"time"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/internal/refimage"
)

// Targets of issue 2.
const (
	targetSpeedup   = 5.0
	targetSizeRatio = 1.03
	targetRSS       = 512 << 20
)

// measurement holds the figures of one image (or the total).
type measurement struct {
	name         string
	layers       int
	input        int64 // uncompressed source bytes
	sourceSize   int64 // compressed source bytes
	baseSeconds  float64
	baseOutput   int64
	baseLayers   []layerFigure
	lazySeconds  float64
	lazyOutput   int64
	lazyLayers   []layerFigure
	lazyRSS      int64 // bytes, the largest of all runs
	lazyDigests  map[string]bool
	lazyRunTimes []float64
	baseRunTimes []float64
	lazyDigest   string // of the median lazybase run

	// The registry-to-registry conversion (convert/job), when measured.
	job         *jobResult // the median run
	jobRunTimes []float64
	jobDigests  map[string]bool
}

type layerFigure struct {
	seconds float64
	output  int64
}

func runBench(ctx context.Context, c *config, stdout, stderr io.Writer) error {
	var opts []refimage.Option
	if c.cacheDir != "" {
		opts = append(opts, refimage.WithCacheDir(c.cacheDir))
	}
	if c.mirror != "" {
		opts = append(opts, refimage.WithMirror(c.mirror))
	}
	var images []*refimage.Image
	for _, name := range c.images {
		start := time.Now()
		img, err := refimage.Build(ctx, refimage.Kind(name), opts...)
		if err != nil {
			return err
		}
		log.G(ctx).WithField("image", name).WithField("seconds", time.Since(start).Seconds()).Debug("reference image ready")
		images = append(images, img)
	}
	if c.refimages {
		for _, img := range images {
			fmt.Fprintf(stdout, "%-8s %s  %s\n", img.Kind, img.Digest, img.Dir)
		}
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("finding own executable: %w", err)
	}
	var results []*measurement
	for _, img := range images {
		m, err := measure(ctx, c, self, img, stderr)
		if err != nil {
			return fmt.Errorf("%s: %w", img.Kind, err)
		}
		results = append(results, m)
	}
	report(stdout, c, results)
	return nil
}

func measure(ctx context.Context, c *config, self string, img *refimage.Image, stderr io.Writer) (*measurement, error) {
	man, err := img.Image.Manifest()
	if err != nil {
		return nil, err
	}
	m := &measurement{name: string(img.Kind) + "-like", layers: len(man.Layers), lazyDigests: map[string]bool{}}
	if m.input, err = uncompressedSize(img, man); err != nil {
		return nil, err
	}
	for _, l := range man.Layers {
		m.sourceSize += l.Size
	}

	// Rounds are interleaved (baseline, library, registry to registry) so
	// that a change in the machine's load touches every side alike.
	var (
		baseRuns [][]layerFigure
		lazyRuns []*childResult
		jobRuns  []*jobResult
	)
	m.jobDigests = map[string]bool{}
	rounds := max(c.runs, c.baselineRuns)
	for round := 0; round < rounds; round++ {
		if round < c.baselineRuns {
			fmt.Fprintf(stderr, "convbench: %s: baseline estargz.Build run %d/%d\n", m.name, round+1, c.baselineRuns)
			figs, secs, err := baseline(ctx, img.Dir, man.Layers)
			if err != nil {
				return nil, err
			}
			m.baseRunTimes = append(m.baseRunTimes, secs)
			baseRuns = append(baseRuns, figs)
		}
		if round >= c.runs {
			continue
		}
		last := round == c.runs-1
		fmt.Fprintf(stderr, "convbench: %s: lazybase run %d/%d\n", m.name, round+1, c.runs)
		profile := ""
		if c.cpuProfile != "" && last {
			profile = c.cpuProfile + "." + string(img.Kind)
		}
		res, rss, err := lazybase(ctx, self, img, profile, stderr)
		if err != nil {
			return nil, err
		}
		if res.SourceUncompressed != 0 && res.SourceUncompressed != m.input {
			log.G(ctx).Warnf("%s: converter counted %d uncompressed bytes, refimage %d", m.name, res.SourceUncompressed, m.input)
		}
		m.lazyRunTimes = append(m.lazyRunTimes, res.Seconds)
		m.lazyDigests[res.Digest] = true
		if rss > m.lazyRSS {
			m.lazyRSS = rss
		}
		lazyRuns = append(lazyRuns, res)
		if !c.registry {
			continue
		}
		fmt.Fprintf(stderr, "convbench: %s: lazybase convert registry to registry run %d/%d\n", m.name, round+1, c.runs)
		if profile != "" {
			profile = c.cpuProfile + "." + string(img.Kind) + ".registry"
		}
		jr, err := registryJob(ctx, self, c.registryBin, img, profile, stderr)
		if err != nil {
			return nil, err
		}
		m.jobRunTimes = append(m.jobRunTimes, jr.Seconds)
		m.jobDigests[jr.Digest] = true
		jobRuns = append(jobRuns, jr)
	}
	i := medianIndex(m.baseRunTimes)
	m.baseSeconds, m.baseLayers = m.baseRunTimes[i], baseRuns[i]
	for _, f := range m.baseLayers {
		m.baseOutput += f.output
	}
	if len(jobRuns) > 0 {
		m.job = jobRuns[medianIndex(m.jobRunTimes)]
	}
	i = medianIndex(m.lazyRunTimes)
	best := lazyRuns[i]
	m.lazySeconds, m.lazyDigest = best.Seconds, best.Digest
	for j, size := range best.OutputSizes {
		f := layerFigure{output: size}
		if j < len(best.LayerSeconds) {
			f.seconds = best.LayerSeconds[j]
		}
		m.lazyLayers = append(m.lazyLayers, f)
		m.lazyOutput += size
	}
	return m, nil
}

// uncompressedSize returns the size of the image's uncompressed layers: the
// reference image's annotation, or counted when it has none.
func uncompressedSize(img *refimage.Image, man *v1.Manifest) (int64, error) {
	if a, ok := man.Annotations[refimage.AnnotationUncompressedSize]; ok {
		n, err := strconv.ParseInt(a, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("manifest %s: annotation %s: %w", img.Digest, refimage.AnnotationUncompressedSize, err)
		}
		return n, nil
	}
	layers, err := img.Image.Layers()
	if err != nil {
		return 0, err
	}
	var total int64
	for _, l := range layers {
		rc, err := l.Uncompressed()
		if err != nil {
			return 0, err
		}
		n, err := io.Copy(io.Discard, rc)
		rc.Close()
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}

// baseline runs estargz.Build with its defaults on every layer blob and
// reads each output fully.
func baseline(ctx context.Context, dir string, layers []v1.Descriptor) ([]layerFigure, float64, error) {
	var figs []layerFigure
	start := time.Now()
	for _, desc := range layers {
		if err := ctx.Err(); err != nil {
			return nil, 0, err
		}
		lstart := time.Now()
		n, err := baselineLayer(filepath.Join(dir, "blobs", desc.Digest.Algorithm, desc.Digest.Hex), desc.Size)
		if err != nil {
			return nil, 0, fmt.Errorf("baseline: layer %s: %w", desc.Digest, err)
		}
		figs = append(figs, layerFigure{seconds: time.Since(lstart).Seconds(), output: n})
	}
	return figs, time.Since(start).Seconds(), nil
}

func baselineLayer(path string, size int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	blob, err := estargz.Build(io.NewSectionReader(f, 0, size))
	if err != nil {
		return 0, err
	}
	defer blob.Close()
	return io.Copy(io.Discard, blob)
}

// lazybase converts img in a child process and returns its report and peak
// RSS in bytes.
func lazybase(ctx context.Context, self string, img *refimage.Image, profile string, stderr io.Writer) (*childResult, int64, error) {
	var out bytes.Buffer
	args := []string{"-child-convert", img.Dir, "-child-digest", img.Digest.String()}
	if profile != "" {
		args = append(args, "-cpuprofile", profile)
	}
	cmd := exec.CommandContext(ctx, self, args...)
	cmd.Stdout = &out
	cmd.Stderr = stderr
	if err := cmd.Run(); err != nil {
		return nil, 0, fmt.Errorf("lazybase conversion (child process): %w", err)
	}
	var res childResult
	if err := json.Unmarshal(out.Bytes(), &res); err != nil {
		return nil, 0, fmt.Errorf("lazybase conversion: reading child report %q: %w", out.String(), err)
	}
	var rss int64
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		rss = ru.Maxrss * 1024 // kilobytes on Linux
	}
	return &res, rss, nil
}

// medianIndex returns the index of the median of xs (the lower median for an
// even count).
func medianIndex(xs []float64) int {
	idx := make([]int, len(xs))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return xs[idx[a]] < xs[idx[b]] })
	return idx[(len(idx)-1)/2]
}

func mb(n int64) float64 { return float64(n) / 1e6 }

func report(w io.Writer, c *config, ms []*measurement) {
	total := &measurement{name: "total", lazyDigests: map[string]bool{}}
	for _, m := range ms {
		total.layers += m.layers
		total.input += m.input
		total.sourceSize += m.sourceSize
		total.baseSeconds += m.baseSeconds
		total.baseOutput += m.baseOutput
		total.lazySeconds += m.lazySeconds
		total.lazyOutput += m.lazyOutput
		if m.lazyRSS > total.lazyRSS {
			total.lazyRSS = m.lazyRSS
		}
	}
	fmt.Fprintf(w, "lazybase convert benchmark — %s/%s, GOMAXPROCS=%d, %s\n", runtime.GOOS, runtime.GOARCH, runtime.GOMAXPROCS(0), runtime.Version())
	fmt.Fprintf(w, "baseline: estargz.Build (stargz-snapshotter/estargz v0.19.1 defaults), median of %d run(s)\n", c.baselineRuns)
	fmt.Fprintf(w, "lazybase: convert.Converter.Image on the whole image, median of %d run(s), each in a child process\n", c.runs)
	fmt.Fprintf(w, "MB = 10^6 bytes; MB/s = uncompressed input / seconds\n\n")

	fmt.Fprintf(w, "%-12s %6s %9s %9s | %8s %7s %9s | %8s %7s %9s %8s | %7s %6s\n",
		"image", "layers", "input MB", "source MB",
		"base s", "MB/s", "out MB",
		"lazy s", "MB/s", "out MB", "RSS MiB",
		"speedup", "size")
	row := func(m *measurement) {
		fmt.Fprintf(w, "%-12s %6d %9.1f %9.1f | %8.2f %7.1f %9.2f | %8.2f %7.1f %9.2f %8.0f | %6.2fx %5.1f%%\n",
			m.name, m.layers, mb(m.input), mb(m.sourceSize),
			m.baseSeconds, mb(m.input)/m.baseSeconds, mb(m.baseOutput),
			m.lazySeconds, mb(m.input)/m.lazySeconds, mb(m.lazyOutput), float64(m.lazyRSS)/(1<<20),
			m.baseSeconds/m.lazySeconds, 100*float64(m.lazyOutput)/float64(m.baseOutput))
	}
	for _, m := range ms {
		row(m)
	}
	if len(ms) > 1 {
		row(total)
	}

	fmt.Fprintf(w, "\nper layer (median runs):\n")
	for _, m := range ms {
		for i := range m.baseLayers {
			var lz layerFigure
			if i < len(m.lazyLayers) {
				lz = m.lazyLayers[i]
			}
			fmt.Fprintf(w, "  %-12s layer %d: baseline %7.2f s %9.2f MB | lazybase %7.2f s %9.2f MB (%5.1f%%)\n",
				m.name, i, m.baseLayers[i].seconds, mb(m.baseLayers[i].output), lz.seconds, mb(lz.output),
				100*float64(lz.output)/float64(m.baseLayers[i].output))
		}
		fmt.Fprintf(w, "  %-12s runs: baseline %s s, lazybase %s s\n", m.name, secs(m.baseRunTimes), secs(m.lazyRunTimes))
		if len(m.lazyDigests) > 1 {
			fmt.Fprintf(w, "  %-12s !!! lazybase produced %d different digests over %d runs (not deterministic)\n", m.name, len(m.lazyDigests), len(m.lazyRunTimes))
		}
	}

	fmt.Fprintf(w, "\ntargets (issue 2): speed >= %.0fx the baseline, output <= %.0f%% of the baseline's size, peak RSS < %d MiB\n",
		targetSpeedup, 100*targetSizeRatio, targetRSS>>20)
	all := append([]*measurement{}, ms...)
	if len(ms) > 1 {
		all = append(all, total)
	}
	misses := 0
	for _, m := range all {
		speed := m.baseSeconds / m.lazySeconds
		size := float64(m.lazyOutput) / float64(m.baseOutput)
		vSpeed, vSize, vRSS := verdict(speed >= targetSpeedup), verdict(size <= targetSizeRatio), verdict(m.lazyRSS < targetRSS)
		for _, v := range []string{vSpeed, vSize, vRSS} {
			if v != "PASS" {
				misses++
			}
		}
		fmt.Fprintf(w, "  %-12s speed %6.2fx %-4s  size %6.1f%% %-4s  peak RSS %6.0f MiB %-4s\n",
			m.name, speed, vSpeed, 100*size, vSize, float64(m.lazyRSS)/(1<<20), vRSS)
	}
	misses += reportRegistry(w, c, ms)
	if misses > 0 {
		fmt.Fprintf(w, "\n!!!!!!!! %d TARGET(S) MISSED — see MISS above !!!!!!!!\n", misses)
	} else {
		fmt.Fprintf(w, "\nall targets met\n")
	}
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

func secs(xs []float64) string {
	var b bytes.Buffer
	for i, x := range xs {
		if i > 0 {
			b.WriteString(" ")
		}
		fmt.Fprintf(&b, "%.2f", x)
	}
	return b.String()
}

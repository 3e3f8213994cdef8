package benchfig

import (
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"
)

// ExportBenchName is the figures name of TestExportBench (exportbench.json,
// the README markers <!-- figures:exportbench:… -->).
const ExportBenchName = "exportbench"

// ExportBench is what TestExportBench writes: one table per shaped link,
// each with the per-variant medians of its interleaved rounds and the
// issue's targets.
type ExportBench struct {
	// Benchmark names the test that wrote the file.
	Benchmark string `json:"benchmark"`
	// Date is when the benchmark finished.
	Date time.Time `json:"date"`
	// CPUs is the machine's CPU count (runtime.NumCPU).
	CPUs int `json:"cpus"`
	// LoadStart and LoadEnd are /proc/loadavg's 1, 5 and 15 minute load
	// averages when the benchmark started and ended.
	LoadStart [3]float64 `json:"load_start"`
	LoadEnd   [3]float64 `json:"load_end"`
	// Links are the shaped links the benchmark ran at, in order.
	Links []Link `json:"links"`
}

// Link is one shaped link's table.
type Link struct {
	// Name says what the link is, e.g. "1 Gbit/s, 20 ms RTT".
	Name string `json:"name"`
	// BitsPerSecond and RTTMillis are the shaping proxy's settings.
	BitsPerSecond int64   `json:"bits_per_second"`
	RTTMillis     float64 `json:"rtt_ms"`
	// Rounds is how many interleaved rounds ran (each variant once per
	// round).
	Rounds int `json:"rounds"`
	// Seconds is the wall time of all the link's rounds, set-up and
	// teardown of every stack included.
	Seconds float64 `json:"seconds"`
	// EStargzBaseBytes and GzipBaseBytes are the compressed sizes of the
	// two base images' distinct layers in each form.
	EStargzBaseBytes int64 `json:"estargz_base_bytes"`
	GzipBaseBytes    int64 `json:"gzip_base_bytes"`
	// Variants are the build set-ups, in the order they ran in a round.
	Variants []Variant `json:"variants"`
	// Targets are the targets, measured on the medians.
	Targets []Target `json:"targets"`
}

// Variant is one build set-up: its runs and their medians.
type Variant struct {
	// Key is the name for it: "a", "b", "c", "c-lazy", "w".
	Key string `json:"key"`
	// What describes the set-up.
	What   string `json:"what"`
	Median Run    `json:"median"`
	Runs   []Run  `json:"runs"`
}

// Run is one cold build and push (or the per-field medians of several).
type Run struct {
	// Round is the round the run belongs to (0 for a median).
	Round int `json:"round,omitempty"`
	// TotalSeconds is buildctl's wall time: build and push.
	TotalSeconds float64 `json:"total_s"`
	// FirstRunSeconds is from the start to the start of the first RUN.
	FirstRunSeconds float64 `json:"first_run_s"`
	// BuildSeconds is from the start to the end of the last step before
	// the export.
	BuildSeconds float64 `json:"build_s"`
	// ExportSeconds is from the start of the export to the end.
	ExportSeconds float64 `json:"export_s"`
	// FetchedBytes are the blob bytes that crossed the shaping proxy
	// during the build and push; Requests the requests it forwarded.
	FetchedBytes int64 `json:"fetched_bytes"`
	Requests     int   `json:"requests"`
	// SnapshotterCPUSeconds is the CPU time of the lazybase daemon during
	// the build and push; nil in variants without it.
	SnapshotterCPUSeconds *float64 `json:"snapshotter_cpu_s,omitempty"`
	// ContainerdCPUSeconds and BuildkitdCPUSeconds are the CPU times of
	// containerd (its overlayfs snapshotter and layer unpacking) and of
	// buildkitd (with the OCI worker, its own snapshotter) during the
	// build and push.
	ContainerdCPUSeconds float64 `json:"containerd_cpu_s"`
	BuildkitdCPUSeconds  float64 `json:"buildkitd_cpu_s"`
	// Load1 is the 1-minute load average when the run started.
	Load1 float64 `json:"load1"`
	// RunSeconds is the run's whole wall time: stack start, publishing
	// the bases, any warm-up, the build and push, checks and teardown.
	RunSeconds float64 `json:"run_s"`
}

// Target is one of the targets, measured.
type Target struct {
	// Name says what is compared, e.g. "(c)/(a) build and push".
	Name string `json:"name"`
	// Unit is "ratio" or "bytes".
	Unit string `json:"unit"`
	// Value is the measured figure, Limit the target's bound (Value ≤
	// Limit passes).
	Value float64 `json:"value"`
	Limit float64 `json:"limit"`
	Pass  bool    `json:"pass"`
}

// NewTarget returns the target Value ≤ Limit.
func NewTarget(name, unit string, value, limit float64) Target {
	return Target{Name: name, Unit: unit, Value: value, Limit: limit, Pass: value <= limit}
}

// Verdict is PASS or MISS.
func (t Target) Verdict() string {
	if t.Pass {
		return "PASS"
	}
	return "MISS"
}

// String formats the target as the benchmark prints it.
func (t Target) String() string {
	return fmt.Sprintf("%s %s (target <= %s) %s", t.Name, t.format(t.Value), t.format(t.Limit), t.Verdict())
}

func (t Target) format(v float64) string {
	if t.Unit == "bytes" {
		return megabytes(int64(v))
	}
	return fmt.Sprintf("%.3f", v)
}

// MedianRun returns the per-field medians of runs (the mean of the two
// middle values for an even count). Snapshotter CPU is the median of the
// runs that have it, nil if none has.
func MedianRun(runs []Run) Run {
	if len(runs) == 0 {
		return Run{}
	}
	f := func(get func(Run) float64) float64 {
		vs := make([]float64, len(runs))
		for i, r := range runs {
			vs[i] = get(r)
		}
		return median(vs)
	}
	m := Run{
		TotalSeconds:         f(func(r Run) float64 { return r.TotalSeconds }),
		FirstRunSeconds:      f(func(r Run) float64 { return r.FirstRunSeconds }),
		BuildSeconds:         f(func(r Run) float64 { return r.BuildSeconds }),
		ExportSeconds:        f(func(r Run) float64 { return r.ExportSeconds }),
		FetchedBytes:         int64(f(func(r Run) float64 { return float64(r.FetchedBytes) })),
		Requests:             int(f(func(r Run) float64 { return float64(r.Requests) })),
		ContainerdCPUSeconds: f(func(r Run) float64 { return r.ContainerdCPUSeconds }),
		BuildkitdCPUSeconds:  f(func(r Run) float64 { return r.BuildkitdCPUSeconds }),
		Load1:                f(func(r Run) float64 { return r.Load1 }),
		RunSeconds:           f(func(r Run) float64 { return r.RunSeconds }),
	}
	var snap []float64
	for _, r := range runs {
		if r.SnapshotterCPUSeconds != nil {
			snap = append(snap, *r.SnapshotterCPUSeconds)
		}
	}
	if len(snap) > 0 {
		v := median(snap)
		m.SnapshotterCPUSeconds = &v
	}
	return m
}

func median(vs []float64) float64 {
	s := append([]float64(nil), vs...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 0 {
		return (s[n/2-1] + s[n/2]) / 2
	}
	return s[n/2]
}

// RenderExportBench renders exportbench.json as the README's markdown:
// one table of medians per link and one of its targets.
func RenderExportBench(data []byte) (string, error) {
	var e ExportBench
	if err := json.Unmarshal(data, &e); err != nil {
		return "", fmt.Errorf("decoding %s figures: %w", ExportBenchName, err)
	}
	if len(e.Links) == 0 {
		return "", fmt.Errorf("%s figures: no link measured", ExportBenchName)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "_Generated by `make figures` from the JSON %s wrote on %s (%d CPUs; load average %.2f at the start, %.2f at the end; fresh stack per run, medians of interleaved rounds)._\n",
		orDash(e.Benchmark), e.Date.UTC().Format("2006-01-02 15:04 UTC"), e.CPUs, e.LoadStart[0], e.LoadEnd[0])
	for _, l := range e.Links {
		rounds := "rounds"
		if l.Rounds == 1 {
			rounds = "round"
		}
		fmt.Fprintf(&b, "\n**%s**: %d %s, %s for all of them, load average %s during the runs; compressed bases: eStargz %s, gzip %s.\n\n",
			l.Name, l.Rounds, rounds, seconds(l.Seconds), loadRange(l), megabytes(l.EStargzBaseBytes), megabytes(l.GzipBaseBytes))
		b.WriteString("| variant | build and push | first RUN | build | export | fetched | snapshotter CPU | containerd CPU | buildkitd CPU | build and push per round |\n")
		b.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
		for _, v := range l.Variants {
			m := v.Median
			snap := "—"
			if m.SnapshotterCPUSeconds != nil {
				snap = seconds(*m.SnapshotterCPUSeconds)
			}
			per := "—"
			if len(v.Runs) > 0 {
				ts := make([]string, len(v.Runs))
				for i, r := range v.Runs {
					ts[i] = fmt.Sprintf("%.1f", r.TotalSeconds)
				}
				per = strings.Join(ts, ", ") + " s"
			}
			fmt.Fprintf(&b, "| (%s) %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
				v.Key, v.What, seconds(m.TotalSeconds), seconds(m.FirstRunSeconds), seconds(m.BuildSeconds), seconds(m.ExportSeconds),
				megabytes(m.FetchedBytes), snap, seconds(m.ContainerdCPUSeconds), seconds(m.BuildkitdCPUSeconds), per)
		}
		if len(l.Targets) > 0 {
			b.WriteString("\n| target | measured | bound | |\n|---|---|---|---|\n")
			for _, t := range l.Targets {
				fmt.Fprintf(&b, "| %s | %s | ≤ %s | %s |\n", t.Name, t.format(t.Value), t.format(t.Limit), t.Verdict())
			}
		}
	}
	return b.String(), nil
}

// loadRange is the lowest and highest 1-minute load average at the start
// of the link's runs.
func loadRange(l Link) string {
	lo, hi, seen := 0.0, 0.0, false
	for _, v := range l.Variants {
		for _, r := range v.Runs {
			if !seen || r.Load1 < lo {
				lo = r.Load1
			}
			if !seen || r.Load1 > hi {
				hi = r.Load1
			}
			seen = true
		}
	}
	if !seen {
		return "—"
	}
	return fmt.Sprintf("%.1f–%.1f", lo, hi)
}

func orDash(s string) string {
	if s == "" {
		return "—"
	}
	return s
}

func seconds(s float64) string {
	if s >= 100 {
		return fmt.Sprintf("%.1f s", s)
	}
	return fmt.Sprintf("%.2f s", s)
}

func megabytes(n int64) string { return fmt.Sprintf("%.1f MB", float64(n)/1e6) }

// Renderers are the figures `make figures` knows how to render, by name.
var Renderers = map[string]func(data []byte) (string, error){
	ExportBenchName: RenderExportBench,
}

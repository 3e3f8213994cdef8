package benchfig

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestReplace(t *testing.T) {
	begin, end := Markers("exportbench")
	doc := "# README\n\nbefore\n" + begin + "\nold table\n" + end + "\nafter\n"
	got, err := Replace([]byte(doc), "exportbench", "  new table\n\n")
	if err != nil {
		t.Fatal(err)
	}
	want := "# README\n\nbefore\n" + begin + "\nnew table\n" + end + "\nafter\n"
	if string(got) != want {
		t.Errorf("Replace:\n%s\nwant:\n%s", got, want)
	}
	again, err := Replace(got, "exportbench", "new table")
	if err != nil {
		t.Fatal(err)
	}
	if string(again) != want {
		t.Errorf("Replace is not idempotent:\n%s", again)
	}
}

func TestReplaceRefuses(t *testing.T) {
	begin, end := Markers("x")
	for _, tc := range []struct {
		name, doc, figures, want string
	}{
		{"no markers", "text\n", "x", "found 0 times"},
		{"no end", begin + "\n", "x", "found 0 times"},
		{"no begin", end + "\n", "x", "found 0 times"},
		{"twice", begin + end + begin + end, "x", "found 2 times"},
		{"reversed", end + "\n" + begin, "x", "comes before"},
		{"bad name", begin + end, "X/../y", "want lower-case"},
		{"empty name", begin + end, "", "want lower-case"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Replace([]byte(tc.doc), tc.figures, "body")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Replace: error %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestMedianRun(t *testing.T) {
	cpu := func(v float64) *float64 { return &v }
	runs := []Run{
		{Round: 1, TotalSeconds: 30, FirstRunSeconds: 1, FetchedBytes: 100, SnapshotterCPUSeconds: cpu(5)},
		{Round: 2, TotalSeconds: 10, FirstRunSeconds: 3, FetchedBytes: 300},
		{Round: 3, TotalSeconds: 20, FirstRunSeconds: 2, FetchedBytes: 200, SnapshotterCPUSeconds: cpu(7)},
	}
	m := MedianRun(runs)
	if m.TotalSeconds != 20 || m.FirstRunSeconds != 2 || m.FetchedBytes != 200 || m.Round != 0 {
		t.Errorf("median of 3: %+v", m)
	}
	if m.SnapshotterCPUSeconds == nil || *m.SnapshotterCPUSeconds != 6 {
		t.Errorf("median snapshotter CPU of the runs that have it: %v, want 6", m.SnapshotterCPUSeconds)
	}
	m = MedianRun(runs[:2])
	if m.TotalSeconds != 20 {
		t.Errorf("median of 2: total %v, want the mean of both, 20", m.TotalSeconds)
	}
	if m := MedianRun(runs[1:2]); m.SnapshotterCPUSeconds != nil {
		t.Errorf("median snapshotter CPU without any: %v, want nil", *m.SnapshotterCPUSeconds)
	}
	if m := MedianRun(nil); m.TotalSeconds != 0 {
		t.Errorf("median of none: %+v", m)
	}
}

func TestTarget(t *testing.T) {
	for _, tc := range []struct {
		tg   Target
		want string
	}{
		{NewTarget("(c)/(a)", "ratio", 0.58, 0.6), "(c)/(a) 0.580 (target <= 0.600) PASS"},
		{NewTarget("(c)/(a)", "ratio", 0.6, 0.6), "(c)/(a) 0.600 (target <= 0.600) PASS"},
		{NewTarget("(c)/(w)", "ratio", 1.2, 1.1), "(c)/(w) 1.200 (target <= 1.100) MISS"},
		{NewTarget("fetched", "bytes", 208.8e6, 174e6), "fetched 208.8 MB (target <= 174.0 MB) MISS"},
	} {
		if got := tc.tg.String(); got != tc.want {
			t.Errorf("String() = %q, want %q", got, tc.want)
		}
	}
}

func TestRenderExportBench(t *testing.T) {
	cpu := 4.5
	e := ExportBench{
		Benchmark: "TestExportBench",
		Date:      time.Date(2026, 12, 3, 20, 5, 0, 0, time.UTC),
		CPUs:      2,
		LoadStart: [3]float64{1.5, 1, 1},
		LoadEnd:   [3]float64{4.25, 3, 2},
		Links: []Link{{
			Name: "1 Gbit/s, 20 ms RTT", Rounds: 3, Seconds: 420, EStargzBaseBytes: 128.7e6, GzipBaseBytes: 119.3e6,
			Variants: []Variant{
				{Key: "a", What: "overlayfs", Median: Run{TotalSeconds: 28.9, FirstRunSeconds: 18.8, ExportSeconds: 0.7, FetchedBytes: 130e6}, Runs: []Run{{TotalSeconds: 28.9, Load1: 2}, {TotalSeconds: 30.1, Load1: 5.5}}},
				{Key: "c", What: "lazybase", Median: Run{TotalSeconds: 16.8, ExportSeconds: 0.6, SnapshotterCPUSeconds: &cpu}, Runs: []Run{{TotalSeconds: 16.8, Load1: 3}}},
			},
			Targets: []Target{NewTarget("(c)/(a) build and push", "ratio", 0.581, 0.6), NewTarget("fetched by (c) vs eStargz bases", "bytes", 190e6, 180e6)},
		}},
	}
	data, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	md, err := RenderExportBench(data)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"TestExportBench wrote on 2026-12-03 20:05 UTC (2 CPUs; load average 1.50 at the start, 4.25 at the end",
		"**1 Gbit/s, 20 ms RTT**: 3 rounds, 420.0 s for all of them, load average 2.0–5.5 during the runs; compressed bases: eStargz 128.7 MB, gzip 119.3 MB.",
		"| (a) overlayfs | 28.90 s | 18.80 s | 0.00 s | 0.70 s | 130.0 MB | — | 0.00 s | 0.00 s | 28.9, 30.1 s |",
		"| (c) lazybase | 16.80 s | 0.00 s | 0.00 s | 0.60 s | 0.0 MB | 4.50 s | 0.00 s | 0.00 s | 16.8 s |",
		"| (c)/(a) build and push | 0.581 | ≤ 0.600 | PASS |",
		"| fetched by (c) vs eStargz bases | 190.0 MB | ≤ 180.0 MB | MISS |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("rendered figures lack %q:\n%s", want, md)
		}
	}
	for _, bad := range []string{"{", `{"links": []}`, `{"links": "x"}`} {
		if _, err := RenderExportBench([]byte(bad)); err == nil {
			t.Errorf("RenderExportBench(%q): no error", bad)
		}
	}
}

package mirror

import (
	"strings"
	"testing"
)

func TestImageReportSummaryNamesStatusImageAndWork(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    ImageReport
		want string
	}{
		{"converted", ImageReport{Source: "r.example.com/a:1", Destination: "m.example.com/a:1", Digest: "sha256:aa", Status: StatusConverted, Seconds: 1.25, LayersConverted: 2, LayersFromRecords: 1, LayersShared: 3, Bytes: 2_500_000},
			"converted r.example.com/a:1 -> m.example.com/a:1 sha256:aa in 1.2s: layers 2 converted, 1 from records, 3 shared; 2.5 MB"},
		{"skipped", ImageReport{Source: "r.example.com/a:1", Destination: "m.example.com/a:1", Digest: "sha256:bb", Status: StatusSkipped, Seconds: 0.031},
			"skipped   r.example.com/a:1 -> m.example.com/a:1 (up to date, sha256:bb) in 0.03s"},
		{"failed", ImageReport{Source: "r.example.com/a:1", Destination: "m.example.com/a:1", Status: StatusFailed, Attempts: 3, Seconds: 9.96, Reason: "reading layer sha256:cc: EOF"},
			"failed    r.example.com/a:1 -> m.example.com/a:1 after 3 attempt(s) in 10.0s: reading layer sha256:cc: EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.r.Summary(); got != tc.want {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
		})
	}
}

func TestReportSummaryAndErrCountFailures(t *testing.T) {
	rep := &Report{Seconds: 12.34, Layers: LayerCounts{Converted: 5, FromRecords: 7}, Retries: 2}
	rep.add(ImageReport{Status: StatusConverted})
	rep.add(ImageReport{Status: StatusSkipped})
	rep.add(ImageReport{Status: StatusSkipped})
	if got, want := rep.Summary(), "1 converted, 2 skipped, 0 failed, 0 quarantined in 12.3s (5 layers converted, 7 from records, 2 HTTP retries)"; got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
	if err := rep.Err(); err != nil {
		t.Errorf("a run without failures: %v", err)
	}
	rep.add(ImageReport{Status: StatusQuarantined})
	if err := rep.Err(); err != nil {
		t.Errorf("a run whose only failure is known bad: %v", err)
	}
	rep.add(ImageReport{Status: StatusFailed})
	rep.Errors = append(rep.Errors, "source r.example.com/x: listing tags: 404")
	err := rep.Err()
	if err == nil || err.Error() != "1 image(s) failed, 1 other error(s) (1 known bad, quarantined)" {
		t.Errorf("err = %v", err)
	}
	if !strings.HasPrefix(rep.Summary(), "1 converted, 2 skipped, 1 failed") {
		t.Errorf("summary %q", rep.Summary())
	}
}

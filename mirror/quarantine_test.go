package mirror

import (
	"context"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// TestBrokenImageIsQuarantinedUntilItsDigestChanges mirrors a permanently
// broken image with good ones, run after run: the first run reports a new
// failure (not OK), the second the same failure as known bad (quarantined,
// OK), the third reads no blob of the broken image (only manifests), and
// once the tag is fixed the image converts and its failure record is
// cleared, so a later breakage is new again.
func TestBrokenImageIsQuarantinedUntilItsDigestChanges(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	brokenSet(t, src, 64<<10, 3)
	bad := src.host + "/lib/bad:1"
	cfg := brokenConfig(t, src, dst, "")
	status := func(rep *Report) ImageReport {
		for _, ir := range rep.Images {
			if ir.Source == bad {
				return ir
			}
		}
		t.Fatalf("no report of %s", bad)
		return ImageReport{}
	}
	run := func() *Report {
		t.Helper()
		rep, err := newMirror(t, cfg).Run(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}

	rep := run()
	if ir := status(rep); rep.OK() || rep.Failed != 1 || rep.Quarantined != 0 || ir.Status != StatusFailed || ir.Attempts != 2 {
		t.Fatalf("run 1: %s; %s: want a new failure after 2 attempts", rep.Summary(), ir.Summary())
	}
	rep = run()
	if ir := status(rep); !rep.OK() || rep.Failed != 0 || rep.Quarantined != 1 || ir.Attempts != 2 || !strings.Contains(ir.Reason, "known bad") {
		t.Fatalf("run 2: %s; %s: want the same failure known bad, run OK", rep.Summary(), ir.Summary())
	}
	src.reset()
	rep = run()
	ir := status(rep)
	if !rep.OK() || rep.Quarantined != 1 || ir.Status != StatusQuarantined || ir.Attempts != 0 {
		t.Fatalf("run 3: %s; %s: want quarantined without an attempt", rep.Summary(), ir.Summary())
	}
	_, manifests, gets := src.counts()
	for dg, n := range gets {
		t.Logf("run 3: blob %s read %d times", dg, n)
	}
	// The good images are skipped after one manifest request each, the
	// bad one after its source manifest: no blob is read.
	if len(gets) != 0 || manifests != 4 {
		t.Errorf("run 3 read %d blobs and %d manifests, want 0 and 4", len(gets), manifests)
	}

	// The tag is fixed: the image converts, the record is cleared.
	r, _ := name.ParseReference(bad)
	if err := remote.Write(r, tinyImage(t)); err != nil {
		t.Fatal(err)
	}
	rep = run()
	if ir := status(rep); !rep.OK() || ir.Status != StatusConverted {
		t.Fatalf("run 4 (fixed): %s; %s", rep.Summary(), ir.Summary())
	}
	m := newMirror(t, cfg)
	if f, err := m.readFailure(context.Background(), bad); err != nil || f == nil || f.runs != 0 {
		t.Errorf("failure record after the fix: %+v, %v; want cleared (runs 0)", f, err)
	}
	// Broken again: a new failure.
	brokenSet(t, src, 64<<10, 0)
	rep = run()
	if ir := status(rep); rep.OK() || ir.Status != StatusFailed {
		t.Fatalf("run 5 (broken again): %s; %s: want a new failure", rep.Summary(), ir.Summary())
	}
}

// TestForgedFailureRecordIsIgnored plants a failure record without a
// valid MAC that would quarantine a good image: it is ignored and the
// image converts.
func TestForgedFailureRecordIsIgnored(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	brokenSet(t, src, 16<<10, 1)
	good := src.host + "/lib/good:1"
	cfg := brokenConfig(t, src, dst, "")
	forger, err := New(cfg, WithRecordKey([]byte("another-key-0123456789abcdef")))
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.ParseReference(good)
	if err != nil {
		t.Fatal(err)
	}
	desc, err := remote.Head(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := forger.writeFailure(context.Background(), good, failure{digest: desc.Digest.String(), reason: "forged", runs: 5}); err != nil {
		t.Fatal(err)
	}
	rep, err := newMirror(t, cfg).Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, ir := range rep.Images {
		if ir.Source == good && ir.Status != StatusConverted {
			t.Errorf("%s", ir.Summary())
		}
	}
}

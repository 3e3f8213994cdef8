package job_test

import (
	"context"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/demo"
	"github.com/lazybase/lazybase/internal/imageio"
)

// isolate keeps the host's docker config and credentials out of a test.
func isolate(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
}

// run runs a job from src to dst with imageio's default client, the
// request changed by each of change.
func run(ctx context.Context, t *testing.T, src, dst string, change ...func(*job.Request)) (*job.Report, error) {
	t.Helper()
	client, err := imageio.New()
	if err != nil {
		t.Fatal(err)
	}
	req := job.Request{Source: src, Destination: dst, Client: client}
	for _, c := range change {
		c(&req)
	}
	return job.Run(ctx, req)
}

// mustRun is run that fails the test on an error.
func mustRun(ctx context.Context, t *testing.T, src, dst string, change ...func(*job.Request)) *job.Report {
	t.Helper()
	rep, err := run(ctx, t, src, dst, change...)
	if err != nil {
		t.Fatalf("converting %s to %s: %v", src, dst, err)
	}
	return rep
}

// verify checks the converted image ref in the registry at host as the
// demo does (demo.Verify: estargz.Open over range requests, VerifyTOC,
// landmarks, VerifyEStargz) against the job's report.
func verify(ctx context.Context, t *testing.T, host, ref string, rep *job.Report) *demo.Report {
	t.Helper()
	client, err := imageio.New()
	if err != nil {
		t.Fatal(err)
	}
	v, err := demo.Verify(ctx, client, host, ref, rep)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// checkImage checks a converted image against the report: every layer is
// eStargz with the TOC digest annotation the report names, and the image is
// valid.
func checkImage(t *testing.T, img v1.Image, ir job.ImageReport) {
	t.Helper()
	if err := demo.ValidateImage(img); err != nil {
		t.Fatal(err)
	}
	d, _ := img.Digest()
	if d.String() != ir.Digest {
		t.Errorf("image digest %s, report says %s", d, ir.Digest)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != len(ir.Layers) {
		t.Fatalf("%d layers, report has %d", len(m.Layers), len(ir.Layers))
	}
	if m.Annotations[convert.AnnotationSourceManifest] != ir.SourceDigest {
		t.Errorf("source manifest annotation %q, report says %s", m.Annotations[convert.AnnotationSourceManifest], ir.SourceDigest)
	}
	for i, l := range m.Layers {
		lr := ir.Layers[i]
		toc := l.Annotations[convert.AnnotationTOCDigest]
		if toc == "" || toc != lr.TOCDigest {
			t.Errorf("layer %d: toc.digest %q, report says %q", i, toc, lr.TOCDigest)
		}
		if l.Digest.String() != lr.Digest || l.Size != lr.Size {
			t.Errorf("layer %d: %s %d bytes, report says %s %d", i, l.Digest, l.Size, lr.Digest, lr.Size)
		}
		if lr.SourceDigest == "" || lr.SourceSize <= 0 || lr.Seconds < 0 || lr.UncompressedSize <= 0 {
			t.Errorf("layer %d: incomplete report %+v", i, lr)
		}
	}
}

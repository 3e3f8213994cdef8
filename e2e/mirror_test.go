//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/mirror"
)

// mirrorRecordKey is the record key of the e2e mirror runs.
const mirrorRecordKey = "e2e-mirror-record-key-0123456789abcdef"

// mirrorImages pushes images to the stack's registry (directly, uncounted)
// and returns the layer digests of each pushed reference.
type mirrorImages struct {
	t      *testing.T
	s      *harness.Stack
	layers map[v1.Hash]bool // every source layer
}

func (mi *mirrorImages) push(repoTag string, ls ...v1.Layer) {
	mi.t.Helper()
	img, err := testimage.Image(testimage.LinuxAMD64, ls...)
	if err != nil {
		mi.t.Fatal(err)
	}
	ref, err := name.ParseReference(mi.s.Registry.Direct + "/" + repoTag)
	if err != nil {
		mi.t.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		mi.t.Fatal(err)
	}
	for _, l := range ls {
		d, _ := l.Digest()
		mi.layers[d] = true
	}
}

func e2eLayer(t *testing.T, seed uint64, size int, name string) *testimage.Layer {
	t.Helper()
	b := make([]byte, size)
	x := seed*0x9E3779B97F4A7C15 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b[i] = byte(x)
	}
	l, err := testimage.EntriesLayer(testimage.Files(name, string(b), "etc/os-release", "ID=e2e\n"))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// runMirror runs `lazybase mirror` as a process with cfg and extra args;
// it returns the JSON report and the exit code.
func runMirror(ctx context.Context, t *testing.T, s *harness.Stack, dir, cfg string, args ...string) (*mirror.Report, int) {
	t.Helper()
	f, err := os.CreateTemp(dir, "mirror-*.toml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(cfg); err != nil {
		t.Fatal(err)
	}
	f.Close()
	report := f.Name() + ".report.json"
	_, stderr, err := s.Lazybase(ctx, append([]string{"mirror", "--config", f.Name(), "--report", report}, args...)...)
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			t.Fatalf("lazybase mirror: %v", err)
		}
		code = ee.ExitCode()
	}
	b, rerr := os.ReadFile(report)
	if rerr != nil {
		t.Fatalf("lazybase mirror wrote no report (exit %d): %v\n%s", code, rerr, stderr)
	}
	var rep mirror.Report
	if err := json.Unmarshal(b, &rep); err != nil {
		t.Fatal(err)
	}
	return &rep, code
}

func mirrorConfig(t *testing.T, s *harness.Stack, dir, dest, extra string, repos ...string) string {
	t.Helper()
	key := filepath.Join(dir, "record-key")
	if err := os.WriteFile(key, []byte(mirrorRecordKey), 0o600); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	fmt.Fprintf(&b, "destination = %q\nrecord_key_file = %q\nconcurrency = 8\nretry_initial = \"10ms\"\nretry_max = \"50ms\"\n%s\n",
		s.Registry.Direct+"/"+dest, key, extra)
	for _, r := range repos {
		// Sources are read through the counting proxy.
		fmt.Fprintf(&b, "[[source]]\nrepository = %q\n", s.Registry.Host()+"/"+r)
	}
	return b.String()
}

// TestMirrorCorruptImageSharesBase mirrors, with `lazybase mirror`
// processes against distribution's registry, a corrupt image (its top
// layer a truncated gzip stream) that shares its 8 MiB base layer with six
// good images: on every run into a fresh destination (the base converted
// anew each time) every good image converts at its first attempt and the
// run exits 1 for the one new failure; run again into the same
// destination, the same failure is known bad (quarantined, exit 0), and
// the next run does not read the corrupt image's blobs at all.
func TestMirrorCorruptImageSharesBase(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t)
	dir := t.TempDir()
	mi := &mirrorImages{t: t, s: s, layers: map[v1.Hash]bool{}}
	base := e2eLayer(t, 1, 8<<20, "usr/lib/base.bin")
	whole := e2eLayer(t, 2, 256<<10, "app/broken.bin")
	diff, _ := whole.DiffID()
	truncated := &testimage.Layer{Blob: whole.Blob[:len(whole.Blob)/2], Diff: &diff}
	truncDigest, _ := truncated.Digest()
	mi.push("up/bad:1", base, truncated)
	for i := 1; i <= 6; i++ {
		mi.push(fmt.Sprintf("up/good:%d", i), base, e2eLayer(t, uint64(10+i), 4<<10, "app/unique.bin"))
	}
	bad := s.Registry.Host() + "/up/bad:1"

	const fresh = 4
	var cfg string
	for run := 1; run <= fresh+2; run++ {
		if run <= fresh {
			cfg = mirrorConfig(t, s, dir, fmt.Sprintf("run%d", run), "image_attempts = 2", "up/bad", "up/good")
		}
		mark := s.Registry.Proxy.Mark()
		start := time.Now()
		rep, code := runMirror(ctx, t, s, dir, cfg)
		took := time.Since(start)
		gets := s.Registry.Proxy.Since(mark)
		t.Logf("run %d: exit %d in %v: %s; layers %+v; corrupt layer GETs %d", run, code, took.Round(time.Millisecond), rep.Summary(), rep.Layers, gets.Blob(truncDigest.String()).GETs)
		var badRep mirror.ImageReport
		for _, ir := range rep.Images {
			if ir.Source == bad {
				badRep = ir
				continue
			}
			if ir.Attempts > 1 || (ir.Status != mirror.StatusConverted && ir.Status != mirror.StatusSkipped) {
				t.Errorf("run %d: good image: %s", run, ir.Summary())
			}
		}
		switch {
		case run <= fresh:
			if code != 1 || rep.Converted != 6 || rep.Failed != 1 || badRep.Status != mirror.StatusFailed {
				t.Errorf("run %d: exit %d, %s, bad image %s; want exit 1, 6 converted, 1 new failure", run, code, rep.Summary(), badRep.Summary())
			}
		case run == fresh+1:
			if code != 0 || rep.Skipped != 6 || rep.Quarantined != 1 || badRep.Attempts != 2 {
				t.Errorf("run %d: exit %d, %s, bad image %s; want exit 0, 6 skipped, the failure known bad", run, code, rep.Summary(), badRep.Summary())
			}
		default:
			if code != 0 || rep.Quarantined != 1 || badRep.Attempts != 0 || gets.Blob(truncDigest.String()).GETs != 0 || len(gets.Fetched()) != 0 {
				t.Errorf("run %d: exit %d, %s, bad image %s, blobs fetched %v; want exit 0, quarantined without a blob read", run, code, rep.Summary(), badRep.Summary(), gets.Fetched())
			}
		}
		record(t, fmt.Sprintf("mirror corrupt-shared run %d", run), took)
	}
}

// TestMirrorTwoShards starts two `lazybase mirror` processes together,
// --shard 0/2 and --shard 1/2, over eight images in four repositories that
// all share an 8 MiB base layer (and pairs of them a 2 MiB middle layer):
// the shards claim layers in the mirror registry, so each unique layer is
// read from the upstream registry once (blob GETs counted at the proxy in
// front of it) and converted once across both processes (their reports).
func TestMirrorTwoShards(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t)
	dir := t.TempDir()
	mi := &mirrorImages{t: t, s: s, layers: map[v1.Hash]bool{}}
	base := e2eLayer(t, 1, 8<<20, "usr/lib/base.bin")
	var repos []string
	for r := range 4 {
		repo := fmt.Sprintf("up/r%d", r)
		repos = append(repos, repo)
		mid := e2eLayer(t, uint64(100+r), 2<<20, "usr/lib/mid.bin")
		for tag := range 2 {
			mi.push(fmt.Sprintf("%s:%d", repo, tag), base, mid, e2eLayer(t, uint64(200+10*r+tag), 4<<10, "app/unique.bin"))
		}
	}
	cfg := mirrorConfig(t, s, dir, "fleet", `claim_ttl = "30s"`, repos...)
	mark := s.Registry.Proxy.Mark()
	reps := make([]*mirror.Report, 2)
	codes := make([]int, 2)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reps[i], codes[i] = runMirror(ctx, t, s, dir, cfg, "--shard", fmt.Sprintf("%d/2", i))
		}()
	}
	wg.Wait()
	took := time.Since(start)
	var converted, images int64
	for i, rep := range reps {
		if rep == nil {
			t.FailNow()
		}
		t.Logf("shard %d/2: exit %d: %s; layers %+v", i, codes[i], rep.Summary(), rep.Layers)
		if codes[i] != 0 || !rep.OK() {
			t.Errorf("shard %d/2: exit %d, %s", i, codes[i], rep.Summary())
		}
		converted += rep.Layers.Converted
		images += int64(rep.Converted)
	}
	if images != 8 {
		t.Errorf("%d images converted by the two shards, want 8", images)
	}
	if converted != int64(len(mi.layers)) {
		t.Errorf("%d layer conversions by the two shards, want %d (each unique layer once)", converted, len(mi.layers))
	}
	stats := s.Registry.Proxy.Since(mark)
	for l := range mi.layers {
		if n := stats.Blob(l.String()).GETs; n != 1 {
			t.Errorf("upstream blob GETs of layer %s: %d, want 1", l, n)
		}
	}
	t.Logf("two shards: %d unique layers, %d conversions, %d upstream blob bytes, in %v", len(mi.layers), converted, stats.BlobBytes(), took.Round(time.Millisecond))
	record(t, "mirror two shards", took)
}

//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/prefetch"
)

// proofProgram is the Go program the proof builds: net/http and
// encoding/json pull a real share of GOROOT into the compile.
const proofProgram = `package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {})
	b, err := json.Marshal(map[string]any{"status": http.StatusText(http.StatusOK), "mux": mux != nil})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("proof", string(b))
}
`

// proofBuild is the command both the recording and the measured runs give
// the container: a build with an empty build cache on the container's own
// disk, so the compiler really reads the toolchain, then the program.
var proofBuild = []string{"sh", "-c", "go build -o /tmp/proof . && /tmp/proof"}

// proofEnv is the build's environment.
var proofEnv = []string{"GOCACHE=/tmp/gocache", "HOME=/tmp", "GOTOOLCHAIN=local", "GOFLAGS=-buildvcs=false", "CGO_ENABLED=0", "GOPROXY=off"}

// proofConfig is the lazybase daemon's configuration for the proof:
// accesses recorded; prefetch as by default (stated here: on, up to each
// layer's landmark, nothing from layers without one, first use waits up to
// 10s for it); no background fetch and no export guard, so that every blob
// byte the proxy serves after the mount is either the prefetch or an
// on-demand read.
func proofConfig(accessDir string) string {
	return fmt.Sprintf(`access_record_dir = %q
[prefetch]
enable = true
default_size = 0
timeout = "10s"
[background_fetch]
enable = false
[guard]
enable = false
`, accessDir)
}

// TestPrefetchProof is the proof, on a 1 Gbit/s link with 20 ms
// round trips:
//
//  1. `lazybase prefetch record` runs a `go build` of a small program
//     (bind-mounted from the host) in the lazily pulled golang-like image
//     and writes the profile;
//  2. the gzip golang-like image is converted twice in this run, with the
//     profile and without;
//  3. each form is pushed to a fresh stack (new registry, containerd and
//     lazybase daemon: nothing cached), pulled lazily, and the same build
//     runs in a container on it.
//
// It measures, from the daemon's access records of the measured run and
// the proxy's record of every range served: the bytes of file content the
// build reads, split into what arrived with the prefetch and what was
// fetched on demand (asserting at least 90% through the prefetch for the
// profiled image), and the time from container start to the end of the
// build, profiled against unprofiled (printed with PASS/MISS, not
// asserted: the machine is shared). The measured builds run in rounds
// ($LAZYBASE_PREFETCH_PROOF_ROUNDS, default 3), each on fresh stacks, the
// order alternating; times compare as medians.
func TestPrefetchProof(t *testing.T) {
	const (
		bandwidth = 125_000_000 // 1 Gbit/s
		rtt       = 20 * time.Millisecond
	)
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"go.mod": "module proof\n\ngo 1.22\n", "main.go": proofProgram} {
		if err := os.WriteFile(filepath.Join(src, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "lazybase")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/lazybase")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	shaped := []harness.Option{
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBandwidth(bandwidth),
		harness.WithRTT(rtt),
	}
	_, golang := referenceImages(t)

	// 1. Record, the way a user does: lazybase prefetch record with the
	// sources bind-mounted.
	profile := filepath.Join(dir, "profile.json")
	t.Run("record", func(t *testing.T) {
		access := filepath.Join(dir, "access-record")
		s := harness.Start(ctx, t, append(shaped, harness.WithLazybaseConfig(proofConfig(access)))...)
		publish(ctx, t, s, repoGolang, tagEStargz, golang.estargz)
		env := []string{}
		for _, e := range proofEnv {
			env = append(env, "--env", e)
		}
		args := append([]string{"prefetch", "record", "--image", s.Registry.Ref(repoGolang, tagEStargz),
			"--containerd", s.Containerd.Address, "--namespace", s.Containerd.Namespace,
			"--snapshotter", harness.LazySnapshotterName, "--access-dir", access, "-o", profile,
			"-v", src + ":/src:ro", "--workdir", "/src"}, env...)
		args = append(append(args, "--"), proofBuild...)
		start := time.Now()
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("prefetch record: %v\n%s\n%s", err, out, s.Logs(40))
		}
		if !strings.Contains(string(out), `proof {"mux":true,"status":"OK"}`) {
			t.Fatalf("prefetch record: the program did not run:\n%s", out)
		}
		t.Logf("prefetch record of the go build: %s", time.Since(start).Round(time.Millisecond))
	})
	if t.Failed() {
		t.FailNow()
	}
	p, err := prefetch.LoadProfile(profile)
	if err != nil {
		t.Fatal(err)
	}
	var profFiles int
	var profBytes int64
	for _, l := range p.Layers {
		for _, f := range l.Files {
			profFiles++
			profBytes += f.Size
			if strings.HasPrefix(trimSlash(f.Path), "src/") {
				t.Errorf("profile names %s, a file of the bind mount", f.Path)
			}
		}
	}
	t.Logf("profile: %d layers, %d files, %d bytes", len(p.Layers), profFiles, profBytes)

	// 2. Convert the gzip image with the profile and without, now.
	profiled := convertedWith(ctx, t, golang.gzip, convert.WithPrefetch(p))
	plain := convertedWith(ctx, t, golang.gzip)

	// 3. Measure each on a fresh stack, in rounds that alternate the
	// order; the build's compile is CPU-bound on a shared machine, so the
	// times compare as medians.
	rounds := 3
	if v := os.Getenv("LAZYBASE_PREFETCH_PROOF_ROUNDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("LAZYBASE_PREFETCH_PROOF_ROUNDS=%q: want a positive number", v)
		}
		rounds = n
	}
	type variant struct {
		name string
		img  v1.Image
		runs []*proofRun
	}
	un, pr := &variant{name: "unprofiled", img: plain}, &variant{name: "profiled", img: profiled}
	for i := range rounds {
		order := []*variant{un, pr}
		if i%2 == 1 {
			order = []*variant{pr, un}
		}
		for _, v := range order {
			name := fmt.Sprintf("%s-%d", v.name, i+1)
			t.Run(name, func(t *testing.T) {
				v.runs = append(v.runs, measureProofBuild(ctx, t, dir, src, name, v.img, shaped))
			})
			if t.Failed() {
				t.FailNow()
			}
		}
	}
	medianOf := func(v *variant, f func(*proofRun) time.Duration) time.Duration {
		ds := make([]time.Duration, len(v.runs))
		for i, m := range v.runs {
			ds[i] = f(m)
		}
		return median(ds)
	}
	buildTime := func(m *proofRun) time.Duration { return m.build }
	pullBuild := func(m *proofRun) time.Duration { return m.pull + m.build }
	for _, v := range []*variant{un, pr} {
		record(t, "prefetch-proof-"+v.name+"-build-median", medianOf(v, buildTime))
	}
	ratio := float64(medianOf(pr, buildTime)) / float64(medianOf(un, buildTime))
	total := float64(medianOf(pr, pullBuild)) / float64(medianOf(un, pullBuild))
	minShare := 1.0
	for _, m := range pr.runs {
		minShare = min(minShare, m.prefetchedShare())
	}
	first := pr.runs[0]
	if first.regionBytes == 0 {
		t.Errorf("profiled: no layer has a prefetch landmark")
	}
	var b strings.Builder
	fmt.Fprintf(&b, "BENCH prefetch proof, 1 Gbit/s 20 ms, go build (net/http, encoding/json) with an empty GOCACHE, %d rounds on fresh stacks:\n", rounds)
	fmt.Fprintf(&b, "  profile: %d files, %.1f MB; profiled image: prefetch regions %.1f of %.1f MB of layer blobs\n",
		profFiles, mb(profBytes), mb(first.regionBytes), mb(first.blobBytes))
	for i := range rounds {
		for _, v := range []*variant{un, pr} {
			m := v.runs[i]
			fmt.Fprintf(&b, "  %-10s #%d pull %7s, container start to build end %8s | read %d files %.1f MB: via prefetch %.1f MB (%.1f%%), on demand %.1f MB, other %.1f MB | blob bytes: prefetch %.1f MB in %d req, on demand %.1f MB in %d req, TOC/footer %.1f MB\n",
				v.name, i+1, m.pull.Round(time.Millisecond), m.build.Round(time.Millisecond),
				m.readFiles, mb(m.readBytes), mb(m.prefetchedRead), 100*m.prefetchedShare(), mb(m.onDemandRead), mb(m.otherRead),
				mb(m.netPrefetch), m.reqPrefetch, mb(m.netOnDemand), m.reqOnDemand, mb(m.netMeta))
		}
	}
	fmt.Fprintf(&b, "  median container start to build end: profiled %s, unprofiled %s, ratio %.3f (target < 1: %s); pull+build ratio %.3f (%s)\n",
		medianOf(pr, buildTime).Round(time.Millisecond), medianOf(un, buildTime).Round(time.Millisecond), ratio, verdict(ratio < 1), total, verdict(total < 1))
	fmt.Fprintf(&b, "  read bytes via prefetch, profiled, lowest of the rounds: %.1f%% (target >= 90%%: %s)", 100*minShare, verdict(minShare >= 0.9))
	t.Log(b.String())

	for i, m := range pr.runs {
		if m.readBytes == 0 {
			t.Errorf("profiled #%d: the access records name no file the build read", i+1)
			continue
		}
		if m.prefetchedShare() < 0.9 {
			t.Errorf("profiled #%d: %.1f%% of the %d bytes the build read arrived through the prefetch, want at least 90%%", i+1, 100*m.prefetchedShare(), m.readBytes)
		}
		if !m.prefetchCovered {
			t.Errorf("profiled #%d: the prefetch requests did not cover every layer's prefetch region", i+1)
		}
	}
	for i, m := range un.runs {
		if m.netPrefetch != 0 {
			t.Errorf("unprofiled #%d: %d blob bytes fetched as a prefetch, want none", i+1, m.netPrefetch)
		}
	}
}

func mb(n int64) float64 { return float64(n) / 1e6 }

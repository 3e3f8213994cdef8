//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/eventually"
)

// Soak benchmark settings, from the environment.
const (
	// soakRoundsEnv is the number of build-and-push rounds (default
	// soakDefaultRounds; `make soak` runs 30).
	soakRoundsEnv = "LAZYBASE_SOAK_ROUNDS"
	// soakStrictEnv, when "1", turns the #15 targets (growth bound over
	// the last rounds, prune back to the start) into failing asserts.
	soakStrictEnv = "LAZYBASE_SOAK_STRICT"
	// soakJSONEnv names the file the rows are written to; default
	// $LAZYBASE_CACHE/soak/soak-<time>-<rounds>r.json.
	soakJSONEnv = "LAZYBASE_SOAK_JSON"

	soakDefaultRounds = 6
	soakRepoApp       = "soak/app"

	// soakGuardLease is the lease the export guard holds its blobs under
	// in each namespace (lazypull.GuardLeaseID; spelled out here so that
	// the benchmark only uses what an operator sees through ctr).
	soakGuardLease = "lazybase-exportguard"
)

// Bounds the #15 targets are checked against; see TestSoak.
const (
	soakWindow        = 10       // the last rounds the growth bound covers
	soakDiskSlack     = 64 << 20 // disk growth over the window beyond BuildKit's own records
	soakRSSFactor     = 1.25     // daemon RSS at the end of the window, relative to its start...
	soakRSSSlack      = 32 << 20 // ...plus this
	soakGoroutineGrow = 20       // goroutines beyond 10 % more than at the window's start
	soakPruneFactor   = 1.10     // prune returns disk to within 10 % of the start...
	soakPruneFloor    = 16 << 20 // ...or this many bytes above it, whichever is larger
)

// soakConfig is the lazybase daemon's configuration for the soak: the
// settings the builder image ships (deploy/builder/snapshotter.toml:
// default mode lazy, export guard on, the other keys at their defaults).
// $LAZYBASE_SNAPSHOTTER_CONFIG replaces it.
const soakConfig = `default_mode = "lazy"
[guard]
enable = true
`

// soakRow is one line of the soak table: the state of the stack after a
// round (or at the start, or after the final prune).
type soakRow struct {
	Label string `json:"label"` // "start", the round number, "prune", "prune+restart"
	Round int    `json:"round"` // 0 outside the rounds
	// Event is what happened before the row's build: "buildkitd
	// restarted", "snapshotter restarted", or the final clean-up.
	Event        string  `json:"event,omitempty"`
	BaseTags     string  `json:"base_tags,omitempty"` // golang-like and debian-like tags of the round
	BuildSeconds float64 `json:"build_seconds"`
	BuildError   string  `json:"build_error,omitempty"`
	// ContentBytes is du of containerd's content store (all namespaces).
	ContentBytes int64 `json:"content_bytes"`
	// SnapshotterRootBytes is du of the lazybase daemon's root, FUSE
	// mounts not entered; SnapshotterDirs splits it by top-level entry.
	SnapshotterRootBytes int64            `json:"snapshotter_root_bytes"`
	SnapshotterDirs      map[string]int64 `json:"snapshotter_dirs"`
	// SnapshotsBytes is du of snapshotter/snapshots (overlay upper dirs
	// and local-unpack dirs), LocalBytes the local-unpack dirs
	// (snapshots/*/lazybase-local) alone, CacheBytes the lazy
	// filesystem's caches (stargz/: httpcache, fscache).
	SnapshotsBytes int64 `json:"snapshots_bytes"`
	LocalBytes     int64 `json:"local_unpack_bytes"`
	CacheBytes     int64 `json:"cache_bytes"`
	// BuildkitRecordBytes is the total size of BuildKit's cache records
	// (`buildctl du`); BuildkitRootBytes du of buildkitd's root.
	BuildkitRecordBytes int64 `json:"buildkit_record_bytes"`
	BuildkitRecords     int   `json:"buildkit_records"`
	// Blobs and Snapshots count the content store's blobs and the lazy
	// snapshotter's snapshots in buildkitd's namespace; GuardLease is
	// whether the export guard's lease is there.
	Blobs             int   `json:"blobs"`
	Snapshots         int   `json:"snapshots"`
	GuardLease        bool  `json:"guard_lease"`
	BuildkitRootBytes int64 `json:"buildkit_root_bytes"`
	FUSEMounts        int   `json:"fuse_mounts"`
	SnapshotterRSS    int64 `json:"snapshotter_rss_bytes"`
	// Goroutines is the daemon's go_goroutines metric, -1 when its
	// metrics do not expose it.
	Goroutines    int   `json:"snapshotter_goroutines"`
	BuildkitdRSS  int64 `json:"buildkitd_rss_bytes"`
	ContainerdRSS int64 `json:"containerd_rss_bytes"`
}

// TestSoak is the soak benchmark of issue #15: one long-lived stack
// (registry, containerd, buildkitd on the lazybase snapshotter with its
// export guard, configured as the builder image ships it) runs
// $LAZYBASE_SOAK_ROUNDS build-and-push rounds (default 6; `make soak`
// runs 30). Each round builds a multi-stage Dockerfile whose bases rotate
// over four debian-like and three golang-like eStargz tags (the reference
// images under two tags each, and variants with one extra eStargz layer,
// so digests differ) and whose sources change every round (main.go and a
// copied file), and pushes the result. buildkitd is restarted (SIGTERM,
// same root) before the round a third of the way in, the snapshotter
// before the round two thirds in. At the end the clean-up a user would do:
// `buildctl prune --all`, `ctr -n buildkit images rm` of every image, and
// `ctr -n buildkit leases rm lazybase-exportguard` (the export guard's
// lease, which holds the materialized base blobs and never expires today),
// a wait until the disk stops changing; then a snapshotter restart, then an
// orderly stop of the whole stack.
//
// After the start, every round and each clean-up step it logs one table
// row: build seconds, du of containerd's content store and of the
// snapshotter root (and its snapshots, local-unpack and cache dirs),
// BuildKit's cache records, FUSE mounts under the root, the snapshotter's
// RSS and goroutines (go_goroutines from its status socket's /metrics),
// buildkitd's and containerd's RSS. The rows go to a JSON file whose path
// it logs ($LAZYBASE_SOAK_JSON, else $LAZYBASE_CACHE/soak/).
//
// It asserts only what must hold today: no build fails, and after the
// orderly stop no FUSE mount is left under the snapshotter root. The
// targets of #15 are computed and printed with a PASS/FAIL verdict, but
// fail the test only with LAZYBASE_SOAK_STRICT=1 until they have held in
// ordinary CI runs (with the bounded-disk work in, a strict 6-round run
// passes them all on this project's machines):
//
//   - growth bound, over the last min(10, rounds/2) rounds: content store
//     plus snapshotter root grow by at most what BuildKit's own cache
//     records grow (buildkitd here runs with gc off, so they grow by the
//     round's build results) plus 64 MiB; FUSE mounts never exceed the
//     bases' distinct layers (one mount per lazily mounted layer); the
//     snapshotter's goroutines grow by at most 10 % + 20; the snapshotter's
//     and buildkitd's RSS by at most 25 % + 32 MiB;
//   - prune: after the clean-up, the content store and the snapshotter
//     root are each within 10 % (or 16 MiB, whichever is larger) of the
//     start, measured before the first build.
func TestSoak(t *testing.T) {
	rounds := soakDefaultRounds
	if v := os.Getenv(soakRoundsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 3 {
			t.Fatalf("%s=%q: want a round count of at least 3 (one per daemon restart and one before)", soakRoundsEnv, v)
		}
		rounds = n
	}
	strict := os.Getenv(soakStrictEnv) == "1"
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(10+4*rounds)*time.Minute)
	defer cancel()

	opts := []harness.Option{harness.WithLazySnapshotter(harness.Lazybase), harness.WithBuildkitLazy()}
	if os.Getenv(harness.LazybaseConfigEnv) == "" {
		opts = append(opts, harness.WithLazybaseConfig(soakConfig))
	}
	begin := time.Now()
	s := harness.Start(ctx, t, opts...)
	golangTags, debianTags, baseLayers := publishSoakBases(ctx, t, s)

	var rows []soakRow
	jsonPath := soakJSONPath(t, rounds)
	defer func() {
		if err := writeSoakJSON(jsonPath, rounds, strict, rows); err != nil {
			t.Errorf("writing the soak rows: %v", err)
			return
		}
		t.Logf("soak rows (JSON): %s", jsonPath)
	}()
	t.Logf("soak: %d rounds; golang-like tags %v, debian-like tags %v (%d distinct layers); buildkitd restart before round %d, snapshotter restart before round %d",
		rounds, golangTags, debianTags, baseLayers, soakBuildkitRestart(rounds), soakSnapshotterRestart(rounds))
	t.Log(soakHeader())
	add := func(r soakRow) {
		sampleSoak(ctx, t, s, &r)
		rows = append(rows, r)
		t.Log(r.line())
	}
	add(soakRow{Label: "start"})

	failed := 0
	for round := 1; round <= rounds; round++ {
		row := soakRow{Label: strconv.Itoa(round), Round: round}
		switch round {
		case soakBuildkitRestart(rounds):
			if err := s.Buildkit.Restart(ctx); err != nil {
				t.Fatalf("restarting buildkitd before round %d: %v\n%s", round, err, s.Logs(40))
			}
			row.Event = "buildkitd restarted"
		case soakSnapshotterRestart(rounds):
			if err := s.RestartSnapshotter(ctx); err != nil {
				t.Fatalf("restarting the snapshotter before round %d: %v\n%s", round, err, s.Logs(40))
			}
			row.Event = "snapshotter restarted"
		}
		gt, dt := golangTags[(round-1)%len(golangTags)], debianTags[(round-1)%len(debianTags)]
		row.BaseTags = gt + "/" + dt
		work := soakContext(t, s, round, gt, dt)
		out := s.Registry.DirectRef(soakRepoApp, fmt.Sprintf("round-%d", round))
		start := time.Now()
		_, err := s.Buildkit.Buildctl(ctx, "build", "--frontend", "dockerfile.v0",
			"--local", "context="+work, "--local", "dockerfile="+work,
			"--output", "type=image,name="+out+",push=true,registry.insecure=true")
		row.BuildSeconds = time.Since(start).Seconds()
		if err != nil {
			failed++
			row.BuildError = err.Error()
			t.Errorf("round %d (bases %s): build failed: %v", round, row.BaseTags, err)
		}
		add(row)
	}

	// The clean-up a user does to get the disk back.
	if out, err := s.Buildkit.Buildctl(ctx, "prune", "--all"); err != nil {
		t.Errorf("buildctl prune --all: %v", err)
	} else if ls := strings.Split(strings.TrimSpace(out), "\n"); len(ls) > 0 {
		t.Logf("buildctl prune --all: %s", ls[len(ls)-1])
	}
	imgs, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "images", "ls", "-q")
	if err != nil {
		t.Errorf("listing buildkit's images: %v", err)
	} else if refs := strings.Fields(imgs); len(refs) > 0 {
		if _, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, append([]string{"images", "rm", "--sync"}, refs...)...); err != nil {
			t.Errorf("removing buildkit's images: %v", err)
		}
	}
	leases, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "leases", "ls", "-q")
	if err != nil {
		t.Errorf("listing buildkit's leases: %v", err)
	} else if strings.Contains(" "+strings.Join(strings.Fields(leases), " ")+" ", " "+soakGuardLease+" ") {
		if _, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "leases", "rm", "--sync", soakGuardLease); err != nil {
			t.Errorf("removing the guard's lease: %v", err)
		}
	}
	settleSoak(ctx, t, s)
	if out, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "content", "ls"); err == nil && len(strings.Fields(out)) > 4 {
		t.Logf("soak: content left in namespace %s after the clean-up:\n%s", harness.BuildkitNamespace, strings.TrimSpace(out))
	}
	add(soakRow{Label: "prune", Event: "buildctl prune --all, images rm, guard lease rm"})
	if err := s.RestartSnapshotter(ctx); err != nil {
		t.Fatalf("restarting the snapshotter after the prune: %v\n%s", err, s.Logs(40))
	}
	add(soakRow{Label: "prune+restart", Event: "snapshotter restarted"})
	t.Logf("soak: %d rounds, %d failed builds, %s in all", rounds, failed, time.Since(begin).Round(time.Second))

	soakVerdicts(t, rows, rounds, baseLayers, strict)

	if failed > 0 {
		t.Errorf("%d of %d builds failed", failed, rounds)
	}
	if err := s.Shutdown(ctx); err != nil {
		t.Errorf("stopping the stack: %v", err)
	}
	mounts, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) > 0 {
		t.Errorf("%d FUSE mounts left under %s after an orderly stop, first %s", len(mounts), s.Snapshotter.Root, mounts[0].Target)
	}
}

// soakSettle is how long the disk must stay unchanged after the clean-up
// before the prune row is taken: containerd removes snapshots and calls
// the snapshotter's Cleanup in its garbage collector, after the commands
// return.
const soakSettle = 5 * time.Second

// settleSoak waits, up to a minute, until the content store, the
// snapshotter's snapshots and its FUSE mounts have not changed for
// soakSettle.
func settleSoak(ctx context.Context, t *testing.T, s *harness.Stack) {
	t.Helper()
	state := func() string {
		c, _ := harness.DiskUsage(s.Containerd.ContentRoot())
		sn, _ := harness.DiskUsage(filepath.Join(s.Snapshotter.Root, "snapshotter", "snapshots"))
		ms, _ := s.Snapshotter.FUSEMounts()
		return fmt.Sprintf("content %d, snapshots %d, %d FUSE mounts", c, sn, len(ms))
	}
	last, since := state(), time.Now()
	err := eventually.Wait(ctx, time.Minute, func() error {
		if now := state(); now != last {
			last, since = now, time.Now()
		}
		if d := time.Since(since); d < soakSettle {
			return fmt.Errorf("%s, unchanged for %s", last, d.Round(time.Millisecond))
		}
		return nil
	})
	if err != nil {
		t.Logf("soak: the disk did not settle after the clean-up: %v", err)
	}
}

// soakBuildkitRestart and soakSnapshotterRestart are the rounds before
// which the daemons restart: a third and two thirds of the way in.
func soakBuildkitRestart(rounds int) int    { return max(2, rounds/3+1) }
func soakSnapshotterRestart(rounds int) int { return max(3, 2*rounds/3+1) }

// publishSoakBases publishes the rotating bases: each reference image's
// eStargz form under tags a and b (same digest), and variants with one
// extra eStargz layer (x1, and x2 for the debian-like image), so that
// rounds move between base digests and between tags of one digest. It
// returns the tags and the number of distinct layers of all the bases.
func publishSoakBases(ctx context.Context, t *testing.T, s *harness.Stack) (golangTags, debianTags []string, layers int) {
	t.Helper()
	debian, golang := referenceImages(t)
	start := time.Now()
	distinct := map[string]bool{}
	for _, p := range []struct {
		repo     string
		img      v1.Image
		variants []string
	}{{repoGolang, golang.estargz, []string{"x1"}}, {repoDebian, debian.estargz, []string{"x1", "x2"}}} {
		tags := []string{"soak-a", "soak-b"}
		publish(ctx, t, s, p.repo, "soak-a", p.img)
		publish(ctx, t, s, p.repo, "soak-b", p.img)
		for _, d := range layerDigests(t, p.img) {
			distinct[d] = true
		}
		for _, v := range p.variants {
			l, err := soakLayer(p.repo + " " + v)
			if err != nil {
				t.Fatalf("variant layer %s: %v", v, err)
			}
			img, err := mutate.Append(p.img, l)
			if err != nil {
				t.Fatal(err)
			}
			publish(ctx, t, s, p.repo, "soak-"+v, img)
			for _, d := range layerDigests(t, img) {
				distinct[d] = true
			}
			tags = append(tags, "soak-"+v)
		}
		if p.repo == repoGolang {
			golangTags = tags
		} else {
			debianTags = tags
		}
	}
	// Interleave, so that consecutive rounds change base digest as well
	// as tag: a, x1, b, x2.
	if len(debianTags) == 4 {
		debianTags = []string{debianTags[0], debianTags[2], debianTags[1], debianTags[3]}
	}
	record(t, "soak-publish", time.Since(start))
	return golangTags, debianTags, len(distinct)
}

// soakLayer returns an eStargz layer with one 1 MiB file of bytes seeded by
// name, annotated with its TOC digest and uncompressed size as converted
// layers are.
func soakLayer(name string) (mutate.Addendum, error) {
	body := make([]byte, 1<<20)
	seed := [32]byte{}
	copy(seed[:], name)
	r := rand.NewChaCha8(seed)
	r.Read(body)
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	for _, f := range []struct {
		name string
		body []byte
	}{{"etc/soak-variant", []byte(name + "\n")}, {"var/lib/soak/blob", body}} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Mode: 0o644, Size: int64(len(f.body)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
			return mutate.Addendum{}, err
		}
		if _, err := tw.Write(f.body); err != nil {
			return mutate.Addendum{}, err
		}
	}
	if err := tw.Close(); err != nil {
		return mutate.Addendum{}, err
	}
	blob, err := estargz.Build(io.NewSectionReader(bytes.NewReader(tb.Bytes()), 0, int64(tb.Len())))
	if err != nil {
		return mutate.Addendum{}, err
	}
	defer blob.Close()
	b, err := io.ReadAll(blob)
	if err != nil {
		return mutate.Addendum{}, err
	}
	usize, err := blob.UncompressedSize()
	if err != nil {
		return mutate.Addendum{}, err
	}
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return mutate.Addendum{}, err
	}
	return mutate.Addendum{Layer: l, MediaType: types.OCILayer, Annotations: map[string]string{
		estargz.TOCJSONDigestAnnotation:         blob.TOCDigest().String(),
		estargz.StoreUncompressedSizeAnnotation: strconv.FormatInt(usize, 10),
	}}, nil
}

// soakContext writes round's build context: a builder stage FROM the
// golang-like image compiles a program that prints the round, and the
// final stage FROM the debian-like image copies it and a round file.
func soakContext(t *testing.T, s *harness.Stack, round int, golangTag, debianTag string) string {
	t.Helper()
	dir := t.TempDir()
	dockerfile := "FROM " + s.Registry.Ref(repoGolang, golangTag) + ` AS build
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOCACHE=/tmp/gocache
WORKDIR /src
COPY main.go .
RUN go build -o /out/app main.go

FROM ` + s.Registry.Ref(repoDebian, debianTag) + `
COPY --from=build /out/app /usr/local/bin/app
COPY round.txt /etc/soak-round
CMD ["/usr/local/bin/app"]
`
	main := fmt.Sprintf("package main\n\nimport \"fmt\"\n\nfunc main() { fmt.Println(\"soak round %d\") }\n", round)
	files := map[string]string{
		"Dockerfile": dockerfile,
		"main.go":    main,
		"round.txt":  fmt.Sprintf("round %d at %s\n", round, time.Now().UTC().Format(time.RFC3339Nano)),
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// sampleSoak fills r's measurements from the running stack. A measurement
// that fails is logged and left at its zero value (-1 for goroutines): the
// table is a benchmark, not an assertion.
func sampleSoak(ctx context.Context, t *testing.T, s *harness.Stack, r *soakRow) {
	t.Helper()
	du := func(p string) int64 {
		n, err := harness.DiskUsage(p)
		if err != nil {
			t.Logf("soak %s: %v", r.Label, err)
		}
		return n
	}
	root := s.Snapshotter.Root
	r.ContentBytes = du(s.Containerd.ContentRoot())
	r.SnapshotterRootBytes = du(root)
	r.SnapshotterDirs = map[string]int64{}
	if ents, err := os.ReadDir(root); err == nil {
		for _, e := range ents {
			r.SnapshotterDirs[e.Name()] = du(filepath.Join(root, e.Name()))
		}
	}
	r.SnapshotsBytes = du(filepath.Join(root, "snapshotter", "snapshots"))
	locals, _ := filepath.Glob(filepath.Join(root, "snapshotter", "snapshots", "*", "lazybase-local"))
	for _, l := range locals {
		r.LocalBytes += du(l)
	}
	r.CacheBytes = du(filepath.Join(root, "stargz"))
	r.BuildkitRootBytes = du(s.Buildkit.Root())
	r.BuildkitRecordBytes, r.BuildkitRecords = buildkitRecords(ctx, t, s)
	ctr := func(args ...string) []string {
		out, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, args...)
		if err != nil {
			t.Logf("soak %s: %v", r.Label, err)
		}
		return strings.Split(strings.TrimSpace(out), "\n")
	}
	if ls := ctr("content", "ls", "-q"); ls[0] != "" {
		r.Blobs = len(ls)
	}
	if ls := ctr("snapshots", "--snapshotter", harness.LazySnapshotterName, "ls"); len(ls) > 1 {
		r.Snapshots = len(ls) - 1 // a header line
	}
	for _, id := range ctr("leases", "ls", "-q") {
		r.GuardLease = r.GuardLease || id == soakGuardLease
	}
	if ms, err := s.Snapshotter.FUSEMounts(); err != nil {
		t.Logf("soak %s: %v", r.Label, err)
	} else {
		r.FUSEMounts = len(ms)
	}
	rss := func(pid int) int64 {
		n, err := harness.ProcessRSS(pid)
		if err != nil {
			t.Logf("soak %s: %v", r.Label, err)
		}
		return n
	}
	r.SnapshotterRSS = rss(s.Snapshotter.Pid())
	r.BuildkitdRSS = rss(s.Buildkit.Pid())
	r.ContainerdRSS = rss(s.Containerd.Pid())
	r.Goroutines = -1
	if text, err := s.Snapshotter.MetricsText(ctx); err != nil {
		t.Logf("soak %s: %v", r.Label, err)
	} else if v, ok := harness.MetricValue(text, "go_goroutines"); ok {
		r.Goroutines = int(v)
	} else {
		t.Logf("soak %s: the daemon's metrics have no go_goroutines", r.Label)
	}
}

// buildkitRecords returns the total size and the number of BuildKit's
// cache records, from `buildctl du`.
func buildkitRecords(ctx context.Context, t *testing.T, s *harness.Stack) (size int64, n int) {
	t.Helper()
	out, err := s.Buildkit.Buildctl(ctx, "du", "--format", "{{json .}}")
	if err != nil {
		t.Logf("buildctl du: %v", err)
		return 0, 0
	}
	var recs []map[string]any
	if err := json.Unmarshal([]byte(out), &recs); err != nil {
		t.Logf("buildctl du output: %v", err)
		return 0, 0
	}
	for _, r := range recs {
		size += recordSize(r)
	}
	return size, len(recs)
}

// recordSize returns the size of one record of `buildctl du --format
// '{{json .}}'` (client.UsageInfo, whose JSON names it "size").
func recordSize(r map[string]any) int64 {
	if sz, ok := r["size"].(float64); ok && sz > 0 {
		return int64(sz)
	}
	return 0
}

func soakHeader() string {
	return fmt.Sprintf("%-13s %7s %8s %8s %8s %7s %7s %8s %5s %5s %5s %5s %4s %7s %6s %7s %7s  %s",
		"round", "build_s", "content", "sn_root", "snaps_d", "local", "cache", "bk_recs", "bk_n", "blobs", "snaps", "lease", "fuse", "sn_rss", "gorout", "bkd_rss", "ctd_rss", "event")
}

// line is the row in the table's columns, sizes in MB (10^6 bytes).
func (r soakRow) line() string {
	mb := func(n int64) string { return fmt.Sprintf("%.1f", float64(n)/1e6) }
	gr := "n/a"
	if r.Goroutines >= 0 {
		gr = strconv.Itoa(r.Goroutines)
	}
	ev := r.Event
	if r.BaseTags != "" {
		ev = strings.TrimSpace(r.BaseTags + " " + ev)
	}
	if r.BuildError != "" {
		ev += " BUILD FAILED"
	}
	lease := "no"
	if r.GuardLease {
		lease = "yes"
	}
	return fmt.Sprintf("%-13s %7.1f %8s %8s %8s %7s %7s %8s %5d %5d %5d %5s %4d %7s %6s %7s %7s  %s",
		r.Label, r.BuildSeconds, mb(r.ContentBytes), mb(r.SnapshotterRootBytes), mb(r.SnapshotsBytes), mb(r.LocalBytes),
		mb(r.CacheBytes), mb(r.BuildkitRecordBytes), r.BuildkitRecords, r.Blobs, r.Snapshots, lease, r.FUSEMounts,
		mb(r.SnapshotterRSS), gr, mb(r.BuildkitdRSS), mb(r.ContainerdRSS), ev)
}

// soakVerdicts computes the #15 targets from the rows, logs each with
// PASS or FAIL, and fails the test on a FAIL only when strict.
func soakVerdicts(t *testing.T, rows []soakRow, rounds, baseLayers int, strict bool) {
	t.Helper()
	byLabel := map[string]soakRow{}
	for _, r := range rows {
		byLabel[r.Label] = r
	}
	window := min(soakWindow, rounds/2)
	from, to := byLabel[strconv.Itoa(rounds-window)], byLabel[strconv.Itoa(rounds)]
	start, pruned := byLabel["start"], byLabel["prune"]
	var fails []string
	check := func(ok bool, format string, args ...any) {
		msg := fmt.Sprintf(format, args...)
		v := "PASS"
		if !ok {
			v = "FAIL"
			fails = append(fails, msg)
		}
		t.Logf("soak verdict %s: %s", v, msg)
	}
	mib := func(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }

	disk := func(r soakRow) int64 { return r.ContentBytes + r.SnapshotterRootBytes }
	grow, recs := disk(to)-disk(from), to.BuildkitRecordBytes-from.BuildkitRecordBytes
	check(grow <= max(recs, 0)+soakDiskSlack,
		"rounds %d-%d: content store + snapshotter root grew %s, BuildKit's records %s (bound: records + %s)",
		rounds-window+1, rounds, mib(grow), mib(recs), mib(soakDiskSlack))
	mostMounts := 0
	for _, r := range rows {
		if r.Round > rounds-window {
			mostMounts = max(mostMounts, r.FUSEMounts)
		}
	}
	check(mostMounts <= baseLayers, "rounds %d-%d: at most %d FUSE mounts (bound: %d, one per distinct base layer)",
		rounds-window+1, rounds, mostMounts, baseLayers)
	if from.Goroutines >= 0 && to.Goroutines >= 0 {
		limit := from.Goroutines + from.Goroutines/10 + soakGoroutineGrow
		check(to.Goroutines <= limit, "rounds %d-%d: snapshotter goroutines %d -> %d (bound: %d)",
			rounds-window+1, rounds, from.Goroutines, to.Goroutines, limit)
	} else {
		t.Logf("soak verdict n/a: the snapshotter's goroutines are not exposed")
	}
	for _, d := range []struct {
		name     string
		from, to int64
	}{{"snapshotter RSS", from.SnapshotterRSS, to.SnapshotterRSS}, {"buildkitd RSS", from.BuildkitdRSS, to.BuildkitdRSS}} {
		limit := int64(float64(d.from)*soakRSSFactor) + soakRSSSlack
		check(d.to <= limit, "rounds %d-%d: %s %s -> %s (bound: %s)", rounds-window+1, rounds, d.name, mib(d.from), mib(d.to), mib(limit))
	}
	for _, d := range []struct {
		name          string
		start, pruned int64
	}{{"content store", start.ContentBytes, pruned.ContentBytes}, {"snapshotter root", start.SnapshotterRootBytes, pruned.SnapshotterRootBytes}} {
		limit := max(int64(float64(d.start)*soakPruneFactor), d.start+soakPruneFloor)
		check(d.pruned <= limit, "after the prune: %s %s (start %s, bound %s)", d.name, mib(d.pruned), mib(d.start), mib(limit))
	}
	if len(fails) == 0 {
		t.Logf("soak: every #15 target met")
		return
	}
	sort.Strings(fails)
	if strict {
		t.Errorf("soak: %d #15 targets missed (%s=1):\n  %s", len(fails), soakStrictEnv, strings.Join(fails, "\n  "))
		return
	}
	t.Logf("soak: %d #15 targets missed; not failing the test (set %s=1 to)", len(fails), soakStrictEnv)
}

// soakJSONPath returns where the rows go: $LAZYBASE_SOAK_JSON, else a new
// file under the cache directory.
func soakJSONPath(t *testing.T, rounds int) string {
	t.Helper()
	if p := os.Getenv(soakJSONEnv); p != "" {
		return p
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	return filepath.Join(harness.CacheDir(root), "soak", fmt.Sprintf("soak-%s-%dr.json", time.Now().UTC().Format("20060102T150405Z"), rounds))
}

func writeSoakJSON(path string, rounds int, strict bool, rows []soakRow) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	b, err := json.MarshalIndent(struct {
		Rounds int       `json:"rounds"`
		Strict bool      `json:"strict"`
		Rows   []soakRow `json:"rows"`
	}{rounds, strict, rows}, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

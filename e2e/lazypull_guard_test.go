//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
)

// TestLazypullGuardExport runs the multi-stage build on buildkitd's
// containerd worker with the lazybase snapshotter and its export guard: the
// final stage's base (debian-like, eStargz) is an export-base, so the daemon
// materializes its blob into the buildkit namespace's content store as soon
// as it is mounted; the builder base (golang-like) is lazy-only. The export
// (push to the harness registry) must then fetch no byte of the final base's
// blob, the builder base must stay mostly unfetched, and the pushed image
// must reference the lazy base's own layer blobs.
func TestLazypullGuardExport(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	dir := t.TempDir()
	// The daemon starts before containerd, whose socket lives in the
	// stack's own directory: the guard dials this link, made once the
	// stack runs, and retries until it resolves.
	link := filepath.Join(dir, "containerd.sock")
	cfg := filepath.Join(dir, "lazybase.toml")
	toml := fmt.Sprintf(`[background_fetch]
enable = false
[guard]
containerd_address = %q
[[policy]]
match = "*/%s:*"
mode = "export-base"
[[policy]]
match = "*/%s:*"
mode = "lazy-only"
`, link, repoDebian, repoGolang)
	if err := os.WriteFile(cfg, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("LAZYBASE_SNAPSHOTTER_CONFIG", cfg)
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
	)
	if err := os.Symlink(s.Containerd.Address, link); err != nil {
		t.Fatal(err)
	}
	debian, golang := publishAll(ctx, t, s)

	work := multiStageContext(t, s, tagEStargz)
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	p := s.Registry.Proxy

	p.SetPhase("build")
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, common...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	record(t, "lazybase-guard-build", time.Since(start))

	// The guard started on the debian-like layers when they were mounted;
	// wait until the status API says every one is in the content store.
	debianLayers := layerDigests(t, debian.estargz)
	// The golang-like image is built on the debian-like one: the layers
	// they share are export bases; the rest is lazy-only.
	shared := map[string]bool{}
	for _, d := range debianLayers {
		shared[d] = true
	}
	builderOnly := map[string]int64{}
	for d, size := range layerSizes(t, golang.estargz) {
		if !shared[d] {
			builderOnly[d] = size
		}
	}
	if len(builderOnly) == 0 {
		t.Fatal("the golang-like image has no layer of its own")
	}
	start = time.Now()
	statusSocket := s.Snapshotter.Address + ".status"
	var last []exportguard.LayerStatus
	wrongState := map[string]string{} // lazy-only layers the guard did not skip
	err := eventually.Wait(ctx, 2*time.Minute, func() error {
		st, err := exportguard.FetchStatus(ctx, statusSocket)
		if err != nil {
			t.Fatal(err)
		}
		last = st.Layers
		state := map[string]exportguard.LayerStatus{}
		for _, l := range st.Layers {
			if l.Namespace == harness.BuildkitNamespace {
				state[l.Layer] = l
			}
		}
		for d := range builderOnly {
			if l, ok := state[d]; ok && l.State != exportguard.StateSkipped {
				wrongState[d] = string(l.State)
			}
		}
		pending := 0
		for _, d := range debianLayers {
			l := state[d]
			if l.State == exportguard.StateFailed {
				t.Fatalf("guard failed on final base layer %s: %s", d, l.Error)
			}
			if !l.Materialized {
				pending++
			}
		}
		if pending > 0 {
			return fmt.Errorf("%d of %d final base layers not materialized", pending, len(debianLayers))
		}
		return nil
	})
	for d, st := range wrongState {
		t.Errorf("lazy-only builder layer %s: guard state %q, want %q", d, st, exportguard.StateSkipped)
	}
	if err != nil {
		t.Fatalf("final base layers materialized: %v\n%+v\n%s", err, last, s.Logs(40))
	}
	t.Logf("guard wait after the build: %s", time.Since(start).Round(time.Millisecond))
	checkAccount(ctx, t, s, layerSizes(t, debian.estargz))

	p.SetPhase("export")
	out := s.Registry.DirectRef("e2e/hello-guard", "latest")
	start = time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=image,name="+out+",push=true,registry.insecure=true")...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	exportTime := time.Since(start)
	record(t, "lazybase-guard-export-push", exportTime)

	p.SetPhase("export-oci")
	start = time.Now()
	ociTar := filepath.Join(t.TempDir(), "hello.oci.tar")
	if _, err := s.Buildkit.Buildctl(ctx, append(common, "--output", "type=oci,dest="+ociTar)...); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	record(t, "lazybase-guard-export-oci", time.Since(start))
	p.SetPhase("")
	if fi, err := os.Stat(ociTar); err != nil || fi.Size() == 0 {
		t.Errorf("OCI export %s: %v", ociTar, err)
	}
	if oci := p.StatsFor("export-oci"); oci.BlobBytes() != 0 {
		t.Errorf("type=oci export fetched %d blob bytes from the source registry", oci.BlobBytes())
	}

	// The materialized blobs are held by the build's snapshots, which
	// reference them, not by a lease of the daemon's (guard.max_bytes is
	// 0 by default).
	leaseOut, err := s.Containerd.CtrNS(ctx, harness.BuildkitNamespace, "leases", "ls")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(leaseOut, exportguard.LeaseID) {
		t.Errorf("lease %s in namespace %s with guard.max_bytes = 0:\n%s", exportguard.LeaseID, harness.BuildkitNamespace, leaseOut)
	}

	build, export := p.StatsFor("build"), p.StatsFor("export")
	t.Logf("export phase: %s, %d blob bytes fetched from the source registry", exportTime.Round(time.Millisecond), export.BlobBytes())
	for d, size := range layerSizes(t, debian.estargz) {
		e := export.Blob(d)
		t.Logf("final base layer %s (%d bytes): build phase fetched %d, export phase %d bytes in %d GETs", d, size, build.Blob(d).Bytes, e.Bytes, e.GETs)
		if e.Bytes != 0 {
			t.Errorf("final base layer %s: %d bytes fetched during the export", d, e.Bytes)
		}
	}
	for d, size := range builderOnly {
		b, e := build.Blob(d), export.Blob(d)
		covered := b.Covered() + e.Covered()
		t.Logf("builder base layer %s (%d bytes): build fetched %d (%.1f%%), export %d", d, size, b.Covered(), 100*build.Coverage(d, size), e.Bytes)
		if b.FullGETs+e.FullGETs != 0 {
			t.Errorf("lazy-only layer %s fetched whole", d)
		}
		if covered*2 >= size {
			t.Errorf("lazy-only layer %s: %d of %d bytes fetched, want under half", d, covered, size)
		}
	}

	requirePushedOnBase(ctx, t, out, debianLayers)
}

// checkAccount checks the lazybase daemon's CPU and I/O account after a
// lazy build whose guard materialized the blobs guarded (digest to size):
// the guard's CPU and the bytes of those blobs are charged to it, the
// mounts' TOC checks and the build's reads are there, and the accounted
// CPU is within the daemon's process CPU as /proc tells it. Hashing is
// not required: containerd hashes the blobs the guard streams into its
// content store, on its side, and the guard's registry reads no manifest
// when the snapshot labels name the layers (the account's hashing stays
// near 0 in the daemon; stargz's chunk verification runs after each
// on-demand read, in fuse_and_other).
func checkAccount(ctx context.Context, t *testing.T, s *harness.Stack, guarded map[string]int64) {
	t.Helper()
	a, err := s.Snapshotter.Account(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Read after the account: the process's CPU only grows.
	proc, err := harness.ProcessCPU(s.Snapshotter.Pid())
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshotter CPU account: %s; /proc: %s", a, proc)
	var want int64
	for _, size := range guarded {
		want += size
	}
	if got := a.RegistryBytes["guard"]; got < want {
		t.Errorf("account: guard fetched %d registry bytes, the guarded blobs have %d", got, want)
	}
	if a.CPUSeconds["guard"] <= 0 || a.Units["guard"] == 0 {
		t.Errorf("account: no guard CPU (%v s in %d units)", a.CPUSeconds["guard"], a.Units["guard"])
	}
	if _, ok := a.CPUSeconds["hashing"]; !ok {
		t.Errorf("account: no hashing entry in %v", a.CPUSeconds)
	}
	if a.Units["toc"] == 0 || a.Units["on_demand"] == 0 || a.CPUSeconds["on_demand"] <= 0 {
		t.Errorf("account: no TOC check or on-demand read: units %v, cpu %v", a.Units, a.CPUSeconds)
	}
	if a.RegistryBytes["on_demand"] == 0 || a.RegistryBytes["toc"] == 0 {
		t.Errorf("account: no registry bytes for the TOC checks or the build's reads: %v", a.RegistryBytes)
	}
	// /proc counts in ticks of 10 ms, rounded down.
	if acc := a.AccountedCPU(); acc > proc+20*time.Millisecond {
		t.Errorf("account: %s accounted, more than the daemon's process CPU %s", acc, proc)
	}
}

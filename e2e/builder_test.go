//go:build e2e

package e2e

import (
	"archive/tar"
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/lazypull"
)

// builderImageRepo is where the test pushes the builder image it builds.
const builderImageRepo = "lazybase/builder"

// TestBuilderImage builds the lazybase builder image (deploy/builder,
// target "local": the harness's binaries on the debian-like reference
// image) with the harness's buildkitd, pushes it to the harness registry,
// and runs it through the harness's containerd the way buildx's
// docker-container driver runs it: privileged, the state volume on
// /var/lib/buildkit, deploy/buildkitd/buildkitd.toml at
// /etc/buildkit/buildkitd.toml and buildkitd flags as arguments (plus host
// networking for the loopback registry). A buildctl build through the
// builder's buildkitd, FROM the eStargz debian-like image, mounts the base
// lazily (the builder's lazybase snapshotter lists its layers, FUSE mounts
// in the builder's mount namespace, ranged reads only) and pushes its result,
// whose manifest holds the base layers plus the new ones. SIGTERM stops the
// builder cleanly (exit 0); a daemon dying makes it exit non-zero.
func TestBuilderImage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t, harness.WithBuildkit())
	debian, _ := referenceImages(t)
	publish(ctx, t, s, repoDebian, tagGzip, debian.gzip)
	publish(ctx, t, s, repoDebian, tagEStargz, debian.estargz)

	// 1. Build and push the builder image.
	image := s.Registry.Ref(builderImageRepo, "e2e")
	buildDir := builderContext(ctx, t)
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, "build", "--frontend", "dockerfile.v0",
		"--local", "context="+buildDir, "--local", "dockerfile="+filepath.Join(buildDir, "deploy", "builder"),
		"--opt", "target=local",
		"--opt", "build-arg:BASE_IMAGE="+s.Registry.Ref(repoDebian, tagGzip),
		"--output", "type=image,name="+image+",push=true"); err != nil {
		t.Fatalf("building the builder image: %v", err)
	}
	record(t, "builder-image-build", time.Since(start))

	// 2. Run it.
	if err := s.Containerd.Pull(ctx, image, ""); err != nil {
		t.Fatal(err)
	}
	stateDir, err := os.MkdirTemp(s.Dir, "b")
	if err != nil {
		t.Fatal(err)
	}
	b := startBuilder(ctx, t, s, image, "lzb-builder", stateDir)

	// 3. Build FROM the eStargz base through it: first without an export
	// (the build phase, whose reads must be lazy), then the same build
	// again, cached, pushing its result.
	base := s.Registry.Ref(repoDebian, tagEStargz)
	ctxDir := t.TempDir()
	writeFile(t, filepath.Join(ctxDir, "Dockerfile"), fmt.Sprintf(`FROM %s
RUN cat /etc/debian_version > /built-by-lazybase && ls /usr/bin | wc -l >> /built-by-lazybase
COPY hello.txt /hello.txt
`, base))
	writeFile(t, filepath.Join(ctxDir, "hello.txt"), "built through the lazybase builder image\n")
	buildArgs := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + ctxDir, "--local", "dockerfile=" + ctxDir}
	p := s.Registry.Proxy
	p.SetPhase("builder-build")
	start = time.Now()
	if _, err := s.BuildctlAt(ctx, b.addr, buildArgs...); err != nil {
		pid := b.pid(ctx, t)
		mi, _ := os.ReadFile(fmt.Sprintf("/proc/%d/mountinfo", pid))
		cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
		t.Fatalf("build through the builder image: %v\nbuilder log:\n%s\nmountinfo:\n%s\ncgroup:\n%s", err, b.proc.Log(60), mi, cg)
	}
	record(t, "builder-inner-build", time.Since(start))
	p.SetPhase("")

	status, err := lazypull.FetchStatus(ctx, filepath.Join(b.lazybaseRun, "snapshotter.sock.status"))
	if err != nil {
		t.Fatalf("lazybase status inside the builder: %v", err)
	}
	mounted := map[string]lazypull.LayerStatus{}
	for _, l := range status.Layers {
		mounted[l.Layer] = l
	}
	st := p.StatsFor("builder-build")
	sizes := layerSizes(t, debian.estargz)
	baseLayers := layerDigests(t, debian.estargz)
	for _, d := range baseLayers {
		l, ok := mounted[d]
		if !ok {
			t.Errorf("base layer %s is not mounted lazily in the builder; status: %+v", d, status.Layers)
			continue
		}
		if l.Image != base && !strings.HasPrefix(l.Image, base+"@sha256:") {
			t.Errorf("layer %s mounted for image %q, want %q", d, l.Image, base)
		}
		bs := st.Blob(d)
		t.Logf("base layer %s: %d of %d bytes fetched during the build (%.1f%%) in %d GETs, %d whole",
			d, bs.Covered(), sizes[d], 100*st.Coverage(d, sizes[d]), bs.GETs, bs.FullGETs)
		if bs.FullGETs != 0 {
			t.Errorf("base layer %s fetched whole %d times during the build", d, bs.FullGETs)
		}
	}
	fuse, err := fuseMountsOf(b.pid(ctx, t))
	if err != nil {
		t.Fatal(err)
	}
	if len(fuse) < len(baseLayers) {
		t.Errorf("%d FUSE mounts in the builder, want at least %d: %v", len(fuse), len(baseLayers), fuse)
	}

	out := s.Registry.Ref("e2e/built", "1")
	p.SetPhase("builder-push")
	start = time.Now()
	if _, err := s.BuildctlAt(ctx, b.addr, append(buildArgs, "--output", "type=image,name="+out+",push=true")...); err != nil {
		t.Fatalf("build and push through the builder image: %v\nbuilder log:\n%s", err, b.proc.Log(60))
	}
	record(t, "builder-inner-push", time.Since(start))
	p.SetPhase("")
	pst := p.StatsFor("builder-push")
	for _, d := range baseLayers {
		bs := pst.Blob(d)
		t.Logf("base layer %s during the push: %d bytes in %d GETs (%d whole)", d, bs.Covered(), bs.GETs, bs.FullGETs)
	}
	ref, err := name.ParseReference(s.Registry.DirectRef("e2e/built", "1"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("pushed image %s: %v", ref, err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Layers) != len(baseLayers)+2 {
		t.Errorf("pushed image has %d layers, want the %d base layers plus RUN and COPY", len(m.Layers), len(baseLayers))
	}
	for i, d := range baseLayers {
		if i < len(m.Layers) && m.Layers[i].Digest.String() != d {
			t.Errorf("pushed layer %d is %s, want the base layer %s", i, m.Layers[i].Digest, d)
		}
	}
	// The pushed layers are readable and hold what the build wrote.
	files := lastLayerFiles(t, img)
	if !files["hello.txt"] {
		t.Errorf("last pushed layer lacks hello.txt: %v", files)
	}

	// 4. SIGTERM stops the three daemons in reverse order, exit status 0.
	start = time.Now()
	if _, err := s.Containerd.Ctr(ctx, "tasks", "kill", "--signal", "SIGTERM", b.id); err != nil {
		t.Fatal(err)
	}
	code, err := b.proc.Wait(ctx, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	record(t, "builder-shutdown", time.Since(start))
	log := b.proc.Log(40)
	if code != 0 {
		t.Errorf("builder exited with %d after SIGTERM, want 0; log:\n%s", code, log)
	}
	iBk, iSn, iCd := strings.Index(log, "stopping buildkitd"), strings.Index(log, "stopping lazybase-snapshotter"), strings.Index(log, "stopping containerd")
	if iBk < 0 || iSn < iBk || iCd < iSn {
		t.Errorf("shutdown not in the order buildkitd, lazybase-snapshotter, containerd; log:\n%s", log)
	}

	// 5. Restarted on the same state (a buildx builder's volume survives
	// its container), the builder serves the same build again, from its
	// cache: the snapshotter re-mounts its lazy layers, containerd and
	// buildkitd keep their snapshots and cache records.
	b2 := startBuilder(ctx, t, s, image, "lzb-builder-2", stateDir)
	start = time.Now()
	if _, err := s.BuildctlAt(ctx, b2.addr, buildArgs...); err != nil {
		t.Fatalf("build after a restart on the same state: %v\nbuilder log:\n%s", err, b2.proc.Log(60))
	}
	record(t, "builder-restarted-build", time.Since(start))

	// 6. A daemon that dies takes the builder down with a non-zero status.
	pid := childNamed(t, b2.pid(ctx, t), "lazybase")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	code, err = b2.proc.Wait(ctx, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if code == 0 {
		t.Errorf("builder exited 0 after its snapshotter was killed; log:\n%s", b2.proc.Log(30))
	}
	t.Logf("builder exited %d after its snapshotter (pid %d) was killed", code, pid)

	// 7. A daemon that fails at start (here the snapshotter, on a flag it
	// does not know) stops the builder with a non-zero status before
	// buildkitd starts, containerd stopped.
	dir3, err := os.MkdirTemp(s.Dir, "b")
	if err != nil {
		t.Fatal(err)
	}
	b3 := runBuilder(t, s, image, "lzb-builder-3", dir3, "--no-such-flag")
	code, err = b3.proc.Wait(ctx, 2*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	log = b3.proc.Log(40)
	if code == 0 || !strings.Contains(log, "lazybase-snapshotter exited with status") ||
		!strings.Contains(log, "stopping containerd") || strings.Contains(log, "started buildkitd") {
		t.Errorf("builder with a failing snapshotter exited %d; log:\n%s", code, log)
	}
}

// builder is one running builder container.
type builder struct {
	id          string
	addr        string // buildkitd, "unix://..."
	lazybaseRun string // host directory bind-mounted on /run/lazybase
	proc        *harness.Background
	s           *harness.Stack
}

// startBuilder runs the builder image in the foreground of a `ctr run`
// (its exit status is the container's), its state, /run/buildkit and
// /run/lazybase under dir, and waits until its buildkitd answers.
func startBuilder(ctx context.Context, t *testing.T, s *harness.Stack, image, id, dir string) *builder {
	t.Helper()
	start := time.Now()
	b := runBuilder(t, s, image, id, dir, "--metrics-address=")
	proc := b.proc
	err := eventually.Wait(ctx, 2*time.Minute, func() error {
		_, err := s.BuildctlAt(ctx, b.addr, "debug", "workers")
		if err != nil && proc.Exited() {
			code, _ := proc.Wait(ctx, time.Second)
			t.Fatalf("builder %s exited with %d before buildkitd answered: %v\n%s", id, code, err, proc.Log(60))
		}
		return err
	})
	if err != nil {
		t.Fatalf("builder %s: buildkitd not answering: %v\n%s", id, err, proc.Log(60))
	}
	record(t, id+"-start", time.Since(start))
	// buildx's docker-container driver checks the builder with
	// `docker exec CONTAINER buildctl debug workers` and talks to it through
	// `buildctl dial-stdio`: buildctl on PATH, buildkitd on its default
	// socket inside.
	var fifo string
	if ra := s.Containerd.RunArgs(); len(ra) > 0 {
		for i := range ra[:len(ra)-1] {
			if ra[i] == "--fifo-dir" {
				fifo = ra[i+1]
			}
		}
	}
	if out, err := s.Containerd.Ctr(ctx, "tasks", "exec", "--exec-id", "hc", "--fifo-dir", fifo, id, "buildctl", "debug", "workers"); err != nil {
		t.Errorf("buildctl debug workers inside the builder: %v\n%s", err, out)
	}
	workers, err := s.BuildctlAt(ctx, b.addr, "debug", "workers", "--verbose")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(workers, "stargz") || !strings.Contains(workers, "containerd") {
		t.Errorf("builder's workers are not the containerd worker on stargz:\n%s", workers)
	}
	return b
}

// pid returns the host PID of the builder container's init process (the
// entrypoint).
func (b *builder) pid(ctx context.Context, t *testing.T) int {
	t.Helper()
	out, err := b.s.Containerd.Ctr(ctx, "tasks", "ls")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) >= 2 && f[0] == b.id {
			pid, err := strconv.Atoi(f[1])
			if err != nil {
				t.Fatalf("tasks ls: %q", l)
			}
			return pid
		}
	}
	t.Fatalf("no task %s in:\n%s", b.id, out)
	return 0
}

// fuseMountsOf returns the FUSE mount points in the mount namespace of pid.
func fuseMountsOf(pid int) ([]string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/mounts", pid))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 3 && strings.HasPrefix(fs[2], "fuse") {
			out = append(out, fs[1])
		}
	}
	return out, sc.Err()
}

// childNamed returns the PID of the child of parent whose command name is
// comm.
func childNamed(t *testing.T, parent int, comm string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", parent, parent))
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range strings.Fields(string(b)) {
		pid, _ := strconv.Atoi(f)
		c, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		if err == nil && strings.TrimSpace(string(c)) == comm {
			return pid
		}
	}
	t.Fatalf("no child %q of pid %d (children %q)", comm, parent, b)
	return 0
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// builderContext assembles the build context of the "local" target: the
// files deploy/builder/Dockerfile copies, and bin/ with the binaries.
func builderContext(ctx context.Context, t *testing.T) string {
	t.Helper()
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, f := range []string{
		"deploy/builder/Dockerfile",
		"deploy/builder/Dockerfile.dockerignore",
		"deploy/builder/entrypoint.sh",
		"deploy/builder/containerd.toml",
		"deploy/builder/snapshotter.toml",
		"deploy/containerd/conf.d/lazybase-stargz.toml",
		"deploy/buildkitd/buildkitd.toml",
	} {
		copyFile(t, filepath.Join(root, f), filepath.Join(dir, f))
	}
	bins, err := harness.BuilderBinaries(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for n, p := range bins {
		copyFile(t, p, filepath.Join(dir, "bin", n))
	}
	return dir
}

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	fi, err := in.Stat()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		t.Fatal(err)
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, fi.Mode().Perm())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// lastLayerFiles returns the paths in img's last layer, without leading
// "./" or "/".
func lastLayerFiles(t *testing.T, img v1.Image) map[string]bool {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) == 0 {
		t.Fatalf("layers: %v (%d)", err, len(layers))
	}
	rc, err := layers[len(layers)-1].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files := map[string]bool{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		files[strings.TrimPrefix(strings.TrimPrefix(h.Name, "./"), "/")] = true
	}
	return files
}

// runBuilder starts the builder image in the foreground of a `ctr run` as
// buildx's docker-container driver would (its exit status is the
// container's), with its state, /run/buildkit and /run/lazybase under dir,
// and snapshotterArgs as $LAZYBASE_SNAPSHOTTER_ARGS.
func runBuilder(t *testing.T, s *harness.Stack, image, id, dir, snapshotterArgs string) *builder {
	t.Helper()
	state, run, lzRun := filepath.Join(dir, "state"), filepath.Join(dir, "run"), filepath.Join(dir, "lz")
	for _, d := range []string{state, run, lzRun} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	root, err := harness.RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	// deploy/buildkitd/buildkitd.toml as buildx's --buildkitd-config, plus
	// the plain-HTTP registry entry a user adds for a registry without TLS.
	cfg, err := os.ReadFile(filepath.Join(root, "deploy", "buildkitd", "buildkitd.toml"))
	if err != nil {
		t.Fatal(err)
	}
	cfg = fmt.Appendf(cfg, "\n[registry.%q]\n  http = true\n", s.Registry.Host())
	cfgPath := filepath.Join(dir, "buildkitd.toml")
	writeFile(t, cfgPath, string(cfg))

	bind := func(src, dst, opts string) string {
		return fmt.Sprintf("type=bind,src=%s,dst=%s,options=rbind:%s", src, dst, opts)
	}
	args := []string{"run", "--rm", "--privileged", "--net-host"}
	args = append(args, s.Containerd.RunArgs()...)
	args = append(args,
		"--mount", bind(state, "/var/lib/buildkit", "rw"),
		"--mount", bind(run, "/run/buildkit", "rw"),
		"--mount", bind(lzRun, "/run/lazybase", "rw"),
		"--mount", bind(cfgPath, "/etc/buildkit/buildkitd.toml", "ro"),
		// Docker mounts the cgroup file system in every container (rw when
		// privileged); ctr's default spec has none, and the runc inside
		// needs it for the containers BuildKit runs.
		"--mount", "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=rw:nosuid:nodev:noexec",
		// The snapshotter's metrics stay off: the builder shares the host's
		// network namespace here.
		"--env", "LAZYBASE_SNAPSHOTTER_ARGS="+snapshotterArgs,
		image, id,
		// The image's entrypoint with the flags buildx's docker-container
		// driver appends (ctr run replaces, not appends, the arguments).
		"/usr/local/bin/lazybase-builder",
		"--config", "/etc/buildkit/buildkitd.toml",
		"--allow-insecure-entitlement=network.host")
	proc, err := s.Containerd.StartCtr(id, args...)
	if err != nil {
		t.Fatal(err)
	}
	return &builder{id: id, addr: "unix://" + filepath.Join(run, "buildkitd.sock"), lazybaseRun: lzRun, proc: proc, s: s}
}

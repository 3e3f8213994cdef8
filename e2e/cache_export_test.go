//go:build e2e

package e2e

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
)

// The RUN steps of cacheExportContext's Dockerfile, one per stage.
const (
	cacheRunBuild = "go build -o /out/hello main.go"
	cacheRunFinal = "/usr/local/bin/hello > /etc/hello.txt"
)

// cacheExportContext writes a build context whose Dockerfile has a RUN step
// in each stage: the builder stage FROM the golang-like image compiles
// helloMain; the final stage FROM the debian-like image runs it.
func cacheExportContext(t *testing.T, s *harness.Stack, tag string) string {
	t.Helper()
	dir := t.TempDir()
	dockerfile := "FROM " + s.Registry.Ref(repoGolang, tag) + ` AS build
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOCACHE=/tmp/gocache
WORKDIR /src
COPY main.go .
RUN ` + cacheRunBuild + `

FROM ` + s.Registry.Ref(repoDebian, tag) + `
COPY --from=build /out/hello /usr/local/bin/hello
RUN ` + cacheRunFinal + `
CMD ["/usr/local/bin/hello"]
`
	for name, body := range map[string]string{"Dockerfile": dockerfile, "main.go": helloMain} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// cacheBlobs returns the digests a registry cache manifest (an index, or
// an image manifest with image-manifest=true) refers to.
func cacheBlobs(ctx context.Context, t *testing.T, ref string) map[string]bool {
	t.Helper()
	desc, err := remote.Get(mustRef(t, ref), remote.WithContext(ctx))
	if err != nil {
		t.Fatalf("reading cache manifest %s: %v", ref, err)
	}
	var m struct {
		Config    v1.Descriptor   `json:"config"`
		Manifests []v1.Descriptor `json:"manifests"`
		Layers    []v1.Descriptor `json:"layers"`
	}
	if err := json.Unmarshal(desc.Manifest, &m); err != nil {
		t.Fatalf("cache manifest %s: %v", ref, err)
	}
	out := map[string]bool{}
	for _, d := range append(m.Manifests, m.Layers...) {
		out[d.Digest.String()] = true
	}
	return out
}

// TestCacheExportLazyBases builds a multi-stage Dockerfile (a RUN step in
// each stage) on buildkitd over the lazybase snapshotter, both eStargz
// bases lazily mounted and guarded (`lazybase guard` after the cold
// build), then exports its build cache in the four forms users run:
// type=registry mode=min, type=registry mode=max, type=inline (with an
// image push) and type=local; and once with several exporters at once (image
// pushes to two registry processes, a type=oci and a type=docker tarball,
// plus a mode=max registry cache), as hosted builders run `--push` and
// `--load` together. No export may fetch a byte of a blob from the
// registry the bases live in. The pushed images must hold every layer in
// both registries, and the docker tarball must load into containerd (`ctr
// images import`) and run the built program. Then, per form, a fresh stack (new containerd, buildkitd and
// snapshotter roots) builds the same Dockerfile importing that cache:
// every RUN step must be CACHED, and a type=oci export of the result must
// succeed (the cache holds every layer a fresh builder needs).
func TestCacheExportLazyBases(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t,
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfig(guardConfig("export-base", "lazy")),
		harness.WithSecondRegistry(),
	)
	debian, golang := publishAll(ctx, t, s)
	work := cacheExportContext(t, s, tagEStargz)
	common := []string{"build", "--progress=plain", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	r, p := s.Registry, s.Registry.Proxy

	p.SetPhase("build")
	start := time.Now()
	_, progress, err := s.Buildkit.BuildctlProgress(ctx, common...)
	if err != nil {
		t.Fatalf("cold build: %v\n%s", err, s.Logs(40))
	}
	record(t, "cache-export-cold-build", time.Since(start))
	for _, cmd := range []string{cacheRunBuild, cacheRunFinal} {
		if cached, found := runStepCached(progress, cmd); !found || cached {
			t.Fatalf("cold build: RUN %s found=%v cached=%v:\n%s", cmd, found, cached, progress)
		}
	}
	mounts, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) == 0 {
		t.Fatal("no FUSE mount after the cold build: the bases were not mounted lazily")
	}
	p.SetPhase("guard")
	start = time.Now()
	if _, _, err := s.Lazybase(ctx, "guard", "--status-socket="+s.Snapshotter.StatusSocket(), "--timeout", "5m",
		r.Ref(repoDebian, tagEStargz), r.Ref(repoGolang, tagEStargz)); err != nil {
		t.Fatalf("%v\n%s", err, s.Logs(40))
	}
	record(t, "cache-export-guard", time.Since(start))

	baseSizes := layerSizes(t, golang.estargz)
	for d, n := range layerSizes(t, debian.estargz) {
		baseSizes[d] = n
	}
	states := guardStates(ctx, t, s)
	for d := range baseSizes {
		if l := states[d]; !l.Materialized {
			t.Fatalf("after lazybase guard, base layer %s is not materialized: %+v", d, l)
		}
	}
	cacheDir := t.TempDir()
	ociTar := filepath.Join(t.TempDir(), "multi.oci.tar")
	dockerTar := filepath.Join(t.TempDir(), "multi.docker.tar")
	type form struct {
		name    string
		export  []string // buildctl flags of the export build
		imports []string // buildctl flags of the fresh stack's build; nil: no import
	}
	reg := func(repo, tag string) string { return r.DirectRef(repo, tag) }
	forms := []form{
		{
			name:    "registry-min",
			export:  []string{"--export-cache", "type=registry,ref=" + reg("e2e/cache", "min") + ",mode=min,registry.insecure=true"},
			imports: []string{"--import-cache", "type=registry,ref=" + reg("e2e/cache", "min") + ",registry.insecure=true"},
		},
		{
			name:    "registry-max",
			export:  []string{"--export-cache", "type=registry,ref=" + reg("e2e/cache", "max") + ",mode=max,registry.insecure=true"},
			imports: []string{"--import-cache", "type=registry,ref=" + reg("e2e/cache", "max") + ",registry.insecure=true"},
		},
		{
			name: "inline",
			export: []string{"--output", "type=image,name=" + reg("e2e/cache-inline", "latest") + ",push=true,registry.insecure=true",
				"--export-cache", "type=inline"},
			imports: []string{"--import-cache", "type=registry,ref=" + reg("e2e/cache-inline", "latest") + ",registry.insecure=true"},
		},
		{
			name:    "local",
			export:  []string{"--export-cache", "type=local,dest=" + cacheDir + ",mode=max"},
			imports: []string{"--import-cache", "type=local,src=" + cacheDir},
		},
		{
			name: "several-exporters",
			export: []string{
				"--output", "type=image,name=" + reg("e2e/multi-a", "latest") + ",push=true,registry.insecure=true",
				"--output", "type=image,name=" + s.Registry2.DirectRef("e2e/multi-b", "latest") + ",push=true,registry.insecure=true",
				"--output", "type=oci,dest=" + ociTar,
				"--output", "type=docker,dest=" + dockerTar + ",name=" + loadedName,
				"--export-cache", "type=registry,ref=" + reg("e2e/cache", "multi") + ",mode=max,registry.insecure=true",
			},
		},
	}
	for _, f := range forms {
		phase := "export-" + f.name
		p.SetPhase(phase)
		start := time.Now()
		_, progress, err := s.Buildkit.BuildctlProgress(ctx, append(common, f.export...)...)
		if err != nil {
			t.Fatalf("%s export: %v\n%s", f.name, err, s.Logs(40))
		}
		record(t, "cache-export-"+f.name, time.Since(start))
		for _, cmd := range []string{cacheRunBuild, cacheRunFinal} {
			if cached, _ := runStepCached(progress, cmd); !cached {
				t.Errorf("%s export build: RUN %s was not cached:\n%s", f.name, cmd, progress)
			}
		}
		st := p.StatsFor(phase)
		for d, size := range baseSizes {
			if b := st.Blob(d); b.Bytes != 0 {
				t.Errorf("%s export: base layer %s (%d bytes): %d bytes fetched in %d GETs", f.name, d, size, b.Bytes, b.GETs)
			}
		}
		if n := st.BlobBytes(); n != 0 {
			t.Errorf("%s export: %d blob bytes fetched from the registry", f.name, n)
		}
		t.Logf("%s export: %s, %d blob bytes fetched from the registry", f.name, time.Since(start).Round(time.Millisecond), st.BlobBytes())
	}
	p.SetPhase("")
	// Both registries hold the whole image, every layer blob readable: the
	// second one had none of the base layers, so the push uploaded them.
	var pushedLayers []string
	for _, ref := range []string{reg("e2e/multi-a", "latest"), s.Registry2.DirectRef("e2e/multi-b", "latest")} {
		img, err := remote.Image(mustRef(t, ref), remote.WithContext(ctx))
		if err != nil {
			t.Errorf("several exporters: pushed image %s: %v", ref, err)
			continue
		}
		layers := layerDigests(t, img)
		if len(layers) != len(layerDigests(t, debian.estargz))+2 {
			t.Errorf("several exporters: %s has %d layers, want the final base's and two more", ref, len(layers))
		}
		if pushedLayers == nil {
			pushedLayers = layers
		} else if !slices.Equal(layers, pushedLayers) {
			t.Errorf("several exporters: %s has layers %v, the first push %v", ref, layers, pushedLayers)
		}
		if err := readLayers(ctx, img); err != nil {
			t.Errorf("several exporters: pushed image %s: %v", ref, err)
		}
	}
	if fi, err := os.Stat(ociTar); err != nil || fi.Size() == 0 {
		t.Errorf("several exporters: OCI tarball %s: %v", ociTar, err)
	}
	checkDockerTarball(ctx, t, s, dockerTar, pushedLayers)
	// The registry caches name the base layers of the stages they cover:
	// mode=min the final stage's, mode=max every stage's.
	for tag, want := range map[string][]string{
		"min": layerDigests(t, debian.estargz),
		"max": append(layerDigests(t, debian.estargz), layerDigests(t, golang.estargz)...),
	} {
		have := cacheBlobs(ctx, t, reg("e2e/cache", tag))
		for _, d := range want {
			if !have[d] {
				t.Errorf("registry cache mode=%s lacks base layer %s", tag, d)
			}
		}
		t.Logf("registry cache mode=%s: %d blobs", tag, len(have))
	}

	// A fresh builder per form imports the cache: every RUN step cached.
	for _, f := range forms {
		if f.imports == nil {
			continue
		}
		t.Run("import-"+f.name, func(t *testing.T) {
			fresh := harness.Start(ctx, t,
				harness.WithLazySnapshotter(harness.Lazybase),
				harness.WithBuildkitLazy(),
				harness.WithLazybaseConfig(guardConfig("export-base", "lazy")),
			)
			phase := "import-" + f.name
			p.SetPhase(phase)
			defer p.SetPhase("")
			start := time.Now()
			// The same Dockerfile: its bases come from the first stack's
			// registry, as the cache does.
			_, progress, err := fresh.Buildkit.BuildctlProgress(ctx, append(common, f.imports...)...)
			if err != nil {
				t.Fatalf("build importing the %s cache: %v\n%s", f.name, err, fresh.Logs(40))
			}
			record(t, "cache-import-"+f.name, time.Since(start))
			for _, cmd := range []string{cacheRunBuild, cacheRunFinal} {
				cached, found := runStepCached(progress, cmd)
				t.Logf("%s import: RUN %s found=%v cached=%v", f.name, cmd, found, cached)
				if !cached {
					t.Errorf("%s import on a fresh builder: RUN %s not CACHED (found=%v)", f.name, cmd, found)
				}
			}
			if t.Failed() {
				t.Logf("progress:\n%s", progress)
			}
			// Exporting the result needs every layer of the final image:
			// the cache's and the base's.
			tar := filepath.Join(t.TempDir(), "imported.oci.tar")
			start = time.Now()
			if _, _, err := fresh.Buildkit.BuildctlProgress(ctx, append(append(common, f.imports...), "--output", "type=oci,dest="+tar)...); err != nil {
				t.Errorf("exporting the build made from the %s cache: %v\n%s", f.name, err, fresh.Logs(40))
			} else if fi, err := os.Stat(tar); err != nil || fi.Size() == 0 {
				t.Errorf("OCI export from the %s cache: %v", f.name, err)
			}
			record(t, "cache-import-"+f.name+"-oci-export", time.Since(start))
			t.Logf("%s import: %d blob bytes fetched from the registry", f.name, p.StatsFor(phase).BlobBytes())
		})
	}
}

// loadedName is the image name the type=docker exporter writes into its
// tarball, as `docker buildx build --load -t NAME` does.
const loadedName = "lazybase.test/e2e/loaded:latest"

// readLayers reads every layer blob of img in full from its registry,
// which verifies each against its digest.
func readLayers(ctx context.Context, img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	for _, l := range layers {
		d, err := l.Digest()
		if err != nil {
			return err
		}
		rc, err := l.Compressed()
		if err != nil {
			return fmt.Errorf("layer %s: %w", d, err)
		}
		_, err = io.Copy(io.Discard, rc)
		if cerr := rc.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("reading layer %s: %w", d, err)
		}
	}
	return nil
}

// checkDockerTarball checks a type=docker export as `docker load` reads it:
// manifest.json names loadedName, a config whose digest matches its file
// and whose diff_ids count the layers, and layer files whose digests match
// their names and, in order, wantLayers (the pushed image's); then it
// imports the tarball into the Stack's containerd (unpacked with overlayfs)
// and runs the built program from it.
func checkDockerTarball(ctx context.Context, t *testing.T, s *harness.Stack, path string, wantLayers []string) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Errorf("docker tarball: %v", err)
		return
	}
	defer f.Close()
	files := map[string]string{} // name: sha256 digest of its content
	var manifest []byte
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Errorf("docker tarball %s: %v", path, err)
			return
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		if h.Name == "manifest.json" {
			if manifest, err = io.ReadAll(tr); err != nil {
				t.Errorf("docker tarball %s: manifest.json: %v", path, err)
				return
			}
			continue
		}
		hash := sha256.New()
		if _, err := io.Copy(hash, tr); err != nil {
			t.Errorf("docker tarball %s: %s: %v", path, h.Name, err)
			return
		}
		files[h.Name] = "sha256:" + hex.EncodeToString(hash.Sum(nil))
	}
	var entries []struct {
		Config   string
		RepoTags []string
		Layers   []string
	}
	if err := json.Unmarshal(manifest, &entries); err != nil || len(entries) != 1 {
		t.Errorf("docker tarball %s: manifest.json (%v): want one image, got %s", path, err, manifest)
		return
	}
	e := entries[0]
	if !slices.Contains(e.RepoTags, loadedName) {
		t.Errorf("docker tarball: RepoTags %v, want %s", e.RepoTags, loadedName)
	}
	named := func(file string) (string, bool) {
		d, ok := files[file]
		return d, ok && d == "sha256:"+strings.TrimPrefix(file, "blobs/sha256/")
	}
	if _, ok := named(e.Config); !ok {
		t.Errorf("docker tarball: config %s missing or not matching its digest", e.Config)
	}
	var layers []string
	for _, l := range e.Layers {
		d, ok := named(l)
		if !ok {
			t.Errorf("docker tarball: layer %s missing or not matching its digest", l)
		}
		layers = append(layers, d)
	}
	if !slices.Equal(layers, wantLayers) {
		t.Errorf("docker tarball: layers %v, the pushed image's %v", layers, wantLayers)
	}
	if t.Failed() {
		return
	}
	if out, err := s.Containerd.Ctr(ctx, "images", "import", path); err != nil {
		t.Errorf("ctr images import of the docker tarball: %v\n%s", err, out)
		return
	}
	out, err := s.Containerd.Run(ctx, loadedName, "", "loaded-hello", "/usr/local/bin/hello")
	if err != nil || strings.TrimSpace(out) != "hello from the lazybase e2e build" {
		t.Errorf("running the program loaded from the docker tarball: %q, %v; want the hello line", out, err)
		return
	}
	t.Logf("docker tarball: %s with %d layers, the pushed image's; imported into containerd, its program runs", loadedName, len(layers))
}

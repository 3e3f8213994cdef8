package job_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
)

// TestRunRegistryToRegistryReportsWhatItWrote converts between two tags of
// a registry: the report's digests, layers and totals are what the
// registry holds, every layer opens lazily and verifies, and converting the
// output again reuses every layer.
func TestRunRegistryToRegistryReportsWhatItWrote(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(1, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/lib/app:v1", reg.Host+"/lib/app:v1-estargz"
	testimage.PushRef(t, src, img)

	var events []convert.Event
	var mu sync.Mutex
	rep := mustRun(ctx, t, src, dst, func(r *job.Request) {
		r.Progress = func(ev convert.Event) { mu.Lock(); events = append(events, ev); mu.Unlock() }
	})
	srcDigest, _ := img.Digest()
	if rep.Source != src || rep.Destination != dst || rep.SourceDigest != srcDigest.String() || rep.Format != "estargz" ||
		len(rep.Images) != 1 || rep.UpToDate {
		t.Fatalf("report: %+v", rep)
	}
	out := testimage.RemoteImage(t, dst)
	checkImage(t, out, rep.Images[0])
	if d, _ := out.Digest(); d.String() != rep.Digest {
		t.Errorf("registry holds %s, report says %s", d, rep.Digest)
	}
	tot := rep.Totals
	if tot.Images != 1 || tot.Layers != 2 || tot.SourceBytes <= 0 || tot.OutputBytes <= 0 || tot.SourceUncompressedSize <= 0 ||
		tot.Seconds < tot.ConvertSeconds+tot.WriteSeconds || tot.ConvertSeconds <= 0 {
		t.Errorf("totals: %+v", tot)
	}
	done := 0
	for _, ev := range events {
		if ev.Kind == convert.LayerDone {
			done++
		}
	}
	if done != 2 {
		t.Errorf("%d LayerDone events, want 2", done)
	}
	verify(ctx, t, reg.Host, dst, rep)

	again := mustRun(ctx, t, dst, reg.Host+"/lib/app:again")
	if again.Totals.Reused != 2 {
		t.Errorf("reconverting: %d of 2 layers reused", again.Totals.Reused)
	}
	for i, l := range again.Images[0].Layers {
		if l.Digest != rep.Images[0].Layers[i].Digest || !l.Reused {
			t.Errorf("layer %d rebuilt: %+v", i, l)
		}
	}
}

// TestRunZstdChunkedWithLevel converts to zstd:chunked at level 5: every
// layer is zstd and opens lazily.
func TestRunZstdChunkedWithLevel(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(2, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/z/app:v1", reg.Host+"/z/app:zstd"
	testimage.PushRef(t, src, img)
	rep := mustRun(ctx, t, src, dst, func(r *job.Request) { r.Format, r.Level, r.Jobs = convert.FormatZstdChunked, 5, 1 })
	checkImage(t, testimage.RemoteImage(t, dst), rep.Images[0])
	if rep.Format != "zstd-chunked" {
		t.Errorf("format %q", rep.Format)
	}
	for _, l := range rep.Images[0].Layers {
		if !strings.Contains(l.MediaType, "zstd") {
			t.Errorf("layer %s: media type %s", l.Digest, l.MediaType)
		}
	}
	m, _ := testimage.RemoteImage(t, dst).Manifest()
	if got, want := m.Annotations[convert.AnnotationFormat], convert.FormatAnnotation(convert.FormatZstdChunked, 5, 0); got != want {
		t.Errorf("format annotation %q, want %q", got, want)
	}
	verify(ctx, t, reg.Host, dst, rep)
}

// TestRunRegistryToLayoutAndBack converts into a fresh OCI layout (tagged,
// with the platform recorded) and from it back into a registry, reusing
// every layer, and rebuilding them with Force.
func TestRunRegistryToLayoutAndBack(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(3, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/lib/app:v1"
	testimage.PushRef(t, src, img)

	t.Chdir(t.TempDir())
	rep := mustRun(ctx, t, src, "oci:out/layout:conv")
	p, err := layout.FromPath("out/layout")
	if err != nil {
		t.Fatal(err)
	}
	ii, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := ii.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 || im.Manifests[0].Annotations[imageio.AnnotationRefName] != "conv" ||
		im.Manifests[0].Digest.String() != rep.Digest || im.Manifests[0].Platform == nil {
		t.Fatalf("index.json: %+v", im.Manifests)
	}
	out, err := ii.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, out, rep.Images[0])

	// oci: without a tag (the only manifest) -> registry.
	dst := reg.Host + "/lib/app:from-layout"
	rep2 := mustRun(ctx, t, "oci:out/layout", dst)
	checkImage(t, testimage.RemoteImage(t, dst), rep2.Images[0])
	if rep2.Totals.Reused != rep2.Totals.Layers {
		t.Errorf("%d of %d layers reused", rep2.Totals.Reused, rep2.Totals.Layers)
	}
	rep3 := mustRun(ctx, t, "oci:out/layout:conv", dst+"-forced", func(r *job.Request) { r.Force = true })
	if rep3.Totals.Reused != 0 {
		t.Errorf("Force: %d layers reused", rep3.Totals.Reused)
	}
}

// TestRunIndexPlatforms converts a two-platform index whole, then one
// platform of it, then none: the last fails and writes nothing.
func TestRunIndexPlatforms(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	idx, err := testimage.SeedIndex(4, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/multi/app:v1"
	testimage.PushRef(t, src, idx)
	index := func(ref string) v1.ImageIndex {
		r, err := name.ParseReference(ref)
		if err != nil {
			t.Fatal(err)
		}
		ii, err := remote.Index(r)
		if err != nil {
			t.Fatal(err)
		}
		if err := validate.Index(ii); err != nil {
			t.Fatalf("validate.Index(%s): %v", ref, err)
		}
		return ii
	}

	rep := mustRun(ctx, t, src, reg.Host+"/multi/app:all")
	all := index(reg.Host + "/multi/app:all")
	im, _ := all.IndexManifest()
	if len(im.Manifests) != 2 || len(rep.Images) != 2 || rep.Totals.Images != 2 || rep.MediaType != string(im.MediaType) {
		t.Fatalf("all platforms: %d manifests, %d in report", len(im.Manifests), len(rep.Images))
	}
	for i, d := range im.Manifests {
		img, err := all.Image(d.Digest)
		if err != nil {
			t.Fatal(err)
		}
		checkImage(t, img, rep.Images[i])
		if d.Platform == nil || rep.Images[i].Platform != d.Platform.String() {
			t.Errorf("manifest %d: platform %v, report %q", i, d.Platform, rep.Images[i].Platform)
		}
	}

	arm := []v1.Platform{{OS: "linux", Architecture: "arm64", Variant: "v8"}, {OS: "linux", Architecture: "s390x"}}
	dst := reg.Host + "/multi/app:arm64"
	rep = mustRun(ctx, t, src, dst, func(r *job.Request) { r.Platforms = arm })
	ii := index(dst)
	im, _ = ii.IndexManifest()
	if len(im.Manifests) != 1 || im.Manifests[0].Platform == nil || im.Manifests[0].Platform.Architecture != "arm64" {
		t.Fatalf("manifests %+v", im.Manifests)
	}
	if len(rep.Images) != 1 || rep.Images[0].Platform != "linux/arm64/v8" || len(rep.Skipped) != 1 {
		t.Fatalf("report images %+v skipped %+v", rep.Images, rep.Skipped)
	}
	img, err := ii.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, img, rep.Images[0])

	_, err = run(ctx, t, src, reg.Host+"/multi/app:none", func(r *job.Request) { r.Platforms = []v1.Platform{{OS: "windows", Architecture: "amd64"}} })
	if err == nil || !strings.Contains(err.Error(), src) {
		t.Fatalf("no matching platform: %v", err)
	}
	if testimage.TagExists(t, reg.Host+"/multi/app:none") {
		t.Fatal("tag written for an empty selection")
	}
}

// TestRunCorruptBlobLeavesDestination converts from a registry blob and a
// layout blob whose bytes do not match their digest: the error names the
// source and the layer, and no destination (tag or index.json) changes.
func TestRunCorruptBlobLeavesDestination(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(5, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/bad/app:v1"
	testimage.PushRef(t, src, img)
	layers, _ := img.Layers()
	bad, _ := layers[1].Digest()

	reg.Corrupt(bad)
	dst := reg.Host + "/bad/app:out"
	_, err = run(ctx, t, src, dst)
	if err == nil || !strings.Contains(err.Error(), src) || !strings.Contains(err.Error(), bad.String()) {
		t.Errorf("corrupt blob: %v, want an error naming %s and %s", err, src, bad)
	}
	if testimage.TagExists(t, dst) {
		t.Fatal("destination tag written after a failed conversion")
	}
	reg.Corrupt(v1.Hash{})

	dir := t.TempDir()
	mustRun(ctx, t, src, "oci:"+dir+":v1")
	before, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	reg.Corrupt(bad)
	if _, err := run(ctx, t, src, "oci:"+dir+":v1", func(r *job.Request) { r.Force = true }); err == nil {
		t.Fatal("converting a corrupt blob into a layout succeeded")
	}
	after, _ := os.ReadFile(filepath.Join(dir, "index.json"))
	if !bytes.Equal(before, after) {
		t.Fatalf("index.json changed:\n%s\n%s", before, after)
	}
	reg.Corrupt(v1.Hash{})

	srcDir := t.TempDir()
	if _, err := layout.Write(srcDir, empty.Index); err != nil {
		t.Fatal(err)
	}
	p, _ := layout.FromPath(srcDir)
	if err := p.AppendImage(img); err != nil {
		t.Fatal(err)
	}
	blob := filepath.Join(srcDir, "blobs", bad.Algorithm, bad.Hex)
	b, err := os.ReadFile(blob)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	if err := os.WriteFile(blob, b, 0o644); err != nil {
		t.Fatal(err)
	}
	dst = reg.Host + "/bad/app:from-layout"
	_, err = run(ctx, t, "oci:"+srcDir, dst)
	if err == nil || !strings.Contains(err.Error(), "oci:"+srcDir) || !strings.Contains(err.Error(), bad.String()) {
		t.Errorf("corrupt layout blob: %v", err)
	}
	if testimage.TagExists(t, dst) {
		t.Fatal("destination tag written after a failed conversion")
	}
}

// TestRunCancelLeavesDestination cancels a job while it reads source blobs,
// while it streams converted layers to the destination as they are written,
// and while it writes the destination (committing blobs, pushing the
// manifest): the error is context.Canceled, the Writing hook ran only in
// the last case, and no tag is written.
func TestRunCancelLeavesDestination(t *testing.T) {
	isolate(t)
	img, err := testimage.SeedImage(6, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	for _, when := range []string{"reading", "streaming", "uploading"} {
		t.Run(when, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var once sync.Once
			inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
			armed := make(chan struct{})
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				select {
				case <-armed:
					read := r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/sha256:")
					stream := r.Method == http.MethodPatch && strings.Contains(r.URL.Path, "/blobs/uploads")
					upload := r.Method == http.MethodPut
					if (when == "reading" && read) || (when == "streaming" && stream) || (when == "uploading" && upload) {
						once.Do(cancel)
					}
				default:
				}
				inner.ServeHTTP(w, r)
			}))
			defer srv.Close()
			host := strings.TrimPrefix(srv.URL, "http://")
			src, dst := host+"/c/app:v1", host+"/c/app:out"
			testimage.PushRef(t, src, img)
			close(armed)
			writing := false
			_, err := run(ctx, t, src, dst, func(r *job.Request) { r.Writing = func(string) { writing = true } })
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("interrupted conversion: %v", err)
			}
			if writing != (when == "uploading") {
				t.Errorf("interrupted %s, but the upload started = %v", when, writing)
			}
			if testimage.TagExists(t, dst) {
				t.Fatal("destination tag written after an interrupted conversion")
			}
		})
	}
}

// TestRunRegistryErrors checks what a job says of registries that refuse:
// 404 on the manifest or on a layer blob, 500, and 401 without credentials
// (and success with them in the docker config).
func TestRunRegistryErrors(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	img, err := testimage.SeedImage(7, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	reg := testimage.NewRegistry(t)
	_, err = run(ctx, t, reg.Host+"/none/app:v1", reg.Host+"/none/app:out")
	if err == nil || !strings.Contains(err.Error(), "reading "+reg.Host+"/none/app:v1: not found: ") || !errors.Is(err, imageio.ErrNotFound) {
		t.Errorf("404: %v", err)
	}

	src := reg.Host + "/lib/app:v1"
	testimage.PushRef(t, src, img)
	layers, _ := img.Layers()
	dgst, _ := layers[0].Digest()
	for status, kind := range map[int]error{http.StatusNotFound: imageio.ErrNotFound, http.StatusInternalServerError: imageio.ErrServer} {
		reg.Fail(dgst, status)
		_, err = run(ctx, t, src, reg.Host+"/lib/app:out")
		if err == nil || !strings.Contains(err.Error(), src) || !strings.Contains(err.Error(), dgst.String()) || !strings.Contains(err.Error(), kind.Error()) || !errors.Is(err, kind) {
			t.Errorf("blob %d: %v, want errors.Is %q", status, err, kind)
		}
		reg.Fail(dgst, 0)
	}

	srv500 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "boom", http.StatusInternalServerError)
	}))
	defer srv500.Close()
	h500 := strings.TrimPrefix(srv500.URL, "http://")
	_, err = run(ctx, t, h500+"/x/app:v1", h500+"/x/app:out")
	if err == nil || !strings.Contains(err.Error(), "reading "+h500+"/x/app:v1: registry error: ") {
		t.Errorf("500: %v", err)
	}

	const user, pass = "builder", "pa55-w0rd-x"
	hAuth := authRegistry(t, user, pass)
	_, err = run(ctx, t, hAuth+"/p/app:v1", hAuth+"/p/app:out")
	if err == nil || !strings.Contains(err.Error(), "reading "+hAuth+"/p/app:v1: unauthorized: ") {
		t.Errorf("401: %v", err)
	}
	cfg := t.TempDir()
	t.Setenv("DOCKER_CONFIG", cfg)
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(filepath.Join(cfg, "config.json"), []byte(`{"auths":{"`+hAuth+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	srcRef, _ := name.ParseReference(hAuth + "/p/app:v1")
	if err := remote.Push(srcRef, img, remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatal(err)
	}
	if rep := mustRun(ctx, t, hAuth+"/p/app:v1", hAuth+"/p/app:out"); len(rep.Images) != 1 {
		t.Errorf("with credentials: %+v", rep)
	}
}

// authRegistry starts a registry that wants basic auth as user and pass,
// and returns its host.
func authRegistry(t *testing.T, user, pass string) string {
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="lazybase-test"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		inner.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// TestRunTLSVerifiesCertificates converts from a registry with a
// self-signed certificate: refused by default, done with an insecure
// client.
func TestRunTLSVerifiesCertificates(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	srv := httptest.NewTLSServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "https://")
	img, err := testimage.SeedImage(9, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := host+"/tls/app:v1", host+"/tls/app:out"
	r, _ := name.ParseReference(src)
	if err := remote.Push(r, img, remote.WithTransport(srv.Client().Transport)); err != nil {
		t.Fatal(err)
	}
	_, err = run(ctx, t, src, dst)
	if err == nil || !strings.Contains(err.Error(), "TLS certificate verification failed: ") {
		t.Fatalf("self-signed certificate accepted: %v", err)
	}
	insecure, err := imageio.New(imageio.WithInsecure(true))
	if err != nil {
		t.Fatal(err)
	}
	rep := mustRun(ctx, t, src, dst, func(r *job.Request) { r.Client = insecure })
	dr, _ := name.ParseReference(dst)
	out, err := remote.Image(dr, remote.WithTransport(srv.Client().Transport))
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, out, rep.Images[0])
}

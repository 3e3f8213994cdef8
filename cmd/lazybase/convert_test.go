package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
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
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/prefetch"
)

// runCLI runs the lazybase command in-process.
func runCLI(ctx context.Context, t *testing.T, args ...string) (stdout, stderr string, err error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := newRootCmd()
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	err = cmd.ExecuteContext(ctx)
	return out.String(), errb.String(), err
}

// isolate keeps the host's docker config and credentials out of a test.
func isolate(t *testing.T) {
	t.Setenv("DOCKER_CONFIG", t.TempDir())
}

func push(t *testing.T, ref string, a remote.Taggable) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Push(r, a); err != nil {
		t.Fatal(err)
	}
}

func remoteImage(t *testing.T, ref string) v1.Image {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func tagExists(t *testing.T, ref string) bool {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	_, err = remote.Head(r)
	if err == nil {
		return true
	}
	var te *transport.Error
	if !errors.As(err, &te) || te.StatusCode != http.StatusNotFound {
		t.Fatalf("HEAD %s: %v", ref, err)
	}
	return false
}

func parseReport(t *testing.T, stdout string) *job.Report {
	t.Helper()
	var rep job.Report
	dec := json.NewDecoder(strings.NewReader(stdout))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&rep); err != nil {
		t.Fatalf("--json output: %v\n%s", err, stdout)
	}
	return &rep
}

// checkImage checks a converted image against the report: every layer is
// eStargz with the TOC digest annotation the report names, and the image is
// valid.
func checkImage(t *testing.T, img v1.Image, ir job.ImageReport) {
	t.Helper()
	if err := validateImage(img); err != nil {
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

func TestConvertRegistryToRegistry(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(1, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/lib/app:v1", reg.Host+"/lib/app:v1-estargz"
	push(t, src, img)

	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", src, dst)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	srcDigest, _ := img.Digest()
	if rep.SourceDigest != srcDigest.String() || rep.Format != "estargz" || len(rep.Images) != 1 {
		t.Fatalf("report: %+v", rep)
	}
	out := remoteImage(t, dst)
	checkImage(t, out, rep.Images[0])
	if d, _ := out.Digest(); d.String() != rep.Digest {
		t.Errorf("registry holds %s, report says %s", d, rep.Digest)
	}
	tot := rep.Totals
	if tot.Images != 1 || tot.Layers != 2 || tot.SourceBytes <= 0 || tot.OutputBytes <= 0 || tot.SourceUncompressedSize <= 0 {
		t.Errorf("totals: %+v", tot)
	}
	// Every layer opens lazily over range requests and passes VerifyTOC.
	client, err := imageio.New()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := verifyDemo(ctx, client, reg.Host, dst, rep); err != nil {
		t.Fatal(err)
	}
	// Not a terminal: one plain line per layer, and a summary.
	for _, l := range rep.Images[0].Layers {
		if !strings.Contains(stderr, "layer "+shortDigest(l.SourceDigest)+" converted: ") {
			t.Errorf("no log line for layer %s:\n%s", l.SourceDigest, stderr)
		}
	}
	if !strings.Contains(stderr, "converted "+src+" -> "+dst+"@sha256:") || strings.Contains(stderr, "\x1b[") {
		t.Errorf("stderr:\n%s", stderr)
	}

	// Converting the output again reuses every layer.
	stdout, stderr, err = runCLI(ctx, t, "convert", "--json", dst, reg.Host+"/lib/app:again")
	if err != nil {
		t.Fatalf("reconvert: %v\n%s", err, stderr)
	}
	rep2 := parseReport(t, stdout)
	if rep2.Totals.Reused != 2 {
		t.Errorf("reconverting: %d of 2 layers reused", rep2.Totals.Reused)
	}
	for i, l := range rep2.Images[0].Layers {
		if l.Digest != rep.Images[0].Layers[i].Digest || !l.Reused {
			t.Errorf("layer %d rebuilt: %+v", i, l)
		}
	}
}

func TestConvertZstdChunked(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(2, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/z/app:v1", reg.Host+"/z/app:zstd"
	push(t, src, img)
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", "--format", "zstd-chunked", "--compression-level", "5", "--jobs", "1", src, dst)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	checkImage(t, remoteImage(t, dst), rep.Images[0])
	for _, l := range rep.Images[0].Layers {
		if !strings.Contains(l.MediaType, "zstd") {
			t.Errorf("layer %s: media type %s", l.Digest, l.MediaType)
		}
	}
	client, err := imageio.New()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := verifyDemo(ctx, client, reg.Host, dst, rep); err != nil {
		t.Fatal(err)
	}
}

func TestConvertRegistryToLayoutAndBack(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(3, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/lib/app:v1"
	push(t, src, img)

	// registry -> oci: (relative path, fresh directory)
	t.Chdir(t.TempDir())
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", src, "oci:out/layout:conv")
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
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

	// oci: (no tag, the only manifest) -> registry; layers already eStargz
	// are reused.
	dst := reg.Host + "/lib/app:from-layout"
	stdout, stderr, err = runCLI(ctx, t, "convert", "--json", "oci:out/layout", dst)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep2 := parseReport(t, stdout)
	checkImage(t, remoteImage(t, dst), rep2.Images[0])
	if rep2.Totals.Reused != rep2.Totals.Layers {
		t.Errorf("%d of %d layers reused", rep2.Totals.Reused, rep2.Totals.Layers)
	}
	// --force rebuilds them, with the same result.
	stdout, stderr, err = runCLI(ctx, t, "convert", "--json", "--force", "oci:out/layout:conv", dst+"-forced")
	if err != nil {
		t.Fatalf("convert --force: %v\n%s", err, stderr)
	}
	if rep3 := parseReport(t, stdout); rep3.Totals.Reused != 0 {
		t.Errorf("--force: %d layers reused", rep3.Totals.Reused)
	}
}

func TestConvertIndexPlatforms(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	idx, err := testimage.SeedIndex(4, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/multi/app:v1"
	push(t, src, idx)

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

	// All platforms.
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", src, reg.Host+"/multi/app:all")
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	all := index(reg.Host + "/multi/app:all")
	im, _ := all.IndexManifest()
	if len(im.Manifests) != 2 || len(rep.Images) != 2 || rep.Totals.Images != 2 {
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

	// One platform (comma list and repeated flags both parse).
	for _, args := range [][]string{
		{"--platform", "linux/arm64/v8"},
		{"--platform", "linux/arm64/v8,linux/s390x"},
		{"--platform", "linux/s390x", "--platform", "linux/arm64/v8"},
	} {
		dst := reg.Host + "/multi/app:arm64"
		stdout, stderr, err := runCLI(ctx, t, append(append([]string{"convert", "--json"}, args...), src, dst)...)
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr)
		}
		rep := parseReport(t, stdout)
		ii := index(dst)
		im, _ := ii.IndexManifest()
		if len(im.Manifests) != 1 || im.Manifests[0].Platform == nil || im.Manifests[0].Platform.Architecture != "arm64" {
			t.Fatalf("%v: manifests %+v", args, im.Manifests)
		}
		if len(rep.Images) != 1 || rep.Images[0].Platform != "linux/arm64/v8" || len(rep.Skipped) != 1 {
			t.Fatalf("%v: report images %+v skipped %+v", args, rep.Images, rep.Skipped)
		}
		img, err := ii.Image(im.Manifests[0].Digest)
		if err != nil {
			t.Fatal(err)
		}
		checkImage(t, img, rep.Images[0])
	}

	// No platform matches: an error, and nothing written.
	_, _, err = runCLI(ctx, t, "convert", "--platform", "windows/amd64", src, reg.Host+"/multi/app:none")
	if err == nil || !strings.Contains(err.Error(), src) {
		t.Fatalf("no matching platform: %v", err)
	}
	if tagExists(t, reg.Host+"/multi/app:none") {
		t.Fatal("tag written for an empty selection")
	}
}

func TestConvertCorruptBlobLeavesDestination(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(5, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/bad/app:v1"
	push(t, src, img)
	layers, _ := img.Layers()
	bad, _ := layers[1].Digest()

	// Registry source with a blob whose bytes do not match its digest.
	reg.Corrupt(bad)
	dst := reg.Host + "/bad/app:out"
	_, _, err = runCLI(ctx, t, "convert", src, dst)
	if err == nil {
		t.Fatal("converting a corrupt blob succeeded")
	}
	t.Logf("corrupt blob: %v", err)
	if !strings.Contains(err.Error(), src) || !strings.Contains(err.Error(), bad.String()) {
		t.Errorf("error names neither image nor layer: %v", err)
	}
	if tagExists(t, dst) {
		t.Fatal("destination tag written after a failed conversion")
	}
	reg.Corrupt(v1.Hash{})

	// A destination layout keeps its index.json.
	dir := t.TempDir()
	if _, _, err := runCLI(ctx, t, "convert", src, "oci:"+dir+":v1"); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		t.Fatal(err)
	}
	reg.Corrupt(bad)
	if _, _, err := runCLI(ctx, t, "convert", "--force", src, "oci:"+dir+":v1"); err == nil {
		t.Fatal("converting a corrupt blob into a layout succeeded")
	}
	after, _ := os.ReadFile(filepath.Join(dir, "index.json"))
	if !bytes.Equal(before, after) {
		t.Fatalf("index.json changed:\n%s\n%s", before, after)
	}
	reg.Corrupt(v1.Hash{})

	// A layout source whose blob was altered on disk.
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
	_, _, err = runCLI(ctx, t, "convert", "oci:"+srcDir, dst)
	if err == nil || !strings.Contains(err.Error(), "oci:"+srcDir) || !strings.Contains(err.Error(), bad.String()) {
		t.Errorf("corrupt layout blob: %v", err)
	}
	if tagExists(t, dst) {
		t.Fatal("destination tag written after a failed conversion")
	}
}

func TestConvertCancelLeavesDestination(t *testing.T) {
	isolate(t)
	img, err := testimage.SeedImage(6, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	// when says at which request the conversion is interrupted: while it
	// reads source blobs, or while it uploads converted ones.
	for _, when := range []string{"reading", "uploading"} {
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
					upload := r.Method != http.MethodGet && r.Method != http.MethodHead && strings.Contains(r.URL.Path, "/blobs/uploads")
					if (when == "reading" && read) || (when == "uploading" && upload) {
						once.Do(cancel)
					}
				default:
				}
				inner.ServeHTTP(w, r)
			}))
			defer srv.Close()
			host := strings.TrimPrefix(srv.URL, "http://")
			src, dst := host+"/c/app:v1", host+"/c/app:out"
			push(t, src, img)
			close(armed)
			_, stderr, err := runCLI(ctx, t, "convert", src, dst)
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("interrupted conversion: %v", err)
			}
			if uploaded := strings.Contains(stderr, "writing "+dst); uploaded != (when == "uploading") {
				t.Errorf("interrupted %s, but the upload started = %v:\n%s", when, uploaded, stderr)
			}
			if tagExists(t, dst) {
				t.Fatal("destination tag written after an interrupted conversion")
			}
		})
	}
}

func TestConvertRegistryErrors(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	img, err := testimage.SeedImage(7, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}

	// 404: no such image.
	reg := testimage.NewRegistry(t)
	_, _, err = runCLI(ctx, t, "convert", reg.Host+"/none/app:v1", reg.Host+"/none/app:out")
	t.Logf("404: %v", err)
	if err == nil || !strings.Contains(err.Error(), "reading "+reg.Host+"/none/app:v1: not found: ") || !errors.Is(err, imageio.ErrNotFound) {
		t.Errorf("404: %v", err)
	}

	// A layer blob answering 404 and 500: the error names image and layer.
	src := reg.Host + "/lib/app:v1"
	push(t, src, img)
	layers, _ := img.Layers()
	dgst, _ := layers[0].Digest()
	for status, kind := range map[int]error{http.StatusNotFound: imageio.ErrNotFound, http.StatusInternalServerError: imageio.ErrServer} {
		reg.Fail(dgst, status)
		_, _, err = runCLI(ctx, t, "convert", src, reg.Host+"/lib/app:out")
		t.Logf("blob %d: %v", status, err)
		if err == nil || !strings.Contains(err.Error(), src) || !strings.Contains(err.Error(), dgst.String()) || !strings.Contains(err.Error(), kind.Error()) || !errors.Is(err, kind) {
			t.Errorf("blob %d: %v, want errors.Is %q", status, err, kind)
		}
		reg.Fail(dgst, 0)
	}

	// 500 on everything.
	srv500 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "boom", http.StatusInternalServerError)
	}))
	defer srv500.Close()
	h500 := strings.TrimPrefix(srv500.URL, "http://")
	_, _, err = runCLI(ctx, t, "convert", h500+"/x/app:v1", h500+"/x/app:out")
	t.Logf("500: %v", err)
	if err == nil || !strings.Contains(err.Error(), "reading "+h500+"/x/app:v1: registry error: ") {
		t.Errorf("500: %v", err)
	}

	// 401: a registry that wants credentials; then with them in the docker
	// config.
	const user, pass = "builder", "pa55-w0rd-x"
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srvAuth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="lazybase-test"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
		inner.ServeHTTP(w, r)
	}))
	defer srvAuth.Close()
	hAuth := strings.TrimPrefix(srvAuth.URL, "http://")
	_, _, err = runCLI(ctx, t, "convert", hAuth+"/p/app:v1", hAuth+"/p/app:out")
	t.Logf("401: %v", err)
	if err == nil || !strings.Contains(err.Error(), "reading "+hAuth+"/p/app:v1: unauthorized: ") {
		t.Errorf("401: %v", err)
	}
	cfg := t.TempDir()
	t.Setenv("DOCKER_CONFIG", cfg)
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(filepath.Join(cfg, "config.json"), []byte(`{"auths":{"`+hAuth+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	// Push with the same credentials, then convert.
	srcRef, _ := name.ParseReference(hAuth + "/p/app:v1")
	if err := remote.Push(srcRef, img, remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCLI(ctx, t, "convert", "--log-level", "debug", "--json", hAuth+"/p/app:v1", hAuth+"/p/app:out")
	if err != nil {
		t.Fatalf("with credentials: %v\n%s", err, stderr)
	}
	if strings.Contains(stdout+stderr, pass) || strings.Contains(stdout+stderr, auth) {
		t.Fatal("credentials in the output")
	}
	parseReport(t, stdout)
}

func TestConvertBadFlags(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"convert", "--format", "lz4", "oci:a", "oci:b"}, "--format"},
		{[]string{"convert", "--platform", "linux", "oci:a", "oci:b"}, "--platform"},
		{[]string{"convert", "--compression-level", "0", "oci:a", "oci:b"}, "--compression-level"},
		{[]string{"convert", "--compression-level", "12", "oci:a", "oci:b"}, "level"},
		{[]string{"convert", "oci:a"}, "accepts 2 arg"},
		{[]string{"convert", "oci:" + t.TempDir(), "oci:b"}, "not an OCI image layout"},
		{[]string{"convert", "oci:a", "127.0.0.1:1/lib/../etc:v1"}, `".." path component`},
		{[]string{"convert", "127.0.0.1:1/lib//x:v1", "oci:b"}, "empty path component"},
	} {
		_, _, err := runCLI(ctx, t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}

func TestConvertPrefetchAndPlatformOfImage(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(8, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/pf/app:v1", reg.Host+"/pf/app:out"
	push(t, src, img)
	list := filepath.Join(t.TempDir(), "prefetch.json")
	if err := os.WriteFile(list, []byte(`{"version":1,"files":["etc/hostname"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", "--prefetch", list, "--platform", "linux/amd64", src, dst)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	if got := rep.Images[0].Layers[1].PrefetchFiles; got != 1 {
		t.Errorf("second layer: %d prefetched files, want 1", got)
	}
	client, err := imageio.New()
	if err != nil {
		t.Fatal(err)
	}
	v, err := verifyDemo(ctx, client, reg.Host, dst, rep)
	if err != nil {
		t.Fatal(err)
	}
	if v.layers[1].landmark != "prefetch landmark" {
		t.Errorf("second layer: %s", v.layers[1].landmark)
	}

	// A single image of another platform than asked for.
	_, _, err = runCLI(ctx, t, "convert", "--platform", "linux/arm64", src, reg.Host+"/pf/app:arm")
	if err == nil || !strings.Contains(err.Error(), "linux/amd64") || !strings.Contains(err.Error(), src) {
		t.Errorf("platform mismatch: %v", err)
	}
	if tagExists(t, reg.Host+"/pf/app:arm") {
		t.Error("tag written for a platform mismatch")
	}
	// A digest is no destination, and that is found before converting.
	d, _ := img.Digest()
	_, stderr, err = runCLI(ctx, t, "convert", src, reg.Host+"/pf/app@"+d.String())
	if err == nil || !strings.Contains(err.Error(), "must be a tag") || strings.Contains(stderr, "layer ") {
		t.Errorf("digest destination: %v\n%s", err, stderr)
	}
	// A missing prefetch list.
	_, _, err = runCLI(ctx, t, "convert", "--prefetch", list+".missing", src, dst)
	if err == nil || !strings.Contains(err.Error(), "--prefetch") {
		t.Errorf("missing prefetch list: %v", err)
	}
}

func TestConvertTLS(t *testing.T) {
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
	// The test server's certificate is self-signed: verification fails.
	_, _, err = runCLI(ctx, t, "convert", src, dst)
	t.Logf("no --insecure: %v", err)
	if err == nil || !strings.Contains(err.Error(), "TLS certificate verification failed: ") {
		t.Fatalf("self-signed certificate accepted: %v", err)
	}
	stdout, stderr, err := runCLI(ctx, t, "convert", "--insecure", "--json", src, dst)
	if err != nil {
		t.Fatalf("--insecure: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	dr, _ := name.ParseReference(dst)
	out, err := remote.Image(dr, remote.WithTransport(srv.Client().Transport))
	if err != nil {
		t.Fatal(err)
	}
	checkImage(t, out, rep.Images[0])
}

func TestConvertTerminalDisplay(t *testing.T) {
	isolate(t)
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(10, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/tty/app:v1"
	push(t, src, img)
	var stderr bytes.Buffer
	rep, err := runConvert(context.Background(), &stderr, src, "oci:"+t.TempDir()+":v1", convertOptions{format: "estargz", terminal: 1})
	if err != nil {
		t.Fatal(err)
	}
	s := stderr.String()
	// Finished layers are permanent lines; the live block is erased at the
	// end, before the summary.
	for _, l := range rep.Images[0].Layers {
		if !strings.Contains(s, "\x1b[Jlayer "+shortDigest(l.SourceDigest)+" converted: ") && !strings.HasPrefix(s, "layer "+shortDigest(l.SourceDigest)) {
			t.Errorf("no permanent line for %s in %q", l.SourceDigest, s)
		}
	}
	lines := strings.Split(strings.TrimSuffix(s, "\n"), "\n")
	last := lines[len(lines)-1]
	if i := strings.LastIndex(last, "\x1b[J"); i >= 0 {
		last = last[i+len("\x1b[J"):]
	}
	if !strings.Contains(s, "writing oci:") || !strings.HasPrefix(last, "converted "+src+" -> oci:") {
		t.Errorf("stderr %q", s)
	}
}

func TestConvertProfileAppliesOnlyToItsImage(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(9, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/pf/prof:v1"
	push(t, src, img)
	layers, _ := img.Layers()
	second, _ := layers[1].Digest()
	profile := func(imageDigest string) string {
		p := prefetch.Profile{
			Version: prefetch.ProfileVersion,
			Kind:    prefetch.ProfileKind,
			Digest:  imageDigest,
			Layers: []prefetch.Layer{{Digest: second.String(), Runs: 1, Files: []prefetch.File{
				{Path: "etc/hostname", Size: 1, Count: 1, RankSum: 0},
			}}},
		}
		b, err := json.Marshal(p)
		if err != nil {
			t.Fatal(err)
		}
		f := filepath.Join(t.TempDir(), "profile.json")
		if err := os.WriteFile(f, b, 0o644); err != nil {
			t.Fatal(err)
		}
		return f
	}
	d, _ := img.Digest()
	for _, tc := range []struct {
		name, digest string
		want         int
	}{
		{"this image", d.String(), 1},
		{"another image", "sha256:" + strings.Repeat("ab", 32), 0},
	} {
		stdout, stderr, err := runCLI(ctx, t, "convert", "--json", "--prefetch", profile(tc.digest), src, reg.Host+"/pf/prof:out")
		if err != nil {
			t.Fatalf("%s: convert: %v\n%s", tc.name, err, stderr)
		}
		rep := parseReport(t, stdout)
		if got := rep.Images[0].Layers[1].PrefetchFiles; got != tc.want {
			t.Errorf("%s: %d prefetched files, want %d", tc.name, got, tc.want)
		}
		if warned := strings.Contains(stderr, "another image"); warned != (tc.want == 0) {
			t.Errorf("%s: warning about another image: %v\n%s", tc.name, warned, stderr)
		}
	}
}

// TestConvertRefusesOwnSource converts an image onto the name it was read
// by: refused without --force (the source keeps its tag), done with it.
func TestConvertRefusesOwnSource(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(41, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	srcDigest, _ := img.Digest()
	push(t, reg.Host+"/lib/self:v1", img)
	push(t, reg.Host+"/lib/self:latest", img)
	t.Chdir(t.TempDir())
	if _, stderr, err := runCLI(ctx, t, "convert", reg.Host+"/lib/self:v1", "oci:lay:v1"); err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	if err := os.MkdirAll("single", 0o755); err != nil {
		t.Fatal(err)
	}
	if _, stderr, err := runCLI(ctx, t, "convert", reg.Host+"/lib/self:v1", "oci:single:only"); err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	layoutIndex := func(dir string) string {
		b, err := os.ReadFile(filepath.Join(dir, "index.json"))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	for _, tc := range []struct {
		name     string
		src, dst string
		check    func(t *testing.T)
	}{
		{"registry-same-tag", reg.Host + "/lib/self:v1", reg.Host + "/lib/self:v1", nil},
		{"registry-implicit-latest", reg.Host + "/lib/self", reg.Host + "/lib/self:latest", nil},
		{"layout-same-tag", "oci:lay:v1", "oci:lay:v1", nil},
		{"layout-other-spelling", "oci:lay:v1", "oci:./sub/../lay:v1", nil},
		{"layout-untagged-source-resolved", "oci:single", "oci:single:only", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.MkdirAll("sub", 0o755)
			beforeLay, beforeSingle := layoutIndex("lay"), layoutIndex("single")
			_, _, err := runCLI(ctx, t, "convert", tc.src, tc.dst)
			if err == nil || !strings.Contains(err.Error(), "is the source") || !strings.Contains(err.Error(), "--force") {
				t.Fatalf("convert %s %s: %v, want a refusal naming --force", tc.src, tc.dst, err)
			}
			if d, _ := remoteImage(t, reg.Host+"/lib/self:v1").Digest(); d != srcDigest {
				t.Errorf("source tag moved to %s", d)
			}
			if layoutIndex("lay") != beforeLay || layoutIndex("single") != beforeSingle {
				t.Errorf("a layout's index.json changed")
			}
		})
	}
	// --force overwrites the source: the tag moves to the converted image.
	stdout, stderr, err := runCLI(ctx, t, "convert", "--force", "--json", reg.Host+"/lib/self:v1", reg.Host+"/lib/self:v1")
	if err != nil {
		t.Fatalf("convert --force X X: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	if d, _ := remoteImage(t, reg.Host+"/lib/self:v1").Digest(); d.String() != rep.Digest || d == srcDigest {
		t.Errorf("after --force the tag names %s, report says %s (source %s)", d, rep.Digest, srcDigest)
	}
	// Another tag of the same repository is not the source.
	if _, stderr, err := runCLI(ctx, t, "convert", reg.Host+"/lib/self:latest", reg.Host+"/lib/self:esgz"); err != nil {
		t.Fatalf("convert to another tag: %v\n%s", err, stderr)
	}
}

// TestConvertTamperedLayoutConfig converts a layout whose config blob was
// changed after it was written: the conversion fails naming the config.
func TestConvertTamperedLayoutConfig(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	img, err := testimage.SeedImage(42, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{imageio.AnnotationRefName: "v1"})); err != nil {
		t.Fatal(err)
	}
	cfg, _ := img.ConfigName()
	cp := filepath.Join(dir, "blobs", "sha256", cfg.Hex)
	b, err := os.ReadFile(cp)
	if err != nil {
		t.Fatal(err)
	}
	b = bytes.Replace(b, []byte(`"amd64"`), []byte(`"arm64"`), 1)
	if err := os.WriteFile(cp, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	_, _, err = runCLI(ctx, t, "convert", "oci:"+dir+":v1", "oci:"+out+":v1")
	if err == nil || !strings.Contains(err.Error(), cfg.String()) || !strings.Contains(err.Error(), "digest mismatch") {
		t.Fatalf("converting a tampered config: %v, want a digest mismatch naming %s", err, cfg)
	}
	if _, err := os.Stat(filepath.Join(out, "index.json")); err == nil {
		t.Errorf("destination written from a tampered source")
	}
}

// TestConvertTamperedRegistryConfig converts from a registry that serves
// other bytes for the config blob: the conversion fails naming the source
// and the config, and the destination is not written.
func TestConvertTamperedRegistryConfig(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(43, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/lib/tampered:v1"
	push(t, src, img)
	cfg, _ := img.ConfigName()
	reg.Corrupt(cfg)
	dst := reg.Host + "/lib/tampered:esgz"
	_, _, err = runCLI(ctx, t, "convert", src, dst)
	if err == nil || !strings.Contains(err.Error(), cfg.String()) || !strings.Contains(err.Error(), src) {
		t.Fatalf("converting with a tampered config: %v, want an error naming %s and %s", err, src, cfg)
	}
	reg.Corrupt(v1.Hash{})
	if tagExists(t, dst) {
		t.Error("destination written from a tampered source")
	}
}

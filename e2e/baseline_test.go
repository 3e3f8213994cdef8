//go:build e2e

package e2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
)

// TestContainerdPullRun is the full-pull baseline: containerd pulls and
// unpacks the gzip golang-like image, then `ctr run` runs `go version` in it.
func TestContainerdPullRun(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t)
	_, golang := publishAll(ctx, t, s)
	ref := s.Registry.Ref(repoGolang, tagGzip)

	mark := s.Registry.Proxy.Mark()
	start := time.Now()
	if err := s.Containerd.Pull(ctx, ref, ""); err != nil {
		t.Fatal(err)
	}
	record(t, "containerd-full-pull", time.Since(start))

	// Every layer came through the proxy whole, exactly once.
	st := s.Registry.Proxy.Since(mark)
	sizes := layerSizes(t, golang.gzip)
	for _, d := range layerDigests(t, golang.gzip) {
		b := st.Blob(d)
		if b.GETs != 1 || b.Bytes != sizes[d] || b.Repeated() != 0 {
			t.Errorf("layer %s: %d GETs, %d bytes (%d repeated), want one GET of %d bytes", d, b.GETs, b.Bytes, b.Repeated(), sizes[d])
		}
	}
	content, err := s.Containerd.ContentDigests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range layerDigests(t, golang.gzip) {
		if !content[d] {
			t.Errorf("layer %s missing from the content store after a full pull", d)
		}
	}

	start = time.Now()
	out, err := s.Containerd.Run(ctx, ref, "", "gover", "go", "version")
	if err != nil {
		t.Fatal(err)
	}
	record(t, "ctr-run-go-version", time.Since(start))
	if !strings.HasPrefix(strings.TrimSpace(out), "go version go1.") {
		t.Errorf("go version printed %q", out)
	}
	if n := s.Registry.Proxy.Since(mark).BlobBytes(); n != st.BlobBytes() {
		t.Errorf("running fetched %d more blob bytes", n-st.BlobBytes())
	}
}

const helloMain = `package main

import "fmt"

func main() { fmt.Println("hello from the lazybase e2e build") }
`

// multiStageContext writes the build context of the multi-stage build the
// e2e tests run into a new temporary directory and returns it: a builder
// stage FROM the golang-like image compiles helloMain, and the final stage
// FROM the debian-like image copies the program; both images with tag.
func multiStageContext(t *testing.T, s *harness.Stack, tag string) string {
	t.Helper()
	dir := t.TempDir()
	dockerfile := "FROM " + s.Registry.Ref(repoGolang, tag) + ` AS build
ENV CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-buildvcs=false GOCACHE=/tmp/gocache
WORKDIR /src
COPY main.go .
RUN go build -o /out/hello main.go

FROM ` + s.Registry.Ref(repoDebian, tag) + `
COPY --from=build /out/hello /usr/local/bin/hello
CMD ["/usr/local/bin/hello"]
`
	for name, body := range map[string]string{"Dockerfile": dockerfile, "main.go": helloMain} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestBuildkitMultiStage is the build baseline: buildkitd (containerd
// worker) builds a program in a stage FROM the gzip golang-like image, copies
// it onto the gzip debian-like image, and pushes the result; containerd then
// pulls and runs it.
func TestBuildkitMultiStage(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	s := harness.Start(ctx, t, harness.WithBuildkit())
	debian, golang := publishAll(ctx, t, s)

	dir := multiStageContext(t, s, tagGzip)
	out := s.Registry.DirectRef("e2e/hello", "latest")
	mark := s.Registry.Proxy.Mark()
	start := time.Now()
	if _, err := s.Buildkit.Buildctl(ctx, "build",
		"--frontend", "dockerfile.v0",
		"--local", "context="+dir, "--local", "dockerfile="+dir,
		"--output", "type=image,name="+out+",push=true,registry.insecure=true",
	); err != nil {
		t.Fatal(err)
	}
	record(t, "buildkit-multistage-build-push", time.Since(start))

	// Each base layer was fetched whole, once: the debian layer is shared
	// by both bases.
	st := s.Registry.Proxy.Since(mark)
	sizes := layerSizes(t, golang.gzip)
	for d, size := range layerSizes(t, debian.gzip) {
		sizes[d] = size
	}
	for d, size := range sizes {
		b := st.Blob(d)
		if b.GETs != 1 || b.Bytes != size {
			t.Errorf("base layer %s: %d GETs, %d bytes, want one GET of %d bytes", d, b.GETs, b.Bytes, size)
		}
	}

	// The pushed image is the debian layer plus one layer with the program.
	ref, err := name.ParseReference(out)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref, remote.WithContext(ctx))
	if err != nil {
		t.Fatal(err)
	}
	got := layerDigests(t, img)
	want := layerDigests(t, debian.gzip)
	if len(got) != len(want)+1 || got[0] != want[0] {
		t.Errorf("pushed layers %v, want %v plus one", got, want)
	}

	start = time.Now()
	if err := s.Containerd.Pull(ctx, s.Registry.Ref("e2e/hello", "latest"), ""); err != nil {
		t.Fatal(err)
	}
	res, err := s.Containerd.Run(ctx, s.Registry.Ref("e2e/hello", "latest"), "", "hello")
	if err != nil {
		t.Fatal(err)
	}
	record(t, "pull-run-built-image", time.Since(start))
	if strings.TrimSpace(res) != "hello from the lazybase e2e build" {
		t.Errorf("built program printed %q", res)
	}
}

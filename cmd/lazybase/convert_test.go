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
	"sort"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/testimage"
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

// TestConvertJSONReportAndSummary runs the verb with --json: stdout is the
// job's report with exactly the documented field names, stderr one line per
// layer and a summary, with no terminal escapes.
func TestConvertJSONReportAndSummary(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(1, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src, dst := reg.Host+"/lib/app:v1", reg.Host+"/lib/app:v1-estargz"
	testimage.PushRef(t, src, img)
	stdout, stderr, err := runCLI(ctx, t, "convert", "--json", src, dst)
	if err != nil {
		t.Fatalf("convert: %v\n%s", err, stderr)
	}
	rep := parseReport(t, stdout)
	if d, _ := testimage.RemoteImage(t, dst).Digest(); d.String() != rep.Digest || rep.Source != src || rep.Destination != dst {
		t.Errorf("registry holds %s, report %+v", d, rep)
	}
	// The schema: field names and nesting as documented in the README.
	var raw map[string]any
	if err := json.Unmarshal([]byte(stdout), &raw); err != nil {
		t.Fatal(err)
	}
	keys := func(m any) string {
		var ks []string
		for k := range m.(map[string]any) {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		return strings.Join(ks, " ")
	}
	image := raw["images"].([]any)[0]
	layer := image.(map[string]any)["layers"].([]any)[0]
	for what, c := range map[string]struct {
		v    any
		want string
	}{
		"report": {raw, "destination digest format images mediaType source sourceDigest totals"},
		"image":  {image, "digest layers platform sourceDigest"},
		"layer": {layer, "digest mediaType prefetchFiles reused seconds size sourceDigest sourceMediaType sourceSize " +
			"sourceUncompressedSize tocDigest uncompressedSize"},
		"totals": {raw["totals"], "convertSeconds images layers mbPerSecond outputBytes reused seconds sourceBytes " +
			"sourceUncompressedBytes writeSeconds"},
	} {
		if got := keys(c.v); got != c.want {
			t.Errorf("%s fields: %s, want %s", what, got, c.want)
		}
	}
	for _, l := range rep.Images[0].Layers {
		if !strings.Contains(stderr, "layer "+shortDigest(l.SourceDigest)+" converted: ") {
			t.Errorf("no log line for layer %s:\n%s", l.SourceDigest, stderr)
		}
	}
	if !strings.Contains(stderr, "converted "+src+" -> "+dst+"@"+shortDigest(rep.Digest)+": 1 image(s), 2 layer(s)") || strings.Contains(stderr, "\x1b[") {
		t.Errorf("stderr:\n%s", stderr)
	}
}

// TestConvertFlagsReachTheJob checks that each flag sets what it names:
// --format, --compression-level and --jobs; --platform in its comma and
// repeated forms; --prefetch; --force.
func TestConvertFlagsReachTheJob(t *testing.T) {
	isolate(t)
	ctx := context.Background()
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(2, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/f/app:v1"
	testimage.PushRef(t, src, img)
	idx, err := testimage.SeedIndex(4, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	multi := reg.Host + "/f/multi:v1"
	testimage.PushRef(t, multi, idx)
	list := filepath.Join(t.TempDir(), "prefetch.json")
	if err := os.WriteFile(list, []byte(`{"version":1,"files":["etc/hostname"]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	convertJSON := func(args ...string) *job.Report {
		t.Helper()
		stdout, stderr, err := runCLI(ctx, t, append([]string{"convert", "--json"}, args...)...)
		if err != nil {
			t.Fatalf("%v: %v\n%s", args, err, stderr)
		}
		return parseReport(t, stdout)
	}
	rep := convertJSON("--format", "zstd-chunked", "--compression-level", "5", "--jobs", "1", src, reg.Host+"/f/app:zstd")
	m, _ := testimage.RemoteImage(t, reg.Host+"/f/app:zstd").Manifest()
	if rep.Format != "zstd-chunked" || !strings.Contains(rep.Images[0].Layers[0].MediaType, "zstd") ||
		m.Annotations[convert.AnnotationFormat] != convert.FormatAnnotation(convert.FormatZstdChunked, 5, 0) {
		t.Errorf("zstd-chunked at level 5: report %+v, annotations %v", rep, m.Annotations)
	}
	for _, args := range [][]string{
		{"--platform", "linux/arm64/v8"},
		{"--platform", "linux/arm64/v8,linux/s390x"},
		{"--platform", "linux/s390x", "--platform", "linux/arm64/v8"},
	} {
		rep := convertJSON(append(args, multi, reg.Host+"/f/multi:arm64")...)
		if len(rep.Images) != 1 || rep.Images[0].Platform != "linux/arm64/v8" || len(rep.Skipped) != 1 {
			t.Errorf("%v: images %+v, skipped %+v", args, rep.Images, rep.Skipped)
		}
	}
	if rep := convertJSON("--prefetch", list, src, reg.Host+"/f/app:pf"); rep.Images[0].Layers[1].PrefetchFiles != 1 {
		t.Errorf("--prefetch: %+v", rep.Images[0].Layers[1])
	}
	if rep := convertJSON("--force", reg.Host+"/f/app:pf", reg.Host+"/f/app:pf"); rep.Totals.Reused != 0 {
		t.Errorf("--force onto the source: %d layers reused", rep.Totals.Reused)
	}
}

// TestConvertRefusalNamesForce converts an image onto its own tag without
// --force: the error says how to do it.
func TestConvertRefusalNamesForce(t *testing.T) {
	isolate(t)
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(41, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	testimage.PushRef(t, reg.Host+"/lib/self:v1", img)
	_, _, err = runCLI(context.Background(), t, "convert", reg.Host+"/lib/self:v1", reg.Host+"/lib/self:v1")
	if !errors.Is(err, job.ErrOverwritesSource) || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("converting onto the source: %v, want a refusal naming --force", err)
	}
}

// TestConvertNeverPrintsCredentials converts from a registry that wants
// credentials, found in the docker config, at debug log level: neither the
// password nor the basic auth string appears on stdout or stderr.
func TestConvertNeverPrintsCredentials(t *testing.T) {
	isolate(t)
	img, err := testimage.SeedImage(7, testimage.LinuxAMD64, testimage.WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	const user, pass = "builder", "pa55-w0rd-x"
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if u, p, ok := r.BasicAuth(); !ok || u != user || p != pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="lazybase-test"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		inner.ServeHTTP(w, r)
	}))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")
	cfg := t.TempDir()
	t.Setenv("DOCKER_CONFIG", cfg)
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(filepath.Join(cfg, "config.json"), []byte(`{"auths":{"`+host+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	srcRef, _ := name.ParseReference(host + "/p/app:v1")
	if err := remote.Push(srcRef, img, remote.WithAuth(&authn.Basic{Username: user, Password: pass})); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := runCLI(context.Background(), t, "convert", "--log-level", "debug", "--json", host+"/p/app:v1", host+"/p/app:out")
	if err != nil {
		t.Fatalf("with credentials: %v\n%s", err, stderr)
	}
	if strings.Contains(stdout+stderr, pass) || strings.Contains(stdout+stderr, auth) {
		t.Fatal("credentials in the output")
	}
	parseReport(t, stdout)
}

// TestConvertBadFlags checks that bad flags and arguments are refused,
// naming the flag or the reference at fault.
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
		{[]string{"convert", "--jobs", "-1", "oci:a", "oci:b"}, "--jobs"},
		{[]string{"convert", "--prefetch", filepath.Join(t.TempDir(), "absent.json"), "oci:a", "oci:b"}, "--prefetch"},
	} {
		_, _, err := runCLI(ctx, t, tc.args...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v, want %q", tc.args, err, tc.want)
		}
	}
}

// TestConvertTerminalDisplay draws the live display on a terminal:
// finished layers stay as permanent lines, the live block is erased before
// the summary.
func TestConvertTerminalDisplay(t *testing.T) {
	isolate(t)
	reg := testimage.NewRegistry(t)
	img, err := testimage.SeedImage(10, testimage.LinuxAMD64)
	if err != nil {
		t.Fatal(err)
	}
	src := reg.Host + "/tty/app:v1"
	testimage.PushRef(t, src, img)
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

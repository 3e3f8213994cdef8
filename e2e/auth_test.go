//go:build e2e

package e2e

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/exportguard"
	"github.com/lazybase/lazybase/internal/eventually"
)

// authHelperName is the credential helper the auth test writes:
// docker-credential-lzbe2e.
const authHelperName = "lzbe2e"

// TestAuthRegistry runs lazybase against a registry that requires
// credentials. Three scenarios: distribution's htpasswd auth with the
// credentials in a docker config.json (`auths`; the daemon's
// auth.docker_config); htpasswd with a credential helper (the daemon's
// auth.credential_helpers; config.json's credHelpers for buildctl and the
// CLI); distribution's token auth (a token server in the test process)
// with a docker config.json. In each: buildkitd builds the multi-stage
// Dockerfile on the lazily mounted eStargz bases (FUSE mounts, the builder
// base fetched by ranges); containerd pulls the golang-like eStargz image
// lazily (ctr --user; no layer in the content store) and runs `go
// version` from it; the export guard materializes the final base and the
// push fetches 0 of its bytes; `lazybase convert` and `lazybase mirror`
// read from and write to the registry. Then, with a wrong password,
// convert, mirror and the daemon's barrier fail with an error naming the
// host. The daemon runs at log level trace (debug in the other two); no
// daemon log and no CLI output holds the password, the base64 of
// user:password, or an issued bearer token.
func TestAuthRegistry(t *testing.T) {
	for _, sc := range []struct {
		name     string
		logLevel string
		helper   bool
		token    bool
	}{
		{name: "docker-config", logLevel: "trace"},
		{name: "credential-helper", logLevel: "debug", helper: true},
		{name: "token-auth", logLevel: "debug", token: true},
	} {
		t.Run(sc.name, func(t *testing.T) {
			start := time.Now()
			testAuthRegistry(t, sc.logLevel, sc.helper, sc.token)
			record(t, "auth-"+sc.name, time.Since(start))
		})
	}
}

func testAuthRegistry(t *testing.T, logLevel string, helper, token bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	const user = "lazybase-e2e"
	password := randomSecret(t)
	secrets := []string{password, base64.StdEncoding.EncodeToString([]byte(user + ":" + password))}

	// cliConfig is DOCKER_CONFIG for buildctl and the lazybase CLI;
	// daemonConfig is the daemon's auth.docker_config (an empty one in the
	// helper scenario, where only auth.credential_helpers gives the
	// credentials); helperDir holds docker-credential-lzbe2e, first on
	// every PATH.
	cliConfig, daemonConfig, helperDir := t.TempDir(), t.TempDir(), t.TempDir()
	if !helper {
		daemonConfig = cliConfig
	}
	auth := harness.WithRegistryAuth(user, password)
	if token {
		auth = harness.WithRegistryTokenAuth(user, password)
	}
	s := harness.Start(ctx, t,
		auth,
		harness.WithEnv("DOCKER_CONFIG="+cliConfig, "PATH="+helperDir),
		harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithBuildkitLazy(),
		harness.WithLazybaseConfigFunc(func(r *harness.Registry) string {
			toml := fmt.Sprintf(`log_level = %q
[background_fetch]
enable = false
[auth]
docker_config = %q
`, logLevel, daemonConfig)
			if helper {
				toml += "[auth.credential_helpers]\n"
				for _, h := range r.Hosts() {
					toml += fmt.Sprintf("%q = %q\n", h, authHelperName)
				}
			}
			return toml + fmt.Sprintf(`[[policy]]
match = "*/%s:*"
mode = "export-base"
[[policy]]
match = "*/%s:*"
mode = "lazy-only"
`, repoDebian, repoGolang)
		}),
	)
	r := s.Registry
	writeCreds := func(pw string) {
		t.Helper()
		var err error
		if helper {
			if err = r.WriteCredentialHelper(helperDir, authHelperName, user, pw); err == nil {
				err = r.WriteCredHelperConfig(cliConfig, authHelperName)
			}
		} else {
			err = r.WriteDockerConfig(cliConfig, user, pw)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	writeCreds(password)

	// The registry really wants credentials.
	resp, err := http.Get("http://" + r.Host() + "/v2/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("anonymous GET /v2/ through the proxy: %s, want 401", resp.Status)
	}
	if challenge := resp.Header.Get("WWW-Authenticate"); token != strings.HasPrefix(challenge, "Bearer ") {
		t.Fatalf("registry challenge %q (token auth: %v)", challenge, token)
	}
	basic := remote.WithAuth(&authn.Basic{Username: user, Password: password})
	debian, golang := referenceImages(t)
	for _, p := range []struct {
		repo, tag string
		img       v1.Image
	}{{repoDebian, tagEStargz, debian.estargz}, {repoGolang, tagEStargz, golang.estargz}, {repoDebian, tagGzip, debian.gzip}} {
		ref, err := name.ParseReference(r.DirectRef(p.repo, p.tag))
		if err != nil {
			t.Fatal(err)
		}
		if err := remote.Write(ref, p.img, remote.WithContext(ctx), remote.WithJobs(4), basic); err != nil {
			t.Fatalf("publishing %s: %v", ref, err)
		}
	}

	var outputs []string // every CLI output, searched for secrets at the end
	work := multiStageContext(t, s, tagEStargz)
	common := []string{"build", "--frontend", "dockerfile.v0", "--local", "context=" + work, "--local", "dockerfile=" + work}
	p := r.Proxy
	p.SetPhase("build")
	begin := time.Now()
	stdout, stderr, err := s.Buildkit.BuildctlProgress(ctx, append(common, "--progress=plain")...)
	outputs = append(outputs, stdout, stderr)
	if err != nil {
		t.Fatalf("lazy build on the authenticated registry: %v\n%s", err, s.Logs(40))
	}
	record(t, "auth-build", time.Since(begin))
	mounts, err := s.Snapshotter.FUSEMounts()
	if err != nil {
		t.Fatal(err)
	}
	if len(mounts) == 0 {
		t.Errorf("no FUSE mount after the build: the bases were not mounted lazily")
	}
	debianLayers := layerDigests(t, debian.estargz)
	shared := map[string]bool{}
	for _, d := range debianLayers {
		shared[d] = true
	}
	build := p.StatsFor("build")
	lazyOnly := 0
	for d, size := range layerSizes(t, golang.estargz) {
		if shared[d] {
			continue
		}
		lazyOnly++
		b := build.Blob(d)
		t.Logf("builder base layer %s (%d bytes): %d bytes fetched in %d GETs (%d whole)", d, size, b.Covered(), b.GETs, b.FullGETs)
		if b.GETs == 0 {
			t.Errorf("builder base layer %s: not read from the registry at all", d)
		}
		if b.FullGETs != 0 || b.Covered()*2 >= size {
			t.Errorf("builder base layer %s: fetched whole or over half (%d of %d bytes): not a lazy pull", d, b.Covered(), size)
		}
	}
	if lazyOnly == 0 {
		t.Fatal("the golang-like image has no layer of its own")
	}

	// A plain containerd lazy pull (ctr passes the credentials to
	// containerd's transfer service; the daemon uses its own) and a
	// container running from it.
	p.SetPhase("pull")
	goRef := r.Ref(repoGolang, tagEStargz)
	redact := func(err error) string { return strings.ReplaceAll(err.Error(), password, "<password>") }
	if _, err := s.Containerd.Ctr(ctx, "images", "pull", "--plain-http", "--snapshotter", harness.LazySnapshotterName, "--user", user+":"+password, goRef); err != nil {
		t.Fatalf("lazy pull of %s: %s", goRef, redact(err))
	}
	content, err := s.Containerd.ContentDigests(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range layerDigests(t, golang.estargz) {
		if content[d] {
			t.Errorf("lazy pull: layer %s is in the content store", d)
		}
	}
	goOut, err := s.Containerd.Run(ctx, goRef, harness.LazySnapshotterName, "authgo", "go", "version")
	if err != nil {
		t.Fatalf("running %s: %v", goRef, err)
	}
	if !strings.HasPrefix(strings.TrimSpace(goOut), "go version") {
		t.Errorf("go version printed %q", goOut)
	}
	for d, size := range layerSizes(t, golang.estargz) {
		if b := p.StatsFor("pull").Blob(d); b.FullGETs != 0 || b.Covered()*2 >= size {
			t.Errorf("lazy pull: layer %s fetched whole or over half (%d of %d bytes)", d, b.Covered(), size)
		}
	}

	// The guard materializes the final base through the same credentials.
	eventually.Require(t, 2*time.Minute, "final base layers materialized by the guard", func() error {
		st := guardStates(ctx, t, s)
		for _, d := range debianLayers {
			l := st[d]
			if l.State == exportguard.StateFailed {
				t.Fatalf("guard failed on final base layer %s: %s\n%s", d, l.Error, s.Logs(40))
			}
			if !l.Materialized {
				return fmt.Errorf("layer %s: state %q", d, l.State)
			}
		}
		return nil
	})
	p.SetPhase("export")
	out := r.DirectRef("e2e/auth-hello", "latest")
	stdout, stderr, err = s.Buildkit.BuildctlProgress(ctx, append(common, "--progress=plain", "--output", "type=image,name="+out+",push=true,registry.insecure=true")...)
	outputs = append(outputs, stdout, stderr)
	if err != nil {
		t.Fatalf("push to the authenticated registry: %v\n%s", err, s.Logs(40))
	}
	p.SetPhase("")
	export := p.StatsFor("export")
	for _, d := range debianLayers {
		if n := export.Blob(d).Bytes; n != 0 {
			t.Errorf("final base layer %s: %d bytes fetched at export", d, n)
		}
	}
	img, err := remote.Image(mustRef(t, out), remote.WithContext(ctx), basic)
	if err != nil {
		t.Fatalf("reading the pushed image: %v", err)
	}
	if pushed := layerDigests(t, img); len(pushed) != len(debianLayers)+1 || pushed[0] != debianLayers[0] {
		t.Errorf("pushed image layers %v, want the final base's %v and one more", pushed, debianLayers)
	}

	// lazybase convert and lazybase mirror, reading and writing the
	// authenticated registry with the CLI's credentials.
	conv := r.DirectRef("e2e/auth-convert", "estargz")
	stdout, stderr, err = s.Lazybase(ctx, "convert", r.DirectRef(repoDebian, tagGzip), conv)
	outputs = append(outputs, stdout, stderr)
	if err != nil {
		t.Fatalf("lazybase convert: %v", err)
	}
	if _, err := remote.Image(mustRef(t, conv), remote.WithContext(ctx), basic); err != nil {
		t.Errorf("converted image %s: %v", conv, err)
	}
	mirrorCfg := filepath.Join(t.TempDir(), "mirror.toml")
	if err := os.WriteFile(mirrorCfg, []byte(fmt.Sprintf(`destination = "%s/mirror"
image_attempts = 1
temp_dir = %q
[[source]]
repository = "%s/%s"
tags = [%q]
`, r.Direct, t.TempDir(), r.Direct, repoDebian, tagGzip)), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err = s.Lazybase(ctx, "mirror", "--config", mirrorCfg)
	outputs = append(outputs, stdout, stderr)
	if err != nil {
		t.Fatalf("lazybase mirror: %v", err)
	}
	mirrored := r.DirectRef("mirror/"+repoDebian, tagGzip)
	if _, err := remote.Image(mustRef(t, mirrored), remote.WithContext(ctx), basic); err != nil {
		t.Errorf("mirrored image %s: %v", mirrored, err)
	}

	// A wrong password: every tool fails naming the host.
	writeCreds("wrong-" + password[:8])
	_, stderr, err = s.Lazybase(ctx, "convert", r.DirectRef(repoDebian, tagGzip), r.DirectRef("e2e/auth-convert", "wrong"))
	outputs = append(outputs, stderr)
	wantAuthError(t, "lazybase convert", err, r.Direct)
	_, stderr, err = s.Lazybase(ctx, "mirror", "--config", mirrorCfg, "--force")
	outputs = append(outputs, stderr)
	wantAuthError(t, "lazybase mirror", err, r.Direct)
	// The daemon reads its credentials on every request: its barrier
	// now fails on the manifest.
	_, stderr, err = s.Lazybase(ctx, "guard", "--status-socket="+s.Snapshotter.StatusSocket(), "--timeout", "1m", r.Ref(repoDebian, tagEStargz))
	outputs = append(outputs, stderr)
	wantAuthError(t, "lazybase guard (the daemon's barrier)", err, r.Host())

	if helper {
		calls, err := os.ReadFile(filepath.Join(helperDir, authHelperName+".calls"))
		if err != nil {
			t.Fatalf("the credential helper was never called: %v", err)
		}
		t.Logf("credential helper: %d calls", strings.Count(string(calls), "\n"))
	}

	if token {
		issued := r.Tokens()
		if len(issued) == 0 {
			t.Fatal("token auth: the token server issued no token")
		}
		t.Logf("token server at %s issued %d tokens", r.TokenRealm(), len(issued))
		// Bearer tokens are secrets too.
		secrets = append(secrets, issued...)
	}

	// No secret in any log or output.
	logs, err := s.LogFiles()
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	for _, f := range logs {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		total += int64(len(b))
		if strings.HasSuffix(f, "/registry.log") {
			// The registry is the test's server, not lazybase's.
			continue
		}
		for _, sec := range secrets {
			if strings.Contains(string(b), sec) {
				t.Errorf("%s holds a secret (%d bytes of log)", f, len(b))
			}
		}
	}
	for i, o := range outputs {
		for _, sec := range secrets {
			if strings.Contains(o, sec) {
				t.Errorf("CLI output %d holds a secret:\n%s", i, o)
			}
		}
	}
	t.Logf("searched %d logs (%d bytes, daemon at log level %s) and %d CLI outputs for the password", len(logs), total, logLevel, len(outputs))
}

// wantAuthError fails t unless err is an authentication error naming host.
func wantAuthError(t *testing.T, what string, err error, host string) {
	t.Helper()
	if err == nil {
		t.Errorf("%s with a wrong password succeeded", what)
		return
	}
	msg := err.Error()
	t.Logf("%s with a wrong password: %s", what, firstLines(msg, 3))
	if !strings.Contains(msg, host) {
		t.Errorf("%s: the error does not name the registry host %s: %s", what, host, msg)
	}
	low := strings.ToLower(msg)
	if !strings.Contains(low, "unauthorized") && !strings.Contains(low, "401") && !strings.Contains(low, "authentication") {
		t.Errorf("%s: the error does not say authentication failed: %s", what, msg)
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	if len(lines) > n {
		lines = lines[:n]
	}
	return strings.Join(lines, "\n")
}

func mustRef(t *testing.T, s string) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(s)
	if err != nil {
		t.Fatal(err)
	}
	return ref
}

// randomSecret returns a password no log can hold by chance.
func randomSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 12)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return "lzb" + hex.EncodeToString(b)
}

package lazypull

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"io"
	stdlog "log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	ggcrremote "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/lazybase/lazybase/exportguard"
)

// unresolvable is the registry host the images of the mirror tests are
// named by: it does not resolve, so every byte has to come from a mirror.
const unresolvable = "unresolvable.invalid"

// mirrorEnv is an image in an in-process registry behind a counting proxy
// (the mirror), named by the host unresolvable; the proxy optionally
// demands basic auth and records the Authorization headers it gets.
type mirrorEnv struct {
	proxy  *countingProxy
	ref    string // unresolvable.invalid/lazybase/mirror-test:v1
	img    v1.Image
	layers []digest.Digest

	mu    sync.Mutex
	auths []string // Authorization headers the mirror got
	user  string   // basic auth the mirror demands, "" for none
	pass  string
}

func newMirrorEnv(t *testing.T) *mirrorEnv {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	e := &mirrorEnv{}
	e.proxy = newCountingProxy(t, srv.URL)
	counting := e.proxy.srv.Config.Handler
	e.proxy.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		e.mu.Lock()
		e.auths = append(e.auths, r.Header.Get("Authorization"))
		user, pass := e.user, e.pass
		e.mu.Unlock()
		if u, p, ok := r.BasicAuth(); user != "" && (!ok || u != user || p != pass) {
			w.Header().Set("WWW-Authenticate", `Basic realm="mirror"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		// distribution (2.8) answers a manifest request for the digest
		// of a layer blob with 500: a size lookup must not go there.
		if _, d, ok := strings.Cut(r.URL.Path, "/manifests/"); ok && slices.Contains(e.layers, digest.Digest(d)) {
			http.Error(w, "unknown manifest", http.StatusInternalServerError)
			return
		}
		counting.ServeHTTP(w, r)
	})
	img, err := random.Image(200_000, 2)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := name.ParseReference(e.proxy.host + "/lazybase/mirror-test:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := ggcrremote.Write(dst, img); err != nil {
		t.Fatal(err)
	}
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		d, _ := l.Digest()
		e.layers = append(e.layers, digest.Digest(d.String()))
	}
	e.img = img
	e.ref = unresolvable + "/lazybase/mirror-test:v1"
	return e
}

// requireAuth makes the mirror demand basic auth user:pass.
func (e *mirrorEnv) requireAuth(user, pass string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.user, e.pass = user, pass
}

// authorizations returns the Authorization headers the mirror got.
func (e *mirrorEnv) authorizations() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.auths...)
}

// layer returns the bytes and descriptor of layer i.
func (e *mirrorEnv) layer(t *testing.T, i int) ([]byte, ocispec.Descriptor) {
	t.Helper()
	ls, err := e.img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := ls[i].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	return data, ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: e.layers[i], Size: int64(len(data))}
}

// writeHostsToml writes dir/HOST/hosts.toml.
func writeHostsToml(t *testing.T, dir, host, toml string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(dir, host), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, host, "hosts.toml"), []byte(toml), 0o644); err != nil {
		t.Fatal(err)
	}
}

// emptyRegistry returns the host of an in-process registry that has
// nothing: every manifest and blob is 404.
func emptyRegistry(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// mirrorForm is one way to point the daemon at mirrors of unresolvable:
// [registry.mirrors] or a config_path hosts.toml directory.
type mirrorForm struct {
	name string
	// config returns a daemon configuration whose hosts for unresolvable
	// are mirrors, in order.
	config func(t *testing.T, mirrors ...string) Config
}

var mirrorForms = []mirrorForm{
	{"registry.mirrors", func(t *testing.T, mirrors ...string) Config {
		cfg := DefaultConfig()
		var ms []Mirror
		for _, m := range mirrors {
			ms = append(ms, Mirror{Host: m})
		}
		cfg.Registry.Mirrors = map[string][]Mirror{unresolvable: ms}
		return cfg
	}},
	{"hosts.toml", func(t *testing.T, mirrors ...string) Config {
		cfg := DefaultConfig()
		dir := t.TempDir()
		toml := `server = "https://` + unresolvable + `"` + "\n"
		for _, m := range mirrors {
			toml += "\n[host.\"http://" + m + "\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
		}
		writeHostsToml(t, dir, unresolvable, toml)
		cfg.Registry.ConfigPath = []string{dir}
		return cfg
	}},
}

// TestGuardRegistryMirrored: for an image named by a host that does not
// resolve, the guard's registry reads the barrier's layer list, the blob
// sizes and the blobs from the mirror that [registry.mirrors] or a
// hosts.toml directory names, and the guard materializes the layers
// through it, verified.
func TestGuardRegistryMirrored(t *testing.T) {
	for _, form := range mirrorForms {
		t.Run(form.name, func(t *testing.T) {
			e := newMirrorEnv(t)
			cfg := form.config(t, e.proxy.host)
			ctx := context.Background()
			reg := newGuardRegistry(ctx, cfg)

			got, err := reg.ImageLayers(ctx, e.ref)
			if err != nil {
				t.Fatalf("ImageLayers: %v", err)
			}
			if len(got) != len(e.layers) || got[0] != e.layers[0] || got[1] != e.layers[1] {
				t.Errorf("ImageLayers: %v, want %v", got, e.layers)
			}
			data, desc := e.layer(t, 1)
			size, err := reg.BlobSize(ctx, e.ref, desc.Digest)
			if err != nil || size != desc.Size {
				t.Errorf("BlobSize: %d, %v; want %d", size, err, desc.Size)
			}

			genv := &guardEnv{}
			genv.store, genv.leases = newContentStore(t)
			g, err := newGuardTrigger(cfg.Guard, genv.stores(), reg, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			nctx := namespaces.WithNamespace(ctx, "builder")
			g.Mounted(nctx, exportguard.MountEvent{Namespace: "builder", Ref: e.ref, Layer: desc.Digest, Mode: string(ModeExportBase), When: exportguard.WhenNow})
			waitState(t, g.Status, "builder", desc.Digest, exportguard.StateMaterialized)
			b, err := content.ReadBlob(nctx, genv.store, desc)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b, data) {
				t.Error("materialized blob differs from the layer")
			}
			if n := e.proxy.blobBytes(desc.Digest); n < desc.Size {
				t.Errorf("the mirror sent %d bytes of the blob, want at least %d", n, desc.Size)
			}
		})
	}
}

// TestGuardRegistryFallsThrough: a first mirror that has neither the
// manifest nor the blob is passed over for the next one, in both forms.
func TestGuardRegistryFallsThrough(t *testing.T) {
	for _, form := range mirrorForms {
		t.Run(form.name, func(t *testing.T) {
			e := newMirrorEnv(t)
			cfg := form.config(t, emptyRegistry(t), e.proxy.host)
			ctx := context.Background()
			reg := newGuardRegistry(ctx, cfg)

			if got, err := reg.ImageLayers(ctx, e.ref); err != nil || len(got) != len(e.layers) {
				t.Errorf("ImageLayers: %v, %v; want %v", got, err, e.layers)
			}
			data, desc := e.layer(t, 0)
			if size, err := reg.BlobSize(ctx, e.ref, desc.Digest); err != nil || size != desc.Size {
				t.Errorf("BlobSize: %d, %v; want %d", size, err, desc.Size)
			}
			for _, off := range []int64{0, 1000} {
				rc, err := reg.FetchRange(ctx, e.ref, desc, off)
				if err != nil {
					t.Fatalf("FetchRange at %d: %v", off, err)
				}
				b, err := io.ReadAll(rc)
				rc.Close()
				if err != nil || !bytes.Equal(b, data[off:]) {
					t.Errorf("FetchRange at %d: %d bytes, %v; want the blob from there", off, len(b), err)
				}
			}

			// No host has it: permanent, and named.
			missing := ocispec.Descriptor{MediaType: desc.MediaType, Digest: digest.FromString("missing"), Size: 7}
			_, err := reg.FetchRange(ctx, e.ref, missing, 0)
			if err == nil || !exportguard.IsPermanent(err) || !strings.Contains(err.Error(), missing.Digest.String()) {
				t.Errorf("FetchRange of a blob no host has: %v, want a permanent error naming it", err)
			}
		})
	}
}

// TestGuardRegistryCredentials: the mirror that demands credentials gets
// those of the daemon's docker config for its host; without them the
// fetch fails at once (permanently); they are read again for every
// request, so a wrong password written later fails the next one.
func TestGuardRegistryCredentials(t *testing.T) {
	for _, form := range mirrorForms {
		t.Run(form.name, func(t *testing.T) {
			e := newMirrorEnv(t)
			e.requireAuth("builder", "s3cret")
			data, desc := e.layer(t, 0)
			ctx := context.Background()

			cfg := form.config(t, e.proxy.host)
			cfg.Auth.DockerConfig = t.TempDir() // empty: no credentials
			if _, err := newGuardRegistry(ctx, cfg).FetchRange(ctx, e.ref, desc, 0); err == nil || !exportguard.IsPermanent(err) {
				t.Errorf("FetchRange without credentials: %v, want a permanent error", err)
			}

			dir := t.TempDir()
			auth := base64.StdEncoding.EncodeToString([]byte("builder:s3cret"))
			conf := `{"auths": {"` + e.proxy.host + `": {"auth": "` + auth + `"}}}`
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(conf), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg.Auth.DockerConfig = dir
			reg := newGuardRegistry(ctx, cfg)
			rc, err := reg.FetchRange(ctx, e.ref, desc, 0)
			if err != nil {
				t.Fatalf("FetchRange with credentials: %v", err)
			}
			b, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || !bytes.Equal(b, data) {
				t.Errorf("FetchRange with credentials: %d bytes, %v", len(b), err)
			}
			if got, err := reg.ImageLayers(ctx, e.ref); err != nil || len(got) != len(e.layers) {
				t.Errorf("ImageLayers with credentials: %v, %v", got, err)
			}
			want := "Basic " + auth
			var sent bool
			for _, a := range e.authorizations() {
				sent = sent || a == want
			}
			if !sent {
				t.Errorf("the mirror never got the credentials of its host (got %q)", e.authorizations())
			}

			// The credentials are read again: a wrong password now fails
			// the manifest read and the blob fetch, naming the mirror.
			wrong := base64.StdEncoding.EncodeToString([]byte("builder:wrong"))
			conf = `{"auths": {"` + e.proxy.host + `": {"auth": "` + wrong + `"}}}`
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(conf), 0o600); err != nil {
				t.Fatal(err)
			}
			if _, err := reg.ImageLayers(ctx, e.ref); err == nil || !strings.Contains(err.Error(), e.proxy.host) || !strings.Contains(err.Error(), "401") {
				t.Errorf("ImageLayers with a wrong password: %v, want a 401 naming %s", err, e.proxy.host)
			}
			if _, err := reg.FetchRange(ctx, e.ref, desc, 0); err == nil || !exportguard.IsPermanent(err) {
				t.Errorf("FetchRange with a wrong password: %v, want a permanent error", err)
			}
		})
	}
}

// TestGuardRegistryTimeouts: a mirror that accepts requests and never
// answers fails the fetch after guard.response_timeout, with a timeout
// error naming it, in both forms (the hosts.toml clients are bounded too).
func TestGuardRegistryTimeouts(t *testing.T) {
	stall := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done()
	}))
	defer stall.Close()
	host := strings.TrimPrefix(stall.URL, "http://")
	for _, form := range mirrorForms {
		t.Run(form.name, func(t *testing.T) {
			cfg := form.config(t, host)
			cfg.Guard.ResponseTimeout = Duration(300 * time.Millisecond)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: digest.FromString("x"), Size: 1}
			start := time.Now()
			// Only the stalled mirror: unresolvable.invalid itself fails
			// at once, so the mirror's error is the one reported.
			_, err := newGuardRegistry(ctx, cfg).FetchRange(ctx, unresolvable+"/lazybase/stall:v1", desc, 0)
			var te *exportguard.TimeoutError
			if !errors.As(err, &te) || te.Host != host {
				t.Fatalf("FetchRange from a stalled mirror: %v, want a timeout error naming %s", err, host)
			}
			if d := time.Since(start); d > 10*time.Second {
				t.Errorf("FetchRange took %s", d)
			}
		})
	}
}

// TestConfigRegistryHosts: the hosts Config.RegistryHosts gives clients
// outside the daemon (the pull of prefetch record) resolve and fetch an
// image named by a host that does not resolve from its mirror, in both
// forms, as containerd's resolver uses them.
func TestConfigRegistryHosts(t *testing.T) {
	for _, form := range mirrorForms {
		t.Run(form.name, func(t *testing.T) {
			e := newMirrorEnv(t)
			cfg := form.config(t, e.proxy.host)
			ctx := context.Background()
			res := docker.NewResolver(docker.ResolverOptions{Hosts: cfg.RegistryHosts(ctx)})
			name, desc, err := res.Resolve(ctx, e.ref)
			if err != nil {
				t.Fatalf("Resolve %s: %v", e.ref, err)
			}
			want, _ := e.img.Digest()
			if name != e.ref || desc.Digest.String() != want.String() {
				t.Errorf("Resolve: %s %s, want %s %s", name, desc.Digest, e.ref, want)
			}
			data, ld := e.layer(t, 0)
			f, err := res.Fetcher(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			rc, err := f.Fetch(ctx, ld)
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || !bytes.Equal(b, data) {
				t.Errorf("Fetch: %d bytes, %v", len(b), err)
			}
		})
	}
}

// TestGuardRegistryHostsErrorNotKept: a hosts.toml that cannot be read
// fails the request naming the repository's hosts, and once it is fixed the next
// request goes through the mirror, without a restart.
func TestGuardRegistryHostsErrorNotKept(t *testing.T) {
	e := newMirrorEnv(t)
	dir := t.TempDir()
	// A hosts.toml that cannot be read (a directory here; containerd only
	// logs one that does not parse, and goes to the registry itself).
	unreadable := filepath.Join(dir, unresolvable, "hosts.toml")
	if err := os.MkdirAll(unreadable, 0o755); err != nil {
		t.Fatal(err)
	}
	cfg := DefaultConfig()
	cfg.Registry.ConfigPath = []string{dir}
	ctx := context.Background()
	reg := newGuardRegistry(ctx, cfg)
	if _, err := reg.ImageLayers(ctx, e.ref); err == nil || !strings.Contains(err.Error(), "registry hosts of "+unresolvable+"/lazybase/mirror-test") {
		t.Fatalf("ImageLayers with an unreadable hosts.toml: %v, want an error naming the repository", err)
	}
	if err := os.Remove(unreadable); err != nil {
		t.Fatal(err)
	}
	writeHostsToml(t, dir, unresolvable, "server = \"https://"+unresolvable+"\"\n\n[host.\"http://"+e.proxy.host+"\"]\n  capabilities = [\"pull\", \"resolve\"]\n")
	if got, err := reg.ImageLayers(ctx, e.ref); err != nil || len(got) != len(e.layers) {
		t.Errorf("ImageLayers after the fix: %v, %v", got, err)
	}
}

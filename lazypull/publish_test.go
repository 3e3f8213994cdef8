package lazypull

import (
	"context"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/prefetch"
)

// publishEnv is an in-process registry holding an image (as an index of
// one platform manifest) and a publisher reaching it as the daemon does.
type publishEnv struct {
	srv      *httptest.Server
	host     string
	ref      string    // the index, by tag
	manifest v1.Hash   // its platform manifest, the subject
	layers   []v1.Hash // the manifest's layers
	pub      *profilePublisher
	m        *metrics
	refused  atomic.Bool // the registry refuses writes
	writes   atomic.Int32
}

func newPublishEnv(t *testing.T, referrers bool, cfg ProfileConfig) *publishEnv {
	t.Helper()
	e := &publishEnv{}
	reg := registry.New(registry.WithReferrersSupport(referrers), registry.Logger(log.New(io.Discard, "", 0)))
	e.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			e.writes.Add(1)
			if e.refused.Load() {
				http.Error(w, `{"errors":[{"code":"DENIED","message":"read-only mirror"}]}`, http.StatusForbidden)
				return
			}
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(e.srv.Close)
	e.host = strings.TrimPrefix(e.srv.URL, "http://")
	img, err := random.Image(200, 2)
	if err != nil {
		t.Fatal(err)
	}
	img = mutate.MediaType(img, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
		mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}})
	e.ref = e.host + "/library/golang:1.22"
	tag, err := name.NewTag(e.ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(tag, idx); err != nil {
		t.Fatal(err)
	}
	if e.manifest, err = img.Digest(); err != nil {
		t.Fatal(err)
	}
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range ls {
		d, err := l.Digest()
		if err != nil {
			t.Fatal(err)
		}
		e.layers = append(e.layers, d)
	}
	e.m = newMetrics()
	dcfg := DefaultConfig()
	creds := dockerCredentials(context.Background(), AuthConfig{DockerConfig: t.TempDir()})
	hosts := dcfg.hostsWith(context.Background(), creds, guardClients(dcfg.Guard.Timeouts()))
	e.pub = newProfilePublisher(cfg, newHostsRegistry(hosts, creds), hosts, creds, e.m)
	return e
}

func testProfileConfig() ProfileConfig {
	c := DefaultConfig().Profile
	c.Delay = 0
	c.MinInterval = Duration(time.Hour)
	c.Timeout = Duration(20 * time.Second)
	return c
}

// record hands the publisher first accesses of files of the image's
// layers.
func (e *publishEnv) record(t *testing.T, image string, paths ...string) {
	t.Helper()
	for i, p := range paths {
		rec := AccessRecord{Time: time.Date(2026, 12, 3, 19, 0, i, 0, time.UTC), Image: image, Layer: e.layers[i%len(e.layers)].String(), Path: p, Size: int64(100 * (i + 1))}
		if err := e.pub.recordAccess(context.Background(), rec); err != nil {
			t.Fatal(err)
		}
	}
}

func (e *publishEnv) status(t *testing.T, image string) ProfileStatus {
	t.Helper()
	for _, s := range e.pub.status() {
		if s.Image == image {
			return s
		}
	}
	t.Fatalf("no profile status of %s in %+v", image, e.pub.status())
	return ProfileStatus{}
}

// referrers returns the published profiles referring to the subject.
func (e *publishEnv) referrers(t *testing.T) []v1.Descriptor {
	t.Helper()
	repo, err := name.NewRepository(e.host + "/library/golang")
	if err != nil {
		t.Fatal(err)
	}
	idx, err := remote.Referrers(repo.Digest(e.manifest.String()))
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	return im.Manifests
}

func (e *publishEnv) published(t *testing.T, d v1.Hash) *prefetch.Profile {
	t.Helper()
	ref, err := name.ParseReference(e.host + "/library/golang@" + d.String())
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.ArtifactType != prefetch.ArtifactType || m.Subject == nil || m.Subject.Digest != e.manifest {
		t.Fatalf("published manifest: artifactType %q, subject %+v; want subject %s", m.ArtifactType, m.Subject, e.manifest)
	}
	ls, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	rc, err := ls[0].Compressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	p, err := prefetch.ParseProfile(b)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestPublisherPublishesToTheImagesRegistry(t *testing.T) {
	for _, referrers := range []bool{true, false} {
		t.Run(fmt.Sprintf("referrers=%v", referrers), func(t *testing.T) {
			e := newPublishEnv(t, referrers, testProfileConfig())
			ctx := context.Background()
			e.record(t, e.ref, "usr/local/go/bin/go", "usr/lib/libc.so", "etc/os-release")
			e.pub.publishReady(ctx, false)
			st := e.status(t, e.ref)
			if st.LastResult != publishOK || st.PendingRecords != 0 || st.Subject != e.manifest.String() || st.Host != e.host || st.Files != 3 {
				t.Fatalf("status after publishing: %+v", st)
			}
			if got := counterValue(t, e.m.publishes.WithLabelValues(publishOK)); got != 1 {
				t.Fatalf("publish_total{result=ok} = %v, want 1", got)
			}
			refs := e.referrers(t)
			if len(refs) != 1 || refs[0].Digest.String() != st.Artifact {
				t.Fatalf("referrers of %s: %+v, want the artifact %s", e.manifest, refs, st.Artifact)
			}
			p := e.published(t, refs[0].Digest)
			if p.Image != e.ref || p.Digest != e.manifest.String() || len(p.Layers) != 2 {
				t.Fatalf("published profile for %s digest %s with %d layers", p.Image, p.Digest, len(p.Layers))
			}
			if p.Layers[0].Files[0].Path != "usr/local/go/bin/go" {
				t.Fatalf("published profile starts with %s", p.Layers[0].Files[0].Path)
			}

			// Nothing pending: nothing is published again; new records
			// within min_interval wait.
			e.record(t, e.ref, "bin/sh")
			e.pub.publishReady(ctx, false)
			if st := e.status(t, e.ref); st.PendingRecords != 1 || len(e.referrers(t)) != 1 {
				t.Fatalf("published again within min_interval: %+v", st)
			}
		})
	}
}

func TestPublisherWaitsUntilTheImageIsUnused(t *testing.T) {
	cfg := testProfileConfig()
	cfg.Delay = Duration(time.Hour)
	cfg.Idle = Duration(5 * time.Hour)
	e := newPublishEnv(t, true, cfg)
	now := time.Now()
	e.pub.now = func() time.Time { return now }
	// Snapshots: "top" is the image's top layer, mounted lazily; "run1"
	// a committed step over it; "run2" an active step over run1.
	e.pub.stat = func(_ context.Context, key string) (snapshots.Info, error) {
		switch key {
		case "top":
			return snapshots.Info{Name: key, Labels: map[string]string{ModeLabel: "lazy", stargzRefLabel: e.ref}}, nil
		case "run1":
			return snapshots.Info{Name: key, Parent: "top"}, nil
		}
		return snapshots.Info{}, errdefs.ErrNotFound
	}
	ctx := context.Background()
	e.pub.using("run2", "run1")
	e.record(t, e.ref, "usr/local/go/bin/go")
	now = now.Add(2 * time.Hour)
	e.pub.publishReady(ctx, false)
	if st := e.status(t, e.ref); st.InUse != 1 || !st.LastAttempt.IsZero() {
		t.Fatalf("published while a step over the image runs: %+v", st)
	}
	e.pub.released("run2")
	now = now.Add(time.Minute)
	e.pub.publishReady(ctx, false)
	if st := e.status(t, e.ref); !st.LastAttempt.IsZero() {
		t.Fatalf("published before profile.delay passed: %+v", st)
	}
	now = now.Add(2 * time.Hour)
	e.pub.publishReady(ctx, false)
	if st := e.status(t, e.ref); st.LastResult != publishOK || st.InUse != 0 {
		t.Fatalf("not published once unused for profile.delay: %+v", st)
	}

	// A snapshot BuildKit keeps active after its step: published once
	// nothing was read for profile.idle.
	e.pub.cfg.MinInterval = 0
	e.pub.using("run3", "run1")
	e.record(t, e.ref, "usr/lib/libc.so")
	now = now.Add(4 * time.Hour)
	e.pub.publishReady(ctx, false)
	if st := e.status(t, e.ref); st.PendingRecords != 1 || st.InUse != 1 {
		t.Fatalf("published while in use before profile.idle: %+v", st)
	}
	now = now.Add(2 * time.Hour)
	e.pub.publishReady(ctx, false)
	if st := e.status(t, e.ref); st.PendingRecords != 0 || st.LastResult != publishOK || st.InUse != 1 {
		t.Fatalf("not published after profile.idle without a read: %+v", st)
	}
}

func TestPublisherFailuresAreCountedAndKept(t *testing.T) {
	ctx := context.Background()
	t.Run("push refused", func(t *testing.T) {
		cfg := testProfileConfig()
		cfg.MinInterval = 0
		e := newPublishEnv(t, false, cfg)
		e.refused.Store(true)
		e.record(t, e.ref, "usr/local/go/bin/go", "etc/os-release")
		e.pub.publishReady(ctx, false)
		st := e.status(t, e.ref)
		if st.LastResult != publishFailed || st.PendingRecords != 2 || st.Host != e.host ||
			!strings.Contains(st.LastError, "read-only mirror") || !strings.Contains(st.LastError, e.host) {
			t.Fatalf("status after a refused push: %+v", st)
		}
		if got := counterValue(t, e.m.publishes.WithLabelValues(publishFailed)); got != 1 {
			t.Fatalf("publish_total{result=failed} = %v, want 1", got)
		}
		// The registry takes pushes again: the kept records are published.
		e.refused.Store(false)
		e.pub.publishReady(ctx, false)
		if st := e.status(t, e.ref); st.LastResult != publishOK || st.PendingRecords != 0 || len(e.referrers(t)) != 1 {
			t.Fatalf("status after the registry recovered: %+v", st)
		}
	})
	for _, tc := range []struct {
		name  string
		image func(e *publishEnv) string
		want  string
	}{
		{"subject unknown", func(e *publishEnv) string { return e.host + "/library/golang:gone" }, "resolving"},
		{"layers not in the image", func(e *publishEnv) string {
			other, err := random.Image(100, 1)
			if err != nil {
				t.Fatal(err)
			}
			tag, err := name.NewTag(e.host + "/library/golang:moved")
			if err != nil {
				t.Fatal(err)
			}
			if err := remote.Write(tag, other); err != nil {
				t.Fatal(err)
			}
			return e.host + "/library/golang:moved"
		}, "none of"},
		{"registry down", func(e *publishEnv) string { return "127.0.0.1:1/library/golang:1.22" }, "127.0.0.1:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newPublishEnv(t, true, testProfileConfig())
			img := tc.image(e)
			e.record(t, img, "usr/local/go/bin/go")
			before := e.writes.Load()
			e.pub.publishReady(ctx, false)
			st := e.status(t, img)
			if st.LastResult != publishFailed || st.PendingRecords != 1 || !strings.Contains(st.LastError, tc.want) {
				t.Fatalf("status: %+v, want a failure containing %q", st, tc.want)
			}
			if e.writes.Load() != before {
				t.Fatal("pushed although the publish failed before")
			}
			if got := counterValue(t, e.m.publishes.WithLabelValues(publishFailed)); got != 1 {
				t.Fatalf("publish_total{result=failed} = %v, want 1", got)
			}
		})
	}
}

func TestPublisherBoundsRecords(t *testing.T) {
	cfg := testProfileConfig()
	cfg.MaxFiles = 2
	e := newPublishEnv(t, true, cfg)
	e.record(t, e.ref, "a", "b", "c", "d")
	e.record(t, "", "e") // no image: not kept
	if st := e.status(t, e.ref); st.PendingRecords != 2 || st.DroppedRecords != 2 {
		t.Fatalf("status with max_files 2: %+v", st)
	}
	if n := len(e.pub.status()); n != 1 {
		t.Fatalf("%d images tracked, want 1", n)
	}
	for i := range maxPublishImages + 5 {
		if err := e.pub.recordAccess(context.Background(), AccessRecord{Image: fmt.Sprintf("r.example/i%d:1", i), Layer: e.layers[0].String(), Path: "x"}); err != nil {
			t.Fatal(err)
		}
	}
	if n := len(e.pub.status()); n != maxPublishImages {
		t.Fatalf("%d images tracked, want the bound %d", n, maxPublishImages)
	}
	// Once an image is published, its place goes to the next image.
	e.pub.publishImage(context.Background(), e.ref)
	if st := e.status(t, e.ref); st.LastResult != publishOK {
		t.Fatalf("publish: %+v", st)
	}
	if err := e.pub.recordAccess(context.Background(), AccessRecord{Image: "r.example/late:1", Layer: e.layers[0].String(), Path: "x"}); err != nil {
		t.Fatal(err)
	}
	var late bool
	for _, st := range e.pub.status() {
		late = late || st.Image == "r.example/late:1"
		if st.Image == e.ref {
			t.Fatalf("the published image %s kept its place", e.ref)
		}
	}
	if !late {
		t.Fatal("no place for a new image after a publish")
	}
}

// TestPublisherClosePublishesPending checks the publish at shutdown, and
// that min_interval holds there too.
func TestPublisherClosePublishesPending(t *testing.T) {
	cfg := testProfileConfig()
	cfg.Delay = Duration(time.Hour) // only the shutdown publishes
	e := newPublishEnv(t, true, cfg)
	e.pub.start(context.Background())
	e.record(t, e.ref, "usr/local/go/bin/go")
	e.pub.close(context.Background())
	if st := e.status(t, e.ref); st.LastResult != publishOK {
		t.Fatalf("status after close: %+v", st)
	}
	if len(e.referrers(t)) != 1 {
		t.Fatal("nothing published at close")
	}
}

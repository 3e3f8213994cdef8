package lazypull

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/sirupsen/logrus"
	logtest "github.com/sirupsen/logrus/hooks/test"

	"github.com/lazybase/lazybase/internal/eventually"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/internal/toccheck"
)

// TestHostileTOCsFallBack serves eStargz layers built to crash stargz's
// reader (a directory cycle overflows the Go stack and kills the process,
// so without the TOC check this test dies) from an in-process registry to
// a daemon holding a healthy lazy mount. Each hostile layer's mount is
// refused and falls back to a normal snapshot with a log line naming image,
// layer and entry; the daemon keeps serving and the healthy mount still
// reads correctly, also after a restart.
func TestHostileTOCsFallBack(t *testing.T) {
	requireFUSE(t)
	hostile, err := testimage.HostileLayers(toccheck.DefaultMaxEntries + 1)
	if err != nil {
		t.Fatal(err)
	}
	hook := logtest.NewLocal(log.L.Logger)
	defer log.L.Logger.ReplaceHooks(make(logrus.LevelHooks))

	reg := testimage.NewRegistry(t)
	healthy := pushTestImage(t, reg, "healthy:estargz")
	root := t.TempDir()
	td := startDaemon(t, root, func(c *Config) { c.BackgroundFetch.Enable = false })
	ctx := namespaces.WithNamespace(context.Background(), "test")

	// The healthy layer is mounted lazily and stays viewed throughout.
	if _, err := td.sn.Prepare(ctx, "extract-healthy", "", snapshots.WithLabels(healthy.unpackLabels(0, "chain-healthy"))); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("Prepare of the healthy layer = %v, want a remote snapshot", err)
	}
	mounts, err := td.sn.View(ctx, "view-healthy", "chain-healthy")
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	defer mount.UnmountAll(target, 0)
	readHealthy := func(when string) {
		t.Helper()
		for name, want := range healthy.files {
			got, err := os.ReadFile(filepath.Join(target, name))
			if err != nil {
				t.Errorf("%s: reading %s: %v", when, name, err)
			} else if !bytes.Equal(got, want) {
				t.Errorf("%s: %s: %d bytes differ from the image's %d", when, name, len(got), len(want))
			}
		}
	}
	readHealthy("before")

	for i, h := range hostile {
		t.Run(h.Name, func(t *testing.T) {
			img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, h.Layer)
			if err != nil {
				t.Fatal(err)
			}
			ref := reg.Push(t, "hostile:"+h.Name, img)
			m, err := img.Manifest()
			if err != nil {
				t.Fatal(err)
			}
			ti := testImage{ref: ref.String(), layers: m.Layers}
			if _, ok := ti.layers[0].Annotations[testimage.AnnotationTOCDigest]; !ok {
				t.Fatal("the hostile layer lacks the TOC digest annotation stargz needs to try it")
			}
			hook.Reset()
			key, chain := fmt.Sprintf("extract-hostile-%d", i), fmt.Sprintf("chain-hostile-%d", i)
			ms, err := td.sn.Prepare(ctx, key, "", snapshots.WithLabels(ti.unpackLabels(0, chain)))
			if err != nil {
				t.Fatalf("Prepare = %v, want mounts for a normal pull", err)
			}
			if len(ms) == 0 {
				t.Fatal("no mounts for the normal pull")
			}
			info, err := td.sn.Stat(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if info.Kind != snapshots.KindActive {
				t.Errorf("snapshot kind %v, want active (normal pull)", info.Kind)
			}
			// One warning names the image, the layer and the entry.
			var found bool
			for _, e := range hook.AllEntries() {
				if e.Level != logrus.WarnLevel || e.Data["reason"] != ReasonInvalidTOC {
					continue
				}
				found = true
				errText := fmt.Sprint(e.Data[logrus.ErrorKey])
				if e.Data["image"] != ti.ref || e.Data["layer"] != ti.layers[0].Digest.String() {
					t.Errorf("log line names image %v, layer %v; want %s, %s", e.Data["image"], e.Data["layer"], ti.ref, ti.layers[0].Digest)
				}
				if !strings.Contains(errText, h.Problem) {
					t.Errorf("log line error %q does not say %q", errText, h.Problem)
				}
				if h.Name != "huge-entry-count" && !strings.Contains(errText, "entry ") {
					t.Errorf("log line error %q names no entry", errText)
				}
			}
			if !found {
				t.Errorf("no invalid_toc warning; log: %v", hook.AllEntries())
			}
			if err := td.sn.Remove(ctx, key); err != nil {
				t.Error(err)
			}
		})
	}

	// The daemon still serves: the healthy mount reads, Stat answers, and
	// only the healthy layer is mounted.
	readHealthy("after")
	if _, err := td.sn.Stat(ctx, "chain-healthy"); err != nil {
		t.Errorf("Stat after the hostile layers: %v", err)
	}
	if n := fuseMountsUnder(t, root); n != 1 {
		t.Errorf("%d FUSE mounts, want the healthy one", n)
	}
	if got := counterValue(t, td.d.m.fallbacks.WithLabelValues(ReasonInvalidTOC)); got != float64(len(hostile)) {
		t.Errorf("invalid_toc fallbacks = %v, want %d", got, len(hostile))
	}
	if got := counterValue(t, td.d.m.lazyMounts.WithLabelValues("ok")); got != 1 {
		t.Errorf("lazy mounts ok = %v, want 1", got)
	}
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}

	// A restarted daemon re-mounts the healthy layer through the same
	// checking store and it reads back.
	td.stop(t)
	td2 := startDaemon(t, root, func(c *Config) { c.BackgroundFetch.Enable = false })
	// The daemon listens first and restores in the background.
	eventually.Require(t, 30*time.Second, "the healthy layer restored", func() error {
		if n := fuseMountsUnder(t, root); n != 1 {
			return fmt.Errorf("%d FUSE mounts after restart, want the healthy one restored", n)
		}
		return nil
	})
	mounts, err = td2.sn.View(ctx, "view-restored", "chain-healthy")
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All(mounts, target); err != nil {
		t.Fatal(err)
	}
	readHealthy("after restart")
	if err := mount.UnmountAll(target, 0); err != nil {
		t.Fatal(err)
	}
}

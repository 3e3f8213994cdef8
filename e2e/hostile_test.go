//go:build e2e

package e2e

import (
	"context"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/e2e/harness"
	"github.com/lazybase/lazybase/internal/testimage"
	"github.com/lazybase/lazybase/internal/toccheck"
	"github.com/lazybase/lazybase/lazypull"
)

// TestHostileEStargzLayers serves eStargz layers built with the estargz
// library directly (not by lazybase's converter) to the lazybase
// snapshotter through containerd: a TOC whose hardlink makes a directory
// its own descendant (the cycle that overflowed the daemon's stack), a
// hardlink cycle, data offsets past the end, names escaping the root, an
// absolute name, more TOC entries than the limit, nesting deeper than the
// limit, an entry under a symlinked directory, and a tar whose hardlink
// targets a directory. Every one is refused with a log line naming image,
// layer and entry and falls back to a normal pull (which succeeds when the
// tar itself is sound and fails cleanly when it is not); the daemon stays up
// with the same PID, its sockets answer, and the debian-like image mounted
// lazily before them still runs containers that read it correctly.
func TestHostileEStargzLayers(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	hostile, err := testimage.HostileLayers(toccheck.DefaultMaxEntries + 1)
	if err != nil {
		t.Fatal(err)
	}
	s := harness.Start(ctx, t, harness.WithLazySnapshotter(harness.Lazybase),
		harness.WithLazybaseConfig("log_level = \"info\"\n[guard]\nenable = false\n"))
	pid := s.Snapshotter.Pid()

	// A healthy image, mounted lazily first.
	debian, _ := referenceImages(t)
	publish(ctx, t, s, repoDebian, tagEStargz, debian.estargz)
	healthy := s.Registry.Ref(repoDebian, tagEStargz)
	healthyLayers := layerDigests(t, debian.estargz)
	const osRelease = "usr/lib/os-release"
	want := sourceDigests(t, debian.gzip, []string{osRelease})[osRelease]
	if err := s.Containerd.Pull(ctx, healthy, harness.LazySnapshotterName); err != nil {
		t.Fatal(err)
	}
	checkLazy(ctx, t, s, healthy, healthyLayers)
	readHealthy := func(id string) {
		t.Helper()
		out, err := s.Containerd.Run(ctx, healthy, harness.LazySnapshotterName, id, "sha256sum", "/"+osRelease)
		if err != nil {
			t.Fatalf("running the healthy image: %v", err)
		}
		if f := strings.Fields(out); len(f) != 2 || f[0] != want {
			t.Fatalf("healthy image: sha256sum printed %q, want %s", out, want)
		}
	}
	readHealthy("healthy-before")

	for _, h := range hostile {
		t.Run(h.Name, func(t *testing.T) {
			img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: "amd64"}, h.Layer)
			if err != nil {
				t.Fatal(err)
			}
			repo := "hostile/" + h.Name
			publish(ctx, t, s, repo, "v1", img)
			ref := s.Registry.Ref(repo, "v1")
			layer := layerDigests(t, img)[0]

			pullErr := s.Containerd.Pull(ctx, ref, harness.LazySnapshotterName)
			if h.Unpackable {
				if pullErr != nil {
					t.Fatalf("the fallback pull failed: %v", pullErr)
				}
				content, err := s.Containerd.ContentDigests(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if !content[layer] {
					t.Errorf("layer %s is not in the content store: it was not pulled normally", layer)
				}
			} else {
				// The tar itself cannot be unpacked; the normal pull
				// fails, cleanly, with the unpacker's error.
				if pullErr == nil {
					t.Fatal("the pull of a tar with a hardlink to a directory succeeded")
				}
				msg := pullErr.Error()
				t.Logf("pull failed: %s", textLastLine(msg))
				for _, crash := range []string{"connection refused", "transport endpoint", "Unavailable", "EOF"} {
					if strings.Contains(msg, crash) {
						t.Errorf("the pull failed as if the snapshotter were gone (%q): %s", crash, msg)
					}
				}
			}

			// The daemon refused the TOC, saying which image, layer and
			// entry, and is still the same process.
			if !s.Snapshotter.Running() || s.Snapshotter.Pid() != pid {
				t.Fatalf("the snapshotter died (pid %d, running %v)", pid, s.Snapshotter.Running())
			}
			logText, err := s.Snapshotter.Log()
			if err != nil {
				t.Fatal(err)
			}
			line := lineWithAll(logText, "reason="+lazypull.ReasonInvalidTOC, layer)
			if line == "" {
				t.Fatalf("no invalid_toc log line for layer %s; log tail:\n%s", layer, textTail(logText, 20))
			}
			t.Logf("daemon: %s", line)
			problem := strings.ReplaceAll(h.Problem, `"`, `\"`)
			if !strings.Contains(line, "/"+repo+":v1") || !strings.Contains(line, problem) {
				t.Errorf("log line does not name image %s and problem %q: %s", ref, h.Problem, line)
			}
			if h.Name != "huge-entry-count" && !strings.Contains(line, `entry \"`) {
				t.Errorf("log line names no entry: %s", line)
			}
		})
	}

	// The daemon is the same process, answers on its sockets, and the
	// healthy lazy mounts still serve a new container.
	if !s.Snapshotter.Running() || s.Snapshotter.Pid() != pid {
		t.Fatalf("the snapshotter died (pid %d)", pid)
	}
	if _, err := lazypull.FetchStatus(ctx, s.Snapshotter.StatusSocket()); err != nil {
		t.Errorf("status socket: %v", err)
	}
	if _, err := s.Containerd.Ctr(ctx, "snapshots", "--snapshotter", harness.LazySnapshotterName, "ls"); err != nil {
		t.Errorf("snapshots API: %v", err)
	}
	checkLazy(ctx, t, s, healthy, healthyLayers)
	readHealthy("healthy-after")
	if logText, err := s.Snapshotter.Log(); err == nil && strings.Contains(logText, "fatal error") {
		t.Errorf("the snapshotter log has a fatal error:\n%s", textTail(logText, 30))
	}
}

// lineWithAll returns the first line of text that contains every one of subs.
func lineWithAll(text string, subs ...string) string {
next:
	for _, l := range strings.Split(text, "\n") {
		for _, s := range subs {
			if !strings.Contains(l, s) {
				continue next
			}
		}
		return l
	}
	return ""
}

func textTail(text string, n int) string {
	ls := strings.Split(strings.TrimRight(text, "\n"), "\n")
	if len(ls) > n {
		ls = ls[len(ls)-n:]
	}
	return strings.Join(ls, "\n")
}

func textLastLine(s string) string { return textTail(s, 1) }

//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/e2e/harness"
)

// TestGuardExportIdentical: the image BuildKit exports from lazily mounted
// eStargz bases, guarded by lazybase, is byte-identical to the one it
// exports after a normal pull of the same bases (overlayfs): the same
// manifest digest. The build is made reproducible with SOURCE_DATE_EPOCH
// and rewrite-timestamp, and each side runs on a stack of its own.
func TestGuardExportIdentical(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	type result struct {
		digest string
		layers []string
	}
	build := func(t *testing.T, lazy bool) result {
		opts := []harness.Option{harness.WithBuildkit()}
		if lazy {
			cfg := filepath.Join(t.TempDir(), "lazybase.toml")
			body := fmt.Sprintf("[background_fetch]\nenable = false\n[[policy]]\nmatch = \"*/%s:*\"\nmode = \"export-base\"\n[[policy]]\nmatch = \"*/%s:*\"\nmode = \"lazy-only\"\n", repoDebian, repoGolang)
			if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
			t.Setenv(harness.LazybaseConfigEnv, cfg)
			opts = []harness.Option{harness.WithLazySnapshotter(harness.Lazybase), harness.WithBuildkitLazy()}
		}
		s := harness.Start(ctx, t, opts...)
		publishAll(ctx, t, s)
		work := multiStageContext(t, s, tagEStargz)
		out := s.Registry.DirectRef("e2e/identical", "latest")
		if _, err := s.Buildkit.Buildctl(ctx, "build",
			"--frontend", "dockerfile.v0",
			"--local", "context="+work, "--local", "dockerfile="+work,
			"--opt", "build-arg:SOURCE_DATE_EPOCH=0",
			"--output", "type=image,name="+out+",push=true,registry.insecure=true,rewrite-timestamp=true",
		); err != nil {
			t.Fatalf("%v\n%s", err, s.Logs(40))
		}
		ref, err := name.ParseReference(out, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		img, err := remote.Image(ref, remote.WithContext(ctx))
		if err != nil {
			t.Fatal(err)
		}
		d, err := img.Digest()
		if err != nil {
			t.Fatal(err)
		}
		return result{digest: d.String(), layers: layerDigests(t, img)}
	}
	var normal, lazy result
	t.Run("normal-pull", func(t *testing.T) { normal = build(t, false) })
	t.Run("lazybase", func(t *testing.T) { lazy = build(t, true) })
	if t.Failed() {
		return
	}
	t.Logf("normal pull: %s %v", normal.digest, normal.layers)
	t.Logf("lazybase:    %s %v", lazy.digest, lazy.layers)
	if normal.digest != lazy.digest {
		t.Errorf("exported manifests differ: normal pull %s, lazybase %s", normal.digest, lazy.digest)
	}
	if fmt.Sprint(normal.layers) != fmt.Sprint(lazy.layers) {
		t.Errorf("exported layers differ:\nnormal pull %v\nlazybase    %v", normal.layers, lazy.layers)
	}
}

package lazypull

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/random"
	ggcrremote "github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/prefetch"
)

// TestManifestSourceMirrored: `lazybase prefetch --resolve` with the
// daemon's configuration resolves a profile of an image named by a host
// that does not resolve, reading the image's manifest (and, for an index,
// its platform manifests by digest) from the mirror that [registry.mirrors]
// or a hosts.toml directory names, with the credentials of the daemon's
// docker config for the mirror.
func TestManifestSourceMirrored(t *testing.T) {
	for _, form := range mirrorForms {
		t.Run(form.name, func(t *testing.T) {
			e := newMirrorEnv(t)
			other, err := random.Image(1000, 1)
			if err != nil {
				t.Fatal(err)
			}
			idx := mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex),
				mutate.IndexAddendum{Add: other, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
				mutate.IndexAddendum{Add: e.img, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}})
			dst, err := name.ParseReference(e.proxy.host + "/lazybase/mirror-test:index")
			if err != nil {
				t.Fatal(err)
			}
			if err := ggcrremote.WriteIndex(dst, idx); err != nil {
				t.Fatal(err)
			}
			imgDigest, err := e.img.Digest()
			if err != nil {
				t.Fatal(err)
			}
			e.requireAuth("builder", "s3cret")
			dir := t.TempDir()
			auth := base64.StdEncoding.EncodeToString([]byte("builder:s3cret"))
			conf := `{"auths": {"` + e.proxy.host + `": {"auth": "` + auth + `"}}}`
			if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(conf), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg := form.config(t, e.proxy.host)
			cfg.Auth.DockerConfig = dir
			ctx := context.Background()
			src := cfg.ManifestSource(ctx)

			for _, ref := range []string{e.ref, unresolvable + "/lazybase/mirror-test:index"} {
				p := &prefetch.Profile{Version: 1, Kind: prefetch.ProfileKind, Image: ref,
					Layers: []prefetch.Layer{{Digest: e.layers[1].String(), Runs: 1}}}
				if err := prefetch.ResolveImage(ctx, p, src); err != nil {
					t.Fatalf("resolving %s through the mirror: %v", ref, err)
				}
				if p.Digest != imgDigest.String() {
					t.Errorf("%s: profile digest %s, want the image's %s", ref, p.Digest, imgDigest)
				}
			}

			// A profile of layers the image does not hold fails, as does
			// a tag the mirror does not have, naming it.
			p := &prefetch.Profile{Version: 1, Kind: prefetch.ProfileKind, Image: e.ref,
				Layers: []prefetch.Layer{{Digest: "sha256:" + strings.Repeat("a", 64), Runs: 1}}}
			if err := prefetch.ResolveImage(ctx, p, src); err == nil || !strings.Contains(err.Error(), "none of the 1 recorded layers") {
				t.Errorf("resolving foreign layers: %v", err)
			}
			p.Image = unresolvable + "/lazybase/mirror-test:nope"
			if err := prefetch.ResolveImage(ctx, p, src); err == nil || !strings.Contains(err.Error(), "mirror-test:nope") {
				t.Errorf("resolving a tag the mirror does not have: %v", err)
			}
		})
	}
}

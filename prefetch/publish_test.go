package prefetch_test

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/random"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/prefetch"
)

const (
	layerA = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	layerB = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
)

// bigProfile is a profile of two layers with n and n/2 files whose paths
// are long enough to make the JSON large.
func bigProfile(n int) *prefetch.Profile {
	p := &prefetch.Profile{
		Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind,
		Image:      "registry.example/golang:1.22",
		LastRecord: time.Date(2026, 12, 3, 19, 0, 0, 123, time.UTC),
		Layers: []prefetch.Layer{
			{Digest: layerA, Runs: 1},
			{Digest: layerB, Runs: 1},
		},
	}
	for i := range n {
		p.Layers[0].Files = append(p.Layers[0].Files, prefetch.File{Path: fmt.Sprintf("usr/local/go/src/pkg%06d/%s.go", i, strings.Repeat("x", 40)), Size: 100, Count: 1, RankSum: int64(i)})
	}
	for i := range n / 2 {
		p.Layers[1].Files = append(p.Layers[1].Files, prefetch.File{Path: fmt.Sprintf("lib/%06d.so", i), Size: 10, Count: 1, RankSum: int64(i)})
	}
	return p
}

func subjectOf(t *testing.T, img v1.Image) v1.Descriptor {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	n, err := img.Size()
	if err != nil {
		t.Fatal(err)
	}
	mt, err := img.MediaType()
	if err != nil {
		t.Fatal(err)
	}
	return v1.Descriptor{MediaType: mt, Digest: d, Size: n}
}

func TestCutIsBoundedAndDeterministic(t *testing.T) {
	p := bigProfile(30000) // about 3 MB of JSON
	whole, err := p.Marshal()
	if err != nil {
		t.Fatal(err)
	}
	if len(whole) <= prefetch.MaxArtifactBytes {
		t.Fatalf("test profile of %d bytes does not exceed %d", len(whole), prefetch.MaxArtifactBytes)
	}
	cp, b, err := prefetch.Cut(p, 0, prefetch.MaxArtifactBytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > prefetch.MaxArtifactBytes {
		t.Fatalf("cut profile has %d bytes, more than %d", len(b), prefetch.MaxArtifactBytes)
	}
	if len(b) < prefetch.MaxArtifactBytes*9/10 {
		t.Errorf("cut profile has %d bytes: cut far below the bound %d", len(b), prefetch.MaxArtifactBytes)
	}
	if _, err := prefetch.ParseProfile(b); err != nil {
		t.Fatalf("cut profile does not parse: %v", err)
	}
	// Both layers keep their first files: cut in turns, not layer A only.
	if len(cp.Layers) != 2 || cp.Layers[1].Files[0].Path != "lib/000000.so" || cp.Layers[0].Files[0].Path != p.Layers[0].Files[0].Path {
		t.Fatalf("cut lost the first files of a layer: %d layers", len(cp.Layers))
	}
	_, b2, err := prefetch.Cut(bigProfile(30000), 0, prefetch.MaxArtifactBytes)
	if err != nil || !bytes.Equal(b, b2) {
		t.Fatalf("the same profile cut twice differs (err %v)", err)
	}
	// The input is not modified.
	if len(p.Layers[0].Files) != 30000 {
		t.Fatalf("Cut modified its input: %d files", len(p.Layers[0].Files))
	}

	// maxFiles: 5 files, in turns: A0 B0 A1 B1 A2.
	cp, _, err = prefetch.Cut(p, 5, prefetch.MaxArtifactBytes)
	if err != nil {
		t.Fatal(err)
	}
	if got := [2]int{len(cp.Layers[0].Files), len(cp.Layers[1].Files)}; got != [2]int{3, 2} {
		t.Fatalf("maxFiles 5 kept %v files per layer, want [3 2]", got)
	}
	// A layer left empty is dropped.
	cp, _, err = prefetch.Cut(p, 1, prefetch.MaxArtifactBytes)
	if err != nil {
		t.Fatal(err)
	}
	if len(cp.Layers) != 1 || cp.Layers[0].Digest != layerA {
		t.Fatalf("maxFiles 1 kept layers %+v", cp.Layers)
	}
	// Nothing fits.
	if _, _, err := prefetch.Cut(p, 0, 10); err == nil {
		t.Fatal("a 10-byte bound gave no error")
	}
}

func TestArtifactBadInputs(t *testing.T) {
	base, err := random.Image(100, 1)
	if err != nil {
		t.Fatal(err)
	}
	good := subjectOf(t, base)
	p := bigProfile(3)
	noTime := bigProfile(3)
	noTime.LastRecord = time.Time{}
	noFiles := bigProfile(0)
	badProfile := bigProfile(3)
	badProfile.Layers[0].Files[0].Count = 5 // above runs

	index := good
	index.MediaType = types.OCIImageIndex
	noSize := good
	noSize.Size = 0
	badDigest := good
	badDigest.Digest = v1.Hash{Algorithm: "sha256", Hex: "abc"}
	for _, tc := range []struct {
		name    string
		subject v1.Descriptor
		p       *prefetch.Profile
		want    string
	}{
		{"index subject", index, p, "not an image manifest"},
		{"no size", noSize, p, "size 0"},
		{"bad digest", badDigest, p, "not a sha256 digest"},
		{"no record time", good, noTime, "no record time"},
		{"no files", good, noFiles, "no file"},
		{"invalid profile", good, badProfile, "count 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := prefetch.BuildArtifact(tc.subject, tc.p, 0)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestArtifactPushesAsReferrer pushes a published profile with
// go-containerregistry's registry client to its in-process registry, with
// and without the referrers API (tag-schema fallback), and reads it back
// as a referrer of its subject.
func TestArtifactPushesAsReferrer(t *testing.T) {
	for _, referrers := range []bool{true, false} {
		t.Run(fmt.Sprintf("referrers=%v", referrers), func(t *testing.T) {
			srv := httptest.NewServer(registry.New(registry.WithReferrersSupport(referrers), registry.Logger(log.New(io.Discard, "", 0))))
			defer srv.Close()
			repo, err := name.NewRepository(strings.TrimPrefix(srv.URL, "http://") + "/golang")
			if err != nil {
				t.Fatal(err)
			}
			base, err := random.Image(100, 2)
			if err != nil {
				t.Fatal(err)
			}
			if err := remote.Write(repo.Tag("1.22"), base); err != nil {
				t.Fatal(err)
			}
			subject := subjectOf(t, base)
			p := bigProfile(4)
			img, cp, err := prefetch.BuildArtifact(subject, p, 3)
			if err != nil {
				t.Fatal(err)
			}
			if files := len(cp.Layers[0].Files) + len(cp.Layers[1].Files); files != 3 {
				t.Fatalf("published profile has %d files, want 3", files)
			}
			if err := validate.Image(img); err != nil {
				t.Fatalf("artifact: %v", err)
			}
			d, err := img.Digest()
			if err != nil {
				t.Fatal(err)
			}
			if err := remote.Write(repo.Digest(d.String()), img); err != nil {
				t.Fatalf("pushing the artifact: %v", err)
			}
			// No artifactType filter: go-containerregistry's registry
			// names the config's media type as a referrer's artifactType
			// (the fallback index names the manifest's).
			idx, err := remote.Referrers(repo.Digest(subject.Digest.String()))
			if err != nil {
				t.Fatal(err)
			}
			im, err := idx.IndexManifest()
			if err != nil {
				t.Fatal(err)
			}
			if len(im.Manifests) != 1 || im.Manifests[0].Digest != d {
				t.Fatalf("referrers of the subject: %+v, want the artifact %s", im.Manifests, d)
			}
			if got := im.Manifests[0].Annotations[prefetch.AnnotationCreated]; got != "2026-12-03T19:00:00.000000123Z" {
				t.Errorf("created annotation %q", got)
			}
			pulled, err := remote.Image(repo.Digest(d.String()))
			if err != nil {
				t.Fatal(err)
			}
			m, err := pulled.Manifest()
			if err != nil {
				t.Fatal(err)
			}
			if m.ArtifactType != prefetch.ArtifactType || m.Subject == nil || m.Subject.Digest != subject.Digest ||
				m.Config.MediaType != types.OCIEmptyJSON || len(m.Layers) != 1 || m.Layers[0].MediaType != prefetch.ArtifactType {
				t.Fatalf("artifact manifest %+v", m)
			}
			ls, err := pulled.Layers()
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
			got, err := prefetch.ParseProfile(b)
			if err != nil {
				t.Fatalf("published profile: %v", err)
			}
			if got.Image != p.Image || !got.LastRecord.Equal(p.LastRecord) {
				t.Fatalf("published profile is for %s at %s", got.Image, got.LastRecord)
			}
			// The same profile gives the same artifact.
			again, _, err := prefetch.BuildArtifact(subject, bigProfile(4), 3)
			if err != nil {
				t.Fatal(err)
			}
			if d2, _ := again.Digest(); d2 != d {
				t.Fatalf("same profile, artifacts %s and %s", d, d2)
			}
		})
	}
}

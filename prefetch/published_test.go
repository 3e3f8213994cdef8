package prefetch

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	stdlog "log"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

var testSubject = v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("5", 64)}

func sha(b []byte) v1.Hash {
	h, _, _ := v1.SHA256(bytes.NewReader(b))
	return h
}

// artifactManifest is a valid published-profile manifest for blob,
// changed by change.
func artifactManifest(blob []byte, created time.Time, change func(*v1.Manifest)) []byte {
	m := v1.Manifest{
		SchemaVersion: 2, MediaType: types.OCIManifestSchema1, ArtifactType: ArtifactType,
		Config:      v1.Descriptor{MediaType: types.OCIEmptyJSON, Size: 2, Digest: sha([]byte("{}"))},
		Layers:      []v1.Descriptor{{MediaType: ArtifactType, Size: int64(len(blob)), Digest: sha(blob)}},
		Subject:     &v1.Descriptor{MediaType: types.OCIManifestSchema1, Size: 100, Digest: testSubject},
		Annotations: map[string]string{AnnotationCreated: created.UTC().Format(time.RFC3339)},
	}
	if change != nil {
		change(&m)
	}
	b, _ := json.Marshal(m)
	return b
}

func TestParseArtifact(t *testing.T) {
	blob, _ := sample().Marshal()
	now := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	good := artifactManifest(blob, now, nil)
	a, err := ParseArtifact(good, sha(good), testSubject)
	if err != nil {
		t.Fatal(err)
	}
	if !a.Created.Equal(now) || a.Layer.Digest != sha(blob) || a.Layer.Size != int64(len(blob)) {
		t.Errorf("parsed %+v", a)
	}
	noCreated := artifactManifest(blob, now, func(m *v1.Manifest) { m.Annotations = nil })
	if a, err := ParseArtifact(noCreated, sha(noCreated), testSubject); err != nil || !a.Created.IsZero() {
		t.Errorf("without %s: %+v, %v", AnnotationCreated, a, err)
	}
	other := v1.Hash{Algorithm: "sha256", Hex: strings.Repeat("6", 64)}
	for _, tc := range []struct {
		name   string
		change func(*v1.Manifest)
		raw    []byte
		digest *v1.Hash
		want   string
	}{
		{name: "digest mismatch", digest: &other, want: "manifest content has digest"},
		{name: "not JSON", raw: []byte(`{"schemaVersion":`), want: "decoding the manifest"},
		{name: "too large", raw: bytes.Repeat([]byte(" "), MaxArtifactManifestBytes+1), want: "above"},
		{name: "schema version", change: func(m *v1.Manifest) { m.SchemaVersion = 1 }, want: "schemaVersion"},
		{name: "docker manifest", change: func(m *v1.Manifest) { m.MediaType = types.DockerManifestSchema2 }, want: "media type"},
		{name: "wrong artifactType", change: func(m *v1.Manifest) { m.ArtifactType = "application/vnd.example.sbom" }, want: "artifactType"},
		{name: "config", change: func(m *v1.Manifest) { m.Config.MediaType = types.OCIConfigJSON }, want: "config media type"},
		{name: "two layers", change: func(m *v1.Manifest) { m.Layers = append(m.Layers, m.Layers[0]) }, want: "2 layers"},
		{name: "no layer", change: func(m *v1.Manifest) { m.Layers = nil }, want: "0 layers"},
		{name: "no subject", change: func(m *v1.Manifest) { m.Subject = nil }, want: "no subject"},
		{name: "other subject", change: func(m *v1.Manifest) { m.Subject.Digest = other }, want: "subject"},
		{name: "layer media type", change: func(m *v1.Manifest) { m.Layers[0].MediaType = types.OCILayer }, want: "layer media type"},
		{name: "oversized", change: func(m *v1.Manifest) { m.Layers[0].Size = MaxArtifactBytes + 1 }, want: "profile of 1048577 bytes"},
		{name: "empty", change: func(m *v1.Manifest) { m.Layers[0].Size = 0 }, want: "profile of 0 bytes"},
		{name: "sha512 layer", change: func(m *v1.Manifest) { m.Layers[0].Digest = v1.Hash{Algorithm: "sha512", Hex: strings.Repeat("a", 128)} }, want: "not a sha256"},
		{name: "bad created", change: func(m *v1.Manifest) { m.Annotations[AnnotationCreated] = "yesterday" }, want: AnnotationCreated},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.raw
			if b == nil {
				b = artifactManifest(blob, now, tc.change)
			}
			d := sha(b)
			if tc.digest != nil {
				d = *tc.digest
			}
			a, err := ParseArtifact(b, d, testSubject)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %+v, %v; want an error with %q", a, err, tc.want)
			}
		})
	}
}

func TestParseArtifactBlob(t *testing.T) {
	blob, _ := sample().Marshal()
	desc := v1.Descriptor{MediaType: ArtifactType, Size: int64(len(blob)), Digest: sha(blob)}
	p, err := ParseArtifactBlob(desc, blob)
	if err != nil || len(p.Layers) != len(sample().Layers) {
		t.Fatalf("good blob: %+v, %v", p, err)
	}
	notProfile := []byte(`{"version":1,"layers":{}}`)
	flipped := slices.Clone(blob)
	flipped[len(flipped)-2] ^= 1
	for _, tc := range []struct {
		name string
		desc v1.Descriptor
		blob []byte
		want string
	}{
		{"short", desc, blob[:len(blob)-1], "descriptor says"},
		{"digest mismatch", desc, flipped, "content has digest"},
		{"bad JSON", v1.Descriptor{Size: 5, Digest: sha([]byte("{not "))}, []byte("{not "), "decoding"},
		{"a list", v1.Descriptor{Size: int64(len(notProfile)), Digest: sha(notProfile)}, notProfile, "not a profile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if p, err := ParseArtifactBlob(tc.desc, tc.blob); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %+v, %v; want an error with %q", p, err, tc.want)
			}
		})
	}
}

// FuzzParseArtifact: ParseArtifact never panics, and what it accepts is
// a manifest of one bounded profile layer referring to the subject.
func FuzzParseArtifact(f *testing.F) {
	blob, _ := sample().Marshal()
	f.Add(artifactManifest(blob, time.Unix(1700000000, 0), nil))
	f.Add(artifactManifest(blob, time.Unix(0, 0), func(m *v1.Manifest) { m.Annotations = nil }))
	f.Add([]byte(`{"schemaVersion":2,"artifactType":"` + ArtifactType + `","layers":[]}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		a, err := ParseArtifact(in, sha(in), testSubject)
		if err != nil {
			if a != nil {
				t.Fatal("artifact returned with an error")
			}
			return
		}
		if a.Layer.Size < 1 || a.Layer.Size > MaxArtifactBytes || a.Layer.MediaType != ArtifactType || a.Layer.Digest.Algorithm != "sha256" {
			t.Fatalf("accepted layer %+v", a.Layer)
		}
		if a.Created.Location() != time.UTC {
			t.Fatalf("created %v not in UTC", a.Created)
		}
		if _, err := ParseArtifact(in, testSubject, testSubject); err == nil && sha(in) != testSubject {
			t.Fatal("accepted a manifest under another digest")
		}
	})
}

// registrySource is an ArtifactSource over go-containerregistry's remote
// package, as a plain registry client reads referrers.
type registrySource struct{ remoteSource }

func (registrySource) Referrers(ctx context.Context, repo string, subject v1.Hash) ([]v1.Descriptor, error) {
	r, err := name.NewRepository(repo)
	if err != nil {
		return nil, err
	}
	idx, err := remote.Referrers(r.Digest(subject.String()), remote.WithContext(ctx))
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	return im.Manifests, nil
}

func (registrySource) Blob(ctx context.Context, repo string, d v1.Hash) (io.ReadCloser, error) {
	r, err := name.NewRepository(repo)
	if err != nil {
		return nil, err
	}
	l, err := remote.Layer(r.Digest(d.String()), remote.WithContext(ctx))
	if err != nil {
		return nil, err
	}
	return l.Compressed()
}

// pushPublished pushes an artifact for subject in repo: the blob, the
// empty config and the manifest, by digest.
func pushPublished(t *testing.T, repo name.Repository, blob, manifest []byte) v1.Hash {
	t.Helper()
	for _, b := range [][]byte{blob, []byte("{}")} {
		if err := remote.WriteLayer(repo, static.NewLayer(b, types.OCIEmptyJSON)); err != nil {
			t.Fatal(err)
		}
	}
	d := sha(manifest)
	if err := remote.Put(repo.Digest(d.String()), rawManifest(manifest)); err != nil {
		t.Fatal(err)
	}
	return d
}

type rawManifest []byte

func (m rawManifest) RawManifest() ([]byte, error)        { return m, nil }
func (m rawManifest) MediaType() (types.MediaType, error) { return types.OCIManifestSchema1, nil }

// TestReadPublished reads, through the referrers API and through the
// tag-schema fallback, the newest profiles of a subject (ties by digest),
// skips bad ones with their reasons and ignores other artifacts.
func TestReadPublished(t *testing.T) {
	for _, api := range []bool{true, false} {
		t.Run(fmt.Sprintf("referrersAPI=%v", api), func(t *testing.T) {
			ctx := context.Background()
			s := httptest.NewServer(registry.New(registry.Logger(stdlog.New(io.Discard, "", 0)), registry.WithReferrersSupport(api)))
			defer s.Close()
			repo, err := name.NewRepository(strings.TrimPrefix(s.URL, "http://") + "/mirror/base")
			if err != nil {
				t.Fatal(err)
			}
			// The subject must exist for the fallback tag's sake.
			subjectBody := []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.empty.v1+json","size":2,"digest":"` + sha([]byte("{}")).String() + `"},"layers":[]}`)
			pushPublished(t, repo, []byte("{}"), subjectBody)
			subject := sha(subjectBody)
			sub := func(m *v1.Manifest) {
				m.Subject = &v1.Descriptor{MediaType: types.OCIManifestSchema1, Size: int64(len(subjectBody)), Digest: subject}
			}
			base := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
			var want []v1.Hash
			for i := range 4 {
				p := sample()
				p.Layers[0].Files[0].Path = fmt.Sprintf("file/%d", i)
				blob, _ := p.Marshal()
				d := pushPublished(t, repo, blob, artifactManifest(blob, base.Add(time.Duration(i%3)*time.Hour), sub))
				want = append(want, d)
			}
			// Newest first: i=2 (2h), i=1 (1h), then i=0 and i=3 (0h)
			// by digest.
			tied := []v1.Hash{want[0], want[3]}
			slices.SortFunc(tied, func(a, b v1.Hash) int { return strings.Compare(a.String(), b.String()) })
			order := []v1.Hash{want[2], want[1], tied[0], tied[1]}

			bad := []byte(`{"version":1,"kind":"lazybase.prefetch.profile","layers":[{"runs":1,"files":[]}]}`)
			badD := pushPublished(t, repo, bad, artifactManifest(bad, base.Add(3*time.Hour), sub))
			blob, _ := sample().Marshal()
			pushPublished(t, repo, blob, artifactManifest(blob, base.Add(4*time.Hour), func(m *v1.Manifest) {
				sub(m)
				m.ArtifactType = "application/vnd.example.signature"
			}))

			got, skipped, err := ReadPublished(ctx, registrySource{}, repo.String(), subject)
			if err != nil {
				t.Fatal(err)
			}
			var digests []v1.Hash
			for _, p := range got {
				digests = append(digests, p.Digest)
				if p.Subject != subject || p.Profile == nil {
					t.Errorf("published %+v", p)
				}
			}
			if !slices.Equal(digests, order) {
				t.Errorf("read %v, want %v", digests, order)
			}
			if len(skipped) != 1 || skipped[0].Digest != badD.String() || !strings.Contains(skipped[0].Reason, "neither digest nor diffID") {
				t.Errorf("skipped %+v, want the bad profile %s", skipped, badD)
			}

			got, _, err = ReadPublished(ctx, registrySource{}, repo.String(), subject, WithMaxArtifacts(2))
			if err != nil || len(got) != 2 || got[0].Digest != order[0] || got[1].Digest != order[1] {
				t.Errorf("newest 2: %+v, %v", got, err)
			}
			if _, _, err := ReadPublished(ctx, registrySource{}, repo.String(), subject, WithMaxArtifacts(MaxArtifactsPerImage+1)); err == nil {
				t.Error("accepted too many artifacts")
			}
			none, _, err := ReadPublished(ctx, registrySource{}, repo.String(), testSubject)
			if err != nil || len(none) != 0 {
				t.Errorf("subject without referrers: %+v, %v", none, err)
			}
		})
	}
}

// loopProfile is a profile of one source layer with the given files, each
// of size 100, read once in this order.
func loopProfile(files ...string) *Profile {
	l := Layer{Digest: digestA, SourceDigest: digestA, Runs: 1}
	for i, f := range files {
		l.Files = append(l.Files, File{Path: f, Size: 100, Count: 1, RankSum: int64(i)})
	}
	return &Profile{Version: ProfileVersion, Kind: ProfileKind, Layers: []Layer{l}}
}

func TestMergeWeighted(t *testing.T) {
	now := time.Date(2026, 12, 3, 0, 0, 0, 0, time.UTC)
	day := 24 * time.Hour
	pub := func(age time.Duration, files ...string) Published {
		return Published{Created: now.Add(-age), Profile: loopProfile(files...)}
	}
	paths := func(p *Profile) []string {
		var out []string
		for _, f := range p.Selected()[0] {
			out = append(out, f.Path)
		}
		return out
	}

	// Old runs read b first, the new one a first: weighted, a leads.
	pubs := []Published{pub(0, "a", "b"), pub(20*day, "b", "a"), pub(21*day, "b", "a")}
	m, used, err := MergeWeighted(nil, pubs, Weighting{Now: now, HalfLife: 7 * day})
	if err != nil || used != 3 {
		t.Fatal(used, err)
	}
	if got := paths(m); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("weighted order %q, want a first", got)
	}
	// Whole half-lives 0, 2 and 3: weights 8, 2 and 1.
	if m.Layers[0].Runs != 8+2+1 {
		t.Errorf("weighted runs %d, want 11 (8 + 2 + 1)", m.Layers[0].Runs)
	}
	m, _, _ = MergeWeighted(nil, pubs, Weighting{Now: now})
	if got := paths(m); !slices.Equal(got, []string{"b", "a"}) {
		t.Errorf("unweighted order %q, want b first", got)
	}

	// max_age drops the old ones.
	m, used, _ = MergeWeighted(nil, []Published{pub(0, "a"), pub(40*day, "old")}, Weighting{Now: now, MaxAge: 30 * day})
	if used != 1 || !slices.Equal(paths(m), []string{"a"}) {
		t.Errorf("max age: used %d, %q", used, paths(m))
	}

	// min_fraction keeps files read in half the runs.
	m, _, _ = MergeWeighted(nil, []Published{pub(0, "a", "b"), pub(0, "a"), pub(0, "a", "c"), pub(0, "a", "b")}, Weighting{Now: now, MinFraction: 0.5})
	if got := paths(m); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("min fraction: %q, want a, b", got)
	}

	// The static profile's rules win; published rules are ignored.
	static := loopProfile("s")
	static.Rules = Rules{Exclude: []string{"x*"}}
	p := loopProfile("xa", "b")
	p.Rules = Rules{Include: []string{"xa"}}
	m, _, _ = MergeWeighted(static, []Published{{Created: now, Profile: p}}, Weighting{Now: now})
	if got := paths(m); !slices.Equal(got, []string{"s", "b"}) || len(m.Rules.Include) != 0 {
		t.Errorf("static rules: %q, rules %+v", got, m.Rules)
	}

	// Deterministic: the same inputs give the same bytes.
	a, _, _ := MergeWeighted(static, pubs, Weighting{Now: now, HalfLife: day, MinFraction: 0.2})
	b, _, _ := MergeWeighted(static, pubs, Weighting{Now: now, HalfLife: day, MinFraction: 0.2})
	ab, _ := a.Marshal()
	bb, _ := b.Marshal()
	if !bytes.Equal(ab, bb) {
		t.Error("two merges of the same profiles differ")
	}

	// Huge numbers are scaled down, not overflowed.
	big := loopProfile("a", "b")
	big.Layers[0].Runs = maxRuns
	big.Layers[0].Files[0].Count = maxRuns
	m, used, err = MergeWeighted(nil, []Published{{Created: now, Profile: big}, pub(30*day, "c")}, Weighting{Now: now, HalfLife: day})
	if err != nil || used != 2 || m.Layers[0].Runs > 2*maxWeightedRuns {
		t.Errorf("huge runs: %+v, %d, %v", m, used, err)
	}
	hostile := loopProfile("a")
	hostile.Layers[0].Files[0].RankSum = maxRankSum
	if _, used, err := MergeWeighted(nil, []Published{{Created: now, Profile: hostile}, pub(30*day, "c")}, Weighting{Now: now, HalfLife: day}); err != nil || used != 1 {
		t.Errorf("huge rank sum: used %d, %v; want it left out", used, err)
	}
}

func TestBySource(t *testing.T) {
	p := &Profile{Version: ProfileVersion, Kind: ProfileKind, Image: "example.com/a:1", Digest: digestB, Rules: Rules{MinCount: 2}, Layers: []Layer{
		{Digest: digestA, DiffID: diffA, SourceDigest: digestC, Runs: 1, Files: []File{{Path: "x", Count: 1}}},
		{Digest: digestB, Runs: 1},
	}}
	got := p.BySource(true)
	if len(got.Layers) != 1 || got.Layers[0].Digest != digestC || got.Layers[0].DiffID != "" || got.Image != "" || got.Digest != "" || !got.Rules.IsZero() {
		t.Errorf("BySource(true) = %+v", got)
	}
	if err := got.Validate(); err != nil {
		t.Error(err)
	}
	if got := p.BySource(false); len(got.Layers) != 2 || got.Layers[1].Digest != digestB {
		t.Errorf("BySource(false) = %+v", got)
	}
	got.Layers[0].Files[0].Path = "changed"
	if p.Layers[0].Files[0].Path != "x" {
		t.Error("BySource shares files with its profile")
	}
}

func TestChange(t *testing.T) {
	budget := loopProfile("a", "b", "c")
	budget.Rules.LayerBytes = 200
	for _, tc := range []struct {
		name string
		a, b *Profile
		want float64
	}{
		{"both nil", nil, nil, 0},
		{"from nothing", nil, loopProfile("a"), 1},
		{"to nothing", loopProfile("a"), nil, 1},
		{"same", loopProfile("a", "b"), loopProfile("a", "b"), 0},
		{"order does not count", loopProfile("a", "b"), loopProfile("b", "a"), 0},
		{"one added of four", loopProfile("a", "b", "c"), loopProfile("a", "b", "c", "d"), 0.25},
		{"one swapped", loopProfile("a", "b"), loopProfile("a", "c"), 1},
		{"budgets count", budget, loopProfile("a", "b"), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Change(tc.a, tc.b); got != tc.want {
				t.Errorf("Change = %g, want %g", got, tc.want)
			}
		})
	}
}

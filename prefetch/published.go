package prefetch

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"slices"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// MaxArtifactManifestBytes bounds the manifest of a published profile; a
// referrer announcing a larger one is skipped without reading it.
const MaxArtifactManifestBytes = 64 << 10

// ArtifactSource reads what a registry holds about a manifest: its
// referrers and their manifests and blobs. A registry client stands
// behind it (the mirror's); this package does not reach registries
// itself.
type ArtifactSource interface {
	// Referrers returns the descriptors of the manifests of repo whose
	// subject is subject: the referrers API, or the tag-schema fallback
	// for registries without it. No referrer is an empty list, not an
	// error.
	Referrers(ctx context.Context, repo string, subject v1.Hash) ([]v1.Descriptor, error)
	// ManifestSource reads an artifact's manifest, by repo@digest.
	ManifestSource
	// Blob opens blob d of repo.
	Blob(ctx context.Context, repo string, d v1.Hash) (io.ReadCloser, error)
}

// Published is one profile a builder (or a mirror) published for an
// image.
type Published struct {
	// Digest is the artifact manifest's digest.
	Digest v1.Hash
	// Subject is the manifest it refers to.
	Subject v1.Hash
	// Created is the manifest's AnnotationCreated, else the profile's
	// LastRecord, else zero.
	Created time.Time
	// Annotations are the manifest's annotations.
	Annotations map[string]string
	// Profile is the published profile, validated.
	Profile *Profile
}

// SkippedArtifact is a referrer that looked like a published profile but
// was not used, and why.
type SkippedArtifact struct {
	Digest string
	Reason string
}

// Artifact is the decoded manifest of a published profile.
type Artifact struct {
	// Layer is the profile blob's descriptor.
	Layer v1.Descriptor
	// Created is AnnotationCreated, zero when absent.
	Created     time.Time
	Annotations map[string]string
}

// ParseArtifact decodes and checks the manifest of a published profile
// (see ArtifactType): its bytes must hash to digest, be an OCI image
// manifest of artifactType ArtifactType with the OCI empty config, exactly
// one layer of media type ArtifactType and a size from 1 to
// MaxArtifactBytes, and refer to subject. AnnotationCreated, when present,
// must be an RFC 3339 time.
func ParseArtifact(b []byte, digest, subject v1.Hash) (*Artifact, error) {
	if len(b) > MaxArtifactManifestBytes {
		return nil, fmt.Errorf("manifest of %d bytes, above %d", len(b), MaxArtifactManifestBytes)
	}
	got, _, err := v1.SHA256(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	if got != digest {
		return nil, fmt.Errorf("manifest content has digest %s", got)
	}
	var m v1.Manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("decoding the manifest: %w", err)
	}
	switch {
	case m.SchemaVersion != 2:
		return nil, fmt.Errorf("schemaVersion %d, want 2", m.SchemaVersion)
	case m.MediaType != "" && m.MediaType != types.OCIManifestSchema1:
		return nil, fmt.Errorf("media type %q, want %q", m.MediaType, types.OCIManifestSchema1)
	case m.ArtifactType != ArtifactType:
		return nil, fmt.Errorf("artifactType %q, want %q", m.ArtifactType, ArtifactType)
	case m.Config.MediaType != types.OCIEmptyJSON:
		return nil, fmt.Errorf("config media type %q, want %q", m.Config.MediaType, types.OCIEmptyJSON)
	case len(m.Layers) != 1:
		return nil, fmt.Errorf("%d layers, want 1", len(m.Layers))
	case m.Subject == nil:
		return nil, errors.New("no subject")
	case m.Subject.Digest != subject:
		return nil, fmt.Errorf("subject %s, want %s", m.Subject.Digest, subject)
	}
	l := m.Layers[0]
	switch {
	case l.MediaType != ArtifactType:
		return nil, fmt.Errorf("layer media type %q, want %q", l.MediaType, ArtifactType)
	case l.Digest.Algorithm != "sha256" || len(l.Digest.Hex) != 64:
		return nil, fmt.Errorf("layer digest %q is not a sha256 digest", l.Digest)
	case l.Size < 1 || l.Size > MaxArtifactBytes:
		return nil, fmt.Errorf("profile of %d bytes, want 1 to %d", l.Size, MaxArtifactBytes)
	}
	a := &Artifact{Layer: l, Annotations: m.Annotations}
	if s, ok := m.Annotations[AnnotationCreated]; ok {
		t, err := time.Parse(time.RFC3339, s)
		if err != nil {
			return nil, fmt.Errorf("annotation %s: %w", AnnotationCreated, err)
		}
		if t.Year() < 1 || t.Year() > 9999 {
			return nil, fmt.Errorf("annotation %s: %s out of range", AnnotationCreated, s)
		}
		a.Created = t.UTC()
	}
	return a, nil
}

// ParseArtifactBlob checks a profile blob against its descriptor (size
// and digest) and parses it with ParseProfile.
func ParseArtifactBlob(layer v1.Descriptor, b []byte) (*Profile, error) {
	if int64(len(b)) != layer.Size {
		return nil, fmt.Errorf("profile blob %s: %d bytes, descriptor says %d", layer.Digest, len(b), layer.Size)
	}
	got, _, err := v1.SHA256(bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	if got != layer.Digest {
		return nil, fmt.Errorf("profile blob %s: content has digest %s", layer.Digest, got)
	}
	p, err := ParseProfile(b)
	if err != nil {
		return nil, fmt.Errorf("profile blob %s: %w", layer.Digest, err)
	}
	return p, nil
}

// ReadOption configures ReadPublished.
type ReadOption func(*readOptions) error

type readOptions struct {
	max int
}

// WithMaxArtifacts keeps the newest n published profiles (1 to
// MaxArtifactsPerImage; default MaxArtifactsPerImage).
func WithMaxArtifacts(n int) ReadOption {
	return func(o *readOptions) error {
		if n < 1 || n > MaxArtifactsPerImage {
			return fmt.Errorf("max artifacts %d: want 1 to %d", n, MaxArtifactsPerImage)
		}
		o.max = n
		return nil
	}
}

// ReadPublished reads the profiles published for the manifest subject of
// repo: it lists subject's referrers, takes those that may be published
// profiles (artifactType ArtifactType; also none or the empty config's
// media type, which registries that derive artifactType from the config
// report), newest first by AnnotationCreated (ties by digest), and reads
// them until it holds the newest MaxArtifactsPerImage (or
// WithMaxArtifacts) valid ones, reading at most four times that many
// manifests. Each is checked with ParseArtifact
// (manifest size checked before reading it) and ParseArtifactBlob (blob
// size checked before reading it). A bad artifact is skipped with a
// warning naming its digest and returned among the skipped; only a
// failure to list the referrers is an error. The result is ordered newest
// first, ties by digest.
func ReadPublished(ctx context.Context, src ArtifactSource, repo string, subject v1.Hash, opts ...ReadOption) ([]Published, []SkippedArtifact, error) {
	o := readOptions{max: MaxArtifactsPerImage}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, nil, err
		}
	}
	refs, err := src.Referrers(ctx, repo, subject)
	if err != nil {
		return nil, nil, fmt.Errorf("listing the referrers of %s@%s: %w", repo, subject, err)
	}
	type cand struct {
		d       v1.Descriptor
		created time.Time
	}
	var cands []cand
	seen := map[v1.Hash]bool{}
	for _, d := range refs {
		switch d.ArtifactType {
		case ArtifactType, "", string(types.OCIEmptyJSON):
		default:
			continue
		}
		if seen[d.Digest] {
			continue
		}
		seen[d.Digest] = true
		var t time.Time
		if s, ok := d.Annotations[AnnotationCreated]; ok {
			t, _ = time.Parse(time.RFC3339, s)
		}
		cands = append(cands, cand{d: d, created: t})
	}
	slices.SortFunc(cands, func(a, b cand) int {
		if c := b.created.Compare(a.created); c != 0 {
			return c
		}
		return cmp.Compare(a.d.Digest.String(), b.d.Digest.String())
	})
	var (
		out     []Published
		skipped []SkippedArtifact
	)
	// Artifacts of other types announced as "" are read too: bound the
	// manifests read.
	budget := 4 * o.max
	for _, c := range cands {
		if len(out) >= o.max || budget == 0 {
			break
		}
		budget--
		p, err := readOne(ctx, src, repo, subject, c.d)
		if errors.Is(err, errOtherType) {
			continue
		}
		if err != nil {
			log.G(ctx).WithField("artifact", c.d.Digest.String()).WithField("subject", subject.String()).WithError(err).Warn("skipping a published prefetch profile")
			skipped = append(skipped, SkippedArtifact{Digest: c.d.Digest.String(), Reason: err.Error()})
			continue
		}
		out = append(out, *p)
	}
	slices.SortFunc(out, func(a, b Published) int {
		if c := b.Created.Compare(a.Created); c != 0 {
			return c
		}
		return cmp.Compare(a.Digest.String(), b.Digest.String())
	})
	return out, skipped, nil
}

// errOtherType marks a referrer announced without an artifactType that
// is some other artifact: not a published profile, not a bad one.
var errOtherType = errors.New("not a published profile")

func readOne(ctx context.Context, src ArtifactSource, repo string, subject v1.Hash, d v1.Descriptor) (*Published, error) {
	if d.Size > MaxArtifactManifestBytes {
		return nil, fmt.Errorf("manifest of %d bytes, above %d", d.Size, MaxArtifactManifestBytes)
	}
	raw, err := src.Manifest(ctx, repo+"@"+d.Digest.String())
	if err != nil {
		return nil, fmt.Errorf("reading the manifest: %w", err)
	}
	if d.ArtifactType != ArtifactType && !isProfileManifest(raw.Body) {
		return nil, errOtherType
	}
	a, err := ParseArtifact(raw.Body, d.Digest, subject)
	if err != nil {
		return nil, err
	}
	rc, err := src.Blob(ctx, repo, a.Layer.Digest)
	if err != nil {
		return nil, fmt.Errorf("reading profile blob %s: %w", a.Layer.Digest, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(io.LimitReader(rc, a.Layer.Size+1))
	if err != nil {
		return nil, fmt.Errorf("reading profile blob %s: %w", a.Layer.Digest, err)
	}
	p, err := ParseArtifactBlob(a.Layer, b)
	if err != nil {
		return nil, err
	}
	created := a.Created
	if created.IsZero() {
		created = p.LastRecord
	}
	return &Published{Digest: d.Digest, Subject: subject, Created: created, Annotations: a.Annotations, Profile: p}, nil
}

// isProfileManifest tells whether a manifest says it is a published
// profile (whatever else is wrong with it).
func isProfileManifest(b []byte) bool {
	var m struct {
		ArtifactType string `json:"artifactType"`
	}
	return json.Unmarshal(b, &m) == nil && m.ArtifactType == ArtifactType
}

// BySource returns a copy of p whose layers are keyed by the source
// layers they were converted from: a layer with a SourceDigest gets it
// as its Digest (and no DiffID, which named the converted layer); a layer
// without one is dropped when dropUnresolved is set (a published profile:
// its layer is not one of the converted image's), else kept as it is (a
// hand-made profile may name source layers directly). The image,
// digests and rules are dropped: the copy is bound to no image. Profiles
// recorded on different conversions of the same source merge layer by
// layer once keyed so.
func (p *Profile) BySource(dropUnresolved bool) *Profile {
	out := &Profile{Version: ProfileVersion, Kind: ProfileKind, LastRecord: p.LastRecord, Layers: []Layer{}}
	for _, l := range p.Layers {
		switch {
		case l.SourceDigest != "":
			l.Digest, l.DiffID = l.SourceDigest, ""
		case dropUnresolved:
			continue
		}
		if slices.ContainsFunc(out.Layers, func(o Layer) bool {
			return (l.Digest != "" && o.Digest == l.Digest) || (l.DiffID != "" && o.DiffID == l.DiffID)
		}) {
			// Two converted layers of one source layer: keep the
			// first, as Validate refuses a layer listed twice.
			continue
		}
		l.Files = slices.Clone(l.Files)
		out.Layers = append(out.Layers, l)
	}
	return out
}

// Weighting says how MergeWeighted folds published profiles.
type Weighting struct {
	// Now is the time ages are measured from.
	Now time.Time
	// MaxAge drops profiles created longer ago; 0 keeps every one.
	MaxAge time.Duration
	// HalfLife weighs a profile created one half-life later than another
	// twice as much (by whole half-lives, up to MaxWeightShift); 0 weighs
	// every profile alike.
	HalfLife time.Duration
	// MinFraction drops, from each merged layer, the files read in less
	// than this fraction of the layer's (weighted) runs; 0 keeps every
	// file.
	MinFraction float64
}

// MaxWeightShift bounds the weights of MergeWeighted: the newest profile
// weighs at most 1<<MaxWeightShift times the oldest.
const MaxWeightShift = 8

// Bounds on the weighted numbers of one profile, so that the merge of
// MaxArtifactsPerImage of them, and a static profile, stays within the
// profile limits.
const (
	maxWeightedRuns    = 1 << 24
	maxWeightedRankSum = 1 << 54
)

// MergeWeighted merges published profiles, each already keyed by source
// (BySource), after the static profile, if any, whose rules the result
// keeps:
//
//   - profiles created more than w.MaxAge before w.Now are dropped;
//   - a profile k whole half-lives younger than the oldest kept one has
//     its runs, counts and rank sums multiplied by 2^k (k at most
//     MaxWeightShift), so newer runs weigh more and a file's mean rank in
//     one profile is unchanged; a profile's numbers are then halved as
//     often as needed to keep its runs at most 2^24 per layer (files
//     whose count drops to 0 go);
//   - Merge folds them, the static profile first, then newest first;
//   - files read in less than w.MinFraction of their layer's merged
//     runs are dropped.
//
// A published profile whose rank sums are too large to weigh is left out.
// All arithmetic is on integers except the fraction test, which is
// exact for fractions of runs below 2^53: the same inputs give the same
// profile. It returns the merged profile and how many published profiles
// it used.
func MergeWeighted(static *Profile, pubs []Published, w Weighting) (*Profile, int, error) {
	type kept struct {
		p *Profile
		k int64
	}
	var in []kept
	var oldest int64
	for _, pub := range pubs {
		age := max(w.Now.Sub(pub.Created), 0)
		if w.MaxAge > 0 && age > w.MaxAge {
			continue
		}
		var k int64
		if w.HalfLife > 0 {
			k = int64(age / w.HalfLife)
		}
		oldest = max(oldest, k)
		in = append(in, kept{p: pub.Profile, k: k})
	}
	var profiles []*Profile
	if static != nil {
		s, err := weigh(static, 0)
		if err != nil {
			return nil, 0, fmt.Errorf("static profile: %w", err)
		}
		s.Image, s.Digest, s.SourceDigest = "", "", ""
		profiles = append(profiles, s)
	}
	used := 0
	for _, c := range in {
		p, err := weigh(c.p, uint(min(oldest-c.k, MaxWeightShift)))
		if err != nil {
			continue
		}
		p.Rules = Rules{}
		p.Image, p.Digest, p.SourceDigest = "", "", ""
		if p.Validate() != nil {
			// One bad profile never spoils the merge of the others.
			continue
		}
		profiles = append(profiles, p)
		used++
	}
	if len(profiles) == 0 {
		return &Profile{Version: ProfileVersion, Kind: ProfileKind, Layers: []Layer{}}, 0, nil
	}
	out, err := Merge(profiles...)
	if err != nil {
		return nil, 0, err
	}
	if w.MinFraction > 0 {
		for i := range out.Layers {
			l := &out.Layers[i]
			need := int(math.Ceil(w.MinFraction * float64(l.Runs)))
			l.Files = slices.DeleteFunc(l.Files, func(f File) bool { return f.Count < need })
		}
	}
	return out, used, nil
}

// weigh returns a copy of p with runs, counts and rank sums multiplied by
// 2^shift, then halved until every layer's runs are at most
// maxWeightedRuns; files left with a count of 0 are dropped. It fails
// when a rank sum stays above maxWeightedRankSum.
func weigh(p *Profile, shift uint) (*Profile, error) {
	out := *p
	out.Rules.Include = slices.Clone(p.Rules.Include)
	out.Rules.Exclude = slices.Clone(p.Rules.Exclude)
	out.Layers = make([]Layer, 0, len(p.Layers))
	for _, l := range p.Layers {
		runs := uint64(l.Runs) << shift
		down := uint(0)
		for runs>>down > maxWeightedRuns {
			down++
		}
		l.Runs = int(runs >> down)
		files := make([]File, 0, len(l.Files))
		for _, f := range l.Files {
			c := (uint64(f.Count) << shift) >> down
			if c == 0 {
				continue
			}
			hi, lo := bits.Mul64(uint64(f.RankSum), 1<<shift)
			if hi != 0 || lo>>down > maxWeightedRankSum {
				return nil, fmt.Errorf("file %q: rank sum %d too large to weigh", f.Path, f.RankSum)
			}
			f.Count, f.RankSum = int(c), int64(lo>>down)
			files = append(files, f)
		}
		l.Files = files
		if l.Runs == 0 {
			continue
		}
		out.Layers = append(out.Layers, l)
	}
	return &out, nil
}

// Change measures how much the selected files (Selected) of b differ
// from those of a: the bytes of the files selected in only one of them
// over the bytes selected in the larger, from 0 (the same files) to 1.
// Files are the same when their layers' keys (source digest, else digest,
// else diffID) and paths are; a file of unknown size counts as 1 byte.
// Order does not count. A nil profile selects nothing; two empty
// selections differ by 0.
func Change(a, b *Profile) float64 {
	sa, ta := selection(a)
	sb, tb := selection(b)
	var diff int64
	for k, n := range sa {
		if _, ok := sb[k]; !ok {
			diff += n
		}
	}
	for k, n := range sb {
		if _, ok := sa[k]; !ok {
			diff += n
		}
	}
	total := max(ta, tb)
	if total == 0 {
		return 0
	}
	return float64(diff) / float64(total)
}

// SelectedBytes returns how many files Selected keeps and their bytes (a
// file of unknown size counting 1).
func (p *Profile) SelectedBytes() (files int, bytes int64) {
	s, t := selection(p)
	return len(s), t
}

func selection(p *Profile) (map[[2]string]int64, int64) {
	out := map[[2]string]int64{}
	if p == nil {
		return out, 0
	}
	var total int64
	for i, files := range p.Selected() {
		l := p.Layers[i]
		key := cmp.Or(l.SourceDigest, l.Digest, l.DiffID)
		for _, f := range files {
			k := [2]string{key, f.Path}
			if _, ok := out[k]; ok {
				continue
			}
			n := max(f.Size, 1)
			out[k] = n
			total += n
		}
	}
	return out, total
}

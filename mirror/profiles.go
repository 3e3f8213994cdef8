package mirror

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/prefetch"
)

// AnnotationMergedProfile marks the profile the mirror converted an image
// with, which it publishes as a referrer of every platform manifest of the
// conversion (value: the conversion's digest, index or image, so that the
// copies of one merge count once):
// the next run reads it as the current conversion's selection (for
// min_change) and folds it in like a builder's profile, so that what the
// builders published against an older conversion is carried forward.
const AnnotationMergedProfile = "dev.lazybase.prefetch.merged"

// AnnotationMergedFrom lists, comma-separated, the digests of the
// published profiles a merged profile folds in (omitted when longer than
// maxMergedFrom), so that they are not counted again while they remain
// referrers of the same conversion or of another image's: with shared
// layer lists, for the layers the merged profile carries.
const AnnotationMergedFrom = "dev.lazybase.prefetch.merged.from"

// maxMergedFrom bounds AnnotationMergedFrom, within
// prefetch.MaxArtifactManifestBytes.
const maxMergedFrom = 32 << 10

// Defaults of the [profiles] table.
const (
	DefaultProfileMinChange = 0.1
	DefaultProfileMaxAge    = 30 * 24 * time.Hour
	DefaultProfileHalfLife  = 7 * 24 * time.Hour
)

// ProfilesConfig is the [profiles] table: the closed prefetch loop.
//
//	[profiles]
//	# Read the prefetch profiles builders publish for the images this
//	# mirror converted (OCI artifacts whose subject is a platform manifest
//	# of the conversion, see prefetch.ArtifactType), merge them, and
//	# convert the source with the merged profile. Default: true.
//	from_registry = true
//	# A source layer has one prefetch list for all the images containing
//	# it (merged from the profiles published against any of them); it
//	# changes, and the images containing it are converted again, only
//	# when the merged runs select files that differ from its current list
//	# by at least this fraction of the selected bytes (added plus
//	# dropped, over the larger selection), 0 to 1; 0 re-converts on any
//	# change. Default: 0.1.
//	min_change = 0.1
//	# Published profiles older than this are not merged. "0s": no limit.
//	# Default: "720h".
//	max_age = "720h"
//	# A profile one half-life newer than another weighs twice as much
//	# (whole half-lives, at most 256 times). "0s": all weigh alike.
//	# Default: "168h".
//	half_life = "168h"
//	# Newest published profiles merged per platform manifest, 1 to 64.
//	# Default: 64.
//	max_artifacts = 64
//	# Drop the files read in less than this fraction of their layer's
//	# (weighted) runs, 0 to 1. Default: 0.
//	min_fraction = 0.0
//	# Prefetch budgets, in bytes, per layer and per image, where the
//	# profile in prefetch_dir sets none (its rules win). image_bytes
//	# applies only to images with a profile in prefetch_dir: the shared
//	# list of a layer cannot depend on the image. Default: 0 (none).
//	layer_bytes = 0
//	image_bytes = 0
//
// A simple prefetch list in prefetch_dir takes precedence: an image that
// has one is converted with it alone. A profile in prefetch_dir is merged
// with the published ones, and its rules apply to the result.
type ProfilesConfig struct {
	FromRegistry *bool    `toml:"from_registry"`
	MinChange    *float64 `toml:"min_change"`
	MaxAge       string   `toml:"max_age"`
	HalfLife     string   `toml:"half_life"`
	MaxArtifacts int      `toml:"max_artifacts"`
	MinFraction  float64  `toml:"min_fraction"`
	LayerBytes   int64    `toml:"layer_bytes"`
	ImageBytes   int64    `toml:"image_bytes"`
}

func (c *ProfilesConfig) validate() error {
	if c.FromRegistry == nil {
		t := true
		c.FromRegistry = &t
	}
	if c.MinChange == nil {
		v := DefaultProfileMinChange
		c.MinChange = &v
	}
	if *c.MinChange < 0 || *c.MinChange > 1 {
		return fmt.Errorf("profiles.min_change: want 0 to 1, got %g", *c.MinChange)
	}
	if c.MinFraction < 0 || c.MinFraction > 1 {
		return fmt.Errorf("profiles.min_fraction: want 0 to 1, got %g", c.MinFraction)
	}
	for _, d := range []struct {
		key string
		v   *string
		def time.Duration
	}{
		{"profiles.max_age", &c.MaxAge, DefaultProfileMaxAge},
		{"profiles.half_life", &c.HalfLife, DefaultProfileHalfLife},
	} {
		if *d.v == "" {
			*d.v = d.def.String()
		}
		if v, err := time.ParseDuration(*d.v); err != nil || v < 0 {
			return fmt.Errorf("%s: want a duration such as \"168h\" (\"0s\" for none), got %q", d.key, *d.v)
		}
	}
	if c.MaxArtifacts == 0 {
		c.MaxArtifacts = prefetch.MaxArtifactsPerImage
	}
	if c.MaxArtifacts < 1 || c.MaxArtifacts > prefetch.MaxArtifactsPerImage {
		return fmt.Errorf("profiles.max_artifacts: want 1 to %d, got %d", prefetch.MaxArtifactsPerImage, c.MaxArtifacts)
	}
	if c.LayerBytes < 0 || c.ImageBytes < 0 {
		return errors.New("profiles.layer_bytes, profiles.image_bytes: must not be negative")
	}
	return nil
}

// weighting returns the merge weighting of a validated table at now.
func (c *ProfilesConfig) weighting(now time.Time) prefetch.Weighting {
	maxAge, _ := time.ParseDuration(c.MaxAge)
	half, _ := time.ParseDuration(c.HalfLife)
	return prefetch.Weighting{Now: now, MaxAge: maxAge, HalfLife: half, MinFraction: c.MinFraction}
}

// profilesEnabled reports whether the closed prefetch loop is on.
func (m *Mirror) profilesEnabled() bool { return *m.cfg.Profiles.FromRegistry }

// ProfileReport is what the closed prefetch loop did for one image.
type ProfileReport struct {
	// Found is how many valid published profiles were read from the
	// current conversion's referrers, the mirror's own merged one
	// among them (its copies on other platforms, and what a merged one
	// folds in already, not counted); Skipped how many bad ones were
	// skipped.
	Found   int `json:"found"`
	Skipped int `json:"skipped"`
	// Used is how many published profiles were merged (Found less the
	// ones older than max_age).
	Used int `json:"used"`
	// Files and Bytes are what the merged profile selects.
	Files int   `json:"files"`
	Bytes int64 `json:"bytes"`
	// Change is how much that selection differs from the current
	// conversion's (prefetch.Change), 0 to 1.
	Change float64 `json:"change"`
	// Reconverted tells whether the profiles made an up-to-date image be
	// converted again.
	Reconverted bool `json:"reconverted"`
	// Reason says what was decided and why.
	Reason string `json:"reason"`
	// Published is the digest of the merged profile the mirror published
	// as a referrer of the new conversion.
	Published string `json:"published,omitempty"`
}

// profilePlan is the prefetch source of one attempt: the static list or
// profile of prefetch_dir, merged with the published profiles once the
// source is open (UpToDate).
type profilePlan struct {
	static prefetch.Source
	src    prefetch.Source
	// merged is what the image is converted with; carry the merge of
	// the published profiles alone, which the mirror publishes with
	// the conversion.
	merged, carry *prefetch.Profile
	// folded are the digests of the published profiles carry folds in.
	folded []string
	// shared is the prefetch source of an image converted with the
	// shared lists of its layers (nil: converted with its own merge).
	shared *sharedSource
	rep    ProfileReport
}

// PrefetchFiles makes the plan the job's prefetch source.
func (pp *profilePlan) PrefetchFiles(diffID, digest v1.Hash) []string {
	if pp.src == nil {
		return nil
	}
	return pp.src.PrefetchFiles(diffID, digest)
}

// withProfiles wraps an UpToDate function (nil: never up to date) so that
// it merges the published profiles of the destination's current
// conversion into pp, and reports an up-to-date image as not up to date
// when the merged profile's selection changed by min_change or more.
//
// An image for which prefetch_dir has no list or profile is converted
// with the shared lists of its layers (see layerLists), and re-converted
// when the list of one of them changed.
func (m *Mirror) withProfiles(j Job, pp *profilePlan, ll *layerLists, inner job.UpToDateFunc) job.UpToDateFunc {
	return func(ctx context.Context, dest imageio.Ref, src *imageio.Source) (string, bool, error) {
		static := pp.static
		if static != nil {
			static = prefetch.For(ctx, static, j.Source, src.Descriptor.Digest)
		}
		if _, ok := static.(*prefetch.List); ok {
			pp.src = static
			pp.rep.Reason = "a prefetch list in prefetch_dir: published profiles not used"
			if inner == nil {
				return "", false, nil
			}
			return inner(ctx, dest, src)
		}
		var (
			dgst string
			ok   bool
			err  error
		)
		if !dest.IsLayout() {
			// One read of the destination for inner and the profiles
			// (planLayerLists read it for the first attempt).
			var r *destRead
			if il := ll.images[j.Destination]; il != nil {
				r = il.takeDest()
			}
			if r == nil || r.ref.String() != dest.String() {
				r = &destRead{ref: dest}
				r.desc, r.body, r.err = m.client.Manifest(ctx, dest)
			}
			ctx = context.WithValue(ctx, destReadKey{}, r)
		}
		if inner != nil {
			if dgst, ok, err = inner(ctx, dest, src); err != nil {
				return dgst, ok, err
			}
		}
		sp, _ := static.(*prefetch.Profile)
		if il := ll.images[j.Destination]; sp == nil && il != nil {
			return m.decideShared(ctx, ll, il, pp, dgst, ok, inner != nil)
		}
		current, err := m.mergeProfiles(ctx, dest, sp, pp)
		if err != nil {
			// The registry could not tell: an up-to-date image is kept,
			// a new conversion is made with the static profile alone.
			log.G(ctx).WithError(err).Warn("reading published prefetch profiles failed; deciding without them")
			pp.rep.Reason = "published profiles unavailable: " + err.Error()
			if sp != nil {
				pp.src = sp
			}
			return dgst, ok, nil
		}
		if pp.merged != nil && len(pp.merged.Layers) > 0 {
			pp.src = pp.merged
		}
		pp.rep.Files, pp.rep.Bytes = pp.merged.SelectedBytes()
		pp.rep.Change = prefetch.Change(current, pp.merged)
		minChange := *m.cfg.Profiles.MinChange
		changed := pp.rep.Change > 0 && pp.rep.Change >= minChange
		switch {
		case !ok && inner != nil && dgst != "":
			pp.rep.Reason = "new conversion (source or format changed)"
		case !ok:
			pp.rep.Reason = "new conversion"
		case changed:
			pp.rep.Reconverted = true
			pp.rep.Reason = fmt.Sprintf("re-converted: the merged profile changed %.1f%% of the selected bytes (min_change %.1f%%)", 100*pp.rep.Change, 100*minChange)
			return dgst, false, nil
		default:
			pp.rep.Reason = fmt.Sprintf("kept: the merged profile changed %.1f%% of the selected bytes (min_change %.1f%%)", 100*pp.rep.Change, 100*minChange)
		}
		return dgst, ok, nil
	}
}

// decideShared decides, for an image converted with the shared lists of
// its layers, whether its current conversion (dgst, up to date when ok)
// is kept: when every layer's shared list is the one it was made with.
func (m *Mirror) decideShared(ctx context.Context, ll *layerLists, il *imageLists, pp *profilePlan, dgst string, ok, checked bool) (string, bool, error) {
	pp.shared = &sharedSource{ll: ll}
	pp.src = pp.shared
	pp.rep.Found, pp.rep.Skipped, pp.rep.Used = il.found, il.skipped, il.used
	if err := cmp.Or(il.err, ll.err); err != nil {
		// The registry could not tell: an up-to-date image is kept, a
		// new conversion is made with the shared lists as they are.
		log.G(ctx).WithError(err).Warn("reading published prefetch profiles failed; deciding without them")
		pp.rep.Reason = "published profiles unavailable: " + err.Error()
		return dgst, ok, nil
	}
	files := func(src string) []prefetch.File { return ll.list(src).files }
	now := profileOf(il.layers, files)
	was := profileOf(il.layers, func(src string) []prefetch.File { return il.lists[src] })
	merged := profileOf(il.layers, func(src string) []prefetch.File {
		g := ll.merged[src]
		p := &prefetch.Profile{Rules: prefetch.Rules{LayerBytes: ll.layerBytes}, Layers: []prefetch.Layer{g}}
		return p.Selected()[0]
	})
	pp.rep.Files, pp.rep.Bytes = now.SelectedBytes()
	pp.rep.Change = prefetch.Change(was, merged)
	var (
		changed int
		most    float64
	)
	for _, src := range il.layers {
		l := ll.list(src)
		if PrefetchFingerprint(paths(l.files)) != PrefetchFingerprint(paths(il.lists[src])) {
			changed++
			most = max(most, l.change)
		}
	}
	minChange := *m.cfg.Profiles.MinChange
	switch {
	case !ok && checked && dgst != "":
		pp.rep.Reason = "new conversion (source or format changed)"
	case !ok:
		pp.rep.Reason = "new conversion"
	case changed > 0:
		pp.rep.Reconverted = true
		pp.rep.Reason = fmt.Sprintf("re-converted: the shared prefetch lists of %d of its %d layers changed (up to %.1f%% of a layer's selected bytes; min_change %.1f%%)", changed, len(il.layers), 100*most, 100*minChange)
		return dgst, false, nil
	default:
		pp.rep.Reason = fmt.Sprintf("kept: the merged profile changed %.1f%% of the selected bytes (min_change %.1f%% per layer)", 100*pp.rep.Change, 100*minChange)
	}
	return dgst, ok, nil
}

// paths returns the paths of files.
func paths(files []prefetch.File) []string {
	out := make([]string, len(files))
	for i, f := range files {
		out[i] = f.Path
	}
	return out
}

// mergeProfiles reads the published profiles of the destination's
// current conversion (every platform manifest of it), merges them with
// the static profile into pp.merged, and returns the profile the current
// conversion was made with (the newest one the mirror published; nil when
// there is none, or no conversion).
func (m *Mirror) mergeProfiles(ctx context.Context, dest imageio.Ref, static *prefetch.Profile, pp *profilePlan) (*prefetch.Profile, error) {
	var staticBySource *prefetch.Profile
	if static != nil {
		staticBySource = static.BySource(false)
		staticBySource.Rules = static.Rules
	}
	var pubs []prefetch.Published
	var current *prefetch.Published
	if !dest.IsLayout() {
		children, err := m.platformManifests(ctx, dest)
		if err != nil {
			return nil, err
		}
		as := &artifactSource{m: m}
		repo := dest.Registry.Context().String()
		seen := map[v1.Hash]bool{}
		for _, c := range children {
			got, skipped, err := prefetch.ReadPublished(ctx, as, repo, c.digest, prefetch.WithMaxArtifacts(m.cfg.Profiles.MaxArtifacts))
			if err != nil {
				return nil, err
			}
			pp.rep.Skipped += len(skipped)
			for _, p := range got {
				if seen[p.Digest] || p.Annotations[AnnotationPrefetchUsed] != "" {
					continue
				}
				seen[p.Digest] = true
				if p.Annotations[AnnotationMergedProfile] == "" {
					p.Profile.Resolve(c.digest, c.manifest)
				}
				p.Profile = p.Profile.BySource(true)
				pubs = append(pubs, p)
			}
		}
	}
	// Newest first, ties by digest, across platforms.
	slices.SortStableFunc(pubs, func(a, b prefetch.Published) int {
		if c := b.Created.Compare(a.Created); c != 0 {
			return c
		}
		return bytes.Compare([]byte(a.Digest.String()), []byte(b.Digest.String()))
	})
	// What a merged profile of the mirror folded in already (a
	// re-conversion that gave the same digest has them as referrers
	// still) is not counted twice; the current conversion's profile is
	// the newest merged one no other folded in.
	folded := map[string]bool{}
	merges := map[string]bool{}
	for _, p := range pubs {
		if p.Annotations[AnnotationMergedProfile] != "" {
			for _, d := range strings.Split(p.Annotations[AnnotationMergedFrom], ",") {
				folded[d] = true
			}
		}
	}
	pubs = slices.DeleteFunc(pubs, func(p prefetch.Published) bool {
		if folded[p.Digest.String()] {
			return true
		}
		// One copy of a merge published on several platforms.
		if v := p.Annotations[AnnotationMergedProfile]; v != "" {
			if merges[v] {
				return true
			}
			merges[v] = true
		}
		return false
	})
	pp.rep.Found = len(pubs)
	pp.folded = nil
	for _, p := range pubs {
		pp.folded = append(pp.folded, p.Digest.String())
		if current == nil && p.Annotations[AnnotationMergedProfile] != "" {
			cp := p
			current = &cp
		}
	}
	w := m.cfg.Profiles.weighting(time.Now())
	merged, used, err := prefetch.MergeWeighted(staticBySource, pubs, w)
	if err != nil {
		return nil, fmt.Errorf("merging published profiles: %w", err)
	}
	// What the mirror publishes carries the published runs only: the
	// static profile is merged in afresh on every run.
	carry, _, err := prefetch.MergeWeighted(nil, pubs, w)
	if err != nil {
		return nil, fmt.Errorf("merging published profiles: %w", err)
	}
	// What the current conversion was made with: the static profile
	// and the merged profile the mirror published with it (no age
	// limit: its files are in the conversion, however old).
	var cur []prefetch.Published
	if current != nil {
		cur = append(cur, *current)
	}
	was, _, err := prefetch.MergeWeighted(staticBySource, cur, prefetch.Weighting{Now: w.Now, MinFraction: w.MinFraction})
	if err != nil {
		return nil, fmt.Errorf("merging the current conversion's profile: %w", err)
	}
	if used == 0 && static != nil {
		// Nothing published: the static profile as it is (Merge would
		// put a hand-made one in rank order).
		cp := *static
		merged = &cp
	}
	m.fillBudgets(merged)
	m.fillBudgets(was)
	pp.merged, pp.carry, pp.rep.Used = merged, carry, used
	return was, nil
}

// fillBudgets sets the [profiles] budgets where p's rules set none.
func (m *Mirror) fillBudgets(p *prefetch.Profile) {
	if p.Rules.LayerBytes == 0 {
		p.Rules.LayerBytes = m.cfg.Profiles.LayerBytes
	}
	if p.Rules.ImageBytes == 0 {
		p.Rules.ImageBytes = m.cfg.Profiles.ImageBytes
	}
}

// destRead is the destination manifest as an attempt read it once, for
// upToDate and the profiles (a context value under destReadKey).
type destRead struct {
	ref  imageio.Ref
	desc v1.Descriptor
	body []byte
	err  error
}

type destReadKey struct{}

// platformManifest is an image manifest of a conversion.
type platformManifest struct {
	desc     v1.Descriptor
	digest   v1.Hash
	manifest *v1.Manifest
}

// platformManifests reads the image manifests of what ref names: itself
// for an image, its image manifests for an index; none when ref does not
// exist.
func (m *Mirror) platformManifests(ctx context.Context, ref imageio.Ref) ([]platformManifest, error) {
	var (
		desc v1.Descriptor
		body []byte
		err  error
	)
	if r, ok := ctx.Value(destReadKey{}).(*destRead); ok && r.ref.String() == ref.String() {
		desc, body, err = r.desc, r.body, r.err
	} else {
		desc, body, err = m.client.Manifest(ctx, ref)
	}
	if err != nil {
		if errors.Is(err, imageio.ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	if desc.MediaType.IsImage() {
		man, err := v1.ParseManifest(bytes.NewReader(body))
		if err != nil {
			return nil, fmt.Errorf("manifest %s of %s: %w", desc.Digest, ref, err)
		}
		return []platformManifest{{desc: desc, digest: desc.Digest, manifest: man}}, nil
	}
	if !desc.MediaType.IsIndex() {
		return nil, fmt.Errorf("%s of %s is a %q, not an image manifest or index", desc.Digest, ref, desc.MediaType)
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("index %s of %s: %w", desc.Digest, ref, err)
	}
	var out []platformManifest
	for _, d := range idx.Manifests {
		if !d.MediaType.IsImage() {
			continue
		}
		cref, err := m.client.ParseRef(ref.Registry.Context().String() + "@" + d.Digest.String())
		if err != nil {
			return nil, err
		}
		cd, cb, err := m.client.Manifest(ctx, cref)
		if err != nil {
			return nil, err
		}
		if cd.Digest != d.Digest {
			return nil, fmt.Errorf("manifest %s of %s: registry named digest %s", d.Digest, ref, cd.Digest)
		}
		man, err := v1.ParseManifest(bytes.NewReader(cb))
		if err != nil {
			return nil, fmt.Errorf("manifest %s of %s: %w", d.Digest, ref, err)
		}
		out = append(out, platformManifest{desc: cd, digest: d.Digest, manifest: man})
	}
	return out, nil
}

// publishMerged publishes the profile an image was converted with (p,
// nil for none) as a referrer of every platform manifest of the
// conversion digest in dest's repository, marked with
// AnnotationMergedProfile, and, when used is not nil, the lists the
// conversion was made with, marked with AnnotationPrefetchUsed. It
// returns the digest of p's artifact (else used's).
func (m *Mirror) publishMerged(ctx context.Context, dest string, digest string, p *prefetch.Profile, folded []string, used *prefetch.Profile) (string, error) {
	ref, err := m.client.ParseRef(dest)
	if err != nil {
		return "", err
	}
	if ref.IsLayout() {
		return "", nil
	}
	repo := ref.Registry.Context()
	top, err := m.client.ParseRef(repo.String() + "@" + digest)
	if err != nil {
		return "", err
	}
	children, err := m.platformManifests(ctx, top)
	if err != nil {
		return "", err
	}
	type artifact struct {
		p   *prefetch.Profile
		ann map[string]string
	}
	var arts []artifact
	if p != nil {
		if p, err = fitArtifact(p); err != nil {
			return "", err
		}
		ann := map[string]string{AnnotationMergedProfile: digest}
		if from := strings.Join(folded, ","); from != "" && len(from) <= maxMergedFrom {
			ann[AnnotationMergedFrom] = from
		}
		arts = append(arts, artifact{p, ann})
	}
	if used != nil {
		if used, err = fitArtifact(used); err != nil {
			return "", err
		}
		arts = append(arts, artifact{used, map[string]string{AnnotationPrefetchUsed: digest}})
	}
	var published string
	for i, a := range arts {
		created := a.p.LastRecord
		if created.IsZero() {
			created = time.Now().UTC()
		}
		for _, c := range children {
			subject := v1.Descriptor{MediaType: c.desc.MediaType, Digest: c.desc.Digest, Size: c.desc.Size}
			img, err := profileArtifact(a.p, subject, created, a.ann)
			if err != nil {
				return "", err
			}
			d, err := img.Digest()
			if err != nil {
				return "", err
			}
			if err := remote.Write(repo.Digest(d.String()), img, m.remoteOptions(ctx)...); err != nil {
				return "", fmt.Errorf("publishing the merged prefetch profile of %s@%s: %w", repo, c.digest, err)
			}
			if i == 0 {
				published = d.String()
			}
		}
	}
	return published, nil
}

// fitArtifact returns p, or a copy of it cut to fit MaxArtifactBytes:
// the files its rules and budgets leave out go first, then the last
// files of its longest layer, half of them at a time.
func fitArtifact(p *prefetch.Profile) (*prefetch.Profile, error) {
	b, err := p.Marshal()
	if err != nil {
		return nil, err
	}
	if len(b) <= prefetch.MaxArtifactBytes {
		return p, nil
	}
	cut := *p
	cut.Layers = slices.Clone(p.Layers)
	for i, sel := range p.Selected() {
		cut.Layers[i].Files = slices.Clone(sel)
	}
	for {
		b, err := cut.Marshal()
		if err != nil {
			return nil, err
		}
		if len(b) <= prefetch.MaxArtifactBytes {
			return &cut, nil
		}
		longest := 0
		for i, l := range cut.Layers {
			if len(l.Files) > len(cut.Layers[longest].Files) {
				longest = i
			}
		}
		l := &cut.Layers[longest]
		if len(l.Files) == 0 {
			return nil, fmt.Errorf("merged profile of %d bytes does not fit %d bytes", len(b), prefetch.MaxArtifactBytes)
		}
		l.Files = l.Files[:len(l.Files)/2]
	}
}

// profileArtifact returns the OCI artifact of a published profile (see
// prefetch.ArtifactType) referring to subject.
func profileArtifact(p *prefetch.Profile, subject v1.Descriptor, created time.Time, annotations map[string]string) (v1.Image, error) {
	blob, err := p.Marshal()
	if err != nil {
		return nil, err
	}
	return prefetch.NewArtifact(subject, blob, created, annotations)
}

// artifactSource reads referrers, manifests and blobs through the
// mirror's registry client (prefetch.ArtifactSource).
type artifactSource struct{ m *Mirror }

func (a *artifactSource) Referrers(ctx context.Context, repo string, subject v1.Hash) ([]v1.Descriptor, error) {
	ref, err := a.m.client.ParseRef(repo + "@" + subject.String())
	if err != nil {
		return nil, err
	}
	idx, err := remote.Referrers(ref.Registry.Context().Digest(subject.String()), a.m.remoteOptions(ctx)...)
	if err != nil {
		return nil, imageio.Classify(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	return im.Manifests, nil
}

func (a *artifactSource) Manifest(ctx context.Context, ref string) (prefetch.RawManifest, error) {
	r, err := a.m.client.ParseRef(ref)
	if err != nil {
		return prefetch.RawManifest{}, err
	}
	d, b, err := a.m.client.Manifest(ctx, r)
	if err != nil {
		return prefetch.RawManifest{}, err
	}
	return prefetch.RawManifest{MediaType: d.MediaType, Digest: d.Digest, Body: b}, nil
}

func (a *artifactSource) Blob(ctx context.Context, repo string, d v1.Hash) (io.ReadCloser, error) {
	ref, err := a.m.client.ParseRef(repo + "@" + d.String())
	if err != nil {
		return nil, err
	}
	l, err := remote.Layer(ref.Registry.Context().Digest(d.String()), a.m.remoteOptions(ctx)...)
	if err != nil {
		return nil, imageio.Classify(err)
	}
	return l.Compressed()
}

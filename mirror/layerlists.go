package mirror

import (
	"bytes"
	"context"
	"encoding/json"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/prefetch"
)

// AnnotationPrefetchUsed marks the prefetch lists a conversion was made
// with, per source layer, which the mirror publishes as a referrer of
// every platform manifest of the conversion (value: the conversion's
// digest). It is not a profile to merge: the next run compares the
// shared lists of the layers with it (see layerLists).
const AnnotationPrefetchUsed = "dev.lazybase.prefetch.used"

// layerLists are the prefetch lists of source layers shared by every image
// a session converts: the files of a source layer come from the merge of
// every published profile's entries for it, whatever image they were
// published against, so that every image containing the layer converts
// it with the same list, to the same blob (converted once). Min_change
// acts per layer: a layer keeps the list its newest conversion was made
// with (its incumbent) until the merged list differs from it by
// min_change or more; then every image containing it is converted again.
//
// The images of a session whose prefetch_dir has a list or profile for
// them are left out: they are converted with their own merge, as before.
type layerLists struct {
	minChange  float64
	layerBytes int64
	// err is set when the published profiles could not be merged.
	err error
	// merged holds, per source layer, the merged runs of every
	// published profile listing it, files in fetch order, unselected.
	merged map[string]prefetch.Layer
	// contrib names, per source layer, the published profiles folded
	// into its merged runs.
	contrib map[string][]string
	// lastRecord is, per source layer, the latest LastRecord of the
	// profiles folded into its merged runs.
	lastRecord map[string]time.Time
	// images are the conversions of the session's jobs, by destination.
	images map[string]*imageLists

	mu    sync.Mutex
	lists map[string]*layerList
}

// imageLists is what the current conversion of one image tells.
type imageLists struct {
	err                  error
	found, skipped, used int
	// exists tells whether the destination holds a conversion; layers
	// are the source layers of its platform manifests.
	exists bool
	layers []string
	// lists are the files the conversion prefetches per source layer
	// (none when absent), and at when they were published.
	lists map[string][]prefetch.File
	at    time.Time

	// dest is the destination manifest as read, for the image's first
	// attempt (which need not read it again).
	destMu sync.Mutex
	dest   *destRead
}

// takeDest returns the destination manifest as read, once.
func (il *imageLists) takeDest() *destRead {
	il.destMu.Lock()
	defer il.destMu.Unlock()
	r := il.dest
	il.dest = nil
	return r
}

// layerList is the list chosen for a source layer.
type layerList struct {
	files []prefetch.File
	// change is how much the merged list differs from the incumbent.
	change float64
}

// planLayerLists reads the published profiles of the current conversions
// of jobs (Concurrency at a time) and merges them by source layer.
func (m *Mirror) planLayerLists(ctx context.Context, jobs []Job) *layerLists {
	ll := &layerLists{
		minChange:  *m.cfg.Profiles.MinChange,
		layerBytes: m.cfg.Profiles.LayerBytes,
		merged:     map[string]prefetch.Layer{},
		contrib:    map[string][]string{},
		lastRecord: map[string]time.Time{},
		images:     map[string]*imageLists{},
		lists:      map[string]*layerList{},
	}
	type read struct {
		il         *imageLists
		pubs, used []prefetch.Published
	}
	reads := make([]*read, len(jobs))
	var wg sync.WaitGroup
	sem := make(chan struct{}, max(m.cfg.Concurrency, 1))
	for i, j := range jobs {
		if static, err := m.prefetchList(j); err != nil || static != nil {
			continue
		}
		if _, ok := ll.images[j.Destination]; ok {
			continue
		}
		r := &read{il: &imageLists{lists: map[string][]prefetch.File{}}}
		ll.images[j.Destination] = r.il
		reads[i] = r
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			r.pubs, r.used, r.il.err = m.readConversion(ctx, j, r.il)
		}()
	}
	wg.Wait()

	// What a merged profile of the mirror folded in already is not
	// counted again, whichever image it was read from: for the layers
	// that merged profile carries (an image carries the runs of its own
	// layers only; what a folded profile says about other layers still
	// counts).
	folded := map[string]map[string]bool{}
	for _, r := range reads {
		if r == nil {
			continue
		}
		for _, p := range r.pubs {
			if p.Annotations[AnnotationMergedProfile] == "" {
				continue
			}
			for _, d := range strings.Split(p.Annotations[AnnotationMergedFrom], ",") {
				if folded[d] == nil {
					folded[d] = map[string]bool{}
				}
				for _, l := range p.Profile.Layers {
					folded[d][l.Digest] = true
				}
			}
		}
	}
	w := m.cfg.Profiles.weighting(time.Now())
	// piece is a published profile, or one layer of a merged one, under
	// the key that makes copies of it count once.
	type piece struct {
		key string
		p   prefetch.Published
	}
	var cands []piece
	for _, r := range reads {
		if r == nil || r.il.err != nil {
			continue
		}
		il := r.il
		sortNewest(r.pubs)
		merges := map[string]bool{}
		var current *prefetch.Published
		for _, p := range r.pubs {
			if f := folded[p.Digest.String()]; f != nil {
				rest := *p.Profile
				rest.Layers = slices.DeleteFunc(slices.Clone(rest.Layers), func(l prefetch.Layer) bool { return f[l.Digest] })
				if len(rest.Layers) == 0 {
					continue
				}
				p.Profile = &rest
			}
			if v := p.Annotations[AnnotationMergedProfile]; v != "" {
				// One copy of a merge published on several platforms.
				if merges[v] {
					continue
				}
				merges[v] = true
				if current == nil {
					cp := p
					current = &cp
				}
			}
			il.found++
			if w.MaxAge <= 0 || w.Now.Sub(p.Created) <= w.MaxAge {
				il.used++
			}
			if p.Annotations[AnnotationMergedProfile] == "" {
				cands = append(cands, piece{key: p.Digest.String(), p: p})
				for _, l := range p.Profile.Layers {
					ll.contrib[l.Digest] = appendNew(ll.contrib[l.Digest], p.Digest.String())
				}
				continue
			}
			// The mirror's merged profiles carry the shared merged runs
			// of each layer: every image containing a layer carries the
			// same runs, counted once.
			for _, l := range p.Profile.Layers {
				ll.contrib[l.Digest] = appendNew(ll.contrib[l.Digest], p.Digest.String())
				b, _ := json.Marshal(l)
				one := p
				one.Profile = &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, LastRecord: p.Profile.LastRecord, Layers: []prefetch.Layer{l}}
				cands = append(cands, piece{key: l.Digest + "\n" + sha256Of(b).Hex, p: one})
			}
		}
		// What the conversion prefetches: its lists as published, else
		// (a conversion of an older mirror) its merged profile's
		// selection, else nothing.
		if len(r.used) > 0 {
			sortNewest(r.used)
			u := r.used[0]
			il.at = u.Created
			for _, l := range u.Profile.Layers {
				il.lists[l.Digest] = l.Files
			}
		} else if current != nil {
			was, _, err := prefetch.MergeWeighted(nil, []prefetch.Published{*current}, prefetch.Weighting{Now: w.Now, MinFraction: w.MinFraction})
			if err == nil {
				m.fillBudgets(was)
				for i, sel := range was.Selected() {
					il.lists[was.Layers[i].Digest] = sel
				}
				il.at = current.Created
			}
		}
	}
	// Newest first, ties by digest, the newest copy of each kept, so
	// that the merge is the same whatever the order of the jobs.
	slices.SortStableFunc(cands, func(a, b piece) int {
		if c := b.p.Created.Compare(a.p.Created); c != 0 {
			return c
		}
		if c := strings.Compare(a.p.Digest.String(), b.p.Digest.String()); c != 0 {
			return c
		}
		return strings.Compare(a.key, b.key)
	})
	var pieces []prefetch.Published
	seen := map[string]bool{}
	for _, c := range cands {
		if !seen[c.key] {
			seen[c.key] = true
			pieces = append(pieces, c.p)
		}
	}
	for _, p := range pieces {
		for _, l := range p.Profile.Layers {
			if t := p.Profile.LastRecord; ll.lastRecord[l.Digest].Before(t) {
				ll.lastRecord[l.Digest] = t
			}
		}
	}
	merged, _, err := prefetch.MergeWeighted(nil, pieces, w)
	if err != nil {
		log.G(ctx).WithError(err).Warn("merging published prefetch profiles failed; converting without them")
		ll.err = err
		return ll
	}
	for _, l := range merged.Layers {
		ll.merged[l.Digest] = l
	}
	return ll
}

// readConversion reads the layers and the published profiles of the
// current conversion of j (every platform manifest of it): the profiles
// to merge, keyed by source layer, and the lists it was made with.
func (m *Mirror) readConversion(ctx context.Context, j Job, il *imageLists) (pubs, used []prefetch.Published, err error) {
	dest, err := m.client.ParseRef(j.Destination)
	if err != nil {
		return nil, nil, err
	}
	if dest.IsLayout() {
		return nil, nil, nil
	}
	r := &destRead{ref: dest}
	r.desc, r.body, r.err = m.client.Manifest(ctx, dest)
	il.dest = r
	children, err := m.platformManifests(context.WithValue(ctx, destReadKey{}, r), dest)
	if err != nil {
		return nil, nil, err
	}
	il.exists = len(children) > 0
	as := &artifactSource{m: m}
	repo := dest.Registry.Context().String()
	seen := map[v1.Hash]bool{}
	for _, c := range children {
		for _, d := range c.manifest.Layers {
			if s := d.Annotations[convert.AnnotationSourceLayer]; s != "" {
				il.layers = appendNew(il.layers, s)
			}
		}
		got, skipped, err := prefetch.ReadPublished(ctx, as, repo, c.digest, prefetch.WithMaxArtifacts(m.cfg.Profiles.MaxArtifacts))
		if err != nil {
			return nil, nil, err
		}
		il.skipped += len(skipped)
		for _, p := range got {
			if seen[p.Digest] {
				continue
			}
			seen[p.Digest] = true
			if p.Annotations[AnnotationPrefetchUsed] != "" {
				used = append(used, p)
				continue
			}
			if p.Annotations[AnnotationMergedProfile] == "" {
				p.Profile.Resolve(c.digest, c.manifest)
			}
			p.Profile = p.Profile.BySource(true)
			pubs = append(pubs, p)
		}
	}
	return pubs, used, nil
}

// list returns the list of source layer src: its incumbent (the list of
// the newest conversion containing it), unless the merged runs select
// files that differ from it by min_change or more, or no conversion
// contains it; then the merged runs' selection.
func (ll *layerLists) list(src string) *layerList {
	ll.mu.Lock()
	defer ll.mu.Unlock()
	if l, ok := ll.lists[src]; ok {
		return l
	}
	var sel []prefetch.File
	if g, ok := ll.merged[src]; ok {
		p := &prefetch.Profile{Rules: prefetch.Rules{LayerBytes: ll.layerBytes}, Layers: []prefetch.Layer{g}}
		sel = p.Selected()[0]
	}
	var (
		inc   []prefetch.File
		found bool
		at    time.Time
		name  string
	)
	for dest, il := range ll.images {
		if il.err != nil || !il.exists || !slices.Contains(il.layers, src) {
			continue
		}
		if !found || il.at.After(at) || (il.at.Equal(at) && dest < name) {
			inc, found, at, name = il.lists[src], true, il.at, dest
		}
	}
	l := &layerList{files: sel}
	if found {
		l.change = prefetch.Change(layerProfile(src, inc), layerProfile(src, sel))
		if l.change == 0 || l.change < ll.minChange {
			l.files = inc
		}
	}
	ll.lists[src] = l
	return l
}

// layerProfile is a profile of one layer selecting files.
func layerProfile(src string, files []prefetch.File) *prefetch.Profile {
	return &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind,
		Layers: []prefetch.Layer{{Digest: src, SourceDigest: src, Runs: 1, Files: files}}}
}

// profileOf returns the lists of layers as one profile (layers with no
// files left out), with their files' counts and ranks set as one run.
func profileOf(layers []string, files func(string) []prefetch.File) *prefetch.Profile {
	p := &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Layers: []prefetch.Layer{}}
	for _, src := range layers {
		fs := files(src)
		if len(fs) == 0 {
			continue
		}
		l := prefetch.Layer{Digest: src, SourceDigest: src, Runs: 1}
		for i, f := range fs {
			l.Files = append(l.Files, prefetch.File{Path: f.Path, Size: f.Size, Count: 1, RankSum: int64(i)})
		}
		p.Layers = append(p.Layers, l)
	}
	return p
}

// carry returns the merged runs of layers, which the mirror publishes
// with a conversion containing them, and the published profiles they fold
// in.
func (ll *layerLists) carry(layers []string) (*prefetch.Profile, []string) {
	p := &prefetch.Profile{Version: prefetch.ProfileVersion, Kind: prefetch.ProfileKind, Layers: []prefetch.Layer{}}
	var folded []string
	for _, src := range layers {
		g, ok := ll.merged[src]
		if !ok {
			continue
		}
		g.Files = slices.Clone(g.Files)
		p.Layers = append(p.Layers, g)
		if t := ll.lastRecord[src]; p.LastRecord.Before(t) {
			p.LastRecord = t
		}
		for _, d := range ll.contrib[src] {
			folded = appendNew(folded, d)
		}
	}
	slices.Sort(folded)
	return p, folded
}

// sharedSource is the prefetch source of one image converted with the
// shared lists; it notes the layers it was asked about.
type sharedSource struct {
	ll    *layerLists
	mu    sync.Mutex
	asked []string
}

// PrefetchFiles returns the shared list of the source layer digest.
func (s *sharedSource) PrefetchFiles(_, digest v1.Hash) []string {
	s.mu.Lock()
	s.asked = appendNew(s.asked, digest.String())
	s.mu.Unlock()
	l := s.ll.list(digest.String())
	if len(l.files) == 0 {
		return nil
	}
	out := make([]string, len(l.files))
	for i, f := range l.files {
		out[i] = f.Path
	}
	return out
}

func (s *sharedSource) layers() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.asked)
}

func appendNew(s []string, v string) []string {
	if slices.Contains(s, v) {
		return s
	}
	return append(s, v)
}

func sortNewest(pubs []prefetch.Published) {
	slices.SortStableFunc(pubs, func(a, b prefetch.Published) int {
		if c := b.Created.Compare(a.Created); c != 0 {
			return c
		}
		return bytes.Compare([]byte(a.Digest.String()), []byte(b.Digest.String()))
	})
}

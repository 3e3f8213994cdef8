package prefetch

import (
	"cmp"
	"fmt"
	"math/bits"
	"slices"
)

// compareMeans compares sa/ca with sb/cb exactly (all non-negative, counts
// positive), in 128 bits.
func compareMeans(sa int64, ca int, sb int64, cb int) int {
	ah, al := bits.Mul64(uint64(sa), uint64(cb))
	bh, bl := bits.Mul64(uint64(sb), uint64(ca))
	if c := cmp.Compare(ah, bh); c != 0 {
		return c
	}
	return cmp.Compare(al, bl)
}

// Merge folds profiles of the same image into one.
//
//   - The image, digest and source digest are the first ones set; profiles
//     naming different images or digests are an error.
//   - LastRecord is the latest one.
//   - The rules are those of the first profile that has any.
//   - Layers are the same when their digests or their diffIDs are equal; they
//     are listed in the order they first appear in the arguments. Runs add up,
//     a missing digest, diffID, source digest or size is filled in.
//   - A file's count and rankSum add up and its size is the largest seen.
//     Files are ordered by mean first-access rank (rankSum/count, lowest
//     first), then by count (highest first), then by first appearance in the
//     arguments.
//
// The output depends only on the arguments and their order: the same
// profiles give the same bytes. Merge of one profile puts it in that order.
func Merge(profiles ...*Profile) (*Profile, error) {
	out := &Profile{Version: ProfileVersion, Kind: ProfileKind, Layers: []Layer{}}
	type fileAt struct {
		File
		first int
	}
	var layers []map[string]*fileAt
	for i, p := range profiles {
		if err := p.Validate(); err != nil {
			return nil, fmt.Errorf("profile %d: %w", i, err)
		}
		switch {
		case out.Image == "":
			out.Image = p.Image
		case p.Image != "" && !sameRef(out.Image, p.Image):
			return nil, fmt.Errorf("profile %d is for %s, not %s", i, p.Image, out.Image)
		}
		switch {
		case out.Digest == "":
			out.Digest = p.Digest
		case p.Digest != "" && p.Digest != out.Digest:
			return nil, fmt.Errorf("profile %d is for digest %s, not %s", i, p.Digest, out.Digest)
		}
		switch {
		case out.SourceDigest == "":
			out.SourceDigest = p.SourceDigest
		case p.SourceDigest != "" && p.SourceDigest != out.SourceDigest:
			return nil, fmt.Errorf("profile %d is for source digest %s, not %s", i, p.SourceDigest, out.SourceDigest)
		}
		if p.LastRecord.After(out.LastRecord) {
			out.LastRecord = p.LastRecord.UTC()
		}
		if out.Rules.IsZero() && !p.Rules.IsZero() {
			out.Rules = p.Rules
			out.Rules.Include = slices.Clone(p.Rules.Include)
			out.Rules.Exclude = slices.Clone(p.Rules.Exclude)
		}
		for _, l := range p.Layers {
			j := slices.IndexFunc(out.Layers, func(o Layer) bool {
				return (l.Digest != "" && o.Digest == l.Digest) || (l.DiffID != "" && o.DiffID == l.DiffID)
			})
			if j < 0 {
				j = len(out.Layers)
				out.Layers = append(out.Layers, Layer{})
				layers = append(layers, map[string]*fileAt{})
			}
			o := &out.Layers[j]
			o.Digest = cmp.Or(o.Digest, l.Digest)
			o.DiffID = cmp.Or(o.DiffID, l.DiffID)
			o.SourceDigest = cmp.Or(o.SourceDigest, l.SourceDigest)
			o.Size = max(o.Size, l.Size)
			o.Runs += l.Runs
			for _, f := range l.Files {
				f.Path, _ = cleanPath(f.Path)
				m := layers[j][f.Path]
				if m == nil {
					layers[j][f.Path] = &fileAt{File: f, first: len(layers[j])}
					continue
				}
				m.Count += f.Count
				m.RankSum += f.RankSum
				m.Size = max(m.Size, f.Size)
			}
		}
	}
	for j := range out.Layers {
		files := make([]*fileAt, 0, len(layers[j]))
		for _, f := range layers[j] {
			files = append(files, f)
		}
		slices.SortFunc(files, func(a, b *fileAt) int {
			if c := compareMeans(a.RankSum, a.Count, b.RankSum, b.Count); c != 0 {
				return c
			}
			if c := cmp.Compare(b.Count, a.Count); c != 0 {
				return c
			}
			return cmp.Compare(a.first, b.first)
		})
		out.Layers[j].Files = make([]File, len(files))
		for k, f := range files {
			out.Layers[j].Files[k] = f.File
		}
	}
	if err := out.Validate(); err != nil {
		return nil, fmt.Errorf("merged profile: %w", err)
	}
	return out, nil
}

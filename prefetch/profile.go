package prefetch

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ProfileVersion is the version of the profile format.
const ProfileVersion = 1

// ProfileKind marks a prefetch profile, so that it is not mistaken for a
// simple List (which has no "kind").
const ProfileKind = "lazybase.prefetch.profile"

// Profile is what a workload reads from one image, learned from one or more
// runs:
//
//	{
//	  "version": 1,
//	  "kind": "lazybase.prefetch.profile",
//	  "image": "registry.example/golang:1.22",
//	  "digest": "sha256:…",            // manifest digest, when known
//	  "sourceDigest": "sha256:…",      // manifest it was converted from
//	  "rules": {
//	    "include": ["usr/local/go/**"], // when set, only matching files
//	    "exclude": ["**/*.md"],         // never these
//	    "minCount": 2,                  // read in at least 2 runs
//	    "layerBytes": 67108864,         // budget per layer
//	    "imageBytes": 268435456         // budget for the whole image
//	  },
//	  "layers": [{
//	    "digest": "sha256:…", "diffID": "sha256:…", "sourceDigest": "sha256:…",
//	    "size": 123456, "runs": 3,
//	    "files": [{"path": "usr/local/go/bin/go", "size": 1234, "count": 3, "rankSum": 0}]
//	  }]
//	}
//
// Files are listed in the order they are to be fetched. Count is in how many
// of the layer's Runs the file was read; RankSum is the sum, over those runs,
// of the file's position in the run's first-access order (0 for the first
// file read), so that runs can be merged exactly (see Merge).
//
// Globs are matched against the cleaned relative path (no leading "/") with
// path.Match per path segment, and a "**" segment matches zero or more whole
// segments ("usr/**" matches "usr/bin/go"; "**/*.so" matches "lib/x.so").
//
// Rules apply in this order: include, exclude, minCount, then the budgets:
// files are taken in order until the next file would exceed the layer's
// budget or the image's budget; that file and every later one of the layer
// are left out. The image budget is spent by layers in their listed order.
// A file of unknown size (0) counts as 0 bytes.
//
// The snapshotter records the layers it serves, which are converted layers.
// SourceDigest, filled in by Resolve from the converted image's manifest,
// names the image and layers they were converted from, so that a profile
// recorded on a converted image applies when its source is converted again.
type Profile struct {
	Version      int    `json:"version"`
	Kind         string `json:"kind"`
	Image        string `json:"image,omitempty"`
	Digest       string `json:"digest,omitempty"`
	SourceDigest string `json:"sourceDigest,omitempty"`
	// LastRecord is the time of the latest access record folded into the
	// profile; collecting again takes only later records.
	LastRecord time.Time `json:"lastRecord,omitzero"`
	Rules      Rules     `json:"rules,omitzero"`
	Layers     []Layer   `json:"layers"`
}

// Rules are the static rules of a profile.
type Rules struct {
	Include    []string `json:"include,omitempty"`
	Exclude    []string `json:"exclude,omitempty"`
	MinCount   int      `json:"minCount,omitempty"`
	LayerBytes int64    `json:"layerBytes,omitempty"`
	ImageBytes int64    `json:"imageBytes,omitempty"`
}

// IsZero reports whether r has no rule.
func (r Rules) IsZero() bool {
	return len(r.Include) == 0 && len(r.Exclude) == 0 && r.MinCount == 0 && r.LayerBytes == 0 && r.ImageBytes == 0
}

// Layer is what the workload read from one layer. Digest is the layer's
// compressed digest as the snapshotter saw it; DiffID is its uncompressed
// digest, when known; SourceDigest is the digest of the layer it was
// converted from, when known. The layer matches a layer being converted by
// any of the three. Size is the layer's uncompressed size, 0 when unknown.
type Layer struct {
	Digest       string `json:"digest,omitempty"`
	DiffID       string `json:"diffID,omitempty"`
	SourceDigest string `json:"sourceDigest,omitempty"`
	Size         int64  `json:"size,omitempty"`
	Runs         int    `json:"runs"`
	Files        []File `json:"files"`
}

// File is one file the workload read.
type File struct {
	Path    string `json:"path"`
	Size    int64  `json:"size"`
	Count   int    `json:"count"`
	RankSum int64  `json:"rankSum"`
}

// Limits on the numbers of a profile, so that sums and products of them
// cannot overflow.
const (
	maxRuns    = 1 << 31
	maxRankSum = 1 << 62
	maxSize    = 1 << 50
)

// LoadProfile reads and validates a profile file.
func LoadProfile(file string) (*Profile, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading prefetch profile: %w", err)
	}
	p, err := ParseProfile(b)
	if err != nil {
		return nil, fmt.Errorf("prefetch profile %s: %w", file, err)
	}
	return p, nil
}

// ParseProfile parses and validates a profile. Unknown fields (keys are
// case-sensitive), keys given twice, trailing data, a wrong version or kind, bad digests, bad globs, negative numbers,
// counts above the runs, and paths that are empty, hold NUL or name the root
// are errors. Paths are normalized: cleaned, relative, no leading "/".
func ParseProfile(b []byte) (*Profile, error) {
	var probe struct {
		Kind *string `json:"kind"`
	}
	if json.Unmarshal(b, &probe) == nil && probe.Kind == nil {
		return nil, fmt.Errorf("no \"kind\": not a profile (a simple prefetch list has none; want %q)", ProfileKind)
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var p Profile
	if err := dec.Decode(&p); err != nil {
		return nil, fmt.Errorf("decoding: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return nil, errors.New("decoding: trailing data after the profile")
	}
	if err := checkKeys(b, profileShape); err != nil {
		return nil, fmt.Errorf("decoding: %w", err)
	}
	if err := p.Validate(); err != nil {
		return nil, err
	}
	p.normalize()
	return &p, nil
}

// Validate checks a profile as ParseProfile does.
func (p *Profile) Validate() error {
	if p.Version != ProfileVersion {
		return fmt.Errorf("unsupported version %d (want %d)", p.Version, ProfileVersion)
	}
	if p.Kind != ProfileKind {
		return fmt.Errorf("kind %q is not %q", p.Kind, ProfileKind)
	}
	if p.Image != "" {
		if _, err := name.ParseReference(p.Image); err != nil {
			return fmt.Errorf("image %q: %w", p.Image, err)
		}
	}
	for _, d := range []string{p.Digest, p.SourceDigest} {
		if d == "" {
			continue
		}
		if _, err := v1.NewHash(d); err != nil {
			return fmt.Errorf("digest %q: %w", d, err)
		}
	}
	if !p.LastRecord.IsZero() && (p.LastRecord.Year() < 1 || p.LastRecord.Year() > 9999) {
		return fmt.Errorf("lastRecord %s out of range", p.LastRecord)
	}
	if err := p.Rules.validate(); err != nil {
		return fmt.Errorf("rules: %w", err)
	}
	seen := map[string]bool{}
	for i, l := range p.Layers {
		if err := l.validate(); err != nil {
			return fmt.Errorf("layer %d (%s): %w", i, l.id(), err)
		}
		for _, k := range []string{l.Digest, l.DiffID} {
			if k == "" {
				continue
			}
			if seen[k] {
				return fmt.Errorf("layer %d: %s listed twice", i, k)
			}
			seen[k] = true
		}
	}
	return nil
}

func (r Rules) validate() error {
	for _, g := range append(append([]string(nil), r.Include...), r.Exclude...) {
		if err := checkGlob(g); err != nil {
			return err
		}
	}
	if r.MinCount < 0 || r.LayerBytes < 0 || r.ImageBytes < 0 {
		return errors.New("minCount, layerBytes and imageBytes must not be negative")
	}
	return nil
}

func (l *Layer) id() string {
	if l.Digest != "" {
		return l.Digest
	}
	if l.DiffID != "" {
		return l.DiffID
	}
	return "no digest"
}

func (l *Layer) validate() error {
	if l.Digest == "" && l.DiffID == "" {
		return errors.New("neither digest nor diffID")
	}
	for _, k := range []string{l.Digest, l.DiffID, l.SourceDigest} {
		if k == "" {
			continue
		}
		if _, err := v1.NewHash(k); err != nil {
			return fmt.Errorf("%q: %w", k, err)
		}
	}
	if l.Size < 0 || l.Size > maxSize {
		return fmt.Errorf("size %d out of range", l.Size)
	}
	if l.Runs < 0 || l.Runs > maxRuns {
		return fmt.Errorf("runs %d out of range", l.Runs)
	}
	seen := map[string]bool{}
	for i, f := range l.Files {
		c, err := cleanPath(f.Path)
		if err != nil {
			return fmt.Errorf("file %d: %w", i, err)
		}
		if seen[c] {
			return fmt.Errorf("file %q listed twice", c)
		}
		seen[c] = true
		switch {
		case f.Size < 0:
			return fmt.Errorf("file %q: negative size %d", c, f.Size)
		case f.Size > maxSize:
			return fmt.Errorf("file %q: size %d out of range", c, f.Size)
		case f.Count < 1:
			return fmt.Errorf("file %q: count %d, want at least 1", c, f.Count)
		case f.Count > l.Runs:
			return fmt.Errorf("file %q: count %d above the layer's %d runs", c, f.Count, l.Runs)
		case f.RankSum < 0 || f.RankSum > maxRankSum:
			return fmt.Errorf("file %q: rankSum %d out of range", c, f.RankSum)
		}
	}
	return nil
}

// cleanPath returns p as the converter expects it: cleaned, relative, no
// leading "/".
func cleanPath(p string) (string, error) {
	if p == "" {
		return "", errors.New("empty path")
	}
	if strings.ContainsRune(p, 0) {
		return "", fmt.Errorf("%q: NUL in path", p)
	}
	c := path.Clean("/" + p)
	if c == "/" {
		return "", fmt.Errorf("%q: names the root directory", p)
	}
	return c[1:], nil
}

func (p *Profile) normalize() {
	if !p.LastRecord.IsZero() {
		p.LastRecord = p.LastRecord.UTC()
	}
	for i := range p.Layers {
		for j := range p.Layers[i].Files {
			p.Layers[i].Files[j].Path, _ = cleanPath(p.Layers[i].Files[j].Path)
		}
	}
}

// Marshal returns the profile as indented JSON with a final newline. The
// same profile always gives the same bytes.
func (p *Profile) Marshal() ([]byte, error) {
	b, err := json.MarshalIndent(p, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// layer returns the index of the profile's layer matching diffID or digest,
// -1 if none.
func (p *Profile) layer(diffID, digest v1.Hash) int {
	for i, l := range p.Layers {
		for _, k := range []string{l.Digest, l.DiffID, l.SourceDigest} {
			if k != "" && (k == digest.String() || k == diffID.String()) {
				return i
			}
		}
	}
	return -1
}

// Selected returns, per layer (in the profile's order), the files the rules
// and budgets keep, in fetch order.
func (p *Profile) Selected() [][]File {
	out := make([][]File, len(p.Layers))
	var imageBytes int64
	for i, l := range p.Layers {
		var layerBytes int64
		for _, f := range l.Files {
			if !p.Rules.keep(f) {
				continue
			}
			if (p.Rules.LayerBytes > 0 && f.Size > p.Rules.LayerBytes-layerBytes) ||
				(p.Rules.ImageBytes > 0 && f.Size > p.Rules.ImageBytes-imageBytes) {
				break
			}
			layerBytes += f.Size
			imageBytes += f.Size
			out[i] = append(out[i], f)
		}
	}
	return out
}

func (r Rules) keep(f File) bool {
	if len(r.Include) > 0 && !matchAny(r.Include, f.Path) {
		return false
	}
	if matchAny(r.Exclude, f.Path) {
		return false
	}
	return f.Count >= r.MinCount
}

// PrefetchFiles returns the files of the layer matching diffID or digest that
// the rules and budgets keep, in order; nil when the profile has no such
// layer. It makes a Profile a convert.PrefetchSource.
func (p *Profile) PrefetchFiles(diffID, digest v1.Hash) []string {
	if p == nil {
		return nil
	}
	i := p.layer(diffID, digest)
	if i < 0 {
		return nil
	}
	sel := p.Selected()[i]
	if len(sel) == 0 {
		return nil
	}
	out := make([]string, len(sel))
	for i, f := range sel {
		out[i], _ = cleanPath(f.Path)
	}
	return out
}

// ForImage returns the profile as a Source for the image ref with manifest
// digest, and true, when the profile is for that image or names none. It
// returns nil and false when the profile names a different image: callers
// then convert without it and warn, for example
//
//	src, ok := prof.ForImage(ref.String(), desc.Digest)
//	if !ok {
//		log.G(ctx).Warnf("prefetch profile is for %s, not %s: ignored", prof.Image, ref)
//	}
//
// A known digest decides: equal to the profile's digest or source digest
// means the same image, whatever the references. Otherwise the references are compared after parsing (so
// "golang:1.22" and "index.docker.io/library/golang:1.22" are the same). An
// empty ref or zero digest is unknown and does not count against the
// profile.
func (p *Profile) ForImage(ref string, digest v1.Hash) (Source, bool) {
	if (p.Digest != "" || p.SourceDigest != "") && digest != (v1.Hash{}) {
		if p.Digest == digest.String() || p.SourceDigest == digest.String() {
			return p, true
		}
		return nil, false
	}
	if p.Image != "" && ref != "" && !sameRef(p.Image, ref) {
		return nil, false
	}
	return p, true
}

func sameRef(a, b string) bool {
	ra, errA := name.ParseReference(a)
	rb, errB := name.ParseReference(b)
	if errA != nil || errB != nil {
		return a == b
	}
	return ra.Name() == rb.Name()
}

package prefetch

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// For returns what a converter should use of s for the image ref with
// manifest digest: s itself for a List or for a Profile of that image (see
// Profile.ForImage), nil for a Profile of another image, which it reports
// as a warning. Callers load the prefetch file with Load, open the source,
// and pass For's result to convert.WithPrefetch when it is not nil.
func For(ctx context.Context, s Source, ref string, digest v1.Hash) Source {
	p, ok := s.(*Profile)
	if !ok {
		return s
	}
	src, ok := p.ForImage(ref, digest)
	if !ok {
		log.G(ctx).WithField("profile", p.Image).WithField("profileDigest", cmp.Or(p.Digest, p.SourceDigest)).
			WithField("image", ref).WithField("digest", digest.String()).
			Warn("prefetch profile is for another image: converting without it")
		return nil
	}
	return src
}

// FindProfile looks in dir for the profile of the image ref with manifest
// digest, for a mirror that applies profiles when it has one. It reads every
// *.json file of dir in name order; files that are not valid profiles are
// skipped with a warning. A profile whose digest or source digest equals
// digest wins; otherwise the first whose image reference matches ref.
// Profiles naming no image never match. It returns nil and "" when none
// matches.
func FindProfile(ctx context.Context, dir, ref string, digest v1.Hash) (*Profile, string, error) {
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, "", err
	}
	if _, err := os.Stat(dir); err != nil {
		return nil, "", fmt.Errorf("profile directory: %w", err)
	}
	slices.Sort(files)
	var byRef *Profile
	var byRefFile string
	for _, f := range files {
		p, err := LoadProfile(f)
		if err != nil {
			log.G(ctx).WithError(err).Warn("skipping a file that is not a valid prefetch profile")
			continue
		}
		if digest != (v1.Hash{}) && (p.Digest == digest.String() || p.SourceDigest == digest.String()) {
			return p, f, nil
		}
		if byRef != nil || p.Image == "" || ref == "" || !sameRef(p.Image, ref) {
			continue
		}
		if _, ok := p.ForImage(ref, digest); ok {
			byRef, byRefFile = p, f
		}
	}
	return byRef, byRefFile, nil
}

// ProfileFileName is a file name for the profile of image in a profile
// directory: the reference with every character outside [A-Za-z0-9._-]
// replaced by "_", and ".json". FindProfile does not depend on it.
func ProfileFileName(image string) string {
	return strings.TrimSuffix(RecordFileName(image), ".jsonl") + ".json"
}

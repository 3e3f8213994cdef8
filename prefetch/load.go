package prefetch

import (
	"encoding/json"
	"fmt"
	"os"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// Source is what the converter takes: the files of a layer to place first,
// in order. Both *List and *Profile are Sources.
type Source interface {
	PrefetchFiles(diffID, digest v1.Hash) []string
}

// Load reads a prefetch file that is either a simple List or a Profile: a
// document whose "kind" is ProfileKind is a profile, one without "kind" a
// list. Errors name the file and what is wrong with it.
func Load(file string) (Source, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading prefetch file: %w", err)
	}
	s, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("prefetch file %s: %w", file, err)
	}
	return s, nil
}

// Parse parses a List or a Profile, as Load.
func Parse(b []byte) (Source, error) {
	var probe struct {
		Kind *string `json:"kind"`
	}
	if err := json.Unmarshal(b, &probe); err != nil {
		return nil, fmt.Errorf("decoding: %w", err)
	}
	switch {
	case probe.Kind == nil:
		return ParseList(b)
	case *probe.Kind == ProfileKind:
		return ParseProfile(b)
	}
	return nil, fmt.Errorf("unknown kind %q (want %q, or none for a simple list)", *probe.Kind, ProfileKind)
}

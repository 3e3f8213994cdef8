package prefetch

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ListVersion is the version of the simple prefetch list format.
const ListVersion = 1

// List is the simple prefetch list format:
//
//	{
//	  "version": 1,
//	  "layers": {
//	    "sha256:<diffID or blob digest>": ["usr/local/go/bin/go", "etc/passwd"]
//	  },
//	  "files": ["etc/os-release"]
//	}
//
// Layers maps a source layer (by diffID or by compressed digest) to the files
// to prefetch from it, in order. Files applies to every layer that holds them.
type List struct {
	Version int                 `json:"version"`
	Layers  map[string][]string `json:"layers,omitempty"`
	Files   []string            `json:"files,omitempty"`
}

// LoadList reads and validates a prefetch list file.
func LoadList(file string) (*List, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("reading prefetch list: %w", err)
	}
	l, err := ParseList(b)
	if err != nil {
		return nil, fmt.Errorf("prefetch list %s: %w", file, err)
	}
	return l, nil
}

// ParseList parses and validates a prefetch list.
func ParseList(b []byte) (*List, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var l List
	if err := dec.Decode(&l); err != nil {
		return nil, fmt.Errorf("decoding: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decoding: trailing data after the list")
	}
	if l.Version != ListVersion {
		return nil, fmt.Errorf("unsupported version %d (want %d)", l.Version, ListVersion)
	}
	for k, files := range l.Layers {
		if _, err := v1.NewHash(k); err != nil {
			return nil, fmt.Errorf("layer key %q: %w", k, err)
		}
		if err := checkFiles(files); err != nil {
			return nil, fmt.Errorf("layer %s: %w", k, err)
		}
	}
	if err := checkFiles(l.Files); err != nil {
		return nil, err
	}
	return &l, nil
}

func checkFiles(files []string) error {
	for i, f := range files {
		if f == "" {
			return fmt.Errorf("file %d: empty path", i)
		}
		c := path.Clean("/" + f)
		if strings.ContainsRune(f, 0) {
			return fmt.Errorf("file %q: NUL in path", f)
		}
		if c == "/" {
			return fmt.Errorf("file %q: names the root directory", f)
		}
	}
	return nil
}

// PrefetchFiles returns the files listed for the layer, the layer's own list
// first, then the image-wide list, without duplicates.
func (l *List) PrefetchFiles(diffID, digest v1.Hash) []string {
	if l == nil {
		return nil
	}
	var out []string
	seen := map[string]bool{}
	add := func(files []string) {
		for _, f := range files {
			c := strings.TrimPrefix(path.Clean("/"+f), "/")
			if !seen[c] {
				seen[c] = true
				out = append(out, c)
			}
		}
	}
	add(l.Layers[diffID.String()])
	add(l.Layers[digest.String()])
	add(l.Files)
	return out
}

package prefetch

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// AccessRecord is one line of the lazy snapshotter's access record files:
// the first access to a file of a lazily mounted layer. The snapshotter
// writes one JSON object per line, one file per image (see RecordFileName),
// in first-access order. This is prefetch's own decoding of that format.
type AccessRecord struct {
	Time  time.Time `json:"time"`
	Image string    `json:"image"`
	Layer string    `json:"layer"`
	Path  string    `json:"path"`
	Size  int64     `json:"size"`
}

// RecordFileName is the name of the access record file of image in an
// access record directory: the reference with every character outside
// [A-Za-z0-9._-] replaced by "_", and ".jsonl"; "unknown.jsonl" for no image.
func RecordFileName(image string) string {
	if image == "" {
		image = "unknown"
	}
	b := []byte(image)
	for i, c := range b {
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '.', c == '-', c == '_':
		default:
			b[i] = '_'
		}
	}
	return string(b) + ".jsonl"
}

// ReadAccessRecords decodes access records, one JSON object per line. Blank
// lines are skipped, and so is an undecodable last line without a final
// newline (a write the snapshotter did not finish), with a warning. Any
// other bad line is an error naming the line.
func ReadAccessRecords(ctx context.Context, r io.Reader) ([]AccessRecord, error) {
	br := bufio.NewReader(r)
	var out []AccessRecord
	for n := 1; ; n++ {
		line, err := br.ReadBytes('\n')
		if err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("line %d: %w", n, err)
		}
		eof := err != nil
		if t := bytes.TrimSpace(line); len(t) > 0 {
			rec, perr := parseRecord(t)
			switch {
			case perr != nil && eof:
				log.G(ctx).WithField("line", n).WithError(perr).Warn("skipping an unfinished last access record")
			case perr != nil:
				return nil, fmt.Errorf("line %d: %w", n, perr)
			default:
				out = append(out, rec)
			}
		}
		if eof {
			return out, nil
		}
	}
}

func parseRecord(b []byte) (AccessRecord, error) {
	var rec AccessRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return rec, fmt.Errorf("decoding access record: %w", err)
	}
	if _, err := v1.NewHash(rec.Layer); err != nil {
		return rec, fmt.Errorf("layer %q: %w", rec.Layer, err)
	}
	p, err := cleanPath(rec.Path)
	if err != nil {
		return rec, fmt.Errorf("path: %w", err)
	}
	rec.Path = p
	if rec.Size < 0 {
		return rec, fmt.Errorf("path %q: negative size %d", p, rec.Size)
	}
	return rec, nil
}

// FromRecords turns access records into a profile for image, keeping the
// records of that image only (all of them when image is ""). The records of
// one layer are split into runs: a run ends where a path it already holds
// comes again (the layer was mounted anew). Each run counts once, and files
// are ordered as Merge orders them.
func FromRecords(image string, recs []AccessRecord) (*Profile, error) {
	type run struct {
		layer string
		files []File
		seen  map[string]bool
	}
	var runs []*run
	current := map[string]*run{}
	var last time.Time
	for _, r := range recs {
		if image != "" && r.Image != image {
			continue
		}
		if r.Time.After(last) {
			last = r.Time
		}
		p, err := cleanPath(r.Path)
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", r.Layer, err)
		}
		cur := current[r.Layer]
		if cur == nil || cur.seen[p] {
			cur = &run{layer: r.Layer, seen: map[string]bool{}}
			current[r.Layer] = cur
			runs = append(runs, cur)
		}
		cur.seen[p] = true
		cur.files = append(cur.files, File{Path: p, Size: r.Size, Count: 1, RankSum: int64(len(cur.files))})
	}
	profiles := make([]*Profile, 0, len(runs)+1)
	profiles = append(profiles, &Profile{Version: ProfileVersion, Kind: ProfileKind, Image: image, LastRecord: last})
	for _, r := range runs {
		profiles = append(profiles, &Profile{
			Version: ProfileVersion, Kind: ProfileKind, Image: image,
			Layers: []Layer{{Digest: r.layer, Runs: 1, Files: r.files}},
		})
	}
	return Merge(profiles...)
}

// CollectDir reads the access record directory dir and returns the profile
// of image. With image "", dir must hold records of exactly one image. With
// a non-zero since, only records timed after it count (the snapshotter
// appends to its record files, so a profile collected before holds the
// earlier ones: pass its LastRecord); when there are none, the profile has
// no layers. A run that spans since counts as two.
func CollectDir(ctx context.Context, dir, image string, since time.Time) (*Profile, error) {
	var file string
	if image != "" {
		file = filepath.Join(dir, RecordFileName(image))
	} else {
		files, err := filepath.Glob(filepath.Join(dir, "*.jsonl"))
		if err != nil {
			return nil, err
		}
		switch len(files) {
		case 0:
			return nil, fmt.Errorf("access record directory %s: no *.jsonl record files", dir)
		case 1:
			file = files[0]
		default:
			names := make([]string, len(files))
			for i, f := range files {
				names[i] = strings.TrimSuffix(filepath.Base(f), ".jsonl")
			}
			slices.Sort(names)
			return nil, fmt.Errorf("access record directory %s holds records of %d images (%s): name one", dir, len(files), strings.Join(names, ", "))
		}
	}
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("access records: %w", err)
	}
	defer f.Close()
	recs, err := ReadAccessRecords(ctx, f)
	if err != nil {
		return nil, fmt.Errorf("access records %s: %w", file, err)
	}
	if image == "" {
		for _, r := range recs {
			if r.Image != "" {
				image = r.Image
				break
			}
		}
	}
	if image != "" {
		var n int
		for _, r := range recs {
			if r.Image == image {
				n++
			}
		}
		if n == 0 {
			return nil, fmt.Errorf("access records %s: no record of image %s", file, image)
		}
	}
	if !since.IsZero() {
		recs = slices.DeleteFunc(recs, func(r AccessRecord) bool { return !r.Time.After(since) })
	}
	p, err := FromRecords(image, recs)
	if err != nil {
		return nil, fmt.Errorf("access records %s: %w", file, err)
	}
	return p, nil
}

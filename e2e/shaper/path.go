package shaper

import (
	"fmt"
	"strconv"
	"strings"
)

// Kind tells what a request addressed.
type Kind string

// Kinds of registry requests.
const (
	KindBlob     Kind = "blob"
	KindManifest Kind = "manifest"
	KindOther    Kind = "other"
)

// parsePath splits a registry API path into repository, kind and reference
// (the digest for blobs, the tag or digest for manifests).
func parsePath(p string) (repo string, kind Kind, ref string) {
	rest, ok := strings.CutPrefix(p, "/v2/")
	if !ok {
		return "", KindOther, ""
	}
	for _, k := range []struct {
		sep  string
		kind Kind
	}{{"/blobs/", KindBlob}, {"/manifests/", KindManifest}} {
		i := strings.LastIndex(rest, k.sep)
		if i <= 0 {
			continue
		}
		ref := rest[i+len(k.sep):]
		if ref == "" || strings.Contains(ref, "/") {
			// e.g. /blobs/uploads/<uuid>
			continue
		}
		return rest[:i], k.kind, ref
	}
	return "", KindOther, ""
}

// Range is an inclusive byte range; End is -1 when open-ended.
type Range struct {
	Start, End int64
}

func (r Range) String() string {
	if r.End < 0 {
		return fmt.Sprintf("%d-", r.Start)
	}
	return fmt.Sprintf("%d-%d", r.Start, r.End)
}

// parseRange parses a Range header "bytes=a-b[,c-d...]". Suffix ranges
// ("-n") get Start -n and End -1. It returns nil for an absent or malformed
// header.
func parseRange(h string) []Range {
	spec, ok := strings.CutPrefix(strings.TrimSpace(h), "bytes=")
	if !ok {
		return nil
	}
	var out []Range
	for _, part := range strings.Split(spec, ",") {
		a, b, ok := strings.Cut(strings.TrimSpace(part), "-")
		if !ok {
			return nil
		}
		if a == "" {
			n, err := strconv.ParseInt(b, 10, 64)
			if err != nil {
				return nil
			}
			out = append(out, Range{Start: -n, End: -1})
			continue
		}
		start, err := strconv.ParseInt(a, 10, 64)
		if err != nil {
			return nil
		}
		end := int64(-1)
		if b != "" {
			if end, err = strconv.ParseInt(b, 10, 64); err != nil || end < start {
				return nil
			}
		}
		out = append(out, Range{Start: start, End: end})
	}
	return out
}

// parseContentRange parses "bytes a-b/size" (size may be "*", reported as -1).
func parseContentRange(h string) (r Range, size int64, ok bool) {
	spec, found := strings.CutPrefix(strings.TrimSpace(h), "bytes ")
	if !found {
		return Range{}, 0, false
	}
	rng, total, found := strings.Cut(spec, "/")
	if !found {
		return Range{}, 0, false
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return Range{}, 0, false
	}
	var err error
	if r.Start, err = strconv.ParseInt(a, 10, 64); err != nil {
		return Range{}, 0, false
	}
	if r.End, err = strconv.ParseInt(b, 10, 64); err != nil {
		return Range{}, 0, false
	}
	size = -1
	if total != "*" {
		if size, err = strconv.ParseInt(total, 10, 64); err != nil {
			return Range{}, 0, false
		}
	}
	return r, size, true
}

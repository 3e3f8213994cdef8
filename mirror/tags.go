package mirror

import (
	"fmt"
	"hash/fnv"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
)

// CompareTags orders tags the "semver" way (see Config): it returns a
// negative number when a is older than b, zero when equal, positive when
// newer.
func CompareTags(a, b string) int {
	ra, rb := tagRuns(a), tagRuns(b)
	for i := 0; i < len(ra) && i < len(rb); i++ {
		x, y := ra[i], rb[i]
		xn, yn := isDigits(x), isDigits(y)
		switch {
		case xn && yn:
			if c := compareNumbers(x, y); c != 0 {
				return c
			}
		case xn != yn:
			// A number sorts after text ("1.10" > "1.x").
			if xn {
				return 1
			}
			return -1
		default:
			if c := strings.Compare(x, y); c != 0 {
				return c
			}
		}
	}
	switch {
	case len(ra) > len(rb):
		// a has more: "1.9-rc1" is a pre-release of "1.9", so older.
		if strings.HasPrefix(ra[len(rb)], "-") {
			return -1
		}
		return 1
	case len(ra) < len(rb):
		if strings.HasPrefix(rb[len(ra)], "-") {
			return 1
		}
		return -1
	}
	return strings.Compare(a, b)
}

func tagRuns(t string) []string {
	t = strings.TrimPrefix(t, "v")
	var runs []string
	start := 0
	for i := 1; i <= len(t); i++ {
		if i == len(t) || unicode.IsDigit(rune(t[i])) != unicode.IsDigit(rune(t[i-1])) {
			runs = append(runs, t[start:i])
			start = i
		}
	}
	return runs
}

func isDigits(s string) bool {
	return s != "" && strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' }) < 0
}

func compareNumbers(a, b string) int {
	a, b = strings.TrimLeft(a, "0"), strings.TrimLeft(b, "0")
	if len(a) != len(b) {
		return len(a) - len(b)
	}
	return strings.Compare(a, b)
}

// SelectTags filters tags through the source's globs and regex and keeps the
// newest N (Source.Newest) in semver order, or, with order "created", in the
// order given by created (which may be nil for semver order). The result is
// sorted newest first.
func (s *Source) SelectTags(tags []string, created func(tag string) (time.Time, error)) ([]string, error) {
	var out []string
	for _, t := range tags {
		if s.MatchTag(t) {
			out = append(out, t)
		}
	}
	if s.Order == OrderCreated && created != nil {
		times := map[string]time.Time{}
		for _, t := range out {
			c, err := created(t)
			if err != nil {
				return nil, fmt.Errorf("tag %s: created time: %w", t, err)
			}
			times[t] = c
		}
		sort.SliceStable(out, func(i, j int) bool {
			ti, tj := times[out[i]], times[out[j]]
			if !ti.Equal(tj) {
				return ti.After(tj)
			}
			return CompareTags(out[i], out[j]) > 0
		})
	} else {
		sort.SliceStable(out, func(i, j int) bool { return CompareTags(out[i], out[j]) > 0 })
	}
	if s.Newest > 0 && len(out) > s.Newest {
		out = out[:s.Newest]
	}
	return out, nil
}

// Shard is one part of a deterministic split of the work: image references
// whose FNV-1a 64 hash modulo Count equals Index.
type Shard struct {
	Index, Count int
}

// ParseShard parses "I/N" with 0 <= I < N.
func ParseShard(s string) (Shard, error) {
	i, n, ok := strings.Cut(s, "/")
	if !ok {
		return Shard{}, fmt.Errorf("shard %q: want I/N", s)
	}
	ii, err1 := strconv.Atoi(i)
	nn, err2 := strconv.Atoi(n)
	if err1 != nil || err2 != nil || nn < 1 || ii < 0 || ii >= nn {
		return Shard{}, fmt.Errorf("shard %q: want I/N with 0 <= I < N", s)
	}
	return Shard{Index: ii, Count: nn}, nil
}

// String returns "I/N".
func (s Shard) String() string { return fmt.Sprintf("%d/%d", s.Index, s.Count) }

// Owns reports whether the image reference ref belongs to this shard. The
// zero Shard owns everything.
func (s Shard) Owns(ref string) bool {
	if s.Count <= 1 {
		return true
	}
	h := fnv.New64a()
	h.Write([]byte(ref))
	return h.Sum64()%uint64(s.Count) == uint64(s.Index)
}

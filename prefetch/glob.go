package prefetch

import (
	"fmt"
	"path"
	"strings"
)

// checkGlob reports a glob path.Match cannot parse.
func checkGlob(g string) error {
	if g == "" {
		return fmt.Errorf("glob %q: empty", g)
	}
	for _, seg := range strings.Split(strings.TrimPrefix(g, "/"), "/") {
		if _, err := path.Match(seg, ""); err != nil {
			return fmt.Errorf("glob %q: %w", g, err)
		}
	}
	return nil
}

func matchAny(globs []string, p string) bool {
	for _, g := range globs {
		if Match(g, p) {
			return true
		}
	}
	return false
}

// Match reports whether the relative path p matches glob: path.Match per
// "/"-separated segment, where a "**" segment matches zero or more segments.
// A leading "/" on either is ignored.
func Match(glob, p string) bool {
	return matchSegs(strings.Split(strings.TrimPrefix(glob, "/"), "/"), strings.Split(strings.TrimPrefix(p, "/"), "/"))
}

func matchSegs(g, p []string) bool {
	for len(g) > 0 {
		if g[0] == "**" {
			for len(g) > 0 && g[0] == "**" {
				g = g[1:]
			}
			if len(g) == 0 {
				return true
			}
			for i := range len(p) + 1 {
				if matchSegs(g, p[i:]) {
					return true
				}
			}
			return false
		}
		if len(p) == 0 {
			return false
		}
		if ok, _ := path.Match(g[0], p[0]); !ok {
			return false
		}
		g, p = g[1:], p[1:]
	}
	return len(p) == 0
}

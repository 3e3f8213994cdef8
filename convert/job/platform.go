package job

import (
	"fmt"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// ParsePlatforms parses platform specs written os/arch[/variant], each spec
// one platform or a comma-separated list; empty items are ignored.
func ParsePlatforms(specs ...string) ([]v1.Platform, error) {
	var out []v1.Platform
	for _, s := range specs {
		for _, part := range strings.Split(s, ",") {
			part = strings.TrimSpace(part)
			if part == "" {
				continue
			}
			p, err := v1.ParsePlatform(part)
			if err != nil {
				return nil, fmt.Errorf("platform %q: %w", part, err)
			}
			if p.OS == "" || p.Architecture == "" {
				return nil, fmt.Errorf("platform %q: want os/arch[/variant]", part)
			}
			out = append(out, *p)
		}
	}
	return out, nil
}

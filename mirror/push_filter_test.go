package mirror

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/lazybase/lazybase/internal/testimage"
)

// TestPushesPassTheScheduledFilters sends pushed tags through JobFor and
// MirrorImage, as serve does, with a source that keeps the newest 2 tags
// of lib/a and the 1.* tags of lib/b: a push of a tag outside newest is
// skipped without a conversion, one inside it converts, and a tag outside
// the glob names no job.
func TestPushesPassTheScheduledFilters(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 1024)
	c, err := ParseConfig([]byte(fmt.Sprintf(`
destination = "%s/mirror"
[[source]]
repository = "%s/lib/a"
newest = 2
[[source]]
repository = "%s/lib/b"
tags = ["1.*"]
`, dst.host, src.host, src.host)))
	if err != nil {
		t.Fatal(err)
	}
	m := newMirror(t, c)
	ctx := context.Background()
	for _, tc := range []struct {
		repo, tag string
		job       bool
		status    string
	}{
		{"lib/a", "1.1", true, StatusSkipped},
		{"lib/a", "1.0", true, StatusSkipped},
		{"lib/a", "1.4", true, StatusConverted},
		{"lib/a", "1.3", true, StatusConverted},
		{"lib/b", "1.2", true, StatusConverted},
		{"lib/b", "2.0", false, ""},
	} {
		j, ok := m.JobFor(src.host, tc.repo, tc.tag)
		if ok != tc.job {
			t.Errorf("%s:%s: job %v, want %v", tc.repo, tc.tag, ok, tc.job)
		}
		if !ok {
			continue
		}
		r := m.MirrorImage(ctx, j)
		if r.Status != tc.status {
			t.Errorf("%s:%s: %s, want %s", tc.repo, tc.tag, r.Summary(), tc.status)
		}
		converted := testimage.TagExists(t, j.Destination)
		if converted != (tc.status == StatusConverted) {
			t.Errorf("%s:%s: destination tag exists: %v", tc.repo, tc.tag, converted)
		}
		if tc.status == StatusSkipped && !strings.Contains(r.Reason, "newest 2") {
			t.Errorf("%s:%s: reason %q does not name the filter", tc.repo, tc.tag, r.Reason)
		}
	}
}

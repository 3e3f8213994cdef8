package mirror

import (
	"strings"
	"testing"
)

// TestParseConfigRepositoryPaths rejects repositories with empty, "." or
// ".." path components in every key that names one, naming the key.
func TestParseConfigRepositoryPaths(t *testing.T) {
	for _, tc := range []struct{ doc, key, want string }{
		{"destination = 'r.example/m/../x'\n[[source]]\nrepository = 'r/a'", "destination", `".." path component`},
		{"destination = 'r.example//m'\n[[source]]\nrepository = 'r/a'", "destination", "empty path component"},
		{"destination = 'r.example/./m'\n[[source]]\nrepository = 'r/a'", "destination", `"." path component`},
		{"destination = 'r.example/m'\nrecords_repository = 'r.example/m/..'\n[[source]]\nrepository = 'r/a'", "records_repository", `".." path component`},
		{"destination = 'r.example/m'\n[[source]]\nrepository = 'r.example/lib/../etc'", "source[0].repository", `".." path component`},
		{"destination = 'r.example/m'\n[[source]]\nrepository = 'r.example/ok'\n[[source]]\nrepository = 'r.example//a'", "source[1].repository", "empty path component"},
		{"tag_suffix = '-esgz'\nrecords_repository = 'r.example/../rec'\n[[source]]\nrepository = 'r.example/a'", "records_repository", `".." path component`},
	} {
		_, err := ParseConfig([]byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.key+":") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err = %v, want one naming %s and saying %s", tc.doc, err, tc.key, tc.want)
		}
	}
	// Dots inside a component are fine.
	if _, err := ParseConfig([]byte("destination = 'r.example:5000/m.x'\n[[source]]\nrepository = 'r.example/a..b/c'")); err != nil {
		t.Errorf("valid repositories refused: %v", err)
	}
}

package benchfig

import (
	"bytes"
	"fmt"
	"regexp"
)

// namePattern is what a figures name may be: it names a JSON file and
// appears in the README's markers.
var namePattern = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)

// ValidName reports whether name can name figures: lower-case letters,
// digits and dashes, as in a file name and the README's markers.
func ValidName(name string) bool { return namePattern.MatchString(name) }

// Markers returns the begin and end markers of the figures called name.
func Markers(name string) (begin, end string) {
	return "<!-- figures:" + name + ":begin -->", "<!-- figures:" + name + ":end -->"
}

// Replace returns doc with the text between the markers of name replaced
// by body (a newline is kept after the begin marker and before the end
// marker). It fails unless doc holds each marker exactly once, begin first.
func Replace(doc []byte, name, body string) ([]byte, error) {
	if !namePattern.MatchString(name) {
		return nil, fmt.Errorf("figures name %q: want lower-case letters, digits and dashes", name)
	}
	begin, end := Markers(name)
	for _, m := range []string{begin, end} {
		if n := bytes.Count(doc, []byte(m)); n != 1 {
			return nil, fmt.Errorf("figures %s: marker %s found %d times, want once", name, m, n)
		}
	}
	i := bytes.Index(doc, []byte(begin)) + len(begin)
	j := bytes.Index(doc, []byte(end))
	if j < i {
		return nil, fmt.Errorf("figures %s: %s comes before %s", name, end, begin)
	}
	body = "\n" + string(bytes.TrimSpace([]byte(body))) + "\n"
	out := make([]byte, 0, len(doc)-(j-i)+len(body))
	out = append(out, doc[:i]...)
	out = append(out, body...)
	return append(out, doc[j:]...), nil
}

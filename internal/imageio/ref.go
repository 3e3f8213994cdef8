package imageio

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// LayoutPrefix starts a reference to an OCI image layout directory.
const LayoutPrefix = "oci:"

// Ref is a parsed source or destination reference.
type Ref struct {
	// Registry is set for registry references.
	Registry name.Reference
	// Path is the OCI layout directory of a layout reference.
	Path string
	// Tag is the optional tag (org.opencontainers.image.ref.name) of a
	// layout reference.
	Tag string
}

// IsLayout reports whether r names an OCI layout directory.
func (r Ref) IsLayout() bool { return r.Registry == nil }

// String returns the reference as it would be written on the command line.
func (r Ref) String() string {
	if r.Registry != nil {
		return r.Registry.String()
	}
	if r.Tag != "" {
		return LayoutPrefix + r.Path + ":" + r.Tag
	}
	return LayoutPrefix + r.Path
}

// ParseRef parses a registry reference or "oci:PATH[:TAG]". Registry
// references to loopback hosts (or to any host with WithPlainHTTP) may use
// plain HTTP; others use HTTPS only.
func (c *Client) ParseRef(s string) (Ref, error) {
	if rest, ok := strings.CutPrefix(s, LayoutPrefix); ok {
		return parseLayoutRef(s, rest)
	}
	ref, err := name.ParseReference(s)
	if err != nil {
		return Ref{}, fmt.Errorf("parsing reference %q: %w", s, err)
	}
	if err := CheckRepositoryPath(ref.Context().Name()); err != nil {
		return Ref{}, fmt.Errorf("parsing reference %q: %w", s, err)
	}
	if AllowsPlainHTTP(ref.Context().RegistryStr(), c.o.plainHTTP) {
		// name.Insecure lets go-containerregistry fall back to http
		// after trying https; the policy transport enforces the rest.
		ref, err = name.ParseReference(s, name.Insecure)
		if err != nil {
			return Ref{}, fmt.Errorf("parsing reference %q: %w", s, err)
		}
	}
	return Ref{Registry: ref}, nil
}

// CheckRepositoryPath rejects a repository name, with or without its
// registry host, that has an empty, "." or ".." path component.
// go-containerregistry accepts such names and sends them as they are in
// /v2/ URLs, where a registry or a proxy before it may resolve them as file
// system paths; the distribution reference grammar does not allow them.
func CheckRepositoryPath(repo string) error {
	for _, seg := range strings.Split(repo, "/") {
		switch seg {
		case "":
			return fmt.Errorf("repository %q has an empty path component", repo)
		case ".", "..":
			return fmt.Errorf("repository %q has a %q path component", repo, seg)
		}
	}
	return nil
}

func parseLayoutRef(s, rest string) (Ref, error) {
	p, tag := rest, ""
	// The tag follows the last colon, unless what follows it looks like
	// a path (so "oci:/a:b/c" is the directory "/a:b/c").
	if i := strings.LastIndexByte(rest, ':'); i >= 0 && !strings.ContainsAny(rest[i+1:], `/\`) {
		p, tag = rest[:i], rest[i+1:]
		if tag == "" {
			return Ref{}, fmt.Errorf("parsing reference %q: empty tag after ':'", s)
		}
	}
	if p == "" {
		return Ref{}, fmt.Errorf("parsing reference %q: %w", s, errors.New("empty OCI layout path"))
	}
	return Ref{Path: filepath.Clean(p), Tag: tag}, nil
}

// Overwrites reports whether writing dst would replace the name src was
// read by: the same registry repository and tag, or the same OCI layout
// directory and tag. resolved, when not nil, is the descriptor src was
// opened as; it lets an untagged layout source (the layout's only manifest)
// be recognised under its tag.
func Overwrites(dst, src Ref, resolved *v1.Descriptor) bool {
	if dst.IsLayout() != src.IsLayout() {
		return false
	}
	if !dst.IsLayout() {
		dt, ok1 := dst.Registry.(name.Tag)
		st, ok2 := src.Registry.(name.Tag)
		return ok1 && ok2 && dt.Context().Name() == st.Context().Name() && dt.TagStr() == st.TagStr()
	}
	if !sameDir(dst.Path, src.Path) {
		return false
	}
	if dst.Tag == src.Tag {
		return true
	}
	return src.Tag == "" && resolved != nil && dst.Tag == resolved.Annotations[AnnotationRefName]
}

// sameDir reports whether a and b name the same directory, following
// symbolic links where the paths exist.
func sameDir(a, b string) bool {
	if fa, err := os.Stat(a); err == nil {
		if fb, err := os.Stat(b); err == nil {
			return os.SameFile(fa, fb)
		}
	}
	aa, err1 := filepath.Abs(a)
	ab, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && aa == ab
}

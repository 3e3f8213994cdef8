package lazypull

import (
	"fmt"
	"regexp"
	"strings"
)

// Mode says how the layers of an image are brought in.
type Mode string

const (
	// ModeLazy mounts eStargz layers lazily over FUSE; other layers are
	// pulled normally.
	ModeLazy Mode = "lazy"
	// ModeEager declines the remote mount: containerd pulls and unpacks
	// every layer normally.
	ModeEager Mode = "eager"
	// ModeExportBase mounts lazily like ModeLazy; the export guard also
	// materializes the image's blobs into the content store because the
	// image is an export base.
	ModeExportBase Mode = "export-base"
	// ModeLazyOnly mounts lazily like ModeLazy and marks the image as one
	// that must never be exported.
	ModeLazyOnly Mode = "lazy-only"
)

// MountsLazily reports whether m mounts eStargz layers lazily: true for
// ModeLazy, ModeExportBase and ModeLazyOnly, false for ModeEager.
func (m Mode) MountsLazily() bool { return m != ModeEager }

func (m Mode) check() error {
	switch m {
	case ModeLazy, ModeEager, ModeExportBase, ModeLazyOnly:
		return nil
	}
	return fmt.Errorf("%q: want lazy, eager, export-base or lazy-only", string(m))
}

// Policy decides the Mode of an image from its reference. The zero Policy
// decides ModeLazy for every image.
type Policy struct {
	def   Mode
	rules []compiledRule
}

type compiledRule struct {
	index int
	match string
	re    *regexp.Regexp
	mode  Mode
}

// Decision is the outcome of Policy.Decide.
type Decision struct {
	Mode Mode
	// Rule is the index of the deciding rule in Config.Policy, -1 when the
	// default decided.
	Rule int
	// Match is the deciding rule's glob, empty when the default decided.
	Match string
}

// NewPolicy compiles rules; images no rule matches get def.
func NewPolicy(def Mode, rules []PolicyRule) (*Policy, error) {
	if def == "" {
		def = ModeLazy
	}
	if err := def.check(); err != nil {
		return nil, &KeyError{Key: "default_mode", Err: err}
	}
	p := &Policy{def: def}
	for i, r := range rules {
		re, err := compileGlob(r.Match)
		if err != nil {
			return nil, &KeyError{Key: fmt.Sprintf("policy[%d].match", i), Err: err}
		}
		if err := r.Mode.check(); err != nil {
			return nil, &KeyError{Key: fmt.Sprintf("policy[%d].mode", i), Err: err}
		}
		p.rules = append(p.rules, compiledRule{index: i, match: r.Match, re: re, mode: r.Mode})
	}
	return p, nil
}

// Decide returns the Mode for the image reference ref: the first matching
// rule's, else the default. A rule matches the reference as given or, for
// a reference that carries both a tag and a digest (BuildKit passes
// "name:tag@sha256:…"), the reference without its digest. An empty ref
// (containerd passed no reference) gets the default.
func (p *Policy) Decide(ref string) Decision {
	if p == nil {
		return Decision{Mode: ModeLazy, Rule: -1}
	}
	if ref != "" {
		alt := ""
		if name, _, ok := strings.Cut(ref, "@"); ok && strings.LastIndexByte(name, ':') > strings.LastIndexByte(name, '/') {
			alt = name
		}
		for _, r := range p.rules {
			if r.re.MatchString(ref) || (alt != "" && r.re.MatchString(alt)) {
				return Decision{Mode: r.mode, Rule: r.index, Match: r.match}
			}
		}
	}
	def := p.def
	if def == "" {
		def = ModeLazy
	}
	return Decision{Mode: def, Rule: -1}
}

// compileGlob turns a glob into an anchored regexp: "*" matches any run of
// characters (including "/"), "?" one character, "[...]" a class ("[!...]"
// negates), and "\" escapes the next character.
func compileGlob(glob string) (*regexp.Regexp, error) {
	if glob == "" {
		return nil, fmt.Errorf("empty glob")
	}
	var b strings.Builder
	b.WriteString(`^`)
	for i := 0; i < len(glob); i++ {
		c := glob[i]
		switch c {
		case '*':
			b.WriteString(`.*`)
		case '?':
			b.WriteString(`.`)
		case '\\':
			if i+1 == len(glob) {
				return nil, fmt.Errorf("glob %q ends in an escape", glob)
			}
			i++
			b.WriteString(regexp.QuoteMeta(glob[i : i+1]))
		case '[':
			end := strings.IndexByte(glob[i+1:], ']')
			if end < 0 {
				return nil, fmt.Errorf("glob %q: unterminated [", glob)
			}
			class := glob[i+1 : i+1+end]
			if class == "" || class == "!" {
				return nil, fmt.Errorf("glob %q: empty character class", glob)
			}
			b.WriteByte('[')
			if class[0] == '!' {
				b.WriteByte('^')
				class = class[1:]
			}
			for _, r := range class {
				if r == '\\' || r == '[' || r == ']' || r == '^' {
					b.WriteByte('\\')
				}
				b.WriteRune(r)
			}
			b.WriteByte(']')
			i += end + 1
		default:
			b.WriteString(regexp.QuoteMeta(glob[i : i+1]))
		}
	}
	b.WriteString(`$`)
	re, err := regexp.Compile(b.String())
	if err != nil {
		return nil, fmt.Errorf("glob %q: %w", glob, err)
	}
	return re, nil
}

package toccheck

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/containerd/stargz-snapshotter/estargz"
)

// Defaults of the limits Validate and Read apply.
const (
	// DefaultMaxEntries is the default bound on the number of TOC entries.
	DefaultMaxEntries = 1_000_000
	// DefaultMaxDepth is the default bound on the number of components of
	// an entry's path.
	DefaultMaxDepth = 256
	// DefaultMaxNameLen is the default bound, in bytes, on an entry's path
	// and on a link target.
	DefaultMaxNameLen = 4096
	// DefaultMaxTOCBytes is the default bound, in bytes, on the TOC as it
	// is stored in the blob (compressed) and on its decompressed JSON.
	DefaultMaxTOCBytes = 256 << 20

	// maxComponentLen is NAME_MAX on Linux.
	maxComponentLen = 255
	// maxXattrValue is the largest extended attribute value Linux accepts.
	maxXattrValue = 64 << 10
)

// ErrInvalid is the error every validation failure matches with errors.Is.
var ErrInvalid = errors.New("invalid eStargz TOC")

// Error is a validation failure: the entry at fault and what is wrong.
type Error struct {
	// Entry is the entry's name as the TOC spells it, "" when the failure
	// is about the TOC as a whole.
	Entry string
	// Index is the entry's position in the TOC, -1 when the failure is
	// about the TOC as a whole.
	Index int
	// Problem says what is wrong.
	Problem string
}

// Error returns the failure as one line; the entry name is quoted so that
// control characters in a hostile name cannot forge log lines.
func (e *Error) Error() string {
	if e.Index < 0 {
		return fmt.Sprintf("%s: %s", ErrInvalid, e.Problem)
	}
	name := e.Entry
	if len(name) > maxErrorName {
		name = fmt.Sprintf("%s…(%d bytes)", name[:maxErrorName], len(e.Entry))
	}
	return fmt.Sprintf("%s: entry %q (#%d): %s", ErrInvalid, name, e.Index, e.Problem)
}

// maxErrorName is how much of a long entry name an error message quotes.
const maxErrorName = 200

// Is reports whether target is ErrInvalid.
func (e *Error) Is(target error) bool { return target == ErrInvalid }

func tocError(format string, args ...any) error {
	return &Error{Index: -1, Problem: fmt.Sprintf(format, args...)}
}

// Option configures Validate and Read.
type Option func(*options) error

type options struct {
	maxEntries  int
	maxDepth    int
	maxNameLen  int
	maxTOCBytes int64
}

func newOptions(opts []Option) (options, error) {
	o := options{
		maxEntries:  DefaultMaxEntries,
		maxDepth:    DefaultMaxDepth,
		maxNameLen:  DefaultMaxNameLen,
		maxTOCBytes: DefaultMaxTOCBytes,
	}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return o, err
		}
	}
	return o, nil
}

// WithMaxEntries bounds the number of TOC entries (chunks included).
func WithMaxEntries(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("max entries %d: must be positive", n)
		}
		o.maxEntries = n
		return nil
	}
}

// WithMaxDepth bounds the number of components of an entry's path.
func WithMaxDepth(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("max depth %d: must be positive", n)
		}
		o.maxDepth = n
		return nil
	}
}

// WithMaxNameLen bounds the length in bytes of an entry's path and of a
// link target.
func WithMaxNameLen(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("max name length %d: must be positive", n)
		}
		o.maxNameLen = n
		return nil
	}
}

// WithMaxTOCBytes bounds the size of the TOC in the blob and of its
// decompressed JSON.
func WithMaxTOCBytes(n int64) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("max TOC bytes %d: must be positive", n)
		}
		o.maxTOCBytes = n
		return nil
	}
}

// Blob locates a TOC in its blob.
type Blob struct {
	// Size is the size of the blob in bytes.
	Size int64
	// TOCOffset is where the TOC starts in the blob: every file's data
	// lies before it.
	TOCOffset int64
}

// node is what Validate remembers of a name.
type node struct {
	typ   string
	index int
	// target is, for a hardlink, the name at the end of its chain.
	target string
}

// file is the regular file whose chunks Validate expects next.
type file struct {
	name      string
	index     int
	size      int64
	chunkSize int64 // the file entry's own chunkSize
	covered   int64 // bytes covered by the file entry and its chunks so far
	chunks    int64 // the file entry and its chunks
}

// Validate checks toc, the decoded TOC of blob, against the rules in the
// package documentation. It returns an *Error (matching ErrInvalid) naming
// the first entry at fault, or an error for an invalid option.
func Validate(toc *estargz.JTOC, blob Blob, opts ...Option) error {
	o, err := newOptions(opts)
	if err != nil {
		return err
	}
	if toc == nil {
		return tocError("no TOC")
	}
	if toc.Version != 1 {
		return tocError("version %d, want 1", toc.Version)
	}
	if n := len(toc.Entries); n > o.maxEntries {
		return tocError("%d entries, more than the limit of %d", n, o.maxEntries)
	}
	if blob.Size < 0 || blob.TOCOffset < 0 || blob.TOCOffset > blob.Size {
		return tocError("TOC offset %d outside the blob of %d bytes", blob.TOCOffset, blob.Size)
	}
	v := validator{
		o:       o,
		blob:    blob,
		names:   make(map[string]node, len(toc.Entries)),
		entries: toc.Entries,
	}
	for i, e := range toc.Entries {
		if err := v.entry(i, e); err != nil {
			return err
		}
	}
	if err := v.endFile(); err != nil {
		return err
	}
	return v.parents(toc)
}

type validator struct {
	o        options
	entries  []*estargz.TOCEntry
	blob     Blob
	names    map[string]node
	order    []string // names in TOC order, for a deterministic first error
	cur      *file    // the regular file whose chunks may follow
	lastData int64    // offset of the last entry with data
}

func (v *validator) entry(i int, e *estargz.TOCEntry) error {
	if e == nil {
		return &Error{Index: i, Problem: "null entry"}
	}
	bad := func(format string, args ...any) error {
		return &Error{Entry: e.Name, Index: i, Problem: fmt.Sprintf(format, args...)}
	}
	switch e.Type {
	case "reg", "dir", "symlink", "hardlink", "char", "block", "fifo", "chunk":
	default:
		return bad("unknown type %q", e.Type)
	}
	switch {
	case e.Size < 0:
		return bad("negative size %d", e.Size)
	case e.Offset < 0:
		return bad("negative offset %d", e.Offset)
	case e.InnerOffset < 0:
		return bad("negative inner offset %d", e.InnerOffset)
	case e.ChunkOffset < 0:
		return bad("negative chunk offset %d", e.ChunkOffset)
	case e.ChunkSize < 0:
		return bad("negative chunk size %d", e.ChunkSize)
	case e.DevMajor < 0 || e.DevMinor < 0:
		return bad("negative device number %d:%d", e.DevMajor, e.DevMinor)
	}
	for _, d := range []string{e.Digest, e.ChunkDigest} {
		if d == "" {
			continue
		}
		if !validDigest(d) {
			return bad("digest %q: not algorithm:hex", d)
		}
	}
	if err := v.xattrs(e); err != nil {
		return bad("%v", err)
	}

	if e.Type == "chunk" {
		return v.chunk(e, bad)
	}
	if err := v.endFile(); err != nil {
		return err
	}

	name, err := v.clean(e.Name, e.Type == "dir")
	if err != nil {
		return bad("name: %v", err)
	}
	if name == "" && e.Type != "dir" {
		return bad("the root is a %s, not a directory", e.Type)
	}
	n := node{typ: e.Type, index: i}
	// stargz ends a file's data at the next non-zero offset of any entry,
	// so an entry without data but with an offset must keep the order too.
	if e.Offset != 0 && !(e.Type == "reg" && e.Size > 0) {
		if err := v.data(e, bad); err != nil {
			return err
		}
	}

	switch e.Type {
	case "reg":
		if e.ChunkOffset != 0 {
			return bad("chunk offset %d of a file's first chunk, want 0", e.ChunkOffset)
		}
		if e.ChunkSize > e.Size {
			return bad("chunk size %d larger than the file size %d", e.ChunkSize, e.Size)
		}
		if e.Size > 0 {
			if err := v.data(e, bad); err != nil {
				return err
			}
			covered := e.ChunkSize
			if covered == 0 {
				covered = e.Size
			}
			v.cur = &file{name: name, index: i, size: e.Size, chunkSize: e.ChunkSize, covered: covered, chunks: 1}
		} else if e.ChunkSize != 0 {
			return bad("chunk size %d of an empty file", e.ChunkSize)
		}
	case "symlink":
		if err := v.linkTarget(e.LinkName); err != nil {
			return bad("symlink target: %v", err)
		}
	case "hardlink":
		if e.LinkName == "" {
			return bad("hardlink without a target")
		}
		target, err := v.clean(e.LinkName, true)
		if err != nil {
			return bad("hardlink target %q: %v", e.LinkName, err)
		}
		t, ok := v.names[target]
		switch {
		case target == name:
			return bad("hardlink to itself")
		case !ok:
			return bad("hardlink to %q, which no earlier entry defines", e.LinkName)
		case t.typ == "hardlink":
			n.target = t.target
			t = v.names[t.target]
		default:
			n.target = target
		}
		if t.typ == "dir" || n.target == "" {
			return bad("hardlink to directory %q", e.LinkName)
		}
		if diff := linkChanges(e, v.entries[t.index], t.typ); diff != "" {
			return bad("hardlink to %q gives the shared file %s: an unpack would apply the link's attributes to the file, the lazy view keeps the target's", e.LinkName, diff)
		}
	}

	if prev, ok := v.names[name]; ok && !(prev.typ == "dir" && e.Type == "dir") {
		return bad("duplicate of entry #%d (%s)", prev.index, prev.typ)
	}
	if _, ok := v.names[name]; !ok {
		v.order = append(v.order, name)
	}
	v.names[name] = n
	return nil
}

// chunk checks a chunk entry against the file it continues.
func (v *validator) chunk(e *estargz.TOCEntry, bad func(string, ...any) error) error {
	f := v.cur
	if f == nil {
		return bad("chunk that does not follow a non-empty regular file")
	}
	if e.Name != "" {
		name, err := v.clean(e.Name, false)
		if err != nil || name != f.name {
			return bad("chunk of %q follows file %q", e.Name, f.name)
		}
	}
	if e.ChunkOffset != f.covered {
		return bad("chunk offset %d, want %d (the end of the previous chunk)", e.ChunkOffset, f.covered)
	}
	size := e.ChunkSize
	if size == 0 {
		size = f.size - e.ChunkOffset
	}
	if size <= 0 || size > f.size-e.ChunkOffset {
		return bad("chunk [%d, +%d) outside the file's %d bytes", e.ChunkOffset, e.ChunkSize, f.size)
	}
	if err := v.data(e, bad); err != nil {
		return err
	}
	f.covered += size
	f.chunks++
	return nil
}

// endFile checks that the chunks of the current file covered all of it.
func (v *validator) endFile() error {
	f := v.cur
	if f == nil {
		return nil
	}
	v.cur = nil
	if f.covered != f.size {
		return &Error{Entry: f.name, Index: f.index,
			Problem: fmt.Sprintf("chunks cover %d of the file's %d bytes", f.covered, f.size)}
	}
	// stargz's reader sizes its chunk list by size/chunkSize.
	if f.chunkSize > 0 && f.chunkSize < f.size && f.size/f.chunkSize > f.chunks {
		return &Error{Entry: f.name, Index: f.index,
			Problem: fmt.Sprintf("chunk size %d implies %d chunks, the TOC has %d", f.chunkSize, f.size/f.chunkSize+1, f.chunks)}
	}
	return nil
}

// data checks the blob offset of an entry that has data or an offset.
func (v *validator) data(e *estargz.TOCEntry, bad func(string, ...any) error) error {
	if e.Offset >= v.blob.TOCOffset {
		return bad("offset %d at or past the TOC offset %d", e.Offset, v.blob.TOCOffset)
	}
	if e.Offset < v.lastData {
		return bad("offset %d before the previous entry's %d", e.Offset, v.lastData)
	}
	v.lastData = e.Offset
	return nil
}

func (v *validator) xattrs(e *estargz.TOCEntry) error {
	for k, val := range e.Xattrs {
		if k == "" || len(k) > maxComponentLen || strings.IndexByte(k, 0) >= 0 || !utf8.ValidString(k) {
			return fmt.Errorf("extended attribute name %q", k)
		}
		if strings.HasPrefix(k, overlayXattrPrefix) {
			return fmt.Errorf("extended attribute %q: overlayfs would obey it in the lazy view, an unpack ignores it", k)
		}
		if len(val) > maxXattrValue {
			return fmt.Errorf("extended attribute %q of %d bytes", k, len(val))
		}
	}
	return nil
}

func (v *validator) linkTarget(s string) error {
	switch {
	case s == "":
		return errors.New("empty")
	case len(s) > v.o.maxNameLen:
		return fmt.Errorf("%d bytes, more than the limit of %d", len(s), v.o.maxNameLen)
	case strings.IndexByte(s, 0) >= 0:
		return errors.New("contains NUL")
	case !utf8.ValidString(s):
		return errors.New("not valid UTF-8")
	}
	return nil
}

// clean returns the canonical form of a TOC name, the path relative to the
// root ("" for the root itself), which is what stargz's reader makes of it,
// or an error if the name is not plainly inside the root.
func (v *validator) clean(s string, trailingSlash bool) (string, error) {
	switch {
	case s == "":
		return "", errors.New("empty")
	case len(s) > v.o.maxNameLen:
		return "", fmt.Errorf("%d bytes, more than the limit of %d", len(s), v.o.maxNameLen)
	case strings.IndexByte(s, 0) >= 0:
		return "", errors.New("contains NUL")
	case !utf8.ValidString(s):
		return "", errors.New("not valid UTF-8")
	case strings.HasPrefix(s, "/"):
		return "", errors.New("absolute path")
	}
	p := strings.TrimPrefix(s, "./")
	if p == "." {
		p = ""
	}
	if strings.HasSuffix(p, "/") {
		if !trailingSlash {
			return "", errors.New("trailing slash on a non-directory")
		}
		p = p[:len(p)-1]
	}
	if p == "" {
		return "", nil
	}
	depth := 0
	for c := range strings.SplitSeq(p, "/") {
		depth++
		switch {
		case c == "":
			return "", errors.New("empty path component")
		case c == "." || c == "..":
			return "", fmt.Errorf("%q path component", c)
		case len(c) > maxComponentLen:
			return "", fmt.Errorf("path component of %d bytes, more than %d", len(c), maxComponentLen)
		}
	}
	if depth > v.o.maxDepth {
		return "", fmt.Errorf("%d path components, more than the limit of %d", depth, v.o.maxDepth)
	}
	return p, nil
}

// parents checks that every entry's parent path is made of directories.
func (v *validator) parents(toc *estargz.JTOC) error {
	dirs := make(map[string]struct{}) // parent paths already checked
	for _, name := range v.order {
		n := v.names[name]
		for p := parentOf(name); p != ""; p = parentOf(p) {
			if _, ok := dirs[p]; ok {
				break
			}
			if pn, ok := v.names[p]; ok && pn.typ != "dir" {
				e := toc.Entries[n.index]
				problem := fmt.Sprintf("parent %q is a %s, not a directory", p, pn.typ)
				if pn.typ == "symlink" {
					problem = fmt.Sprintf("parent %q is a symlink: the lazy view would differ from an unpacked one", p)
				}
				return &Error{Entry: e.Name, Index: n.index, Problem: problem}
			}
			dirs[p] = struct{}{}
		}
	}
	return nil
}

func parentOf(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
}

// overlayXattrPrefix is the namespace of the extended attributes overlayfs
// reads from its layers.
const overlayXattrPrefix = "trusted.overlay."

var (
	minUnpackTime = time.Unix(0, 0)
	maxUnpackTime = time.Unix(0, 1<<63-1)
)

// unpackTime is the modification time containerd's unpack gives a file for
// a TOC modtime, read as stargz reads it (unparsable is the zero time):
// times it cannot set become 1970-01-01.
func unpackTime(s string) time.Time {
	t, _ := time.Parse(time.RFC3339, s)
	if t.Before(minUnpackTime) || t.After(maxUnpackTime) {
		return minUnpackTime
	}
	return t
}

// linkChanges describes how the hardlink entry l would change the file it
// shares with target (whose type is typ) when unpacked: containerd applies
// a hardlink's owner, extended attributes, mode (unless the file is a
// symlink) and modification time to the shared file, while stargz shows
// the target's entry under both names. It returns "" when nothing changes.
// Extended attributes the unpack does not set (trusted.*, user.* on a
// symlink) are passed over.
func linkChanges(l, target *estargz.TOCEntry, typ string) string {
	switch {
	case l.UID != target.UID || l.GID != target.GID:
		return fmt.Sprintf("owner %d:%d where the target has %d:%d", l.UID, l.GID, target.UID, target.GID)
	case typ != "symlink" && l.Mode&0o7777 != target.Mode&0o7777:
		return fmt.Sprintf("mode %#o where the target has %#o", l.Mode&0o7777, target.Mode&0o7777)
	case !unpackTime(l.ModTime3339).Equal(unpackTime(target.ModTime3339)):
		return fmt.Sprintf("modtime %q where the target has %q", l.ModTime3339, target.ModTime3339)
	}
	keys := make([]string, 0, len(l.Xattrs))
	for k := range l.Xattrs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if strings.HasPrefix(k, "trusted.") || (typ == "symlink" && strings.HasPrefix(k, "user.")) {
			continue
		}
		if v, ok := target.Xattrs[k]; !ok {
			return fmt.Sprintf("extended attribute %q, which the target does not have", k)
		} else if !bytes.Equal(v, l.Xattrs[k]) {
			return fmt.Sprintf("another value of extended attribute %q", k)
		}
	}
	return ""
}

// validDigest reports whether d is a sha256, sha384 or sha512 digest that
// stargz's verifier can parse (go-digest's regexp costs a third of Validate).
func validDigest(d string) bool {
	alg, hex, ok := strings.Cut(d, ":")
	if !ok {
		return false
	}
	switch {
	case alg == "sha256" && len(hex) == 64, alg == "sha384" && len(hex) == 96, alg == "sha512" && len(hex) == 128:
	default:
		return false
	}
	for i := 0; i < len(hex); i++ {
		if c := hex[i]; (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}

package convert

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/types"
	kgzip "github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	digest "github.com/opencontainers/go-digest"
)

// ErrUnsupportedMediaType is returned for layers whose media type the
// converter cannot read.
var ErrUnsupportedMediaType = errors.New("unsupported layer media type")

type compression int

const (
	compNone compression = iota
	compGzip
	compZstd
)

func sourceCompression(mt types.MediaType) (compression, error) {
	switch mt {
	case types.DockerLayer, types.OCILayer:
		return compGzip, nil
	case types.OCILayerZStd:
		return compZstd, nil
	case types.OCIUncompressedLayer, types.DockerUncompressedLayer:
		return compNone, nil
	}
	return 0, fmt.Errorf("%w %q", ErrUnsupportedMediaType, mt)
}

func (c *Converter) codec() (memberCodec, error) {
	if c.opts.format == FormatZstdChunked {
		c.zstdOnce.Do(func() { c.zstd, c.zstdErr = newZstdCodec(c.opts.level, c.opts.workers) })
		return c.zstd, c.zstdErr
	}
	return c.gzip, nil
}

func (c *Converter) outputMediaType() types.MediaType {
	if c.opts.format == FormatZstdChunked {
		return types.OCILayerZStd
	}
	return types.OCILayer
}

func (c *Converter) convertLayer(ctx context.Context, src v1.Layer, dgst, diffID v1.Hash) (_ *Layer, retErr error) {
	start := time.Now()
	defer func() {
		if retErr != nil {
			retErr = fmt.Errorf("layer %s: %w", dgst, retErr)
			c.opts.progress(Event{Kind: LayerFailed, Layer: dgst, Err: retErr})
		}
	}()
	mt, err := src.MediaType()
	if err != nil {
		return nil, fmt.Errorf("reading media type: %w", err)
	}
	comp, err := sourceCompression(mt)
	if err != nil {
		return nil, err
	}
	size, err := src.Size()
	if err != nil {
		return nil, fmt.Errorf("reading size: %w", err)
	}
	var srcAnn map[string]string
	if d, err := partial.Descriptor(src); err == nil {
		srcAnn = d.Annotations
	}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("layer", dgst.String()))
	c.opts.progress(Event{Kind: LayerStarted, Layer: dgst, Total: size})

	res := LayerResult{Source: v1.Descriptor{MediaType: mt, Size: size, Digest: dgst}}
	out, err := os.CreateTemp(c.dir, "layer-*")
	if err != nil {
		return nil, fmt.Errorf("creating output file: %w", err)
	}
	defer func() {
		out.Close()
		if retErr != nil {
			os.Remove(out.Name())
		}
	}()

	rc, err := src.Compressed()
	if err != nil {
		return nil, fmt.Errorf("opening blob: %w", err)
	}
	c.stats.blobReads.Add(1)
	defer rc.Close()
	blob := &sourceReader{r: rc, h: sha256.New(), ctx: ctx, total: size, layer: dgst, progress: c.opts.progress}

	reuse := !c.opts.force && c.opts.format == FormatEStargz && comp == compGzip && srcAnn[AnnotationTOCDigest] != ""
	var l *Layer
	if reuse && c.opts.prefetch != nil && len(c.opts.prefetch.PrefetchFiles(diffID, dgst)) > 0 {
		log.G(ctx).Warn("layer already is eStargz and is kept as it is: the prefetch list does not apply to it (use force to rebuild it with the list)")
	}
	if reuse {
		l, err = c.reuseLayer(ctx, blob, out, srcAnn, diffID, &res)
	} else {
		l, err = c.rebuildLayer(ctx, blob, comp, out, srcAnn, diffID, &res)
	}
	if err != nil {
		return nil, blameBlob(ctx, blob, res.Source, err)
	}
	l.result.setDuration(time.Since(start))
	r := l.Result()
	c.opts.progress(Event{Kind: LayerDone, Layer: dgst, Total: size, Complete: size, Result: &r})
	log.G(ctx).WithFields(log.Fields{
		"output": l.desc.Digest.String(), "reused": l.result.Reused,
		"seconds": strconv.FormatFloat(l.result.Seconds, 'f', 2, 64),
	}).Debug("converted layer")
	return l, nil
}

// blameBlob explains a failed conversion: when the blob's bytes do not match
// its digest, that is the fault to report, not the decoding error it caused.
// It reads the rest of the blob to find out.
func blameBlob(ctx context.Context, blob *sourceReader, src v1.Descriptor, err error) error {
	var bad *badEntryError
	if ctx.Err() != nil || errors.Is(err, context.Canceled) || blob.done || errors.As(err, &bad) {
		return err // not a decoding failure: no need to read on
	}
	if ferr := finishSource(blob, src.Digest, src.Size); ferr != nil {
		return fmt.Errorf("%w (which made decoding fail: %v)", ferr, err)
	}
	return err
}

// finishSource drains the blob and checks its digest and size.
func finishSource(blob *sourceReader, want v1.Hash, wantSize int64) error {
	blob.done = true
	if _, err := io.Copy(io.Discard, blob); err != nil {
		return fmt.Errorf("reading blob: %w", err)
	}
	got := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", blob.h.Sum(nil))}
	if want.Algorithm == "sha256" && got != want {
		return fmt.Errorf("blob digest mismatch: content is %s (%d bytes), manifest says %s", got, blob.n, want)
	}
	if blob.n != wantSize {
		return fmt.Errorf("blob size mismatch: read %d bytes, manifest says %d", blob.n, wantSize)
	}
	return nil
}

func checkDiffID(got digest.Digest, want v1.Hash) error {
	if want == (v1.Hash{}) || got.String() == want.String() {
		return nil
	}
	return fmt.Errorf("diffID mismatch: uncompressed content is %s, config says %s", got, want)
}

// reuseLayer keeps a layer that already is eStargz after verifying it.
func (c *Converter) reuseLayer(ctx context.Context, blob *sourceReader, out *os.File, srcAnn map[string]string, diffID v1.Hash, res *LayerResult) (*Layer, error) {
	tocDigest, err := digest.Parse(srcAnn[AnnotationTOCDigest])
	if err != nil {
		return nil, fmt.Errorf("annotation %s: %w", AnnotationTOCDigest, err)
	}
	if _, err := io.Copy(out, blob); err != nil {
		return nil, fmt.Errorf("reading blob: %w", err)
	}
	if err := finishSource(blob, res.Source.Digest, res.Source.Size); err != nil {
		return nil, err
	}
	v, err := VerifyEStargz(out, blob.n, tocDigest)
	var bad *badEntryError
	if errors.As(err, &bad) {
		// Rebuilding would refuse the same entry: do not suggest it.
		return nil, fmt.Errorf("existing eStargz layer is refused: %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("existing eStargz layer is invalid (use force to rebuild it): %w", err)
	}
	if err := checkDiffID(v.DiffID, diffID); err != nil {
		return nil, err
	}
	c.stats.reused.Add(1)
	ann := copyMap(srcAnn)
	ann[AnnotationUncompressedSize] = strconv.FormatInt(v.UncompressedSize, 10)
	h, _ := v1.NewHash(v.DiffID.String())
	res.Reused = true
	res.DiffID = h
	res.TOCDigest = tocDigest.String()
	res.UncompressedSize = v.UncompressedSize
	res.SourceUncompressedSize = v.UncompressedSize
	res.Output = v1.Descriptor{MediaType: types.OCILayer, Size: blob.n, Digest: res.Source.Digest, Annotations: ann}
	log.G(ctx).Debug("layer already is valid eStargz; reusing it")
	return &Layer{path: out.Name(), desc: res.Output, diffID: h, result: *res, lpaths: v.paths}, nil
}

// rebuildLayer converts a layer, reading and decompressing its blob once.
func (c *Converter) rebuildLayer(ctx context.Context, blob *sourceReader, comp compression, out *os.File, srcAnn map[string]string, diffID v1.Hash, res *LayerResult) (l *Layer, retErr error) {
	codec, err := c.codec()
	if err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(blob, 1<<20)
	var u io.Reader
	switch comp {
	case compGzip:
		zr, err := kgzip.NewReader(br)
		if err != nil {
			return nil, fmt.Errorf("decompressing: %w", err)
		}
		defer zr.Close()
		u = zr
	case compZstd:
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			return nil, fmt.Errorf("decompressing: %w", err)
		}
		defer zr.Close()
		u = zr
	default:
		u = br
	}
	if comp != compNone {
		c.stats.decompressions.Add(1)
	}
	srcDiff := &hashingReader{r: u, h: sha256.New()}

	odig := sha256.New()
	var sink io.Writer = io.MultiWriter(out, odig)
	if c.opts.tee != nil {
		tw := c.opts.tee.Start(ctx, res.Source)
		var done bool
		end := func(d v1.Descriptor, err error) {
			if !done {
				done = true
				tw.End(d, err)
			}
		}
		defer func() {
			if retErr != nil {
				end(v1.Descriptor{}, retErr)
			} else {
				end(l.desc, nil)
			}
		}()
		sink = io.MultiWriter(out, odig, ignoreErrors{tw})
	}
	ow := bufio.NewWriterSize(sink, 1<<20)
	w := newLayerWriter(ctx, ow, codec, c.pool, c.opts.chunkSize, 2*c.opts.workers+2)

	var files []string
	if c.opts.prefetch != nil {
		files = c.opts.prefetch.PrefetchFiles(diffID, res.Source.Digest)
	}
	filter := newEntryFilter()
	if len(files) == 0 {
		err = c.streamEntries(ctx, srcDiff, w, filter)
	} else {
		err = c.spoolEntries(ctx, srcDiff, w, files, res, filter)
	}
	if err != nil {
		w.abort()
		return nil, err
	}
	if _, err := io.Copy(io.Discard, srcDiff); err != nil {
		w.abort()
		return nil, fmt.Errorf("decompressing: %w", err)
	}
	if err := finishSource(blob, res.Source.Digest, res.Source.Size); err != nil {
		w.abort()
		return nil, err
	}
	if err := checkDiffID(digest.NewDigest(digest.SHA256, srcDiff.h), diffID); err != nil {
		w.abort()
		return nil, err
	}
	tocDigest, codecAnn, err := w.finish()
	if err != nil {
		return nil, err
	}
	if err := ow.Flush(); err != nil {
		return nil, fmt.Errorf("writing output: %w", err)
	}
	c.stats.converted.Add(1)

	ann := map[string]string{}
	for k, v := range srcAnn {
		switch k {
		case AnnotationTOCDigest, AnnotationUncompressedSize,
			AnnotationZstdChunkedManifestChecksum, AnnotationZstdChunkedManifestPosition:
			// stale: describe the source, not the output
		default:
			ann[k] = v
		}
	}
	for k, v := range codecAnn {
		ann[k] = v
	}
	ann[AnnotationTOCDigest] = tocDigest.String()
	ann[AnnotationUncompressedSize] = strconv.FormatInt(w.usize, 10)
	ann[AnnotationSourceLayer] = res.Source.Digest.String()

	outDigest := v1.Hash{Algorithm: "sha256", Hex: fmt.Sprintf("%x", odig.Sum(nil))}
	outDiff, _ := v1.NewHash(digest.NewDigest(digest.SHA256, w.diffHash).String())
	res.Output = v1.Descriptor{MediaType: c.outputMediaType(), Size: w.written, Digest: outDigest, Annotations: ann}
	res.DiffID = outDiff
	res.TOCDigest = tocDigest.String()
	res.UncompressedSize = w.usize
	res.SourceUncompressedSize = srcDiff.n
	return &Layer{path: out.Name(), desc: res.Output, diffID: outDiff, result: *res, lpaths: filter.summary()}, nil
}

var landmarkPayload = []byte{0xf}

func landmark(name string) *tar.Header {
	return &tar.Header{Name: name, Typeflag: tar.TypeReg, Size: int64(len(landmarkPayload))}
}

// badEntryError is a tar entry the converter refuses (a path escaping the
// root, a dangling hardlink, ...): the bytes decoded fine.
type badEntryError struct{ err error }

func (e *badEntryError) Error() string { return e.err.Error() }
func (e *badEntryError) Unwrap() error { return e.err }

// entryFilter validates source entries and tells which to drop.
//
// Besides paths that leave the root, it refuses what would make the lazily
// mounted layer differ from the layer unpacked by containerd, or what the
// stargz reader cannot hold: a hardlink to a directory (directly or through
// other hardlinks; it makes a cycle in the TOC), an entry under a symbolic
// link or under a non-directory of the same layer (containerd's unpack
// resolves the link, the lazy view does not), a directory replaced by a
// non-directory (the unpack removes what was in it, the lazy view keeps it),
// a hardlink target replaced after the link was made (the unpacked link
// keeps the old file, the lazy one follows the new), a hardlink whose header
// gives the shared file other attributes than its target's (containerd's
// unpack applies the link's header to the file, the lazy view keeps the
// target's) and an extended attribute overlayfs acts on, trusted.overlay.*
// (containerd's unpack ignores it; overlayfs obeys it in a lazy mount).
type entryFilter struct {
	// kinds is the kind of each path so far, directories implied by
	// deeper paths included; a hardlink has its target's kind.
	kinds map[string]entryKind
	// linked maps a hardlink target to the first hardlink naming it.
	linked map[string]string
	// implied maps a directory first met as the parent of an entry (not as
	// an entry of its own) to that entry's name.
	implied map[string]string
	// attrs holds what each non-directory's header applies to its file,
	// for the hardlinks made to it later in the layer.
	attrs map[string]fileAttrs
}

// fileAttrs are the attributes containerd's unpack applies to a file from
// its tar header, again from each hardlink header naming it.
type fileAttrs struct {
	mode     int64 // permission, setuid, setgid and sticky bits
	uid, gid int
	mtime    time.Time         // as containerd bounds it
	xattrs   map[string]string // nil when none
}

// entryKind is what a path of the layer is.
type entryKind uint8

const (
	kindNone entryKind = iota
	kindDir
	kindSymlink
	kindOther // regular files, devices, FIFOs
)

func newEntryFilter() *entryFilter {
	return &entryFilter{kinds: map[string]entryKind{}, linked: map[string]string{}, implied: map[string]string{}, attrs: map[string]fileAttrs{}}
}

// check validates h and reports whether it belongs in the output.
func (f *entryFilter) check(ctx context.Context, h *tar.Header) (bool, error) {
	keep, err := f.checkEntry(ctx, h)
	if err != nil {
		return false, &badEntryError{err}
	}
	return keep, nil
}

func (f *entryFilter) checkEntry(ctx context.Context, h *tar.Header) (keep bool, err error) {
	if h.Typeflag == tar.TypeXGlobalHeader {
		log.G(ctx).WithField("path", h.Name).Debug("dropping PAX global header")
		return false, nil
	}
	clean, err := safePath(h.Name)
	if err != nil {
		return false, err
	}
	if err := representable(h); err != nil {
		return false, err
	}
	if err := noOverlayXattr(h); err != nil {
		return false, err
	}
	switch clean {
	case estargz.TOCTarName, estargz.PrefetchLandmark, estargz.NoPrefetchLandmark:
		return false, nil // left by an earlier conversion; rebuilt here
	}
	kind := kindOther
	switch h.Typeflag {
	case tar.TypeReg, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
	case tar.TypeDir:
		kind = kindDir
	case tar.TypeSymlink:
		kind = kindSymlink
	case tar.TypeLink:
		target, err := safePath(h.Linkname)
		if err != nil {
			return false, fmt.Errorf("hardlink %q: target: %w", h.Name, err)
		}
		if target == clean {
			return false, fmt.Errorf("hardlink %q links to itself", h.Name)
		}
		switch f.kinds[target] {
		case kindNone:
			return false, fmt.Errorf("hardlink %q: target %q is not in the layer before it", h.Name, h.Linkname)
		case kindDir:
			return false, fmt.Errorf("hardlink %q: target %q is a directory (directly or through other hardlinks), which a layer cannot hold", h.Name, h.Linkname)
		}
		kind = f.kinds[target]
		if err := sameAttrs(h, target, f.attrs[target], kind); err != nil {
			return false, err
		}
		if _, ok := f.linked[target]; !ok {
			f.linked[target] = clean
		}
	default:
		return false, fmt.Errorf("file %q: unsupported tar entry type %q", h.Name, h.Typeflag)
	}
	if err := f.checkParents(h.Name, clean); err != nil {
		return false, err
	}
	if prev := f.kinds[clean]; prev != kindNone {
		if prev == kindDir && kind != kindDir {
			return false, fmt.Errorf("file %q replaces a directory of the same layer: containerd's unpack would remove the directory and its contents, a lazy mount would keep them", h.Name)
		}
		if l, ok := f.linked[clean]; ok && l != clean {
			return false, fmt.Errorf("file %q replaces the target of hardlink %q of the same layer: the unpacked link would keep the old file, a lazy mount would show the new one", h.Name, l)
		}
	}
	f.kinds[clean] = kind
	switch {
	case kind == kindDir:
		delete(f.attrs, clean)
	case h.Typeflag == tar.TypeLink:
		f.attrs[clean] = f.attrs[path.Clean(h.Linkname)]
	default:
		f.attrs[clean] = headerAttrs(h)
	}
	return true, nil
}

const (
	paxXattr = "SCHILY.xattr."
	// overlayXattrPrefix is the namespace of the extended attributes
	// overlayfs reads from its layers (opaque directories, redirects,
	// metacopy, ...).
	overlayXattrPrefix = "trusted.overlay."
)

// noOverlayXattr refuses an entry carrying a trusted.overlay.* extended
// attribute: containerd's unpack does not set trusted.* attributes, while
// the lazily mounted layer serves it and overlayfs acts on it (an opaque
// directory hides the lower layers' files), so the two views would differ.
// Stripping it would change the layer, so lazybase refuses it instead.
func noOverlayXattr(h *tar.Header) error {
	for k := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, paxXattr); ok && strings.HasPrefix(x, overlayXattrPrefix) {
			return fmt.Errorf("file %q carries the extended attribute %q, which overlayfs would obey in a lazy mount while containerd's unpack ignores it, so lazybase refuses the layer", h.Name, x)
		}
	}
	return nil
}

var (
	minUnpackTime = time.Unix(0, 0)
	maxUnpackTime = time.Unix(0, 1<<63-1)
)

// unpackTime is the modification time containerd's unpack gives a file
// whose header says t: times it cannot set become 1970-01-01.
func unpackTime(t time.Time) time.Time {
	if t.Before(minUnpackTime) || t.After(maxUnpackTime) {
		return minUnpackTime
	}
	return t
}

// headerAttrs returns what containerd's unpack applies from h.
func headerAttrs(h *tar.Header) fileAttrs {
	a := fileAttrs{mode: h.Mode & 0o7777, uid: h.Uid, gid: h.Gid, mtime: unpackTime(h.ModTime)}
	for k, v := range h.PAXRecords {
		if x, ok := strings.CutPrefix(k, paxXattr); ok {
			if a.xattrs == nil {
				a.xattrs = map[string]string{}
			}
			a.xattrs[x] = v
		}
	}
	return a
}

// sameAttrs refuses a hardlink whose header would change the file it
// shares with target: containerd's unpack makes the link, then applies the
// link's owner, extended attributes, mode (unless the file is a symbolic
// link) and modification time to the shared file, while the lazily mounted
// layer shows the target's entry under both names. Extended attributes the
// unpack does not set (trusted.*, user.* on a symbolic link) are passed over.
func sameAttrs(h *tar.Header, target string, t fileAttrs, kind entryKind) error {
	l := headerAttrs(h)
	diff := ""
	switch {
	case l.uid != t.uid || l.gid != t.gid:
		diff = fmt.Sprintf("owner %d:%d where the target has %d:%d", l.uid, l.gid, t.uid, t.gid)
	case kind != kindSymlink && l.mode != t.mode:
		diff = fmt.Sprintf("mode %#o where the target has %#o", l.mode, t.mode)
	case !l.mtime.Equal(t.mtime):
		diff = fmt.Sprintf("modification time %s where the target has %s", l.mtime.UTC().Format(time.RFC3339Nano), t.mtime.UTC().Format(time.RFC3339Nano))
	}
	if diff == "" {
		keys := make([]string, 0, len(l.xattrs))
		for k := range l.xattrs {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if strings.HasPrefix(k, "trusted.") || (kind == kindSymlink && strings.HasPrefix(k, "user.")) {
				continue
			}
			if v, ok := t.xattrs[k]; !ok {
				diff = fmt.Sprintf("extended attribute %q, which the target does not have", k)
				break
			} else if v != l.xattrs[k] {
				diff = fmt.Sprintf("extended attribute %q = %q where the target has %q", k, l.xattrs[k], v)
				break
			}
		}
	}
	if diff == "" {
		return nil
	}
	return fmt.Errorf("hardlink %q to %q: its header gives the shared file %s; containerd's unpack applies a hardlink's header to the file, a lazy mount keeps the target's, so lazybase refuses the layer", h.Name, target, diff)
}

// checkParents refuses an entry under a symbolic link or a non-directory,
// and records the directories its path implies.
func (f *entryFilter) checkParents(name, clean string) error {
	for i := 0; i < len(clean); i++ {
		if clean[i] != '/' {
			continue
		}
		parent := clean[:i]
		switch f.kinds[parent] {
		case kindNone:
			f.kinds[parent] = kindDir
			f.implied[parent] = name
		case kindSymlink:
			return fmt.Errorf("file %q is under %q, a symbolic link of the same layer: containerd's unpack would follow the link, a lazy mount would not, so lazybase refuses the layer", name, parent)
		case kindOther:
			return fmt.Errorf("file %q is under %q, which is not a directory", name, parent)
		}
	}
	return nil
}

// representable rejects headers whose strings are not valid UTF-8: the TOC is
// JSON, which would silently replace the invalid bytes, so the lazily mounted
// file system would differ from the layer.
func representable(h *tar.Header) error {
	bad := ""
	switch {
	case !utf8.ValidString(h.Name):
		bad = "its name"
	case !utf8.ValidString(h.Linkname):
		bad = "its link target"
	case !utf8.ValidString(h.Uname) || !utf8.ValidString(h.Gname):
		bad = "its owner name"
	}
	for k := range h.PAXRecords {
		if bad == "" && strings.HasPrefix(k, "SCHILY.xattr.") && !utf8.ValidString(k) {
			bad = "an xattr name"
		}
	}
	if bad != "" {
		return fmt.Errorf("file %q: %s is not valid UTF-8, which an eStargz TOC cannot represent", h.Name, bad)
	}
	return nil
}

// safePath cleans a tar path and rejects paths that leave the layer root.
func safePath(name string) (string, error) {
	if name == "" {
		return "", errors.New("empty path in tar entry")
	}
	if strings.ContainsRune(name, 0) {
		return "", fmt.Errorf("path %q contains NUL", name)
	}
	if path.IsAbs(name) {
		return "", fmt.Errorf("path %q is absolute", name)
	}
	c := path.Clean(name)
	if c == ".." || strings.HasPrefix(c, "../") {
		return "", fmt.Errorf("path %q escapes the layer root", name)
	}
	return c, nil
}

// streamEntries converts in source order, with no prefetch list: nothing is
// buffered beyond the batches being compressed.
func (c *Converter) streamEntries(ctx context.Context, u io.Reader, w *layerWriter, f *entryFilter) error {
	if err := w.writeEntry(landmark(estargz.NoPrefetchLandmark), bytes.NewReader(landmarkPayload)); err != nil {
		return err
	}
	return streamTar(ctx, tar.NewReader(u), f, w)
}

// streamTar writes the rest of tr's entries in source order.
func streamTar(ctx context.Context, tr *tar.Reader, f *entryFilter, w *layerWriter) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading tar: %w", err)
		}
		keep, err := f.check(ctx, h)
		if err != nil {
			return err
		}
		if !keep {
			continue
		}
		if err := w.writeEntry(h, tr); err != nil {
			return fmt.Errorf("file %q: %w", h.Name, err)
		}
	}
}

type spooled struct {
	h     *tar.Header
	off   int64
	clean string
}

// emitSpooled writes a spooled entry, its payload read from the spool.
func emitSpooled(w *layerWriter, spool io.ReaderAt, e *spooled) error {
	var r io.Reader = emptyReader{}
	if e.h.Typeflag == tar.TypeReg {
		r = io.NewSectionReader(spool, e.off, e.h.Size)
	}
	if err := w.writeEntry(e.h, r); err != nil {
		return fmt.Errorf("file %q: %w", e.h.Name, err)
	}
	return nil
}

// switchWriter writes to w until it is turned off, then discards.
type switchWriter struct {
	w   io.Writer
	off bool
}

func (s *switchWriter) Write(p []byte) (int, error) {
	if s.off {
		return len(p), nil
	}
	return s.w.Write(p)
}

// spoolEntries converts with a prefetch list: the decompressed tar is spooled
// to a temporary file as it is read, then written prioritized files first.
// A layer beyond the spool limits is written in source order instead (see
// WithSpoolLimit).
func (c *Converter) spoolEntries(ctx context.Context, u io.Reader, w *layerWriter, files []string, res *LayerResult, f *entryFilter) error {
	tmp, err := os.CreateTemp(c.dir, "src-*.tar")
	if err != nil {
		return fmt.Errorf("creating spool file: %w", err)
	}
	defer func() {
		tmp.Close()
		os.Remove(tmp.Name())
	}()
	bw := bufio.NewWriterSize(tmp, 1<<20)
	sw := &switchWriter{w: bw}
	cr := &hashingReader{r: io.TeeReader(u, sw)}
	tr := tar.NewReader(cr)
	var ents []*spooled
	byName := map[string]int{}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("reading tar: %w", err)
		}
		keep, err := f.check(ctx, h)
		if err != nil {
			return err
		}
		if !keep {
			continue
		}
		if cr.n+h.Size > c.opts.spoolBytes || len(ents) >= c.opts.spoolEntries {
			// Too large to reorder: write what is spooled, then stream
			// the rest, exactly as without a prefetch list.
			log.G(ctx).WithFields(log.Fields{"spoolBytes": c.opts.spoolBytes, "spoolEntries": c.opts.spoolEntries}).
				Warn("layer exceeds the prefetch spool limits: converting it in source order, without its prefetch list")
			sw.off = true
			if err := bw.Flush(); err != nil {
				return fmt.Errorf("writing spool file: %w", err)
			}
			if err := w.writeEntry(landmark(estargz.NoPrefetchLandmark), bytes.NewReader(landmarkPayload)); err != nil {
				return err
			}
			for _, e := range ents {
				if err := emitSpooled(w, tmp, e); err != nil {
					return err
				}
			}
			if err := w.writeEntry(h, tr); err != nil {
				return fmt.Errorf("file %q: %w", h.Name, err)
			}
			res.SpoolExceeded = true
			return streamTar(ctx, tr, f, w)
		}
		e := &spooled{h: h, off: cr.n, clean: path.Clean(h.Name)}
		byName[e.clean] = len(ents)
		ents = append(ents, e)
	}
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return fmt.Errorf("reading tar: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("writing spool file: %w", err)
	}

	// Moving an entry ahead is only safe when nothing else in the layer
	// shares its name: otherwise it would change which version wins, or what
	// a hardlink made between the versions points to.
	count := map[string]int{}
	for _, e := range ents {
		count[e.clean]++
	}
	picked := map[int]bool{}
	var order []int
	var duplicated []string
	var move func(name string, depth int) bool
	move = func(name string, depth int) bool {
		i, ok := byName[name]
		if !ok || depth > 256 {
			return false
		}
		if picked[i] {
			return true
		}
		if count[name] > 1 {
			duplicated = append(duplicated, name)
			return false
		}
		if name != "." {
			move(path.Dir(name), depth+1) // parents first, when they have entries
		}
		if e := ents[i]; e.h.Typeflag == tar.TypeLink && !move(path.Clean(e.h.Linkname), depth+1) {
			return false // a hardlink never goes ahead of its target
		}
		picked[i] = true
		order = append(order, i)
		return true
	}
	prioritized := 0
	for _, name := range files {
		clean := cleanName(name)
		if clean == "" {
			clean = "."
		}
		if move(clean, 0) {
			prioritized++
		} else if _, ok := byName[clean]; !ok {
			res.MissingPrefetch = append(res.MissingPrefetch, name)
		}
	}
	if len(res.MissingPrefetch) > 0 {
		log.G(ctx).WithField("missing", len(res.MissingPrefetch)).Warn("prefetch list names files the layer does not hold")
	}
	if len(duplicated) > 0 {
		log.G(ctx).WithField("files", duplicated).Warn("not prefetching files whose names occur more than once in the layer")
	}
	res.Prefetch = prioritized
	emit := func(e *spooled) error { return emitSpooled(w, tmp, e) }
	for _, i := range order {
		if err := emit(ents[i]); err != nil {
			return err
		}
	}
	mark := estargz.PrefetchLandmark
	if len(order) == 0 {
		mark = estargz.NoPrefetchLandmark
	}
	if err := w.writeEntry(landmark(mark), bytes.NewReader(landmarkPayload)); err != nil {
		return err
	}
	for i, e := range ents {
		if picked[i] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := emit(e); err != nil {
			return err
		}
	}
	return nil
}

// ignoreErrors writes to w and reports success whatever w says: a
// BlobTee's copy never fails a conversion.
type ignoreErrors struct{ w io.Writer }

func (i ignoreErrors) Write(p []byte) (int, error) {
	i.w.Write(p)
	return len(p), nil
}

// emptyReader is an empty reader.
type emptyReader struct{}

func (emptyReader) Read([]byte) (int, error) { return 0, io.EOF }

// sourceReader reads a source blob once, hashing it and reporting progress.
type sourceReader struct {
	done     bool // finishSource ran
	r        io.Reader
	h        hash.Hash
	n        int64
	ctx      context.Context
	total    int64
	layer    v1.Hash
	last     int64
	progress func(Event)
}

func (s *sourceReader) Read(p []byte) (int, error) {
	if err := s.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := s.r.Read(p)
	s.h.Write(p[:n])
	s.n += int64(n)
	if s.n-s.last >= 1<<20 || (err == io.EOF && s.n != s.last) {
		s.last = s.n
		s.progress(Event{Kind: LayerProgress, Layer: s.layer, Total: s.total, Complete: s.n})
	}
	return n, err
}

// hashingReader counts and optionally hashes what passes through it.
type hashingReader struct {
	r io.Reader
	h hash.Hash
	n int64
}

func (h *hashingReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	if h.h != nil {
		h.h.Write(p[:n])
	}
	h.n += int64(n)
	return n, err
}

// decompressed returns the uncompressed stream of a converted blob.
func decompressed(f io.ReadCloser, mt types.MediaType) (io.ReadCloser, error) {
	switch mt {
	case types.OCILayerZStd:
		zr, err := zstd.NewReader(f)
		if err != nil {
			f.Close()
			return nil, err
		}
		return &readCloser{Reader: zr, close: func() error { zr.Close(); return f.Close() }}, nil
	default:
		zr, err := kgzip.NewReader(f)
		if err != nil {
			f.Close()
			return nil, err
		}
		return &readCloser{Reader: zr, close: func() error { zr.Close(); return f.Close() }}, nil
	}
}

type readCloser struct {
	io.Reader
	close func() error
}

func (r *readCloser) Close() error { return r.close() }

package convert

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"hash"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	digest "github.com/opencontainers/go-digest"
)

// batchTarget is how many uncompressed bytes a batch collects before it is
// handed to a compressor. Batches always end on a member boundary.
const batchTarget = 1 << 20

// batch is a run of consecutive members compressed by one worker.
type batch struct {
	raw    bytes.Buffer // uncompressed members, back to back
	starts []int        // start of each member in raw
	out    bytes.Buffer // compressed members, back to back
	ends   []int        // end of each compressed member in out
	codec  memberCodec
	err    error
	done   chan struct{}
}

var batchPool = sync.Pool{New: func() any { return &batch{} }}

func getBatch(codec memberCodec) *batch {
	b := batchPool.Get().(*batch)
	b.raw.Reset()
	b.out.Reset()
	b.starts = append(b.starts[:0], 0)
	b.ends = b.ends[:0]
	b.codec = codec
	b.err = nil
	b.done = make(chan struct{})
	return b
}

func putBatch(b *batch) {
	if b.raw.Cap() > 8<<20 || b.out.Cap() > 8<<20 {
		return // do not keep oversized buffers
	}
	b.codec = nil
	batchPool.Put(b)
}

func (b *batch) compress() {
	defer close(b.done)
	raw := b.raw.Bytes()
	for i, s := range b.starts {
		e := len(raw)
		if i+1 < len(b.starts) {
			e = b.starts[i+1]
		}
		if err := b.codec.compress(&b.out, raw[s:e]); err != nil {
			b.err = err
			return
		}
		b.ends = append(b.ends, b.out.Len())
	}
}

// pool is the set of compressors a Converter shares between its layers.
type pool struct {
	work chan *batch
	wg   sync.WaitGroup
}

func newPool(workers int) *pool {
	p := &pool{work: make(chan *batch, workers)}
	for range workers {
		p.wg.Go(func() {
			for b := range p.work {
				b.compress()
			}
		})
	}
	return p
}

func (p *pool) close() {
	close(p.work)
	p.wg.Wait()
}

// layerWriter writes one output layer. The tar stream it is given is cut
// into members exactly where estargz.Writer cuts it (before the data of every
// regular-file chunk); members are compressed in parallel and written in
// order, so the output is the same whatever the parallelism.
type layerWriter struct {
	ctx       context.Context
	codec     memberCodec
	pool      *pool
	chunkSize int

	tw      *tar.Writer
	cur     *batch
	members int // members started so far

	toc         estargz.JTOC
	entryMember []int // member index of toc.Entries[i], or -1

	lastUname map[int]string
	lastGname map[int]string

	queue    chan *batch
	asmDone  chan struct{}
	asmErr   error
	offsets  []int64 // compressed offset of each member
	written  int64
	out      io.Writer
	diffHash hash.Hash
	usize    int64 // uncompressed bytes written
}

func newLayerWriter(ctx context.Context, out io.Writer, codec memberCodec, p *pool, chunkSize, depth int) *layerWriter {
	w := &layerWriter{
		ctx:       ctx,
		codec:     codec,
		pool:      p,
		chunkSize: chunkSize,
		toc:       estargz.JTOC{Version: 1},
		lastUname: map[int]string{},
		lastGname: map[int]string{},
		queue:     make(chan *batch, depth),
		asmDone:   make(chan struct{}),
		out:       out,
		diffHash:  sha256.New(),
	}
	w.cur = getBatch(codec)
	w.members = 1
	w.tw = tar.NewWriter(w)
	go w.assemble()
	return w
}

// Write appends uncompressed tar bytes to the current member.
func (w *layerWriter) Write(p []byte) (int, error) {
	return w.cur.raw.Write(p)
}

// cut starts a new member and returns its index.
func (w *layerWriter) cut() (int, error) {
	if w.cur.raw.Len() >= batchTarget {
		if err := w.submit(); err != nil {
			return 0, err
		}
		w.cur = getBatch(w.codec)
	} else {
		w.cur.starts = append(w.cur.starts, w.cur.raw.Len())
	}
	idx := w.members
	w.members++
	return idx, nil
}

func (w *layerWriter) submit() error {
	b := w.cur
	w.cur = nil
	select {
	case w.queue <- b:
	case <-w.asmDone:
		return w.asmErr
	case <-w.ctx.Done():
		return w.ctx.Err()
	}
	select {
	case w.pool.work <- b:
		return nil
	case <-w.ctx.Done():
		// The assembler waits for b; finish it here.
		b.err = w.ctx.Err()
		close(b.done)
		return w.ctx.Err()
	}
}

// assemble writes compressed batches in order.
func (w *layerWriter) assemble() {
	defer close(w.asmDone)
	fail := func(err error) {
		if w.asmErr == nil {
			w.asmErr = err
		}
	}
	for b := range w.queue {
		<-b.done
		if w.asmErr == nil && b.err != nil {
			fail(fmt.Errorf("compressing: %w", b.err))
		}
		if w.asmErr == nil {
			start := 0
			for _, e := range b.ends {
				w.offsets = append(w.offsets, w.written+int64(start))
				start = e
			}
			n, err := w.out.Write(b.out.Bytes())
			w.written += int64(n)
			if err != nil {
				fail(fmt.Errorf("writing output: %w", err))
			}
			w.diffHash.Write(b.raw.Bytes())
			w.usize += int64(b.raw.Len())
		}
		putBatch(b)
	}
}

func (w *layerWriter) nameIfChanged(m map[int]string, id int, name string) string {
	if name == "" || m[id] == name {
		return ""
	}
	m[id] = name
	return name
}

// formatModtime returns the TOC modtime of a tar header's time. Unlike
// estargz's writer, it writes mtime 0 as "1970-01-01T00:00:00Z" rather than
// leaving it out: stargz shows a missing modtime as Go's zero time
// (0001-01-01), containerd's unpack shows 1970-01-01. Only a header without
// a time at all gets no modtime.
func formatModtime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Round(time.Second).Format(time.RFC3339)
}

func (w *layerWriter) addEntry(e *estargz.TOCEntry, member int) {
	w.toc.Entries = append(w.toc.Entries, e)
	w.entryMember = append(w.entryMember, member)
}

// writeEntry appends one tar entry with its payload.
func (w *layerWriter) writeEntry(h *tar.Header, payload io.Reader) error {
	const xattrPrefix = "SCHILY.xattr."
	var xattrs map[string][]byte
	for k, v := range h.PAXRecords {
		if strings.HasPrefix(k, xattrPrefix) {
			if xattrs == nil {
				xattrs = map[string][]byte{}
			}
			xattrs[k[len(xattrPrefix):]] = []byte(v)
		}
	}
	ent := &estargz.TOCEntry{
		Name:        h.Name,
		Mode:        h.Mode,
		UID:         h.Uid,
		GID:         h.Gid,
		Uname:       w.nameIfChanged(w.lastUname, h.Uid, h.Uname),
		Gname:       w.nameIfChanged(w.lastGname, h.Gid, h.Gname),
		ModTime3339: formatModtime(h.ModTime),
		Xattrs:      xattrs,
	}
	switch h.Typeflag {
	case tar.TypeLink:
		ent.Type, ent.LinkName = "hardlink", h.Linkname
	case tar.TypeSymlink:
		ent.Type, ent.LinkName = "symlink", h.Linkname
	case tar.TypeDir:
		ent.Type = "dir"
	case tar.TypeReg:
		ent.Type, ent.Size = "reg", h.Size
	case tar.TypeChar:
		ent.Type, ent.DevMajor, ent.DevMinor = "char", int(h.Devmajor), int(h.Devminor)
	case tar.TypeBlock:
		ent.Type, ent.DevMajor, ent.DevMinor = "block", int(h.Devmajor), int(h.Devminor)
	case tar.TypeFifo:
		ent.Type = "fifo"
	default:
		return fmt.Errorf("unsupported tar entry type %q", h.Typeflag)
	}
	if err := w.tw.WriteHeader(h); err != nil {
		return fmt.Errorf("writing tar header: %w", err)
	}
	if h.Typeflag != tar.TypeReg {
		w.addEntry(ent, -1)
		return w.tw.Flush()
	}
	fileHash := sha256.New()
	if h.Size == 0 {
		ent.Digest = digest.NewDigest(digest.SHA256, fileHash).String()
		w.addEntry(ent, -1)
		return w.tw.Flush()
	}
	first := ent
	single := h.Size <= int64(w.chunkSize)
	var written int64
	for written < h.Size {
		n := int64(w.chunkSize)
		if remain := h.Size - written; remain < n {
			n = remain
		} else {
			ent.ChunkSize = n
		}
		member, err := w.cut()
		if err != nil {
			return err
		}
		ent.ChunkOffset = written
		var hashes io.Writer = fileHash
		var chunkHash hash.Hash
		if !single {
			chunkHash = sha256.New()
			hashes = io.MultiWriter(fileHash, chunkHash)
		}
		if err := w.copyPayload(payload, n, hashes); err != nil {
			return err
		}
		if single {
			ent.ChunkDigest = digest.NewDigest(digest.SHA256, fileHash).String()
		} else {
			ent.ChunkDigest = digest.NewDigest(digest.SHA256, chunkHash).String()
		}
		w.addEntry(ent, member)
		written += n
		ent = &estargz.TOCEntry{Name: h.Name, Type: "chunk"}
	}
	first.Digest = digest.NewDigest(digest.SHA256, fileHash).String()
	return w.tw.Flush()
}

// copyPayload copies n bytes from r into the tar writer, hashing them. It
// reads straight into the batch buffer to avoid an extra copy.
func (w *layerWriter) copyPayload(r io.Reader, n int64, h io.Writer) error {
	buf := &w.cur.raw
	for n > 0 {
		want := n
		if want > 256<<10 {
			want = 256 << 10
		}
		buf.Grow(int(want))
		b := buf.AvailableBuffer()[:want]
		m, err := io.ReadFull(r, b)
		if m > 0 {
			h.Write(b[:m])
			// tw.Write accounts for the bytes and appends them to buf; b
			// aliases buf's free space, which append copies onto itself.
			if _, werr := w.tw.Write(b[:m]); werr != nil {
				return fmt.Errorf("writing tar payload: %w", werr)
			}
			n -= int64(m)
		}
		if err != nil {
			if err == io.EOF || err == io.ErrUnexpectedEOF {
				return io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// finish closes the stream, writes TOC and footer, and returns the TOC digest
// and the codec's annotations.
func (w *layerWriter) finish() (digest.Digest, map[string]string, error) {
	if w.codec.trailer() {
		if err := w.tw.Close(); err != nil {
			return "", nil, err
		}
	}
	if err := w.submit(); err != nil {
		w.abort()
		return "", nil, err
	}
	close(w.queue)
	<-w.asmDone
	if w.asmErr != nil {
		return "", nil, w.asmErr
	}
	for i, m := range w.entryMember {
		if m >= 0 {
			w.toc.Entries[i].Offset = w.offsets[m]
		}
	}
	tocDigest, ann, err := w.codec.writeTOCAndFooter(countWriter{w}, w.written, &w.toc, usizeHash{w})
	if err != nil {
		return "", nil, fmt.Errorf("writing TOC: %w", err)
	}
	return tocDigest, ann, nil
}

// abort stops the assembler after a failure.
func (w *layerWriter) abort() {
	if w.cur != nil {
		putBatch(w.cur)
		w.cur = nil
	}
	select {
	case <-w.asmDone:
	default:
		close(w.queue)
		<-w.asmDone
	}
}

type countWriter struct{ w *layerWriter }

func (c countWriter) Write(p []byte) (int, error) {
	n, err := c.w.out.Write(p)
	c.w.written += int64(n)
	return n, err
}

// usizeHash feeds the diffID hash and counts uncompressed bytes.
type usizeHash struct{ w *layerWriter }

func (u usizeHash) Write(p []byte) (int, error) {
	u.w.usize += int64(len(p))
	return u.w.diffHash.Write(p)
}
func (u usizeHash) Sum(b []byte) []byte { return u.w.diffHash.Sum(b) }
func (u usizeHash) Reset()              { u.w.diffHash.Reset() }
func (u usizeHash) Size() int           { return u.w.diffHash.Size() }
func (u usizeHash) BlockSize() int      { return u.w.diffHash.BlockSize() }

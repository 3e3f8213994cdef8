package imageio

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sync/errgroup"

	"github.com/lazybase/lazybase/internal/tmpsweep"
)

const ociLayoutFile = `{"imageLayoutVersion":"1.0.0"}`

// writeLayout writes a's blobs into the layout at ref.Path (created if
// needed) and then names it in index.json, replaced atomically.
//
// go-containerregistry's layout package writes blobs in place (a crash
// leaves a truncated blob under its final name, which later writes then
// trust) and rewrites index.json in place; this writer puts every file in
// place with a rename after verifying its digest.
func (c *Client) writeLayout(ctx context.Context, ref Ref, a Artifact, desc v1.Descriptor, wo writeOptions) error {
	dir := ref.Path
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(dir, "oci-layout")); errors.Is(err, os.ErrNotExist) {
		if err := writeFileAtomic(dir, "oci-layout", []byte(ociLayoutFile)); err != nil {
			return err
		}
	} else if err != nil {
		return err
	}
	sweepLayout(ctx, dir)
	lw := &layoutWriter{dir: dir, jobs: c.o.jobs, progress: wo.progress}
	switch t := a.(type) {
	case v1.Image:
		if err := lw.image(ctx, t); err != nil {
			return err
		}
	case v1.ImageIndex:
		if err := lw.index(ctx, t); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return updateIndexJSON(dir, ref.Tag, desc)
}

// sweepLayout removes the temporary files that killed writers left in the
// layout dir: blobs/*/.tmp-* and .NAME.tmp-*. A writer holds its temporary
// file locked while it writes it; a file is removed only when no process
// holds it locked and it was last modified at least tmpsweep.MinAge ago.
func sweepLayout(ctx context.Context, dir string) {
	algs, _ := filepath.Glob(filepath.Join(dir, "blobs", "*"))
	for _, a := range algs {
		_, _ = tmpsweep.Sweep(ctx, a, ".tmp-*", tmpsweep.MinAge)
	}
	_, _ = tmpsweep.Sweep(ctx, dir, ".*.tmp-*", tmpsweep.MinAge)
}

type layoutWriter struct {
	dir      string
	jobs     int
	progress func(complete, total int64)

	mu              sync.Mutex
	complete, total int64
}

// count reports progress: total grows when a blob is started, complete as
// its bytes are written (or at once when it already is there).
func (lw *layoutWriter) count(complete, total int64) {
	if lw.progress == nil {
		return
	}
	lw.mu.Lock()
	defer lw.mu.Unlock()
	lw.complete += complete
	lw.total += total
	lw.progress(lw.complete, lw.total)
}

type countWriter struct {
	lw *layoutWriter
}

func (w countWriter) Write(p []byte) (int, error) {
	w.lw.count(int64(len(p)), 0)
	return len(p), nil
}

func (lw *layoutWriter) image(ctx context.Context, img v1.Image) error {
	layers, err := img.Layers()
	if err != nil {
		return err
	}
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(max(lw.jobs, 1))
	for _, l := range layers {
		g.Go(func() error {
			d, err := l.Digest()
			if err != nil {
				return err
			}
			size, err := l.Size()
			if err != nil {
				return fmt.Errorf("layer %s: %w", d, err)
			}
			if err := lw.blob(gctx, d, size, l.Compressed); err != nil {
				return fmt.Errorf("layer %s: %w", d, err)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return err
	}
	cfgName, err := img.ConfigName()
	if err != nil {
		return err
	}
	cfg, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	if err := lw.bytes(ctx, cfgName, cfg); err != nil {
		return fmt.Errorf("config %s: %w", cfgName, err)
	}
	return lw.manifest(ctx, img)
}

func (lw *layoutWriter) index(ctx context.Context, idx v1.ImageIndex) error {
	im, err := idx.IndexManifest()
	if err != nil {
		return err
	}
	for _, d := range im.Manifests {
		switch {
		case d.MediaType.IsIndex():
			child, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return fmt.Errorf("index %s: %w", d.Digest, err)
			}
			if err := lw.index(ctx, child); err != nil {
				return fmt.Errorf("index %s: %w", d.Digest, err)
			}
		case d.MediaType.IsImage():
			child, err := idx.Image(d.Digest)
			if err != nil {
				return fmt.Errorf("image %s: %w", d.Digest, err)
			}
			if err := lw.image(ctx, child); err != nil {
				return fmt.Errorf("image %s: %w", d.Digest, err)
			}
		default:
			return fmt.Errorf("manifest %s: unsupported media type %q", d.Digest, d.MediaType)
		}
	}
	return lw.manifest(ctx, idx)
}

func (lw *layoutWriter) manifest(ctx context.Context, a Artifact) error {
	d, err := a.Digest()
	if err != nil {
		return err
	}
	raw, err := a.RawManifest()
	if err != nil {
		return fmt.Errorf("manifest %s: %w", d, err)
	}
	if err := lw.bytes(ctx, d, raw); err != nil {
		return fmt.Errorf("manifest %s: %w", d, err)
	}
	return nil
}

func (lw *layoutWriter) bytes(ctx context.Context, d v1.Hash, b []byte) error {
	return lw.blob(ctx, d, int64(len(b)), func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	})
}

// blob writes a blob to blobs/ALG/HEX through a temporary file, checking its
// digest and size before renaming it in place. A blob already present is
// kept only when its content has the right digest and size; otherwise it is
// replaced.
func (lw *layoutWriter) blob(ctx context.Context, d v1.Hash, size int64, open func() (io.ReadCloser, error)) error {
	if d.Algorithm != "sha256" {
		return fmt.Errorf("unsupported digest algorithm %q", d.Algorithm)
	}
	dir := filepath.Join(lw.dir, "blobs", d.Algorithm)
	final := filepath.Join(dir, d.Hex)
	lw.count(0, size)
	ok, err := existingBlobOK(ctx, final, d, size)
	if err != nil {
		return err
	}
	if ok {
		lw.count(size, 0)
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rc, err := open()
	if err != nil {
		return err
	}
	defer rc.Close()
	f, err := os.CreateTemp(dir, ".tmp-"+d.Hex[:12]+"-")
	if err != nil {
		return err
	}
	_ = tmpsweep.Lock(f) // see sweepLayout
	tmp := f.Name()
	defer os.Remove(tmp) // no-op once renamed
	h, err := v1.Hasher(d.Algorithm)
	if err != nil {
		f.Close()
		return err
	}
	n, err := io.Copy(io.MultiWriter(f, h, countWriter{lw}), ctxReader{ctx, rc})
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	got := v1.Hash{Algorithm: d.Algorithm, Hex: fmt.Sprintf("%x", h.Sum(nil))}
	if n != size || got != d {
		return fmt.Errorf("wrote %d bytes with digest %s, want %d bytes with digest %s", n, got, size, d)
	}
	if err := os.Chmod(tmp, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, final)
}

// existingBlobOK reports whether the layout already holds the blob d at
// path: a regular file of the right size whose content hashes to d. A file
// that is there but wrong (a crash, a disk error, a tampered layout) is
// logged and reported as absent, so the caller replaces it.
func existingBlobOK(ctx context.Context, path string, d v1.Hash, size int64) (bool, error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	why := ""
	switch {
	case !fi.Mode().IsRegular():
		why = "not a regular file"
	case fi.Size() != size:
		why = fmt.Sprintf("%d bytes, want %d", fi.Size(), size)
	default:
		f, err := os.Open(path)
		if err != nil {
			return false, err
		}
		h, err := v1.Hasher(d.Algorithm)
		if err != nil {
			f.Close()
			return false, err
		}
		_, err = io.Copy(h, ctxReader{ctx, f})
		f.Close()
		if err != nil {
			return false, fmt.Errorf("checking existing blob: %w", err)
		}
		got := v1.Hash{Algorithm: d.Algorithm, Hex: fmt.Sprintf("%x", h.Sum(nil))}
		if got == d {
			return true, nil
		}
		why = "content is " + got.String()
	}
	log.G(ctx).WithField("blob", d.String()).WithField("path", path).WithField("reason", why).Warn("replacing a wrong blob in the destination layout")
	return false, nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (r ctxReader) Read(p []byte) (int, error) {
	if err := r.ctx.Err(); err != nil {
		return 0, err
	}
	return r.r.Read(p)
}

// updateIndexJSON names desc in the layout's index.json: with a tag, it
// replaces the manifests carrying that tag; without one, it adds desc unless
// an untagged entry with the same digest is there. Unknown fields of
// index.json are kept. The file is replaced atomically.
func updateIndexJSON(dir, tag string, desc v1.Descriptor) error {
	top := map[string]json.RawMessage{}
	var manifests []v1.Descriptor
	b, err := os.ReadFile(filepath.Join(dir, "index.json"))
	switch {
	case err == nil:
		if err := json.Unmarshal(b, &top); err != nil {
			return fmt.Errorf("index.json: %w", err)
		}
		if raw, ok := top["manifests"]; ok {
			if err := json.Unmarshal(raw, &manifests); err != nil {
				return fmt.Errorf("index.json manifests: %w", err)
			}
		}
	case errors.Is(err, os.ErrNotExist):
		top["schemaVersion"] = json.RawMessage(`2`)
		mt, _ := json.Marshal(types.OCIImageIndex)
		top["mediaType"] = mt
	default:
		return err
	}
	if tag != "" {
		if desc.Annotations == nil {
			desc.Annotations = map[string]string{}
		} else {
			desc.Annotations = maps(desc.Annotations)
		}
		desc.Annotations[AnnotationRefName] = tag
	}
	manifests = slices.DeleteFunc(manifests, func(d v1.Descriptor) bool {
		if tag != "" {
			return d.Annotations[AnnotationRefName] == tag
		}
		return d.Digest == desc.Digest && d.Annotations[AnnotationRefName] == ""
	})
	manifests = append(manifests, desc)
	raw, err := json.Marshal(manifests)
	if err != nil {
		return err
	}
	top["manifests"] = raw
	out, err := json.MarshalIndent(top, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(dir, "index.json", append(out, '\n'))
}

func maps(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// writeFileAtomic replaces dir/name with data: a temporary file in dir,
// synced, renamed over the old one, and the directory synced.
func writeFileAtomic(dir, name string, data []byte) error {
	f, err := os.CreateTemp(dir, "."+name+".tmp-")
	if err != nil {
		return err
	}
	_ = tmpsweep.Lock(f) // see sweepLayout
	tmp := f.Name()
	defer os.Remove(tmp)
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp, 0o644)
	}
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	if err := os.Rename(tmp, filepath.Join(dir, name)); err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

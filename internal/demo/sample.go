package demo

import (
	"archive/tar"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"

	"github.com/lazybase/lazybase/internal/testimage"
)

// sampleImage builds the two-layer sample image, its second layer in dir
// unless the run is small.
func sampleImage(dir string, o options) (v1.Image, Sample, error) {
	var info Sample
	base, err := generatedLayer("", 1, 200, 16<<10, &info)
	if err != nil {
		return nil, info, fmt.Errorf("base layer: %w", err)
	}
	var top v1.Layer
	if o.small {
		top, err = generatedLayer("opt/app/", 2, 50, 64<<10, &info)
	} else {
		top, err = sourceLayer(dir, o, &info)
	}
	if err != nil {
		return nil, info, fmt.Errorf("second layer: %w", err)
	}
	info.Layers = 2
	img, err := testimage.Image(v1.Platform{OS: "linux", Architecture: runtime.GOARCH}, base, top)
	return img, info, err
}

// generatedLayer is a gzip layer of n generated files of up to size bytes
// (testimage.ManyFiles) under prefix, with files and a symlink under /etc
// when prefix is empty. It adds the layer to info.
func generatedLayer(prefix string, seed uint64, n, size int, info *Sample) (v1.Layer, error) {
	var es []testimage.Entry
	for _, d := range parents(prefix + "x") {
		es = append(es, testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: testimage.Epoch}})
	}
	if prefix == "" {
		es = append(es, testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755, ModTime: testimage.Epoch}})
		es = append(es, testimage.Files(
			"etc/os-release", "NAME=\"lazybase demo\"\nID=lazybase-demo\n",
			"etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
			"etc/group", "root:x:0:\nnogroup:x:65534:\n",
		)...)
		es = append(es, testimage.Entry{Header: &tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/mtab", Linkname: "../proc/self/mounts", Mode: 0o777, ModTime: testimage.Epoch}})
	}
	for _, e := range testimage.ManyFiles(seed, n, size) {
		e.Header.Name = prefix + e.Header.Name
		es = append(es, e)
	}
	tarball, err := testimage.Tar(es)
	if err != nil {
		return nil, err
	}
	l := testimage.GzipLayer(tarball)
	for _, e := range es {
		if e.Header.Typeflag == tar.TypeReg {
			info.Files++
		}
	}
	info.UncompressedSize += int64(len(tarball))
	info.CompressedSize += int64(len(l.Blob))
	return l, nil
}

// sourceLayer is a gzip layer, written to a file in dir, of the files
// under o.source (default: the Go toolchain's src directory) up to
// o.maxBytes. It adds the layer to info.
func sourceLayer(dir string, o options, info *Sample) (v1.Layer, error) {
	src := o.source
	if src == "" {
		var err error
		if src, err = goSourceDir(); err != nil {
			return nil, err
		}
	}
	info.SourceDir = src
	l, n, err := writeLayer(filepath.Join(dir, "top.tar.gz"), func(tw *tar.Writer) (int, error) {
		return dirFiles(tw, src, "usr/local/go/src", o.maxBytes)
	})
	if err != nil {
		return nil, err
	}
	info.Files += n
	info.UncompressedSize += l.uncompressedSize
	info.CompressedSize += l.size
	return l, nil
}

// goSourceDir finds the Go toolchain's src directory.
func goSourceDir() (string, error) {
	var roots []string
	if out, err := exec.Command("go", "env", "GOROOT").Output(); err == nil {
		roots = append(roots, strings.TrimSpace(string(out)))
	}
	if r := os.Getenv("GOROOT"); r != "" {
		roots = append(roots, r)
	}
	roots = append(roots, runtime.GOROOT()) //nolint:staticcheck // a fallback only
	for _, r := range roots {
		if r == "" {
			continue
		}
		src := filepath.Join(r, "src")
		if fi, err := os.Stat(src); err == nil && fi.IsDir() {
			return src, nil
		}
	}
	return "", errors.New("cannot find the Go toolchain's src directory; give one with --source DIR or use --small")
}

func parents(p string) []string {
	var out []string
	for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
		out = append([]string{d}, out...)
	}
	return out
}

// dirFiles writes the tree under root (directories, regular files, symlinks)
// as prefix/..., in lexical order, with fixed owners and times, until
// maxBytes of file content have been written.
func dirFiles(tw *tar.Writer, root, prefix string, maxBytes int64) (int, error) {
	var total int64
	files := 0
	for _, d := range parents(prefix + "/x") {
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: testimage.Epoch, Format: tar.FormatPAX}); err != nil {
			return 0, err
		}
	}
	errFull := errors.New("full")
	err := filepath.WalkDir(root, func(p string, de fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil || rel == "." {
			return err
		}
		name := prefix + "/" + filepath.ToSlash(rel)
		fi, err := de.Info()
		if err != nil {
			return err
		}
		hdr := &tar.Header{Name: name, Mode: int64(fi.Mode().Perm()), ModTime: testimage.Epoch, Format: tar.FormatPAX}
		switch {
		case fi.IsDir():
			hdr.Typeflag, hdr.Name = tar.TypeDir, name+"/"
			return tw.WriteHeader(hdr)
		case fi.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			hdr.Typeflag, hdr.Linkname = tar.TypeSymlink, target
			return tw.WriteHeader(hdr)
		case !fi.Mode().IsRegular():
			return nil
		}
		if total+fi.Size() > maxBytes {
			return errFull
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		hdr.Typeflag, hdr.Size = tar.TypeReg, fi.Size()
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if _, err := io.Copy(tw, f); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		total += fi.Size()
		files++
		return nil
	})
	if errors.Is(err, errFull) {
		err = nil
	}
	return files, err
}

// fileLayer is a gzip layer in a file, with digests computed as it was
// written.
type fileLayer struct {
	path             string
	digest, diffID   v1.Hash
	size             int64
	uncompressedSize int64
}

var _ v1.Layer = (*fileLayer)(nil)

func (l *fileLayer) Digest() (v1.Hash, error)             { return l.digest, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)             { return l.diffID, nil }
func (l *fileLayer) Size() (int64, error)                 { return l.size, nil }
func (l *fileLayer) MediaType() (types.MediaType, error)  { return types.OCILayer, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)   { return os.Open(l.path) }
func (l *fileLayer) Uncompressed() (io.ReadCloser, error) { return openGzipFile(l.path) }

func hashOf(h hash.Hash) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: hex.EncodeToString(h.Sum(nil))}
}

// counter counts the bytes written through it.
type counter struct {
	w io.Writer
	n *int64
}

type gzipFile struct {
	*gzip.Reader
	f *os.File
}

func (c *counter) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	*c.n += int64(k)
	return k, err
}

func (g gzipFile) Close() error {
	err := g.Reader.Close()
	if ferr := g.f.Close(); err == nil {
		err = ferr
	}
	return err
}

func openGzipFile(p string) (io.ReadCloser, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	zr, err := gzip.NewReader(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return gzipFile{zr, f}, nil
}

// writeLayer writes a gzip tar layer to p from fill, hashing the compressed
// and uncompressed streams on the way.
func writeLayer(p string, fill func(*tar.Writer) (int, error)) (*fileLayer, int, error) {
	f, err := os.Create(p)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	l := &fileLayer{path: p}
	ch, uh := sha256.New(), sha256.New()
	zw, err := gzip.NewWriterLevel(&counter{w: io.MultiWriter(f, ch), n: &l.size}, gzip.DefaultCompression)
	if err != nil {
		return nil, 0, err
	}
	tw := tar.NewWriter(&counter{w: io.MultiWriter(zw, uh), n: &l.uncompressedSize})
	n, err := fill(tw)
	if err != nil {
		return nil, 0, err
	}
	if err := tw.Close(); err != nil {
		return nil, 0, err
	}
	if err := zw.Close(); err != nil {
		return nil, 0, err
	}
	if err := f.Close(); err != nil {
		return nil, 0, err
	}
	l.digest, l.diffID = hashOf(ch), hashOf(uh)
	return l, n, nil
}

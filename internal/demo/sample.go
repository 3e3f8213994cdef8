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
	"math/rand/v2"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/klauspost/compress/gzip"
)

// sampleImage builds the two-layer sample image in dir.
func sampleImage(dir string, o options) (v1.Image, Sample, error) {
	var info Sample
	base, n, err := writeLayer(filepath.Join(dir, "base.tar.gz"), func(tw *tar.Writer) (int, error) {
		return generatedFiles(tw, "", 200, 16<<10)
	})
	if err != nil {
		return nil, info, fmt.Errorf("base layer: %w", err)
	}
	info.Files += n
	var top *fileLayer
	if o.small {
		top, n, err = writeLayer(filepath.Join(dir, "top.tar.gz"), func(tw *tar.Writer) (int, error) {
			return generatedFiles(tw, "opt/app/", 50, 64<<10)
		})
	} else {
		src := o.source
		if src == "" {
			if src, err = goSourceDir(); err != nil {
				return nil, info, err
			}
		}
		info.SourceDir = src
		top, n, err = writeLayer(filepath.Join(dir, "top.tar.gz"), func(tw *tar.Writer) (int, error) {
			return dirFiles(tw, src, "usr/local/go/src", o.maxBytes)
		})
	}
	if err != nil {
		return nil, info, fmt.Errorf("second layer: %w", err)
	}
	info.Files += n
	info.Layers = 2
	for _, l := range []*fileLayer{base, top} {
		info.UncompressedSize += l.uncompressedSize
		info.CompressedSize += l.size
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	created := v1.Time{Time: sampleTime}
	img, err = mutate.Append(img,
		mutate.Addendum{Layer: base, History: v1.History{Created: created, CreatedBy: "lazybase demo: generated base files"}},
		mutate.Addendum{Layer: top, History: v1.History{Created: created, CreatedBy: "lazybase demo: source tree"}},
	)
	if err != nil {
		return nil, info, err
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, info, err
	}
	cfg = cfg.DeepCopy()
	cfg.OS, cfg.Architecture = "linux", runtime.GOARCH
	cfg.Created = created
	cfg.Config.Env = []string{"PATH=/usr/local/go/bin:/usr/bin:/bin"}
	cfg.Config.Labels = map[string]string{"org.opencontainers.image.title": "lazybase demo sample"}
	img, err = mutate.ConfigFile(img, cfg)
	return img, info, err
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

// sampleTime is the time of every file and history entry of the sample
// image, which makes it reproducible.
var sampleTime = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

// generatedFiles writes n deterministic text files of up to size bytes
// under prefix, with /etc files when prefix is empty.
func generatedFiles(tw *tar.Writer, prefix string, n, size int) (int, error) {
	files := 0
	dirs := map[string]bool{}
	mkdir := func(p string) error {
		for _, d := range parents(p) {
			if dirs[d] {
				continue
			}
			dirs[d] = true
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: sampleTime, Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
		return nil
	}
	add := func(name string, body []byte, mode int64) error {
		if err := mkdir(name); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: sampleTime, Format: tar.FormatPAX}); err != nil {
			return err
		}
		_, err := tw.Write(body)
		files++
		return err
	}
	if prefix == "" {
		for _, f := range []struct{ name, body string }{
			{"etc/os-release", "NAME=\"lazybase demo\"\nID=lazybase-demo\n"},
			{"etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"},
			{"etc/group", "root:x:0:\nnogroup:x:65534:\n"},
		} {
			if err := add(f.name, []byte(f.body), 0o644); err != nil {
				return files, err
			}
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/mtab", Linkname: "../proc/self/mounts", Mode: 0o777, ModTime: sampleTime, Format: tar.FormatPAX}); err != nil {
			return files, err
		}
	}
	rng := rand.New(rand.NewPCG(1, 2))
	words := []string{"lazy", "base", "layer", "image", "stargz", "chunk", "prefetch", "registry", "build", "kit"}
	for i := 0; i < n; i++ {
		var b strings.Builder
		want := 256 + rng.IntN(size)
		for b.Len() < want {
			b.WriteString(words[rng.IntN(len(words))])
			if rng.IntN(12) == 0 {
				b.WriteByte('\n')
			} else {
				b.WriteByte(' ')
			}
		}
		name := fmt.Sprintf("%susr/share/demo/%02d/file-%04d.txt", prefix, i%16, i)
		if err := add(name, []byte(b.String()), 0o644); err != nil {
			return files, err
		}
	}
	return files, nil
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
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: sampleTime, Format: tar.FormatPAX}); err != nil {
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
		hdr := &tar.Header{Name: name, Mode: int64(fi.Mode().Perm()), ModTime: sampleTime, Format: tar.FormatPAX}
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

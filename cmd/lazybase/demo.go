package main

import (
	"archive/tar"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"io/fs"
	stdlog "log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/klauspost/compress/gzip"
	"github.com/opencontainers/go-digest"
	"github.com/spf13/cobra"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/internal/progress"
)

// demoOptions are the flags of the demo verb.
type demoOptions struct {
	source   string // directory for the second layer; "" means GOROOT/src
	maxBytes int64  // cap on the file bytes of the second layer
	small    bool   // generated files only, for a quick run
	format   string
	jobs     int
	terminal int // as convertOptions.terminal
}

func newDemoCmd() *cobra.Command {
	var o demoOptions
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Convert a sample image in an in-process registry and verify it",
		Long: `Start a registry on 127.0.0.1, publish a sample image built from local files
(a small generated base layer and a layer of the Go toolchain's source tree),
convert it to eStargz with the same code as 'lazybase convert', verify the
result, and print a before/after report. Needs no root and no network.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDemo(cmd.Context(), cmd.OutOrStdout(), cmd.ErrOrStderr(), o)
		},
	}
	f := cmd.Flags()
	f.StringVar(&o.source, "source", "", "directory whose files make the second layer (default: the Go toolchain's src tree)")
	f.Int64Var(&o.maxBytes, "max-bytes", 100_000_000, "stop adding files to the second layer after this many bytes")
	f.BoolVar(&o.small, "small", false, "use a few generated files instead of a directory (quick)")
	f.StringVar(&o.format, "format", string(convert.FormatEStargz), "output format: estargz or zstd-chunked")
	f.IntVar(&o.jobs, "jobs", 0, "layers converted and blobs transferred at the same time (default: number of CPUs)")
	return cmd
}

func runDemo(ctx context.Context, stdout, stderr io.Writer, o demoOptions) error {
	tmp, err := os.MkdirTemp("", "lazybase-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)

	// 1. A registry on loopback, blobs on disk.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("starting registry: %w", err)
	}
	blobs := filepath.Join(tmp, "registry")
	if err := os.MkdirAll(blobs, 0o755); err != nil {
		return err
	}
	srv := &http.Server{
		Handler: registry.New(
			registry.Logger(stdlog.New(io.Discard, "", 0)),
			registry.WithBlobHandler(registry.NewDiskBlobHandler(blobs)),
		),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	host := ln.Addr().String()
	fmt.Fprintf(stdout, "lazybase demo: registry at http://%s (in-process, loopback)\n", host)

	// 2. The sample image.
	t0 := time.Now()
	img, info, err := demoImage(tmp, o)
	if err != nil {
		return fmt.Errorf("building the sample image: %w", err)
	}
	client, err := imageio.New(imageio.WithUserAgent("lazybase/" + version))
	if err != nil {
		return err
	}
	srcName := host + "/demo/sample:gzip"
	dstName := host + "/demo/sample:" + strings.ReplaceAll(o.format, "-", "")
	srcRef, err := client.ParseRef(srcName)
	if err != nil {
		return err
	}
	if _, err := client.Write(ctx, srcRef, img, nil); err != nil {
		return fmt.Errorf("publishing the sample image: %w", err)
	}
	fmt.Fprintf(stdout, "published %s: %s, built and pushed in %.1fs\n", srcName, info, time.Since(t0).Seconds())

	// 3. Convert, with the convert verb's code.
	rep, err := runConvert(ctx, stderr, srcName, dstName, convertOptions{
		format:   o.format,
		jobs:     o.jobs,
		terminal: o.terminal,
	})
	if err != nil {
		return err
	}

	// 4. Verify what the registry holds.
	v, err := verifyDemo(ctx, client, host, dstName, rep)
	if err != nil {
		return fmt.Errorf("verifying %s: %w", dstName, err)
	}

	// 5. Report.
	printDemoReport(stdout, rep, v)
	return nil
}

type demoInfo struct {
	files        int
	uncompressed int64
	compressed   int64
	layers       int
	sourceDir    string
}

func (i demoInfo) String() string {
	s := fmt.Sprintf("%d layers, %d files, %s uncompressed, %s gzip", i.layers, i.files,
		progress.Bytes(i.uncompressed), progress.Bytes(i.compressed))
	if i.sourceDir != "" {
		s += " (second layer from " + i.sourceDir + ")"
	}
	return s
}

// demoImage builds the two-layer sample image in dir.
func demoImage(dir string, o demoOptions) (v1.Image, demoInfo, error) {
	var info demoInfo
	base, n, err := writeLayer(filepath.Join(dir, "base.tar.gz"), func(tw *tar.Writer) (int, error) {
		return generatedFiles(tw, "", 200, 16<<10)
	})
	if err != nil {
		return nil, info, fmt.Errorf("base layer: %w", err)
	}
	info.files += n
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
		info.sourceDir = src
		top, n, err = writeLayer(filepath.Join(dir, "top.tar.gz"), func(tw *tar.Writer) (int, error) {
			return dirFiles(tw, src, "usr/local/go/src", o.maxBytes)
		})
	}
	if err != nil {
		return nil, info, fmt.Errorf("second layer: %w", err)
	}
	info.files += n
	info.layers = 2
	for _, l := range []*fileLayer{base, top} {
		info.uncompressed += l.uncompressedSize
		info.compressed += l.size
	}

	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	created := v1.Time{Time: time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)}
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

var demoTime = time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)

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
			if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: demoTime, Format: tar.FormatPAX}); err != nil {
				return err
			}
		}
		return nil
	}
	add := func(name string, body []byte, mode int64) error {
		if err := mkdir(name); err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: demoTime, Format: tar.FormatPAX}); err != nil {
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
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeSymlink, Name: "etc/mtab", Linkname: "../proc/self/mounts", Mode: 0o777, ModTime: demoTime, Format: tar.FormatPAX}); err != nil {
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
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: d + "/", Mode: 0o755, ModTime: demoTime, Format: tar.FormatPAX}); err != nil {
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
		hdr := &tar.Header{Name: name, Mode: int64(fi.Mode().Perm()), ModTime: demoTime, Format: tar.FormatPAX}
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

// demoVerify is what the verification found, per output layer.
type demoVerify struct {
	layers []demoLayerCheck
}

type demoLayerCheck struct {
	digest       v1.Hash
	size         int64
	tocDigest    string
	entries      int
	landmark     string
	openBytes    int64 // bytes read to open the TOC lazily
	openRequests int
}

// verifyDemo checks the converted image as the registry holds it:
// validate.Image over the whole image, and for every layer estargz.Open over
// HTTP range requests (as a lazy puller does) and VerifyTOC against the
// layer's annotation.
func verifyDemo(ctx context.Context, client *imageio.Client, host, ref string, rep *convertReport) (*demoVerify, error) {
	r, err := client.ParseRef(ref)
	if err != nil {
		return nil, err
	}
	src, err := client.Open(ctx, r)
	if err != nil {
		return nil, err
	}
	if src.Image == nil {
		return nil, errors.New("not an image")
	}
	if src.Descriptor.Digest.String() != rep.Digest {
		return nil, fmt.Errorf("registry holds %s, conversion wrote %s", src.Descriptor.Digest, rep.Digest)
	}
	if err := validateImage(src.Image); err != nil {
		return nil, err
	}
	m, err := src.Image.Manifest()
	if err != nil {
		return nil, err
	}
	repo := strings.TrimPrefix(r.Registry.Context().RepositoryStr(), "/")
	v := &demoVerify{}
	for _, d := range m.Layers {
		toc := d.Annotations[convert.AnnotationTOCDigest]
		if toc == "" {
			return nil, fmt.Errorf("layer %s: no %s annotation", d.Digest, convert.AnnotationTOCDigest)
		}
		ra := &rangeReader{ctx: ctx, url: fmt.Sprintf("http://%s/v2/%s/blobs/%s", host, repo, d.Digest)}
		er, err := estargz.Open(io.NewSectionReader(ra, 0, d.Size), estargz.WithDecompressors(new(zstdchunked.Decompressor)))
		if err != nil {
			return nil, fmt.Errorf("layer %s: estargz.Open: %w", d.Digest, err)
		}
		want, err := digest.Parse(toc)
		if err != nil {
			return nil, fmt.Errorf("layer %s: TOC digest annotation: %w", d.Digest, err)
		}
		if _, err := er.VerifyTOC(want); err != nil {
			return nil, fmt.Errorf("layer %s: VerifyTOC: %w", d.Digest, err)
		}
		c := demoLayerCheck{digest: d.Digest, size: d.Size, tocDigest: toc, openBytes: ra.bytes, openRequests: ra.requests}
		root, ok := er.Lookup("")
		if ok {
			var walk func(e *estargz.TOCEntry)
			walk = func(e *estargz.TOCEntry) {
				e.ForeachChild(func(_ string, ch *estargz.TOCEntry) bool {
					c.entries++
					walk(ch)
					return true
				})
			}
			walk(root)
		}
		switch {
		case lookup(er, estargz.PrefetchLandmark):
			c.landmark = "prefetch landmark"
		case lookup(er, estargz.NoPrefetchLandmark):
			c.landmark = "no-prefetch landmark"
		default:
			return nil, fmt.Errorf("layer %s: no landmark file", d.Digest)
		}
		v.layers = append(v.layers, c)
	}
	return v, nil
}

// validateImage runs validate.Image. Its layer check assumes gzip, so for
// images with zstd layers it runs the fast checks and compares every layer's
// digest, size and diffID itself.
func validateImage(img v1.Image) error {
	m, err := img.Manifest()
	if err != nil {
		return err
	}
	zstd := false
	for _, l := range m.Layers {
		zstd = zstd || l.MediaType == types.OCILayerZStd
	}
	if !zstd {
		if err := validate.Image(img); err != nil {
			return fmt.Errorf("validate.Image: %w", err)
		}
		return nil
	}
	if err := validate.Image(img, validate.Fast); err != nil {
		return fmt.Errorf("validate.Image: %w", err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return err
	}
	if len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return fmt.Errorf("%d diff_ids for %d layers", len(cfg.RootFS.DiffIDs), len(m.Layers))
	}
	for i, d := range m.Layers {
		l, err := img.LayerByDigest(d.Digest)
		if err != nil {
			return err
		}
		if err := checkLayer(l, d, cfg.RootFS.DiffIDs[i]); err != nil {
			return fmt.Errorf("layer %s: %w", d.Digest, err)
		}
	}
	return nil
}

func checkLayer(l v1.Layer, d v1.Descriptor, diffID v1.Hash) error {
	rc, err := l.Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	h := sha256.New()
	n, err := io.Copy(h, rc)
	if err != nil {
		return err
	}
	if got := hashOf(h); got != d.Digest || n != d.Size {
		return fmt.Errorf("blob is %d bytes with digest %s, manifest says %d bytes, %s", n, got, d.Size, d.Digest)
	}
	urc, err := l.Uncompressed()
	if err != nil {
		return err
	}
	defer urc.Close()
	h = sha256.New()
	if _, err := io.Copy(h, urc); err != nil {
		return err
	}
	if got := hashOf(h); got != diffID {
		return fmt.Errorf("uncompressed digest %s, diff_id says %s", got, diffID)
	}
	return nil
}

func lookup(r *estargz.Reader, name string) bool {
	_, ok := r.Lookup(name)
	return ok
}

// rangeClient is rangeReader's client: every phase of a request is bounded
// by imageio's default timeouts, like every other registry request.
var rangeClient = &http.Client{Transport: imageio.NewTransport(false, imageio.Timeouts{})}

// rangeReader reads a blob from a registry with HTTP range requests.
type rangeReader struct {
	ctx      context.Context
	url      string
	bytes    int64
	requests int
}

func (r *rangeReader) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	req, err := http.NewRequestWithContext(r.ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1))
	resp, err := rangeClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusPartialContent {
		return 0, fmt.Errorf("range request: %s", resp.Status)
	}
	n, err := io.ReadFull(resp.Body, p)
	r.requests++
	r.bytes += int64(n)
	if errors.Is(err, io.ErrUnexpectedEOF) {
		err = io.EOF
	}
	return n, err
}

func printDemoReport(w io.Writer, rep *convertReport, v *demoVerify) {
	img := rep.Images[0]
	fmt.Fprintf(w, "\nconverted %s\n       -> %s@%s (%s)\n\n", rep.Source, rep.Destination, rep.Digest, rep.Format)
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "layer\tsource (gzip)\tsize\t->\toutput\tsize\tratio\tseconds\tMB/s\tTOC digest")
	for i, l := range img.Layers {
		ratio := float64(l.Size) / float64(max(l.SourceSize, 1)) * 100
		rate := 0.0
		if l.Seconds > 0 {
			rate = float64(l.SourceUncompressedSize) / 1e6 / l.Seconds
		}
		state := ""
		if l.Reused {
			state = " (reused)"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t->\t%s\t%s\t%.1f%%\t%.2f\t%.0f\t%s%s\n", i+1,
			shortDigest(l.SourceDigest), progress.Bytes(l.SourceSize), shortDigest(l.Digest), progress.Bytes(l.Size),
			ratio, l.Seconds, rate, l.TOCDigest, state)
	}
	t := rep.Totals
	fmt.Fprintf(tw, "total\t\t%s\t->\t\t%s\t%.1f%%\t%.2f\t%.0f\t\n", progress.Bytes(t.SourceBytes), progress.Bytes(t.OutputBytes),
		float64(t.OutputBytes)/float64(max(t.SourceBytes, 1))*100, t.ConvertSeconds, t.MBPerSecond)
	tw.Flush()
	fmt.Fprintf(w, "\n%s uncompressed converted in %.2fs (%.0f MB/s); pushed in %.2fs\n",
		progress.Bytes(t.SourceUncompressedSize), t.ConvertSeconds, t.MBPerSecond, t.WriteSeconds)
	fmt.Fprintln(w, "verified: validate.Image passes on the pushed image")
	for i, c := range v.layers {
		fmt.Fprintf(w, "verified: layer %d %s opens with estargz.Open over %d range request(s), %s of %s (%.2f%%), VerifyTOC ok, %d entries, %s\n",
			i+1, progress.Short(c.digest), c.openRequests, progress.Bytes(c.openBytes), progress.Bytes(c.size),
			float64(c.openBytes)/float64(max(c.size, 1))*100, c.entries, c.landmark)
	}
	fmt.Fprintf(w, "ready for lazy pull: %s@%s\n", rep.Destination, rep.Digest)
}

func shortDigest(s string) string {
	h, err := v1.NewHash(s)
	if err != nil {
		return s
	}
	return progress.Short(h)
}

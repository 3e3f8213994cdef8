package refimage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Kind names a reference image.
type Kind string

const (
	// Debian is a Debian bookworm minbase root filesystem in one layer.
	Debian Kind = "debian"
	// Golang is the Debian layer plus the local Go toolchain at /usr/local/go.
	Golang Kind = "golang"
)

// Image is a built reference image.
type Image struct {
	Kind Kind
	// Dir is an OCI image layout directory holding exactly this image (gzip
	// layers, OCI media types).
	Dir string
	// Digest is the manifest digest.
	Digest v1.Hash
	// Image is the image, opened from Dir.
	Image v1.Image
}

// formatVersion is part of every cache key: bump it whenever the builder's
// output changes for the same inputs.
const formatVersion = 2

// Suite and variant of the Debian root filesystem.
const (
	suite   = "bookworm"
	variant = "minbase"
)

// Minimum size of the golang-like image.
const (
	minGolangBytes = 350_000_000
	minGolangFiles = 15_000
)

// Manifest annotations written on reference images.
const (
	AnnotationKind             = "dev.lazybase.refimage.kind"
	AnnotationKey              = "dev.lazybase.refimage.key"
	AnnotationUncompressedSize = "dev.lazybase.refimage.uncompressed-size"
	AnnotationFiles            = "dev.lazybase.refimage.files"
)

type options struct {
	cacheDir string
	mirror   string
}

// Option configures Build.
type Option func(*options) error

// WithCacheDir sets the cache directory. The default is $LAZYBASE_CACHE/refimages
// when LAZYBASE_CACHE is set, else .cache/refimages in the root of the Go
// module holding the working directory, else lazybase/refimages in the user's
// cache directory.
func WithCacheDir(dir string) Option {
	return func(o *options) error {
		if dir == "" {
			return errors.New("cache directory must not be empty")
		}
		o.cacheDir = dir
		return nil
	}
}

// WithMirror sets the Debian mirror debootstrap downloads from. The default is
// the mirror of the machine's apt configuration for bookworm.
func WithMirror(url string) Option {
	return func(o *options) error {
		if !strings.HasPrefix(url, "http://") && !strings.HasPrefix(url, "https://") && !strings.HasPrefix(url, "file:") {
			return fmt.Errorf("mirror %q: want an http, https or file URL", url)
		}
		o.mirror = strings.TrimRight(url, "/")
		return nil
	}
}

func makeOptions(opts ...Option) (*options, error) {
	o := &options{}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(o); err != nil {
			return nil, err
		}
	}
	if o.cacheDir == "" {
		dir, err := defaultCacheDir()
		if err != nil {
			return nil, err
		}
		o.cacheDir = dir
	}
	abs, err := filepath.Abs(o.cacheDir)
	if err != nil {
		return nil, fmt.Errorf("cache directory %s: %w", o.cacheDir, err)
	}
	o.cacheDir = abs
	if o.mirror == "" {
		m, err := aptMirror("/etc/apt", suite)
		if err != nil {
			return nil, err
		}
		o.mirror = m
	}
	return o, nil
}

func defaultCacheDir() (string, error) {
	if c := os.Getenv("LAZYBASE_CACHE"); c != "" {
		return filepath.Join(c, "refimages"), nil
	}
	if wd, err := os.Getwd(); err == nil {
		for dir := wd; ; dir = filepath.Dir(dir) {
			if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
				return filepath.Join(dir, ".cache", "refimages"), nil
			}
			if filepath.Dir(dir) == dir {
				break
			}
		}
	}
	uc, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("finding a cache directory: %w", err)
	}
	return filepath.Join(uc, "lazybase", "refimages"), nil
}

// inputs is everything a reference image is made from; its hash is the cache
// key.
type inputs struct {
	Format      int    `json:"format"`
	Kind        Kind   `json:"kind"`
	Suite       string `json:"suite"`
	Variant     string `json:"variant"`
	Mirror      string `json:"mirror"`
	Arch        string `json:"arch"`
	Debootstrap string `json:"debootstrap"`
	GoRoot      string `json:"goroot,omitempty"`
	GoVersion   string `json:"goversion,omitempty"`
}

func (in *inputs) key() string {
	b, _ := json.Marshal(in)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

// Build returns the reference image of the given kind, from the cache when it
// holds one built from the same inputs, else built and cached.
func Build(ctx context.Context, kind Kind, opts ...Option) (*Image, error) {
	switch kind {
	case Debian, Golang:
	default:
		return nil, fmt.Errorf("unknown reference image kind %q (want %q or %q)", kind, Debian, Golang)
	}
	o, err := makeOptions(opts...)
	if err != nil {
		return nil, err
	}
	b := &builder{opts: o}
	return b.build(ctx, kind)
}

type builder struct {
	opts *options
}

func (b *builder) inputs(ctx context.Context, kind Kind) (*inputs, error) {
	in := &inputs{
		Format:      formatVersion,
		Kind:        kind,
		Suite:       suite,
		Variant:     variant,
		Mirror:      b.opts.mirror,
		Arch:        runtime.GOARCH,
		Debootstrap: debootstrapVersion(ctx),
	}
	if kind == Golang {
		root, version, err := goToolchain(ctx)
		if err != nil {
			return nil, err
		}
		in.GoRoot, in.GoVersion = root, version
	}
	return in, nil
}

func (b *builder) build(ctx context.Context, kind Kind) (*Image, error) {
	in, err := b.inputs(ctx, kind)
	if err != nil {
		return nil, err
	}
	key := in.key()
	name := string(kind) + "-" + key[:16]
	cache := b.opts.cacheDir
	final := filepath.Join(cache, name)
	img, err := openCached(final, kind)
	if err == nil {
		return img, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("dir", final).Warn("refimage: cached image is invalid, rebuilding")
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("cache directory %s: %w", cache, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(cache, name+".lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Another process may have built it while we waited for the lock.
	if img, err := openCached(final, kind); err == nil {
		return img, nil
	}
	if err := os.RemoveAll(final); err != nil {
		return nil, fmt.Errorf("removing invalid cache entry %s: %w", final, err)
	}
	// Holding the lock, no other build of this key runs: what is left of
	// earlier builds was left by killed ones.
	stale, _ := filepath.Glob(filepath.Join(cache, ".tmp-"+name+"-*"))
	for _, dir := range stale {
		if err := removeTree(dir); err != nil {
			return nil, fmt.Errorf("removing stale build %s: %w", dir, err)
		}
	}
	staging, err := os.MkdirTemp(cache, ".tmp-"+name+"-")
	if err != nil {
		return nil, err
	}
	defer func() {
		if staging != "" {
			if err := removeTree(staging); err != nil {
				log.G(ctx).WithError(err).WithField("dir", staging).Warn("refimage: removing build directory")
			}
		}
	}()
	layoutDir := filepath.Join(staging, "layout")
	log.G(ctx).WithField("kind", kind).WithField("key", key[:16]).Info("refimage: building")
	switch kind {
	case Debian:
		err = b.buildDebian(ctx, in, key, staging, layoutDir)
	case Golang:
		err = b.buildGolang(ctx, in, key, layoutDir)
	}
	if err != nil {
		return nil, fmt.Errorf("building %s reference image: %w", kind, err)
	}
	meta, err := json.MarshalIndent(in, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(staging, "inputs.json"), append(meta, '\n'), 0o644); err != nil {
		return nil, err
	}
	if err := syncTree(staging); err != nil {
		return nil, err
	}
	if err := os.Rename(staging, final); err != nil {
		return nil, fmt.Errorf("moving %s into the cache: %w", kind, err)
	}
	staging = ""
	return openCached(final, kind)
}

// assemble writes an image made of layers into a new OCI layout at dir. The
// layers' blobs must already be in dir's blobs directory.
func assemble(dir string, kind Kind, key string, cfg *v1.ConfigFile, adds []mutate.Addendum) (v1.Hash, error) {
	var total int64
	var files int
	for _, a := range adds {
		if l, ok := a.Layer.(*fileLayer); ok {
			total += l.stats.Bytes
			files += l.stats.Files
		}
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err := mutate.ConfigFile(img, cfg)
	if err != nil {
		return v1.Hash{}, err
	}
	img, err = mutate.Append(img, adds...)
	if err != nil {
		return v1.Hash{}, err
	}
	img = mutate.Annotations(img, map[string]string{
		AnnotationKind:             string(kind),
		AnnotationKey:              key,
		AnnotationUncompressedSize: strconv.FormatInt(total, 10),
		AnnotationFiles:            strconv.Itoa(files),
	}).(v1.Image)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return v1.Hash{}, err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": string(kind),
	})); err != nil {
		return v1.Hash{}, err
	}
	return img.Digest()
}

// openCached opens and checks the image cached in root.
func openCached(root string, kind Kind) (*Image, error) {
	dir := filepath.Join(root, "layout")
	raw, err := os.ReadFile(filepath.Join(dir, "index.json"))
	if err != nil {
		return nil, err
	}
	idx, err := v1.ParseIndexManifest(bytes.NewReader(raw))
	if err != nil {
		return nil, fmt.Errorf("%s: index.json: %w", dir, err)
	}
	if len(idx.Manifests) != 1 {
		return nil, fmt.Errorf("%s: index.json lists %d manifests, want 1", dir, len(idx.Manifests))
	}
	desc := idx.Manifests[0]
	mraw, err := readBlob(dir, desc)
	if err != nil {
		return nil, err
	}
	m, err := v1.ParseManifest(bytes.NewReader(mraw))
	if err != nil {
		return nil, fmt.Errorf("%s: manifest %s: %w", dir, desc.Digest, err)
	}
	if got := m.Annotations[AnnotationKind]; got != string(kind) {
		return nil, fmt.Errorf("%s: manifest %s is of kind %q, want %q", dir, desc.Digest, got, kind)
	}
	if _, err := readBlob(dir, m.Config); err != nil {
		return nil, err
	}
	for _, l := range m.Layers {
		fi, err := os.Stat(blobPath(dir, l.Digest))
		if err != nil {
			return nil, fmt.Errorf("%s: layer %s: %w", dir, l.Digest, err)
		}
		if fi.Size() != l.Size {
			return nil, fmt.Errorf("%s: layer %s: blob has %d bytes, manifest says %d", dir, l.Digest, fi.Size(), l.Size)
		}
	}
	img, err := layout.Path(dir).Image(desc.Digest)
	if err != nil {
		return nil, fmt.Errorf("%s: opening image %s: %w", dir, desc.Digest, err)
	}
	return &Image{Kind: kind, Dir: dir, Digest: desc.Digest, Image: img}, nil
}

func blobPath(dir string, h v1.Hash) string {
	return filepath.Join(dir, "blobs", h.Algorithm, h.Hex)
}

// readBlob reads a small blob and checks its size and digest.
func readBlob(dir string, desc v1.Descriptor) ([]byte, error) {
	b, err := os.ReadFile(blobPath(dir, desc.Digest))
	if err != nil {
		return nil, fmt.Errorf("%s: blob %s: %w", dir, desc.Digest, err)
	}
	if int64(len(b)) != desc.Size {
		return nil, fmt.Errorf("%s: blob %s has %d bytes, want %d", dir, desc.Digest, len(b), desc.Size)
	}
	if h, _, _ := v1.SHA256(bytes.NewReader(b)); h != desc.Digest {
		return nil, fmt.Errorf("%s: blob %s has digest %s", dir, desc.Digest, h)
	}
	return b, nil
}

// syncTree flushes every regular file under dir to disk, so that the rename
// that publishes dir never publishes files still in flight.
func syncTree(dir string) error {
	return filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil || !fi.Mode().IsRegular() {
			return err
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		return f.Sync()
	})
}

// goToolchain returns the GOROOT and version of the go command on PATH.
func goToolchain(ctx context.Context) (root, version string, err error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOROOT", "GOVERSION").Output()
	if err != nil {
		return "", "", fmt.Errorf("running go env: %w", err)
	}
	lines := strings.Fields(string(out))
	if len(lines) != 2 {
		return "", "", fmt.Errorf("go env GOROOT GOVERSION: unexpected output %q", out)
	}
	return lines[0], lines[1], nil
}

// linkOrCopy hard links src to dst, or copies it when they are on different
// file systems.
func linkOrCopy(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

package demo

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"

	"github.com/containerd/stargz-snapshotter/estargz"
	"github.com/containerd/stargz-snapshotter/estargz/zstdchunked"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

// verify checks the converted image as the registry holds it and fills in
// what it found per layer: validate.Image over the whole image, and for
// every layer estargz.Open over HTTP range requests (as a lazy puller does),
// VerifyTOC against the layer's annotation, a landmark, and
// convert.VerifyEStargz over gzip eStargz blobs.
func verify(ctx context.Context, client *imageio.Client, rep *Report) error {
	r, err := client.ParseRef(rep.Destination)
	if err != nil {
		return err
	}
	src, err := client.Open(ctx, r)
	if err != nil {
		return err
	}
	if src.Image == nil {
		return errors.New("not an image")
	}
	if src.Descriptor.Digest != rep.Digest {
		return fmt.Errorf("registry holds %s, conversion wrote %s", src.Descriptor.Digest, rep.Digest)
	}
	if err := ValidateImage(src.Image); err != nil {
		return err
	}
	m, err := src.Image.Manifest()
	if err != nil {
		return err
	}
	cfg, err := src.Image.ConfigFile()
	if err != nil {
		return err
	}
	if len(m.Layers) != len(rep.Layers) || len(cfg.RootFS.DiffIDs) != len(m.Layers) {
		return fmt.Errorf("%d layers and %d diff_ids in the registry, conversion reported %d layers", len(m.Layers), len(cfg.RootFS.DiffIDs), len(rep.Layers))
	}
	// Every phase of a range request is bounded by imageio's default
	// timeouts, like every other registry request.
	hc := &http.Client{Transport: imageio.NewTransport(false, imageio.Timeouts{})}
	repo := strings.TrimPrefix(r.Registry.Context().RepositoryStr(), "/")
	for i, d := range m.Layers {
		l := &rep.Layers[i]
		if d.Digest.String() != l.Digest {
			return fmt.Errorf("layer %d is %s in the registry, conversion reported %s", i+1, d.Digest, l.Digest)
		}
		ra := &rangeReader{ctx: ctx, client: hc, url: fmt.Sprintf("http://%s/v2/%s/blobs/%s", rep.Registry, repo, d.Digest)}
		if err := verifyLayer(src.Image, d, cfg.RootFS.DiffIDs[i], ra, l); err != nil {
			return fmt.Errorf("layer %s: %w", d.Digest, err)
		}
	}
	return nil
}

// verifyLayer checks one layer, described by d, that ra reads lazily.
func verifyLayer(img v1.Image, d v1.Descriptor, diffID v1.Hash, ra *rangeReader, l *Layer) error {
	want, err := digest.Parse(d.Annotations[convert.AnnotationTOCDigest])
	if err != nil {
		return fmt.Errorf("annotation %s: %w", convert.AnnotationTOCDigest, err)
	}
	if want.String() != l.TOCDigest {
		return fmt.Errorf("annotation %s says %s, conversion reported %s", convert.AnnotationTOCDigest, want, l.TOCDigest)
	}
	if err := openLazily(ra, d.Size, want, l); err != nil {
		return err
	}
	if d.MediaType != types.OCILayer && d.MediaType != types.DockerLayer {
		return nil // zstd:chunked: validateImage compared digest and diffID
	}
	v, err := verifyBlob(img, d, want)
	if err != nil {
		return err
	}
	if v.DiffID.String() != diffID.String() {
		return fmt.Errorf("uncompressed digest %s, diff_id says %s", v.DiffID, diffID)
	}
	l.EStargzVerified = true
	return nil
}

// openLazily opens the blob with estargz.Open over ra's range requests,
// counting them, verifies its TOC against want and records its entries and
// landmark in l.
func openLazily(ra *rangeReader, size int64, want digest.Digest, l *Layer) error {
	er, err := estargz.Open(io.NewSectionReader(ra, 0, size), estargz.WithDecompressors(new(zstdchunked.Decompressor)))
	if err != nil {
		return fmt.Errorf("estargz.Open: %w", err)
	}
	l.OpenRequests, l.OpenBytes = ra.requests, ra.bytes
	if _, err := er.VerifyTOC(want); err != nil {
		return fmt.Errorf("VerifyTOC: %w", err)
	}
	if root, ok := er.Lookup(""); ok {
		l.Entries = countEntries(root)
	}
	for _, name := range []string{estargz.PrefetchLandmark, estargz.NoPrefetchLandmark} {
		if _, ok := er.Lookup(name); ok {
			l.Landmark = name
			return nil
		}
	}
	return errors.New("no landmark file")
}

// countEntries counts the entries below e.
func countEntries(e *estargz.TOCEntry) int {
	n := 0
	e.ForeachChild(func(_ string, ch *estargz.TOCEntry) bool {
		n += 1 + countEntries(ch)
		return true
	})
	return n
}

// verifyBlob copies the layer's blob to a temporary file and runs
// convert.VerifyEStargz over it.
func verifyBlob(img v1.Image, d v1.Descriptor, toc digest.Digest) (*convert.Verified, error) {
	layer, err := img.LayerByDigest(d.Digest)
	if err != nil {
		return nil, err
	}
	rc, err := layer.Compressed()
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	f, err := os.CreateTemp("", "lazybase-demo-blob-")
	if err != nil {
		return nil, err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	n, err := io.Copy(f, rc)
	if err != nil {
		return nil, fmt.Errorf("reading blob: %w", err)
	}
	if n != d.Size {
		return nil, fmt.Errorf("blob is %d bytes, manifest says %d", n, d.Size)
	}
	v, err := convert.VerifyEStargz(f, n, toc)
	if err != nil {
		return nil, fmt.Errorf("VerifyEStargz: %w", err)
	}
	return v, nil
}

// ValidateImage runs validate.Image. Its layer check assumes gzip, so for
// images with zstd layers it runs the fast checks and compares every layer's
// digest, size and diffID itself.
func ValidateImage(img v1.Image) error {
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

// checkLayer compares a layer's blob with its digest and size and its
// uncompressed stream with diffID.
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

// rangeReader reads a blob from a registry with HTTP range requests,
// counting them and the bytes they return.
type rangeReader struct {
	ctx      context.Context
	client   *http.Client
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
	resp, err := r.client.Do(req)
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

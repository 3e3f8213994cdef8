package testimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/containerd/stargz-snapshotter/estargz"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/google/go-containerregistry/pkg/v1/validate"
	digest "github.com/opencontainers/go-digest"
)

func TestEntriesDeterministicAndComplete(t *testing.T) {
	a := MustTar(Entries(42))
	b := MustTar(Entries(42))
	if !bytes.Equal(a, b) {
		t.Fatal("same seed gave different tars")
	}
	if bytes.Equal(a, MustTar(Entries(43))) {
		t.Fatal("different seeds gave the same tar")
	}
	small := MustTar(Entries(42, WithoutLargeFiles()))
	if !bytes.Equal(Gzip(small), Gzip(small)) {
		t.Fatal("gzip is not deterministic")
	}
	kinds := map[byte]int{}
	var sawPAX, sawXattr, sawLong, sawNonASCII, sawDotSlash, sawWhiteout, sawOpaque, sawSetuid, sawSticky, sawLarge bool
	tr := tar.NewReader(bytes.NewReader(a))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		kinds[h.Typeflag]++
		sawPAX = sawPAX || h.Format == tar.FormatPAX
		sawLong = sawLong || len(h.Name) > 100
		sawDotSlash = sawDotSlash || strings.HasPrefix(h.Name, "./")
		sawWhiteout = sawWhiteout || strings.Contains(h.Name, "/.wh.foo")
		sawOpaque = sawOpaque || strings.HasSuffix(h.Name, "/.wh..wh..opq")
		sawSetuid = sawSetuid || h.Mode&0o4000 != 0
		sawSticky = sawSticky || h.Mode&0o1000 != 0
		sawLarge = sawLarge || h.Size > ChunkSize
		for k := range h.PAXRecords {
			sawXattr = sawXattr || strings.HasPrefix(k, "SCHILY.xattr.")
		}
		for _, r := range h.Name {
			sawNonASCII = sawNonASCII || r > 127
		}
	}
	for _, k := range []byte{tar.TypeDir, tar.TypeReg, tar.TypeSymlink, tar.TypeLink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo} {
		if kinds[k] == 0 {
			t.Errorf("no entry of type %q", k)
		}
	}
	for name, ok := range map[string]bool{"PAX": sawPAX, "xattr": sawXattr, "long name": sawLong, "non-ASCII": sawNonASCII,
		"./ prefix": sawDotSlash, "whiteout": sawWhiteout, "opaque": sawOpaque, "setuid": sawSetuid, "sticky": sawSticky, "large": sawLarge} {
		if !ok {
			t.Errorf("no %s entry", name)
		}
	}
}

func TestLayerLies(t *testing.T) {
	l := GzipLayer(MustTar(Files("a", "b")))
	d, _ := l.Digest()
	if d != SHA256(l.Blob) {
		t.Fatal("honest digest wrong")
	}
	other := SHA256([]byte("x"))
	l.Hash = &other
	if d, _ := l.Digest(); d != other {
		t.Fatal("digest override ignored")
	}
	bad := NewLayer(Truncate(Gzip(MustTar(Entries(1, WithoutLargeFiles()))), 100), "")
	if _, err := bad.DiffID(); err == nil {
		t.Fatal("diffID of a truncated gzip computed without error")
	}
}

func TestEStargzDamage(t *testing.T) {
	l, err := EStargz(MustTar(Entries(3, WithoutLargeFiles())))
	if err != nil {
		t.Fatal(err)
	}
	open := func(l *Layer) error {
		r, err := estargz.Open(io.NewSectionReader(bytes.NewReader(l.Blob), 0, int64(len(l.Blob))))
		if err != nil {
			return err
		}
		_, err = r.VerifyTOC(digest.Digest(l.Annotations[AnnotationTOCDigest]))
		return err
	}
	if err := open(l); err != nil {
		t.Fatalf("valid layer: %v", err)
	}
	if err := open(l.DamageFooter()); err == nil {
		t.Error("damaged footer opens")
	}
	if _, err := ReadAll(l.DamageFooter().Blob); err != nil {
		t.Errorf("damaged footer no longer gunzips: %v", err)
	}
	if err := open(l.WrongTOCDigest()); err == nil {
		t.Error("wrong TOC digest verifies")
	}
	f, err := l.FlipPayloadByte("data/medium.bin")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ReadAll(f.Blob); err == nil {
		t.Error("flipped payload byte decompresses cleanly")
	}
}

func TestRegistryFaults(t *testing.T) {
	reg := NewRegistry(t)
	idx, err := SeedIndex(1, WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Index(idx); err != nil {
		t.Fatalf("validate.Index: %v", err)
	}
	ref := reg.PushIndex(t, "test/index:v1", idx)
	if _, err := remote.Index(ref, NoRetry()...); err != nil {
		t.Fatal(err)
	}
	img, err := SeedImage(2, LinuxAMD64, WithoutLargeFiles())
	if err != nil {
		t.Fatal(err)
	}
	ref = reg.Push(t, "test/img:v1", img)
	layers, _ := img.Layers()
	dgst, _ := layers[0].Digest()
	for _, status := range []int{http.StatusUnauthorized, http.StatusNotFound, http.StatusBadGateway} {
		reg.Fail(dgst, status)
		l, err := reg.Image(t, ref).LayerByDigest(dgst)
		if err != nil {
			t.Fatal(err)
		}
		_, err = l.Compressed()
		var terr *transport.Error
		if !errors.As(err, &terr) || terr.StatusCode != status {
			t.Errorf("status %d: got %v", status, err)
		}
	}
	reg.Fail(dgst, 0)
	reg.Corrupt(dgst)
	if err := validate.Image(reg.Image(t, ref)); err == nil {
		t.Error("corrupted blob validates")
	}
	reg.Corrupt(v1.Hash{})
	if err := validate.Image(reg.Image(t, ref)); err != nil {
		t.Errorf("validate.Image: %v", err)
	}
	reg.DeleteBlob(t, "test/img", dgst)
	l, _ := reg.Image(t, ref).LayerByDigest(dgst)
	if _, err := l.Compressed(); err == nil {
		t.Error("deleted blob still readable")
	}
}

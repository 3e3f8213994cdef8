package mirror

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/internal/testimage"
)

// recordConfig mirrors src's lib/a:1.0 to DST/NS, with the records in
// DST/records whatever NS is.
func recordConfig(t *testing.T, src, dst *server, ns string) *Config {
	t.Helper()
	c, err := ParseConfig([]byte(fmt.Sprintf(`
destination = "%s/%s"
records_repository = "%s/records"
retry_initial = "5ms"
retry_max = "20ms"
[[source]]
repository = "%s/lib/a"
tags = ["1.0"]
`, dst.host, ns, dst.host, src.host)))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// sourceLayers returns the layer digests of src's lib/a:1.0.
func sourceLayers(t *testing.T, src *server) []v1.Hash {
	t.Helper()
	ref, _ := name.ParseReference(src.host + "/lib/a:1.0")
	img, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	ls, _ := img.Layers()
	var out []v1.Hash
	for _, l := range ls {
		d, _ := l.Digest()
		out = append(out, d)
	}
	return out
}

// outputLayers mirrors with m and returns the layer digests of the output.
func outputLayers(t *testing.T, m *Mirror, dest string) (*Report, map[v1.Hash]bool) {
	t.Helper()
	rep, err := m.Run(context.Background())
	if err != nil || !rep.OK() || rep.Converted != 1 {
		t.Fatalf("%v %+v", err, rep)
	}
	ref, _ := name.ParseReference(dest)
	img, err := remote.Image(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(img); err != nil {
		t.Fatal(err)
	}
	ls, _ := img.Layers()
	out := map[v1.Hash]bool{}
	for _, l := range ls {
		d, _ := l.Digest()
		out[d] = true
	}
	return rep, out
}

// TestRecordForgeryIsNotReused plants records in the records repository,
// as anyone who may push there could: a record for a real source layer
// whose blob is the attacker's, with no MAC, with a MAC made under another
// key, and with the genuine record's MAC copied onto it. None is reused:
// the layer is converted again, the output holds no planted blob, and the
// record is rewritten with a valid MAC.
func TestRecordForgeryIsNotReused(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	base := sourceLayers(t, src)[0]

	m0 := newMirror(t, recordConfig(t, src, dst, "m0"))
	_, genuine := outputLayers(t, m0, dst.host+"/m0/lib/a:1.0")
	key := RecordKey(base, m0.Format(), "none")
	recRef, _ := name.ParseReference(dst.host + "/records:" + key)
	rec, err := remote.Image(recRef)
	if err != nil {
		t.Fatalf("record of the base layer: %v", err)
	}
	man, _ := rec.Manifest()
	genuineDesc := man.Layers[0]
	genuineMAC := man.Annotations[AnnotationRecordMAC]
	if genuineMAC != RecordMAC(testRecordKey, base, m0.Format(), "none", mustHash(t, man.Annotations[AnnotationRecordDiffID]), genuineDesc) {
		t.Fatalf("the written record's MAC %q does not verify", genuineMAC)
	}

	// The attacker's blob, described with the genuine annotations.
	evil, err := testimage.EntriesLayer(testimage.Files("usr/lib/base.bin", "planted\n"))
	if err != nil {
		t.Fatal(err)
	}
	evilDigest, _ := evil.Digest()
	evilSize, _ := evil.Size()
	evilMT, _ := evil.MediaType()
	evilDiffID, _ := evil.DiffID()
	evilDesc := v1.Descriptor{MediaType: evilMT, Digest: evilDigest, Size: evilSize, Annotations: genuineDesc.Annotations}

	for i, tc := range []struct {
		name string
		mac  func() string // "" drops the annotation
	}{
		{"no MAC", func() string { return "" }},
		{"MAC under another key", func() string {
			return RecordMAC([]byte("attacker-key-0123456789abcdef"), base, m0.Format(), "none", evilDiffID, evilDesc)
		}},
		{"genuine MAC copied", func() string { return genuineMAC }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			plantRecord(t, recRef, evil, evilDesc, base, m0.Format(), evilDiffID, tc.mac())
			ns := fmt.Sprintf("m%d", i+1)
			m := newMirror(t, recordConfig(t, src, dst, ns))
			rep, out := outputLayers(t, m, dst.host+"/"+ns+"/lib/a:1.0")
			if out[evilDigest] {
				t.Fatal("the planted blob is in the output image")
			}
			for d := range genuine {
				if !out[d] {
					t.Errorf("output layer %s of the first run is missing (conversion is deterministic)", d)
				}
			}
			if rep.Layers.RecordsRejected != 1 {
				t.Errorf("records rejected %d, want 1: %+v", rep.Layers.RecordsRejected, rep.Layers)
			}
			if rep.Layers.FromRecords != 1 {
				t.Errorf("layers from records %d, want 1 (the unique layer's genuine record)", rep.Layers.FromRecords)
			}
			// The record was rewritten, valid again.
			rec, err := remote.Image(recRef)
			if err != nil {
				t.Fatal(err)
			}
			man, _ := rec.Manifest()
			if man.Layers[0].Digest != genuineDesc.Digest || man.Annotations[AnnotationRecordMAC] != genuineMAC {
				t.Errorf("record not rewritten: layer %s, MAC %q", man.Layers[0].Digest, man.Annotations[AnnotationRecordMAC])
			}
		})
	}

	// A mirror holding another key trusts none of these records.
	c := recordConfig(t, src, dst, "other")
	mo := newMirror(t, c, WithRecordKey([]byte("another-record-key-0123456789")))
	rep, _ := outputLayers(t, mo, dst.host+"/other/lib/a:1.0")
	if rep.Layers.FromRecords != 0 || rep.Layers.RecordsRejected != 2 {
		t.Errorf("mirror with another key: %+v, want 0 from records, 2 rejected", rep.Layers)
	}
}

// TestRecordsNeedAKey: without a record key no record is read or written.
func TestRecordsNeedAKey(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	m0 := newMirror(t, recordConfig(t, src, dst, "m0"))
	outputLayers(t, m0, dst.host+"/m0/lib/a:1.0")

	c := recordConfig(t, src, dst, "nokey")
	m, err := New(c, WithOperationBackoff(remote.Backoff{Duration: 1, Steps: 1}))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	rep, _ := outputLayers(t, m, dst.host+"/nokey/lib/a:1.0")
	if rep.Layers.FromRecords != 0 || rep.Layers.RecordsRejected != 0 || rep.Layers.Converted != 2 {
		t.Errorf("mirror without a key: %+v, want both layers converted, no record read", rep.Layers)
	}
}

func mustHash(t *testing.T, s string) v1.Hash {
	t.Helper()
	h, err := v1.NewHash(s)
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// plantRecord writes a record tag whose layer is l (described by desc),
// with the given MAC annotation ("" for none), as an attacker would.
func plantRecord(t *testing.T, ref name.Reference, l v1.Layer, desc v1.Descriptor, src v1.Hash, format string, diffID v1.Hash, mac string) {
	t.Helper()
	img, err := recordImage([]byte("unused-key-0123456789abcdef"), l, desc, src, format, "none", diffID)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := img.RawManifest()
	var man v1.Manifest
	if err := json.Unmarshal(raw, &man); err != nil {
		t.Fatal(err)
	}
	if mac == "" {
		delete(man.Annotations, AnnotationRecordMAC)
	} else {
		man.Annotations[AnnotationRecordMAC] = mac
	}
	raw, _ = json.Marshal(man)
	forged, err := partial.CompressedToImage(&rawImage{manifest: raw, config: []byte("{}"), layers: map[v1.Hash]partial.CompressedLayer{desc.Digest: l}})
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, forged); err != nil {
		t.Fatal(err)
	}
}

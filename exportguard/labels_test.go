package exportguard

import (
	"bytes"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestCommittedReadsCurrentAndLegacyLabels puts four blobs in containerd's
// metadata content store: one a Guard commits now, one as an earlier
// lazybase daemon left it (LabelRef plus lazybase.io/exportguard), one with
// the legacy label alone, and one a normal pull committed. Committed and a
// Walk with CommittedFilters both find the first three, not the fourth.
func TestCommittedReadsCurrentAndLegacyLabels(t *testing.T) {
	tr := newTestRegistry(t)
	_, guarded := tr.push(16 << 10)
	s := metadataStore(t)
	g := newGuard(t, s, WithGCRoot())
	if err := g.Ensure(s.ctx, tr.ref, guarded); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC().Format(time.RFC3339)
	oldDaemon := writeBlob(t, s, "old daemon", map[string]string{
		LabelRef: tr.ref, LabelVerified: now, labelGCRoot: now, "lazybase.io/exportguard": "true",
	})
	legacyOnly := writeBlob(t, s, "legacy label only", map[string]string{"lazybase.io/exportguard": "true", labelGCRoot: now})
	pulled := writeBlob(t, s, "pulled normally", map[string]string{labelGCRoot: now, "containerd.io/distribution.source.example": "x"})

	want := []digest.Digest{guarded.Digest, oldDaemon, legacyOnly}
	for _, d := range append(want, pulled) {
		info, err := s.store.Info(s.ctx, d)
		if err != nil {
			t.Fatal(err)
		}
		if got := Committed(info.Labels); got != (d != pulled) {
			t.Errorf("Committed(%v) = %v for blob %s", info.Labels, got, d)
		}
	}
	var walked []digest.Digest
	if err := s.store.Walk(s.ctx, func(info content.Info) error {
		walked = append(walked, info.Digest)
		return nil
	}, CommittedFilters()...); err != nil {
		t.Fatal(err)
	}
	slices.Sort(walked)
	slices.Sort(want)
	if !slices.Equal(walked, want) {
		t.Errorf("Walk with %q found %v, want %v", CommittedFilters(), walked, want)
	}
	// The Guard writes only dev.lazybase labels of its own.
	info, err := s.store.Info(s.ctx, guarded.Digest)
	if err != nil {
		t.Fatal(err)
	}
	for k := range maps.Keys(info.Labels) {
		if k == labelLegacy {
			t.Errorf("the Guard wrote the legacy label %s", k)
		}
	}
}

// writeBlob commits data to the store with labels and returns its digest.
func writeBlob(t *testing.T, s stores, data string, labels map[string]string) digest.Digest {
	t.Helper()
	d := digest.FromString(data)
	desc := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayerGzip, Digest: d, Size: int64(len(data))}
	if err := content.WriteBlob(s.ctx, s.store, "test-"+d.Encoded(), bytes.NewReader([]byte(data)), desc, content.WithLabels(labels)); err != nil {
		t.Fatalf("writing blob %q: %v", data, err)
	}
	return d
}

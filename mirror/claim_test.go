package mirror

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestShardsStartedTogetherConvertEachLayerOnce runs two mirror processes
// (two Mirrors, each with its own claim holder) over the same images at
// the same time: each unique source layer is read from the source once
// and converted once across both, the other process waiting on its claim
// and taking the layer from its record; both report every image done.
func TestShardsStartedTogetherConvertEachLayerOnce(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	layers := imageSet(t, src, 256<<10)
	src.reset()
	cfg := `claim_ttl = "10s"`
	ms := []*Mirror{newMirror(t, testConfig(t, src, dst, cfg)), newMirror(t, testConfig(t, src, dst, cfg))}
	reps := make([]*Report, len(ms))
	var wg sync.WaitGroup
	start := time.Now()
	for i, m := range ms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep, err := m.Run(context.Background())
			if err != nil {
				t.Error(err)
			}
			reps[i] = rep
		}()
	}
	wg.Wait()
	var converted, waits int64
	for i, rep := range reps {
		if rep == nil {
			t.FailNow()
		}
		if !rep.OK() || rep.Converted+rep.Skipped != 10 {
			t.Errorf("mirror %d: %s", i, rep.Summary())
		}
		t.Logf("mirror %d: %s; layers %+v", i, rep.Summary(), rep.Layers)
		converted += rep.Layers.Converted
		waits += rep.Layers.ClaimWaits
	}
	t.Logf("two mirrors over 10 images in %v", time.Since(start))
	if converted != int64(len(layers)) {
		t.Errorf("%d layers converted by the two mirrors, want %d (each unique layer once)", converted, len(layers))
	}
	if waits == 0 {
		t.Error("no mirror waited on the other's claim")
	}
	_, _, gets := src.counts()
	for l := range layers {
		if n := gets[l.String()]; n != 1 {
			t.Errorf("source layer %s read %d times, want 1", l, n)
		}
	}
}

// TestExpiredClaimIsTakenOver plants a claim of a process that died (never
// renewed, expiring soon) on every layer: the mirror waits at most until
// it expires, takes the layers over, converts them and reports the
// takeovers.
func TestExpiredClaimIsTakenOver(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	layers := imageSet(t, src, 16<<10)
	const ttl = 2 * time.Second
	c := testConfig(t, src, dst, fmt.Sprintf("claim_ttl = %q", ttl))
	dead := newMirror(t, c)
	m := newMirror(t, c)
	f := m.Format()
	for l := range layers {
		if err := dead.writeClaim(context.Background(), RecordKey(l, f, "none"), l, time.Now().Add(ttl), false); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	rep, err := m.Run(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if !rep.OK() || rep.Converted != 10 {
		t.Fatalf("%s", rep.Summary())
	}
	if rep.Layers.Converted != int64(len(layers)) || rep.Layers.ClaimTakeovers != int64(len(layers)) {
		t.Errorf("layers %+v, want %d converted after taking over %d expired claims", rep.Layers, len(layers), len(layers))
	}
	if took < ttl/2 || took > ttl+10*time.Second {
		t.Errorf("run took %v with claims expiring after %v", took, ttl)
	}
	// The claims are released: another process finds them expired.
	for l := range layers {
		cl, err := m.readClaim(context.Background(), RecordKey(l, f, "none"))
		if err != nil || cl == nil || cl.fresh(time.Now()) || !cl.released || cl.holder != m.holder {
			t.Errorf("claim of %s after the run: %+v, %v; want released", l, cl, err)
		}
	}
}

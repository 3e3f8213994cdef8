package mirror

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containerd/log"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/partial"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

// Conversion claims (see the package documentation).
const (
	// ClaimArtifactType is the artifactType of a claim manifest.
	ClaimArtifactType = "application/vnd.lazybase.conversion-claim.v1"
	// ClaimTagPrefix starts every claim tag.
	ClaimTagPrefix = "claim-"
	// AnnotationClaimHolder names the process holding a claim.
	AnnotationClaimHolder = "dev.lazybase.claim.holder"
	// AnnotationClaimExpires is when a claim expires (RFC 3339, UTC).
	AnnotationClaimExpires = "dev.lazybase.claim.expires"
	// AnnotationClaimReleased is "true" on a claim its holder gave up
	// (its conversion ended).
	AnnotationClaimReleased = "dev.lazybase.claim.released"
	// DefaultClaimTTL is the default claim_ttl.
	DefaultClaimTTL = 2 * time.Minute
)

// ClaimTag returns the tag of the claim on the conversion whose record tag
// is recordTag: "claim-" and the record tag's hex.
func ClaimTag(recordTag string) string {
	return ClaimTagPrefix + strings.TrimPrefix(recordTag, RecordTagPrefix)
}

// claim is a claim read from the registry.
type claim struct {
	holder   string
	expires  time.Time
	released bool
}

func (c *claim) fresh(now time.Time) bool { return c != nil && !c.released && now.Before(c.expires) }

// newHolder names this process in its claims: host, process id and a
// random suffix, so two processes never take each other's claims for
// their own.
func newHolder(shard Shard) string {
	host, _ := os.Hostname()
	var b [6]byte
	_, _ = rand.Read(b[:])
	h := fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b[:]))
	if shard.Count > 1 {
		h += "/shard-" + shard.String()
	}
	return h
}

// claimsEnabled reports whether layers are claimed before they are
// converted: with records (a waiter takes the layer from the record) and
// a positive claim_ttl, unless forced.
func (m *Mirror) claimsEnabled() bool {
	return m.recordsEnabled() && m.cfg.claimTTL() > 0 && !m.o.force
}

// claimTimes returns the claim expiry, the wait between two polls of a
// waiter and the settle time a writer waits before reading its claim back.
func (m *Mirror) claimTimes() (ttl, poll, settle time.Duration) {
	ttl = m.cfg.claimTTL()
	poll = min(max(ttl/30, 50*time.Millisecond), 2*time.Second)
	settle = min(max(ttl/200, 250*time.Millisecond), time.Second)
	return ttl, poll, settle
}

// claimLayer makes sure this process may convert the layer of record tag
// key, as the only one in the fleet: it returns the layer when another
// process's conversion record turned up meanwhile, else a release
// function to call once the layer is converted and recorded (or failed).
// Claims are an economy, never a condition of correctness (conversion is
// deterministic and records are idempotent): a claim that cannot be read
// or written is logged and the layer converted.
func (m *Mirror) claimLayer(ctx context.Context, key string, src v1.Hash, fp string) (convert.ConvertedLayer, func(), error) {
	ttl, poll, settle := m.claimTimes()
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("layer", src))
	noop := func() {}
	waited, takeover, sawClaim := false, false, false
	for {
		c, err := m.readClaim(ctx, key)
		if err != nil {
			log.G(ctx).WithError(err).Warn("reading the conversion claim failed; converting without one")
			return nil, noop, nil
		}
		sawClaim = sawClaim || c != nil
		now := time.Now()
		if c != nil && c.holder != m.holder && c.fresh(now) {
			if !waited {
				waited = true
				m.claimWaits.Add(1)
				log.G(ctx).WithField("holder", c.holder).WithField("expires", c.expires.Format(time.RFC3339)).Info("another mirror is converting this layer; waiting for its record")
			}
			if l, err := m.waitClaim(ctx, key, src, fp, poll); l != nil || err != nil {
				return l, nil, err
			}
			continue
		}
		if c != nil && c.holder != m.holder && !c.released {
			takeover = true // expired without being released
		}
		if err := m.writeClaim(ctx, key, src, now.Add(ttl), false); err != nil {
			log.G(ctx).WithError(err).Warn("writing the conversion claim failed; converting without one")
			return nil, noop, nil
		}
		// The registry has no conditional tag write: two writers that both
		// found the claim free both write it, and the last one wins. Each
		// reads it back after a settle time longer than the spread of
		// their writes; the loser sees the winner's claim and waits.
		select {
		case <-ctx.Done():
			return nil, nil, context.Cause(ctx)
		case <-time.After(settle):
		}
		c, err = m.readClaim(ctx, key)
		if err != nil {
			log.G(ctx).WithError(err).Warn("reading the conversion claim back failed; converting without one")
			return nil, noop, nil
		}
		if c != nil && c.holder != m.holder && c.fresh(time.Now()) {
			continue // lost the race: wait for the winner
		}
		if takeover {
			m.claimTakeovers.Add(1)
			log.G(ctx).Warn("took over an expired conversion claim (its holder stopped or is late)")
		}
		// Another holder may have finished between our record lookup and
		// our claim (it left its claim behind, released or expired).
		if !sawClaim {
			return nil, m.renewClaim(ctx, key, src, ttl), nil
		}
		if l, err := m.lookupRecordCounting(ctx, key, src, fp, false); err == nil && l != nil {
			m.releaseClaim(ctx, key, src)
			return l, nil, nil
		}
		return nil, m.renewClaim(ctx, key, src, ttl), nil
	}
}

// waitClaim polls the record until it appears (the layer), the claim is
// no longer another's fresh one (nil, nil: claim again) or ctx ends.
func (m *Mirror) waitClaim(ctx context.Context, key string, src v1.Hash, fp string, poll time.Duration) (convert.ConvertedLayer, error) {
	for {
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-time.After(poll):
		}
		if l, err := m.lookupRecordCounting(ctx, key, src, fp, false); err == nil && l != nil {
			m.claimRecords.Add(1)
			return l, nil
		}
		c, err := m.readClaim(ctx, key)
		if err != nil || c == nil || c.holder == m.holder || !c.fresh(time.Now()) {
			return nil, nil
		}
	}
}

// renewClaim keeps this process's claim fresh, rewriting it every third
// of its expiry, until the returned function is called; that function
// then releases the claim.
func (m *Mirror) renewClaim(ctx context.Context, key string, src v1.Hash, ttl time.Duration) func() {
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		t := time.NewTicker(ttl / 3)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				if err := m.writeClaim(ctx, key, src, time.Now().Add(ttl), false); err != nil {
					log.G(ctx).WithError(err).Warn("renewing the conversion claim failed")
				}
			}
		}
	}()
	return func() {
		close(stop)
		<-done
		m.releaseClaim(ctx, key, src)
	}
}

// releaseClaim marks the claim released, so a process waiting for a record
// that never comes (a failed conversion) takes over at its next poll.
func (m *Mirror) releaseClaim(ctx context.Context, key string, src v1.Hash) {
	ctx = context.WithoutCancel(ctx)
	if err := m.writeClaim(ctx, key, src, time.Now(), true); err != nil {
		log.G(ctx).WithError(err).Debug("releasing the conversion claim failed; it expires by itself")
	}
}

func (m *Mirror) claimRef(key string) (imageio.Ref, error) {
	return m.client.ParseRef(m.cfg.RecordsRepository + ":" + ClaimTag(key))
}

// readClaim returns the claim of key, nil when there is none (or it is not
// a claim).
func (m *Mirror) readClaim(ctx context.Context, key string) (*claim, error) {
	ref, err := m.claimRef(key)
	if err != nil {
		return nil, err
	}
	a, err := m.readArtifact(ctx, ref, ClaimArtifactType)
	if err != nil || a == nil {
		return nil, err
	}
	exp, err := time.Parse(time.RFC3339Nano, a[AnnotationClaimExpires])
	if err != nil {
		return nil, nil // unreadable: as good as expired
	}
	return &claim{holder: a[AnnotationClaimHolder], expires: exp, released: a[AnnotationClaimReleased] == "true"}, nil
}

// writeClaim tags this process's claim on key, expiring at exp; released
// marks a claim given up. It is one manifest PUT (the empty blob is
// uploaded once per process), so that the time between reading a claim
// free and writing one stays well below the settle time.
func (m *Mirror) writeClaim(ctx context.Context, key string, src v1.Hash, exp time.Time, released bool) error {
	ref, err := m.claimRef(key)
	if err != nil {
		return err
	}
	ann := map[string]string{
		AnnotationClaimHolder:         m.holder,
		AnnotationClaimExpires:        exp.UTC().Format(time.RFC3339Nano),
		convert.AnnotationSourceLayer: src.String(),
	}
	if released {
		ann[AnnotationClaimReleased] = "true"
	}
	if err := m.putArtifact(ctx, ref, ClaimArtifactType, ann); err != nil {
		return fmt.Errorf("claim %s: %w", ClaimTag(key), err)
	}
	return nil
}

// putArtifact is writeArtifact in one manifest PUT: the empty blob is
// uploaded to the records repository once per process.
func (m *Mirror) putArtifact(ctx context.Context, ref imageio.Ref, artifactType string, ann map[string]string) error {
	opts := m.remoteOptions(ctx)
	m.emptyMu.Lock()
	if !m.emptyUp {
		if err := remote.WriteLayer(m.records, static.NewLayer([]byte("{}"), types.OCIEmptyJSON), opts...); err != nil {
			m.emptyMu.Unlock()
			return err
		}
		m.emptyUp = true
	}
	m.emptyMu.Unlock()
	img, err := artifact(artifactType, ann)
	if err != nil {
		return err
	}
	return remote.Put(ref.Registry, img.(*rawImage), opts...)
}

// writeArtifact tags at ref an OCI manifest of the given artifactType and
// annotations, with the empty config as its config and only layer.
func (m *Mirror) writeArtifact(ctx context.Context, ref imageio.Ref, artifactType string, ann map[string]string) error {
	core, err := artifact(artifactType, ann)
	if err != nil {
		return err
	}
	img, err := partial.CompressedToImage(core)
	if err != nil {
		return err
	}
	_, err = m.client.Write(ctx, ref, img, nil)
	return err
}

// artifact returns the image core of an artifact manifest: the empty
// config as its config and only layer, the given artifactType and
// annotations.
func artifact(artifactType string, ann map[string]string) (partial.CompressedImageCore, error) {
	empty := v1.Descriptor{MediaType: types.OCIEmptyJSON, Size: 2, Digest: sha256Of([]byte("{}"))}
	man := v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		ArtifactType:  artifactType,
		Config:        empty,
		Layers:        []v1.Descriptor{empty},
		Annotations:   ann,
	}
	raw, err := json.Marshal(man)
	if err != nil {
		return nil, err
	}
	return &rawImage{manifest: raw, config: []byte("{}"), layers: map[v1.Hash]partial.CompressedLayer{empty.Digest: static.NewLayer([]byte("{}"), types.OCIEmptyJSON)}}, nil
}

// readArtifact returns the annotations of the manifest tagged at ref when
// it has the given artifactType, nil when there is none.
func (m *Mirror) readArtifact(ctx context.Context, ref imageio.Ref, artifactType string) (map[string]string, error) {
	src, err := m.client.Open(ctx, ref)
	if err != nil {
		if errors.Is(err, imageio.ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	if src.Image == nil {
		return nil, nil
	}
	man, err := src.Image.Manifest()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	if man.ArtifactType != artifactType || man.Annotations == nil {
		return nil, nil
	}
	return man.Annotations, nil
}

package mirror

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/containerd/log"

	"github.com/lazybase/lazybase/internal/imageio"
)

// Failure records (see the package documentation).
const (
	// FailureArtifactType is the artifactType of a failure record.
	FailureArtifactType = "application/vnd.lazybase.failure-record.v1"
	// FailureTagPrefix starts every failure record tag.
	FailureTagPrefix = "fail-"
	// AnnotationFailureSource is the source reference that failed.
	AnnotationFailureSource = "dev.lazybase.failure.source"
	// AnnotationFailureDigest is the digest of the source manifest that
	// failed.
	AnnotationFailureDigest = "dev.lazybase.failure.digest"
	// AnnotationFailureReason is the failure, as reported.
	AnnotationFailureReason = "dev.lazybase.failure.reason"
	// AnnotationFailureRuns counts the consecutive runs that failed this
	// way ("0": the image converted since).
	AnnotationFailureRuns = "dev.lazybase.failure.runs"
	// AnnotationFailureSince is when the first of those runs failed
	// (RFC 3339).
	AnnotationFailureSince = "dev.lazybase.failure.since"
	// AnnotationFailureMAC is the record's MAC under the record key.
	AnnotationFailureMAC = "dev.lazybase.failure.mac"
	// DefaultQuarantineAfter is the default quarantine_after.
	DefaultQuarantineAfter = 2
)

// FailureTag returns the tag of the failure record of a source reference:
// "fail-" and the hex sha256 of "lazybase-failure/v1\n" + source + "\n".
func FailureTag(source string) string {
	h := sha256.Sum256([]byte("lazybase-failure/v1\n" + source + "\n"))
	return FailureTagPrefix + hex.EncodeToString(h[:])
}

// failure is a failure record.
type failure struct {
	digest, reason string
	runs           int
	since          time.Time
}

// sameAs reports whether a failure of digest with reason is the one this
// record holds.
func (f *failure) sameAs(digest, reason string) bool {
	return f != nil && f.runs > 0 && f.digest == digest && f.reason == reason
}

// quarantineEnabled reports whether failure records are kept: with a
// record key (they are authenticated like conversion records) and a
// positive quarantine_after, unless forced.
func (m *Mirror) quarantineEnabled() bool {
	return m.recordsEnabled() && *m.cfg.QuarantineAfter > 0 && !m.o.force
}

func failureMAC(key []byte, source string, f failure) string {
	h := hmac.New(sha256.New, key)
	fmt.Fprintf(h, "lazybase-failure-mac/v1\nsource %q\ndigest %q\nreason %q\nruns %d\nsince %q\n",
		source, f.digest, f.reason, f.runs, f.since.UTC().Format(time.RFC3339Nano))
	return "hmac-sha256:" + hex.EncodeToString(h.Sum(nil))
}

// readFailure returns the failure record of source, nil when there is none
// or it has no valid MAC.
func (m *Mirror) readFailure(ctx context.Context, source string) (*failure, error) {
	ref, err := m.client.ParseRef(m.cfg.RecordsRepository + ":" + FailureTag(source))
	if err != nil {
		return nil, err
	}
	a, err := m.readArtifact(ctx, ref, FailureArtifactType)
	if err != nil || a == nil {
		return nil, err
	}
	runs, _ := strconv.Atoi(a[AnnotationFailureRuns])
	since, _ := time.Parse(time.RFC3339Nano, a[AnnotationFailureSince])
	f := failure{digest: a[AnnotationFailureDigest], reason: a[AnnotationFailureReason], runs: runs, since: since}
	if a[AnnotationFailureSource] != source || !hmac.Equal([]byte(a[AnnotationFailureMAC]), []byte(failureMAC(m.o.recordKey, source, f))) {
		log.G(ctx).WithField("record", FailureTag(source)).Warn("failure record does not match its image or has no valid MAC; ignoring it")
		return nil, nil
	}
	return &f, nil
}

func (m *Mirror) writeFailure(ctx context.Context, source string, f failure) error {
	ref, err := m.client.ParseRef(m.cfg.RecordsRepository + ":" + FailureTag(source))
	if err != nil {
		return err
	}
	err = m.writeArtifact(ctx, ref, FailureArtifactType, map[string]string{
		AnnotationFailureSource: source,
		AnnotationFailureDigest: f.digest,
		AnnotationFailureReason: f.reason,
		AnnotationFailureRuns:   strconv.Itoa(f.runs),
		AnnotationFailureSince:  f.since.UTC().Format(time.RFC3339Nano),
		AnnotationFailureMAC:    failureMAC(m.o.recordKey, source, f),
	})
	if err != nil {
		return fmt.Errorf("failure record of %s: %w", source, err)
	}
	return nil
}

// imageFailures holds an image's failure record, read at most once per
// image and run.
type imageFailures struct {
	mu   sync.Mutex
	read bool
	f    *failure
}

func (q *imageFailures) get(ctx context.Context, m *Mirror, source string) *failure {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.read {
		f, err := m.readFailure(ctx, source)
		if err != nil {
			log.G(ctx).WithError(err).Warn("reading the failure record failed")
			return nil // read again later
		}
		q.read, q.f = true, f
	}
	return q.f
}

// quarantinedError stops the job of a quarantined image before any layer
// is read.
type quarantinedError struct{ f *failure }

func (e *quarantinedError) Error() string { return e.f.describe() }

// upToDateOrQuarantined is upToDate, then, for an image whose destination
// is not up to date, the quarantine check: when its failure record says it
// failed quarantine_after runs in a row at the source digest it has now,
// the job stops with a quarantinedError before reading any blob. An up to
// date image costs no failure record request.
func (m *Mirror) upToDateOrQuarantined(j Job, q *imageFailures) func(context.Context, imageio.Ref, *imageio.Source) (string, bool, error) {
	return func(ctx context.Context, dest imageio.Ref, src *imageio.Source) (string, bool, error) {
		dgst, ok, err := m.upToDate(ctx, dest, src)
		if err != nil || ok {
			return dgst, ok, err
		}
		if f := q.get(ctx, m, j.Source); f != nil && f.runs >= *m.cfg.QuarantineAfter && f.digest == src.Descriptor.Digest.String() {
			return "", false, &quarantinedError{f: f}
		}
		return dgst, false, nil
	}
}

func (f *failure) describe() string {
	return fmt.Sprintf("known bad: failed the same way on %d consecutive run(s) since %s (not tried again until its source digest changes): %s",
		f.runs, f.since.UTC().Format(time.RFC3339), f.reason)
}

// noteOutcome updates the failure record of an image after its attempts:
// a failure with a known source digest counts one more consecutive run
// when it repeats the recorded one (and quarantines the image once
// quarantine_after runs failed alike), else starts the count; a success
// clears a record (read only for images that failed or converted: an up
// to date image costs no failure record request). It returns the report, its status changed to
// quarantined when this run made the image known bad.
func (m *Mirror) noteOutcome(ctx context.Context, prev *failure, r ImageReport) ImageReport {
	switch {
	case r.Status != StatusFailed:
		if prev != nil && prev.runs > 0 {
			if err := m.writeFailure(ctx, r.Source, failure{since: time.Now()}); err != nil {
				log.G(ctx).WithError(err).Warn("clearing the failure record failed")
			}
		}
		return r
	case r.SourceDigest == "" || ctx.Err() != nil:
		// Not even the manifest was read, or the run was stopped: a
		// transient failure, not a verdict on the image.
		return r
	}
	f := failure{digest: r.SourceDigest, reason: r.Reason, runs: 1, since: time.Now()}
	if prev.sameAs(r.SourceDigest, r.Reason) {
		f.runs, f.since = prev.runs+1, prev.since
	}
	if err := m.writeFailure(ctx, r.Source, f); err != nil {
		log.G(ctx).WithError(err).Warn("writing the failure record failed")
	}
	if f.runs >= *m.cfg.QuarantineAfter {
		r.Status, r.Reason = StatusQuarantined, f.describe()
	}
	return r
}

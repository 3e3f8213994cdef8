package mirror

import (
	"fmt"
	"time"

	"github.com/lazybase/lazybase/internal/progress"
)

// Image statuses in a report.
const (
	StatusConverted = "converted"
	StatusSkipped   = "skipped"
	StatusFailed    = "failed"
	// StatusQuarantined is a known-bad image: it failed the same way
	// (same source digest, same reason) on quarantine_after consecutive
	// runs; it is not tried again until its source digest changes.
	StatusQuarantined = "quarantined"
)

// ImageReport is what happened to one image.
type ImageReport struct {
	// Source is the source reference (repository:tag).
	Source string `json:"source"`
	// SourceDigest is the digest of the source manifest, when it was read.
	SourceDigest string `json:"sourceDigest,omitempty"`
	// Destination is the destination reference.
	Destination string `json:"destination"`
	// Digest is the digest the destination tag points to.
	Digest string `json:"digest,omitempty"`
	// Status is "converted", "skipped", "failed" (a new failure) or
	// "quarantined" (known bad, see StatusQuarantined; Attempts is 0 when
	// it was not tried).
	Status string `json:"status"`
	// Reason says why an image was skipped or failed.
	Reason string `json:"reason,omitempty"`
	// Attempts is how many times the image was tried.
	Attempts int `json:"attempts"`
	// Seconds is the wall time spent on the image.
	Seconds float64 `json:"seconds"`
	// LayersConverted, LayersFromRecords and LayersShared count the layers
	// this image converted itself, took from conversion records in the
	// registry, and shared with another image of the same run.
	LayersConverted   int `json:"layersConverted"`
	LayersFromRecords int `json:"layersFromRecords"`
	LayersShared      int `json:"layersShared"`
	// Bytes is the size of the converted layers the image refers to.
	Bytes int64 `json:"bytes"`
	// Profiles is what the closed prefetch loop did: published profiles
	// found and used, re-converted or not and why (nil when [profiles]
	// from_registry is off or the image was not read).
	Profiles *ProfileReport `json:"profiles,omitempty"`
}

// Report is the outcome of a run.
type Report struct {
	Started   time.Time `json:"started"`
	Seconds   float64   `json:"seconds"`
	Shard     string    `json:"shard,omitempty"`
	Converted int       `json:"converted"`
	Skipped   int       `json:"skipped"`
	Failed    int       `json:"failed"`
	// Quarantined counts known-bad images (StatusQuarantined): they do
	// not make the run fail.
	Quarantined int           `json:"quarantined"`
	Images      []ImageReport `json:"images"`
	// Errors lists failures that are not about one image (a repository
	// whose tags could not be listed).
	Errors []string `json:"errors,omitempty"`
	// Layers counts layer work over the whole run.
	Layers LayerCounts `json:"layers"`
	// Retries is how many HTTP requests were retried.
	Retries int64 `json:"retries"`
	// Swept is how many temporary directories of killed runs were removed
	// from temp_dir at start.
	Swept int64 `json:"swept"`
}

// LayerCounts counts layer work.
type LayerCounts struct {
	// Converted is how many layers were converted in this process.
	Converted int64 `json:"converted"`
	// FromRecords is how many layers came from conversion records.
	FromRecords int64 `json:"fromRecords"`
	// RecordWriteFailures is how many records could not be written (the
	// images were still written; later runs convert those layers again).
	RecordWriteFailures int64 `json:"recordWriteFailures"`
	// RecordsRejected is how many records were found without a valid MAC
	// (their layers were converted again and the records rewritten).
	RecordsRejected int64 `json:"recordsRejected"`
	// ClaimWaits is how many layers were found claimed by another mirror
	// process (see claim_ttl); ClaimRecords how many of them were then
	// taken from the record that process wrote, and ClaimTakeovers how
	// many expired claims this process took over.
	ClaimWaits     int64 `json:"claimWaits"`
	ClaimRecords   int64 `json:"claimRecords"`
	ClaimTakeovers int64 `json:"claimTakeovers"`
}

// OK reports whether nothing failed anew: quarantined (known-bad) images
// do not count.
func (r *Report) OK() bool { return r.Failed == 0 && len(r.Errors) == 0 }

// Err returns nil when the run went OK, else an error counting the failed
// images and the other errors.
func (r *Report) Err() error {
	if r.OK() {
		return nil
	}
	return fmt.Errorf("%d image(s) failed, %d other error(s) (%d known bad, quarantined)", r.Failed, len(r.Errors), r.Quarantined)
}

// Summary is the one-line account of a run: images by status, time,
// layer work and HTTP retries.
func (r *Report) Summary() string {
	return fmt.Sprintf("%d converted, %d skipped, %d failed, %d quarantined in %.1fs (%d layers converted, %d from records, %d HTTP retries)",
		r.Converted, r.Skipped, r.Failed, r.Quarantined, r.Seconds, r.Layers.Converted, r.Layers.FromRecords, r.Retries)
}

// Summary is the one-line account of an image, starting with its status.
func (r ImageReport) Summary() string {
	switch r.Status {
	case StatusFailed:
		return fmt.Sprintf("failed    %s -> %s after %d attempt(s) in %.1fs: %s", r.Source, r.Destination, r.Attempts, r.Seconds, r.Reason)
	case StatusQuarantined:
		return fmt.Sprintf("quarantined %s -> %s after %d attempt(s) in %.1fs: %s", r.Source, r.Destination, r.Attempts, r.Seconds, r.Reason)
	case StatusSkipped:
		if r.Digest == "" {
			return fmt.Sprintf("skipped   %s -> %s: %s", r.Source, r.Destination, r.Reason)
		}
		return fmt.Sprintf("skipped   %s -> %s (up to date, %s) in %.2fs", r.Source, r.Destination, r.Digest, r.Seconds) + r.Profiles.summary()
	}
	return fmt.Sprintf("converted %s -> %s %s in %.1fs: layers %d converted, %d from records, %d shared; %s",
		r.Source, r.Destination, r.Digest, r.Seconds, r.LayersConverted, r.LayersFromRecords, r.LayersShared, progress.Bytes(r.Bytes)) + r.Profiles.summary()
}

// summary is the profile part of an image's summary line, "" without
// published profiles.
func (p *ProfileReport) summary() string {
	if p == nil || p.Found+p.Skipped == 0 {
		return ""
	}
	return fmt.Sprintf("; prefetch profiles: %d found, %d used, %d skipped, %d files (%s): %s",
		p.Found, p.Used, p.Skipped, p.Files, progress.Bytes(p.Bytes), p.Reason)
}

func (r *Report) add(ir ImageReport) {
	switch ir.Status {
	case StatusConverted:
		r.Converted++
	case StatusSkipped:
		r.Skipped++
	case StatusFailed:
		r.Failed++
	case StatusQuarantined:
		r.Quarantined++
	}
	r.Images = append(r.Images, ir)
}

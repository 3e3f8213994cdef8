package exportguard

import (
	"time"

	"github.com/opencontainers/go-digest"
)

// State is where a lazily mounted layer stands with a Trigger. Its text
// form is what the status API and the barrier stream show.
type State string

// States of a layer.
const (
	StateScheduled     State = "scheduled"     // waiting for its delay (WhenDelayed)
	StateMaterializing State = "materializing" // transfer under way
	StateMaterialized  State = "materialized"  // blob verified in the content store
	StateSkipped       State = "skipped"       // WhenNever: never materialized
	StateFailed        State = "failed"        // given up on; LayerStatus.Error says why
)

// Terminal reports whether a layer in state s stays there until something
// asks for it again (a barrier, a new mount): materialized, failed or
// skipped.
func (s State) Terminal() bool {
	switch s {
	case StateMaterialized, StateFailed, StateSkipped:
		return true
	}
	return false
}

// When says when a Trigger materializes the blob of a layer it is told
// about.
type When int

// When a layer's blob is materialized.
const (
	// WhenNow materializes the blob at once (the policy's export-base).
	WhenNow When = iota
	// WhenDelayed materializes it after the Trigger's delay (WithDelay),
	// or earlier when a barrier asks for it or the lazy filesystem starts
	// fetching it in earnest (Promote).
	WhenDelayed
	// WhenNever never materializes it: the layer is only recorded as
	// skipped, and a barrier on it fails.
	WhenNever
)

// action is the label of the triggers metric for w.
func (w When) action() string {
	switch w {
	case WhenNow:
		return "now"
	case WhenDelayed:
		return "delayed"
	}
	return "skipped"
}

// Status lists the layers a Trigger has been told about. It is the JSON
// document the status route serves.
type Status struct {
	Layers []LayerStatus `json:"layers"`
}

// LayerStatus is one lazily mounted layer as a Trigger sees it: a copy,
// taken under the Trigger's lock, of its internal state.
type LayerStatus struct {
	Namespace string `json:"namespace"`
	Image     string `json:"image"`
	Layer     string `json:"layer"`
	// Mode is the policy mode the layer was mounted with, as the caller
	// named it in MountEvent.
	Mode    string    `json:"mode"`
	State   State     `json:"state"`
	Size    int64     `json:"size"`
	Error   string    `json:"error,omitempty"`
	Updated time.Time `json:"updated"`
	// Materialized is true when the layer's blob is in the content store.
	Materialized bool `json:"materialized"`
	// TransferStarted is when the guard began to put the blob into the
	// content store (after its size was known), TransferFinished when
	// that ended, materialized or failed; zero (omitted) until then.
	TransferStarted  time.Time `json:"transfer_started,omitzero"`
	TransferFinished time.Time `json:"transfer_finished,omitzero"`
}

// layer is a Trigger's internal state of one lazily mounted layer in one
// namespace. Its fields are guarded by the Trigger's lock.
type layer struct {
	ns      string
	image   string
	digest  digest.Digest
	mode    string
	when    When
	state   State
	size    int64
	err     string
	updated time.Time
	present bool // the blob is in the content store
	// transferStarted and transferFinished bound the last transfer
	// (LayerStatus.TransferStarted, TransferFinished).
	transferStarted, transferFinished time.Time
	// checked is set once the content store was asked whether it holds
	// the blob already; until then LocalBlob asks it. inStore records
	// that it did: LocalBlob reads it before Ensure holds it.
	checked bool
	inStore bool
	// wake, while the layer waits for its delay, is closed to end the wait
	// early; nil otherwise.
	wake chan struct{}
}

func (l *layer) status() LayerStatus {
	return LayerStatus{
		Namespace: l.ns, Image: l.image, Layer: l.digest.String(), Mode: l.mode,
		State: l.state, Size: l.size, Error: l.err, Updated: l.updated, Materialized: l.present,
		TransferStarted: l.transferStarted, TransferFinished: l.transferFinished,
	}
}

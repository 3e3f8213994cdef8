package exportguard

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/lazybase/lazybase/internal/eventually"
)

// TestTriggerTransferTimes: a layer's status tells when the guard's
// transfer of its blob started (after the delay) and when it finished;
// neither before, and nothing for a skipped layer.
func TestTriggerTransferTimes(t *testing.T) {
	e := newTriggerEnv(t)
	const delay = 300 * time.Millisecond
	g := e.trigger(t, delay)
	hold := make(chan struct{})
	e.hold.Store(hold)
	mounted := time.Now()
	layer, skipped := e.layers[0], e.layers[1]
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: layer, Mode: "lazy", When: WhenDelayed})
	g.Mounted(context.Background(), MountEvent{Namespace: "default", Ref: e.ref, Layer: skipped, Mode: "lazy-only", When: WhenNever})
	if st, _ := layerStatus(g, "default", layer); !st.TransferStarted.IsZero() || !st.TransferFinished.IsZero() {
		t.Fatalf("scheduled layer has transfer times %+v", st)
	}
	// In flight: started, not finished.
	var inFlight LayerStatus
	eventually.Require(t, 20*time.Second, "the transfer starting", func() error {
		inFlight, _ = layerStatus(g, "default", layer)
		if inFlight.TransferStarted.IsZero() {
			return fmt.Errorf("state %s, no transfer start", inFlight.State)
		}
		return nil
	})
	if !inFlight.TransferFinished.IsZero() {
		t.Errorf("held transfer already finished: %+v", inFlight)
	}
	if d := inFlight.TransferStarted.Sub(mounted); d < delay {
		t.Errorf("transfer started %s after the mount, before the delay %s", d, delay)
	}
	close(hold)
	st := waitState(t, g, "default", layer, StateMaterialized)
	if !st.TransferStarted.Equal(inFlight.TransferStarted) {
		t.Errorf("transfer start moved from %s to %s", inFlight.TransferStarted, st.TransferStarted)
	}
	if st.TransferFinished.Before(st.TransferStarted) || st.TransferFinished.After(time.Now()) {
		t.Errorf("transfer %s – %s: finish out of order", st.TransferStarted, st.TransferFinished)
	}

	b, err := json.Marshal(g.Status())
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Layers []map[string]any `json:"layers"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	for _, l := range doc.Layers {
		_, hasStart := l["transfer_started"]
		_, hasEnd := l["transfer_finished"]
		want := l["layer"] == layer.String()
		if hasStart != want || hasEnd != want {
			t.Errorf("layer %v: transfer_started %v, transfer_finished %v in JSON, want %v", l["layer"], hasStart, hasEnd, want)
		}
		if !strings.Contains(string(b), `"state"`) {
			t.Errorf("existing fields missing from %s", b)
		}
	}
}

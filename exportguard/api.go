package exportguard

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"
)

// Routes of a Trigger's HTTP API, which the lazybase daemon serves on its
// status unix socket.
const (
	// StatusPath serves GET: the Status as JSON.
	StatusPath = "/guard"
	// BarrierPath serves POST of a BarrierRequest: a stream of
	// BarrierEvents as JSON lines while the barrier waits.
	BarrierPath = "/guard/barrier"
)

// BarrierRequest asks a Trigger to wait until every layer of Images that
// was mounted lazily in Namespace is materialized and verified in that
// namespace's content store.
type BarrierRequest struct {
	Namespace string
	Images    []string
	// Timeout bounds the wait; zero waits until the client hangs up.
	Timeout time.Duration
}

// barrierRequestJSON is BarrierRequest on the wire: the timeout as a Go
// duration string ("30s").
type barrierRequestJSON struct {
	Namespace string   `json:"namespace"`
	Images    []string `json:"images"`
	Timeout   string   `json:"timeout,omitempty"`
}

// MarshalJSON writes the timeout as a Go duration string, left out when
// zero.
func (r BarrierRequest) MarshalJSON() ([]byte, error) {
	w := barrierRequestJSON{Namespace: r.Namespace, Images: r.Images}
	if r.Timeout != 0 {
		w.Timeout = r.Timeout.String()
	}
	return json.Marshal(w)
}

// UnmarshalJSON reads what MarshalJSON writes.
func (r *BarrierRequest) UnmarshalJSON(b []byte) error {
	var w barrierRequestJSON
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	*r = BarrierRequest{Namespace: w.Namespace, Images: w.Images}
	if w.Timeout != "" {
		d, err := time.ParseDuration(w.Timeout)
		if err != nil {
			return fmt.Errorf("timeout %q is not a duration like \"30s\"", w.Timeout)
		}
		r.Timeout = d
	}
	return nil
}

// BarrierEvent is one line of the barrier's response, a stream of JSON
// lines: progress lines carry Layer, the last line has Done set, and Error
// unless every layer is in the content store.
type BarrierEvent struct {
	Layer  *LayerStatus  `json:"layer,omitempty"`
	Done   bool          `json:"done,omitempty"`
	Error  string        `json:"error,omitempty"`
	Layers []LayerStatus `json:"layers,omitempty"`
}

// StatusHandler serves the Trigger's Status as JSON (StatusPath).
func (t *Trigger) StatusHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(t.Status())
	})
}

// BarrierHandler serves BarrierPath: it decodes a BarrierRequest and
// streams BarrierEvents as JSON lines while Barrier waits.
func (t *Trigger) BarrierHandler() http.Handler {
	return http.HandlerFunc(t.serveBarrier)
}

func (t *Trigger) serveBarrier(w http.ResponseWriter, r *http.Request) {
	var req BarrierRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		http.Error(w, "decoding barrier request: "+err.Error(), http.StatusBadRequest)
		return
	}
	if req.Namespace == "" || len(req.Images) == 0 {
		http.Error(w, "barrier request needs a namespace and at least one image", http.StatusBadRequest)
		return
	}
	ctx := r.Context()
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, req.Timeout)
		defer cancel()
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	enc := json.NewEncoder(w)
	flusher, _ := w.(http.Flusher)
	send := func(ev BarrierEvent) {
		_ = enc.Encode(ev)
		if flusher != nil {
			flusher.Flush()
		}
	}
	layers, err := t.Barrier(ctx, req.Namespace, req.Images, func(l LayerStatus) {
		send(BarrierEvent{Layer: &l})
	})
	end := BarrierEvent{Done: true, Layers: layers}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && req.Timeout > 0 {
			err = fmt.Errorf("timed out after %s: %w", req.Timeout, err)
		}
		end.Error = err.Error()
	}
	send(end)
}

// unixClient is an HTTP client whose every connection goes to the unix
// socket at path.
func unixClient(path string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
}

// RequestBarrier asks the daemon listening on the unix socket at path (the
// lazybase daemon's status socket) to wait until req's images are
// materialized, calling progress, when not nil, for each layer state it
// reports. It returns the final state of every layer waited for, and an
// error naming each image and layer at fault.
func RequestBarrier(ctx context.Context, path string, req BarrierRequest, progress func(LayerStatus)) ([]LayerStatus, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	client := unixClient(path)
	defer client.CloseIdleConnections()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://lazybase"+BarrierPath, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(hreq)
	if err != nil {
		return nil, fmt.Errorf("status socket %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("status socket %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 16<<20)
	for sc.Scan() {
		var ev BarrierEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			return nil, fmt.Errorf("status socket %s: decoding barrier event: %w", path, err)
		}
		if ev.Layer != nil && progress != nil {
			progress(*ev.Layer)
		}
		if ev.Done {
			if ev.Error != "" {
				return ev.Layers, errors.New(ev.Error)
			}
			return ev.Layers, nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("status socket %s: %w", path, err)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return nil, fmt.Errorf("status socket %s: barrier ended without a result", path)
}

// FetchStatus asks the daemon listening on the unix socket at path for
// its Trigger's Status (StatusPath).
func FetchStatus(ctx context.Context, path string) (*Status, error) {
	client := unixClient(path)
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lazybase"+StatusPath, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("status socket %s: %w", path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return nil, fmt.Errorf("status socket %s: %s: %s", path, resp.Status, strings.TrimSpace(string(b)))
	}
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("status socket %s: decoding guard status: %w", path, err)
	}
	return &st, nil
}

package lazypull

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/opencontainers/go-digest"

	"github.com/lazybase/lazybase/internal/imageio"
)

// BarrierPath is the status API's route of the export guard's barrier.
const BarrierPath = "/guard/barrier"

// BarrierRequest asks the daemon to wait until every layer of Images that it
// mounted lazily in Namespace is materialized and verified in that
// namespace's content store.
type BarrierRequest struct {
	Namespace string   `json:"namespace"`
	Images    []string `json:"images"`
	// Timeout bounds the wait; zero waits until the client hangs up.
	Timeout Duration `json:"timeout,omitempty"`
}

// BarrierEvent is one line of the barrier's response, a stream of JSON
// lines: progress lines carry Layer, the last line has Done set, and Error
// unless every layer is in the content store.
type BarrierEvent struct {
	Layer  *GuardLayerStatus  `json:"layer,omitempty"`
	Done   bool               `json:"done,omitempty"`
	Error  string             `json:"error,omitempty"`
	Layers []GuardLayerStatus `json:"layers,omitempty"`
}

// imageLayers lists the layer digests of an image reference.
type imageLayers func(ctx context.Context, ref string) ([]digest.Digest, error)

// remoteImageLayers reads ref's manifest (for the running platform when ref
// names an index) with credentials from keychain, plain HTTP for loopback
// registries only, and each phase of a request bounded by timeouts.
func remoteImageLayers(keychain authn.Keychain, timeouts imageio.Timeouts) imageLayers {
	rt := imageio.PolicyTransport(imageio.NewTransport(false, timeouts), false)
	return func(ctx context.Context, ref string) ([]digest.Digest, error) {
		r, err := name.ParseReference(ref)
		if err != nil {
			return nil, fmt.Errorf("parsing reference %q: %w", ref, err)
		}
		img, err := remote.Image(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(keychain), remote.WithTransport(rt))
		if err != nil {
			return nil, fmt.Errorf("reading manifest: %w", err)
		}
		m, err := img.Manifest()
		if err != nil {
			return nil, fmt.Errorf("reading manifest: %w", err)
		}
		out := make([]digest.Digest, 0, len(m.Layers))
		for _, l := range m.Layers {
			out = append(out, digest.Digest(l.Digest.String()))
		}
		return out, nil
	}
}

// barrierLayer is one layer a barrier waits for.
type barrierLayer struct {
	image string // as the barrier was asked for it
	key   string // of guardTrigger.layers
}

// barrier waits until every lazily mounted layer of images is materialized
// in namespace ns, triggering at once those still waiting for their delay
// and trying again those that failed or whose blob left the content store.
// It fails at once for an image none of whose layers this daemon mounted
// lazily in ns, and for a layer lazy-only policy keeps from being
// materialized. progress sees each layer whenever its state changes.
func (g *guardTrigger) barrier(ctx context.Context, ns string, images []string, layersOf imageLayers, progress func(GuardLayerStatus)) ([]GuardLayerStatus, error) {
	if len(images) == 0 {
		return nil, errors.New("no image to wait for")
	}
	var (
		wait []barrierLayer
		errs []error
		seen = map[string]bool{}
	)
	for _, img := range images {
		dgsts, err := layersOf(ctx, img)
		if err != nil {
			errs = append(errs, fmt.Errorf("image %s: %w", img, err))
			continue
		}
		g.mu.Lock()
		var mine []barrierLayer
		for _, d := range dgsts {
			key := ns + "/" + d.String()
			st, ok := g.layers[key]
			if !ok {
				continue // not mounted lazily: pulled in full, or not mounted
			}
			if st.State == GuardSkipped {
				errs = append(errs, fmt.Errorf("image %s layer %s: lazy-only policy: never materialized; an export of this image fetches it", img, d))
			}
			mine = append(mine, barrierLayer{image: img, key: key})
		}
		var elsewhere []string
		if len(mine) == 0 {
			elsewhere = g.namespacesOfLocked(dgsts, ns)
		}
		g.mu.Unlock()
		if len(mine) == 0 {
			msg := fmt.Sprintf("image %s: not mounted by this daemon in namespace %s", img, ns)
			if len(elsewhere) > 0 {
				msg += " (mounted in namespace " + strings.Join(elsewhere, ", ") + ")"
			}
			errs = append(errs, errors.New(msg))
			continue
		}
		for _, l := range mine {
			if !seen[l.key] {
				seen[l.key] = true
				wait = append(wait, l)
			}
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	for _, l := range wait {
		if err := g.hurry(ctx, l.key); err != nil {
			return nil, err
		}
	}

	last := map[string]string{}
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		g.mu.Lock()
		snap := make([]GuardLayerStatus, len(wait))
		for i, l := range wait {
			snap[i] = *g.layers[l.key]
		}
		closed := g.closed
		g.mu.Unlock()
		pending, failed := 0, []error{}
		for i, st := range snap {
			if progress != nil && last[wait[i].key] != st.State {
				progress(st)
			}
			last[wait[i].key] = st.State
			switch {
			case st.State == GuardMaterialized:
			case st.State == GuardFailed:
				if strings.Contains(st.Error, st.Layer) {
					failed = append(failed, fmt.Errorf("export guard failed: %s", st.Error))
				} else {
					failed = append(failed, fmt.Errorf("image %s layer %s: export guard failed: %s", wait[i].image, st.Layer, st.Error))
				}
			default:
				pending++
			}
		}
		if pending == 0 {
			return snap, errors.Join(failed...)
		}
		if closed {
			return snap, errors.New("export guard closed: the daemon is stopping")
		}
		select {
		case <-ctx.Done():
			var still []string
			for i, st := range snap {
				if st.State != GuardMaterialized && st.State != GuardFailed {
					still = append(still, fmt.Sprintf("image %s layer %s %s", wait[i].image, st.Layer, st.State))
				}
			}
			return snap, errors.Join(append(failed, fmt.Errorf("%w waiting for %s", ctx.Err(), strings.Join(still, ", ")))...)
		case <-tick.C:
		}
	}
}

// namespacesOfLocked returns the namespaces other than ns in which any of
// dgsts was mounted lazily. g.mu is held.
func (g *guardTrigger) namespacesOfLocked(dgsts []digest.Digest, ns string) []string {
	set := map[string]bool{}
	for _, d := range dgsts {
		for _, st := range g.layers {
			if st.Layer == d.String() && st.Namespace != ns {
				set[st.Namespace] = true
			}
		}
	}
	out := make([]string, 0, len(set))
	for n := range set {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// hurry makes the layer at key move towards the content store now: a layer
// waiting for its delay starts, a failed one starts again, and a
// materialized one whose blob is no longer in the content store is fetched
// again.
func (g *guardTrigger) hurry(ctx context.Context, key string) error {
	g.mu.Lock()
	st := g.layers[key]
	state, ns, layer, image := st.State, st.Namespace, st.Layer, st.Image
	g.mu.Unlock()
	switch state {
	case GuardScheduled:
		g.mu.Lock()
		if wake, ok := g.wake[key]; ok {
			close(wake)
			delete(g.wake, key)
			log.G(ctx).WithFields(log.Fields{"layer": layer, "namespace": ns, "image": image}).
				Info("export guard: barrier asks for this blob; materializing it now")
		}
		g.mu.Unlock()
		return nil
	case GuardMaterialized:
		store, _, err := g.stores(ctx)
		if err != nil {
			return fmt.Errorf("containerd at %s: %w", g.cfg.ContainerdAddress, err)
		}
		_, err = store.Info(namespaces.WithNamespace(ctx, ns), digest.Digest(layer))
		if err == nil {
			return nil
		}
		if !errdefs.IsNotFound(err) {
			return fmt.Errorf("layer %s in namespace %s: %w", layer, ns, err)
		}
		log.G(ctx).WithFields(log.Fields{"layer": layer, "namespace": ns}).
			Warn("export guard: a materialized blob left the content store; fetching it again")
		return g.restart(key, GuardMaterialized)
	case GuardFailed:
		return g.restart(key, GuardFailed)
	}
	return nil
}

// restart runs the layer at key's transfer again if it is still in state
// from.
func (g *guardTrigger) restart(key, from string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errors.New("export guard closed: the daemon is stopping")
	}
	st := g.layers[key]
	if st.State != from {
		return nil // another barrier or a new mount got there first
	}
	st.State, st.Error, st.Materialized, st.Updated = GuardScheduled, "", false, time.Now()
	dgst, err := digest.Parse(st.Layer)
	if err != nil {
		return fmt.Errorf("layer %q: %w", st.Layer, err)
	}
	ev := mountEvent{Namespace: st.Namespace, Ref: st.Image, Layer: dgst, Mode: Mode(st.Mode)}
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.materialize(ev, st)
	}()
	return nil
}

// barrierHandler serves POST BarrierPath: it streams BarrierEvents as JSON
// lines while the barrier waits.
func (d *Daemon) barrierHandler() http.Handler {
	layersOf := remoteImageLayers(credentialKeychain{dockerCredentials(context.Background(), d.cfg.Auth)}, d.cfg.Guard.Timeouts())
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if d.guard == nil {
			http.Error(w, "export guard disabled (guard.enable = false in the daemon's configuration)", http.StatusConflict)
			return
		}
		serveBarrier(w, r, d.guard, layersOf)
	})
}

func serveBarrier(w http.ResponseWriter, r *http.Request, g *guardTrigger, layersOf imageLayers) {
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
		ctx, cancel = context.WithTimeout(ctx, req.Timeout.D())
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
	layers, err := g.barrier(ctx, req.Namespace, req.Images, layersOf, func(l GuardLayerStatus) {
		send(BarrierEvent{Layer: &l})
	})
	end := BarrierEvent{Done: true, Layers: layers}
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && req.Timeout > 0 {
			err = fmt.Errorf("timed out after %s: %w", req.Timeout.D(), err)
		}
		end.Error = err.Error()
	}
	send(end)
}

// GuardBarrier asks the daemon listening on the status unix socket at path
// to wait until req's images are materialized, calling progress for each
// layer state it reports. It returns the final state of every layer waited
// for, and an error naming each image and layer at fault.
func GuardBarrier(ctx context.Context, path string, req BarrierRequest, progress func(GuardLayerStatus)) ([]GuardLayerStatus, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
	defer client.CloseIdleConnections()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://lazybase"+BarrierPath, strings.NewReader(string(body)))
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

package lazypull

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/lazybase/lazybase/internal/cpuacct"
)

// Upstream filesystem metrics Status reads, per mountpoint.
const (
	metricLayerSize       = "stargz_fs_layer_size_bytes"
	metricLayerFetched    = "stargz_fs_layer_fetched_size_bytes"
	metricLayerPrefetched = "stargz_fs_layer_prefetch_size_bytes"
)

// Status lists the layers a Daemon has mounted lazily.
type Status struct {
	Layers []LayerStatus `json:"layers"`
	// Restore, while the daemon restores the lazy mounts of the previous
	// one, says how many are left and which failed (registry down); nil
	// once every one is mounted.
	Restore *RestoreStatus `json:"restore,omitempty"`
	// Account is the daemon's CPU and I/O account since it started: CPU
	// seconds, measured units, registry bytes and bytes written, by
	// activity (lazybase_snapshotter_cpu_seconds_total and its kin).
	Account *Account `json:"account,omitempty"`
	// Profiles are the images whose prefetch profiles the daemon
	// publishes ([profile]): records pending and the last publish.
	Profiles []ProfileStatus `json:"profiles,omitempty"`
}

// Account is the daemon's CPU and I/O account (see Status.Account).
type Account = cpuacct.Snapshot

// LayerStatus is one lazily mounted layer.
type LayerStatus struct {
	Mountpoint string    `json:"mountpoint"`
	Image      string    `json:"image"`
	Layer      string    `json:"layer"`
	Mode       string    `json:"mode,omitempty"`
	MountedAt  time.Time `json:"mounted_at"`
	// Size is the layer's compressed size in bytes, FetchedBytes how much
	// of it is in the local cache (on demand, prefetch and background
	// fetches together), PrefetchBytes the size of its prefetch section.
	// All three are -1 when the upstream filesystem does not report them.
	Size          int64 `json:"size"`
	FetchedBytes  int64 `json:"fetched_bytes"`
	PrefetchBytes int64 `json:"prefetch_bytes"`
	// FetchedPercent is 100*FetchedBytes/Size, -1 when unknown.
	FetchedPercent float64 `json:"fetched_percent"`
	// LocalDir is where the layer is unpacked locally (local.enable), ""
	// until then; mounts handed out afterwards use it instead of the lazy
	// mount.
	LocalDir string `json:"local_dir,omitempty"`
	// BackgroundFetch tells when the layer's background fetch ran; absent
	// when none started.
	BackgroundFetch *BackgroundFetchStatus `json:"background_fetch,omitempty"`
}

// Status returns the daemon's lazily mounted layers, sorted by image and
// layer.
func (d *Daemon) Status(ctx context.Context) (*Status, error) {
	perMount, err := upstreamLayerStats()
	if err != nil {
		return nil, err
	}
	acct := cpuacct.Default.Snapshot()
	st := &Status{Layers: []LayerStatus{}, Account: &acct}
	if rs := d.fs.restore.status(); rs.Pending > 0 {
		st.Restore = &rs
	}
	if d.pub != nil {
		st.Profiles = d.pub.status()
	}
	for mp, rec := range d.fs.snapshot() {
		ls := LayerStatus{
			Mountpoint: mp, Image: rec.image, Layer: rec.layer, Mode: rec.mode, MountedAt: rec.mountedAt,
			Size: -1, FetchedBytes: -1, PrefetchBytes: -1, FetchedPercent: -1,
			LocalDir:        d.local.LocalDir(mp),
			BackgroundFetch: d.fs.bg.fetchStatus(mp),
		}
		if s, ok := perMount[mp]; ok {
			ls.Size, ls.FetchedBytes, ls.PrefetchBytes = s[0], s[1], s[2]
			if ls.Size > 0 && ls.FetchedBytes >= 0 {
				ls.FetchedPercent = 100 * float64(ls.FetchedBytes) / float64(ls.Size)
			}
		}
		st.Layers = append(st.Layers, ls)
	}
	sort.Slice(st.Layers, func(i, j int) bool {
		a, b := st.Layers[i], st.Layers[j]
		if a.Image != b.Image {
			return a.Image < b.Image
		}
		if a.Layer != b.Layer {
			return a.Layer < b.Layer
		}
		return a.Mountpoint < b.Mountpoint
	})
	return st, nil
}

// upstreamLayerStats reads size, fetched and prefetch bytes per mountpoint
// from the upstream filesystem's metrics in the default registry.
func upstreamLayerStats() (map[string][3]int64, error) {
	mfs, err := defaultGatherer().Gather()
	if err != nil {
		return nil, fmt.Errorf("gathering upstream layer metrics: %w", err)
	}
	out := make(map[string][3]int64)
	get := func(mp string) [3]int64 {
		if v, ok := out[mp]; ok {
			return v
		}
		return [3]int64{-1, -1, -1}
	}
	for _, mf := range mfs {
		idx := -1
		switch mf.GetName() {
		case metricLayerSize:
			idx = 0
		case metricLayerFetched:
			idx = 1
		case metricLayerPrefetched:
			idx = 2
		default:
			continue
		}
		for _, m := range mf.GetMetric() {
			mp := labelValue(m, "mountpoint")
			if mp == "" {
				continue
			}
			v := get(mp)
			v[idx] = int64(metricValue(m))
			out[mp] = v
		}
	}
	return out, nil
}

func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}

func metricValue(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	case m.Untyped != nil:
		return m.Untyped.GetValue()
	}
	return -1
}

func (d *Daemon) statusHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		st, err := d.Status(r.Context())
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(st)
	})
}

// FetchStatus asks the daemon listening on the status unix socket at path
// for its Status.
func FetchStatus(ctx context.Context, path string) (*Status, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}
	defer client.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://lazybase/status", nil)
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
		return nil, fmt.Errorf("status socket %s: %s: %s", path, resp.Status, b)
	}
	var st Status
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("status socket %s: decoding: %w", path, err)
	}
	return &st, nil
}

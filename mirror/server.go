package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"sync"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MaxEventBody is the largest notification body the server reads.
const MaxEventBody = 1 << 20

// Server converts images named by registry push notifications. Its handler
// serves POST /events (distribution's envelope or Harbor's payload; the
// path /webhook works too), GET /healthz and GET /metrics (Prometheus).
// Jobs wait in a bounded queue; a job already waiting is not queued twice.
// A job reads the source by tag when it runs, so a tag pushed twice while
// its job waits is converted once, at its newest digest. (distribution sends
// the notification before it links the tag: the first read may find no
// tag, and the image's next attempt does.)
type Server struct {
	m       *Mirror
	queue   chan Job
	workers int

	mu      sync.Mutex
	pending map[string]bool // Job.Source of queued jobs

	reg      *prometheus.Registry
	events   *prometheus.CounterVec
	images   *prometheus.CounterVec
	seconds  *prometheus.HistogramVec
	layers   *prometheus.CounterVec
	inflight prometheus.Gauge
}

// NewServer returns a Server over m with a queue of queueSize jobs and
// workers images converted at once.
func NewServer(m *Mirror, queueSize, workers int) *Server {
	queueSize, workers = max(queueSize, 1), max(workers, 1)
	s := &Server{
		m:       m,
		queue:   make(chan Job, queueSize),
		workers: workers,
		pending: map[string]bool{},
		reg:     prometheus.NewRegistry(),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazybase_mirror_events_total",
			Help: "Pushed images named by notifications, by what was done with them (queued, deduplicated, ignored, rejected).",
		}, []string{"result"}),
		images: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazybase_mirror_images_total",
			Help: "Images mirrored, by status (converted, skipped, failed).",
		}, []string{"status"}),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "lazybase_mirror_image_duration_seconds",
			Help:    "Time spent on one image, by status.",
			Buckets: prometheus.ExponentialBuckets(0.05, 2, 14),
		}, []string{"status"}),
		layers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazybase_mirror_layers_total",
			Help: "Layers of mirrored images, by where the converted layer came from (converted, record, shared).",
		}, []string{"source"}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "lazybase_mirror_images_in_progress",
			Help: "Images being mirrored now.",
		}),
	}
	s.reg.MustRegister(s.events, s.images, s.seconds, s.layers, s.inflight,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "lazybase_mirror_queue_length",
			Help: "Jobs waiting in the queue.",
		}, func() float64 { return float64(len(s.queue)) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "lazybase_mirror_http_retries_total",
			Help: "Registry requests retried.",
		}, func() float64 { return float64(m.Retries()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "lazybase_mirror_record_write_failures_total",
			Help: "Conversion records that could not be written.",
		}, func() float64 { return float64(m.recordFailures.Load()) }),
	)
	return s
}

// Registry returns the server's Prometheus registry.
func (s *Server) Registry() *prometheus.Registry { return s.reg }

// Enqueue queues a job unless the same source is already waiting. It
// returns "queued", "deduplicated" or "rejected" (queue full).
func (s *Server) Enqueue(j Job) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pending[j.Source] {
		s.events.WithLabelValues("deduplicated").Inc()
		return "deduplicated"
	}
	select {
	case s.queue <- j:
		s.pending[j.Source] = true
		s.events.WithLabelValues("queued").Inc()
		return "queued"
	default:
		s.events.WithLabelValues("rejected").Inc()
		return "rejected"
	}
}

// Run converts queued jobs until ctx ends, then waits for the images in
// progress.
func (s *Server) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for range s.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-ctx.Done():
					return
				case j := <-s.queue:
					s.mu.Lock()
					delete(s.pending, j.Source)
					s.mu.Unlock()
					s.process(ctx, j)
				}
			}
		}()
	}
	wg.Wait()
}

func (s *Server) process(ctx context.Context, j Job) {
	s.inflight.Inc()
	defer s.inflight.Dec()
	r := s.m.MirrorImage(ctx, j)
	s.images.WithLabelValues(r.Status).Inc()
	s.seconds.WithLabelValues(r.Status).Observe(r.Seconds)
	s.layers.WithLabelValues("converted").Add(float64(r.LayersConverted))
	s.layers.WithLabelValues("record").Add(float64(r.LayersFromRecords))
	s.layers.WithLabelValues("shared").Add(float64(r.LayersShared))
	l := log.G(ctx).WithFields(log.Fields{"image": r.Source, "status": r.Status, "seconds": r.Seconds, "digest": r.Digest})
	if r.Status == StatusFailed {
		l.WithField("reason", r.Reason).Error("image failed")
	} else {
		l.Info("image done")
	}
}

// EventsResponse is the JSON answer to a notification.
type EventsResponse struct {
	Queued       []string `json:"queued,omitempty"`
	Deduplicated []string `json:"deduplicated,omitempty"`
	Rejected     []string `json:"rejected,omitempty"`
	Ignored      int      `json:"ignored"`
}

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /events", s.handleEvents)
	mux.HandleFunc("POST /webhook", s.handleEvents)
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, "ok\n")
	})
	mux.Handle("GET /metrics", promhttp.HandlerFor(s.reg, promhttp.HandlerOpts{Registry: s.reg}))
	return mux
}

func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxEventBody))
	if err != nil {
		http.Error(w, "reading body: "+err.Error(), http.StatusRequestEntityTooLarge)
		return
	}
	evs, err := ParseEvents(body)
	if err != nil {
		code := http.StatusBadRequest
		if errors.Is(err, ErrNotNotification) {
			code = http.StatusUnprocessableEntity
		}
		http.Error(w, err.Error(), code)
		return
	}
	var resp EventsResponse
	for _, e := range evs {
		j, ok := s.m.JobFor(e.Host, e.Repository, e.Tag)
		if !ok {
			resp.Ignored++
			s.events.WithLabelValues("ignored").Inc()
			continue
		}
		switch s.Enqueue(j) {
		case "queued":
			resp.Queued = append(resp.Queued, j.Source)
		case "deduplicated":
			resp.Deduplicated = append(resp.Deduplicated, j.Source)
		default:
			resp.Rejected = append(resp.Rejected, j.Source)
		}
	}
	w.Header().Set("Content-Type", "application/json")
	if len(resp.Rejected) > 0 {
		// The registry retries notifications it could not deliver.
		w.Header().Set("Retry-After", "30")
		w.WriteHeader(http.StatusServiceUnavailable)
	} else {
		w.WriteHeader(http.StatusAccepted)
	}
	json.NewEncoder(w).Encode(resp)
}

package mirror

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// MaxEventBody is the largest notification body the server reads.
const MaxEventBody = 1 << 20

// SignatureHeader carries an HMAC-SHA256 of the request body under the
// shared secret: "sha256=" and the hex MAC (the form GitHub's
// X-Hub-Signature-256 uses), for senders that sign bodies.
const SignatureHeader = "X-Lazybase-Signature-256"

// ServerOption configures a Server.
type ServerOption func(*serverOptions) error

type serverOptions struct {
	queue, perRepo, workers, maxEvents int
	token                              []byte
	noAuth                             bool
	stateFile                          string
	grace                              time.Duration
}

// WithQueue bounds the jobs that may wait: total in all, perRepository of
// one source repository. Defaults: DefaultQueue, DefaultQueuePerRepository.
func WithQueue(total, perRepository int) ServerOption {
	return func(o *serverOptions) error {
		if total < 1 || perRepository < 1 {
			return fmt.Errorf("queue bounds must be positive, got %d and %d per repository", total, perRepository)
		}
		o.queue, o.perRepo = total, perRepository
		return nil
	}
}

// WithWorkers sets how many images are converted at once. Default: the
// config's concurrency.
func WithWorkers(n int) ServerOption {
	return func(o *serverOptions) error {
		if n < 1 {
			return fmt.Errorf("workers must be positive, got %d", n)
		}
		o.workers = n
		return nil
	}
}

// WithMaxEvents caps the push events of one request. Default:
// DefaultMaxEvents.
func WithMaxEvents(n int) ServerOption {
	return func(o *serverOptions) error {
		if n < 1 {
			return fmt.Errorf("max events must be positive, got %d", n)
		}
		o.maxEvents = n
		return nil
	}
}

// WithToken sets the shared secret a notification must carry: as
// "Authorization: Bearer SECRET" (distribution's endpoint headers), as
// "Authorization: SECRET" (Harbor's auth header, sent verbatim), or as
// SignatureHeader, an HMAC-SHA256 of the body under the secret.
func WithToken(secret []byte) ServerOption {
	return func(o *serverOptions) error {
		if len(secret) < MinSecretLength {
			return fmt.Errorf("serve token: %d bytes long, want at least %d", len(secret), MinSecretLength)
		}
		o.token = append([]byte(nil), secret...)
		return nil
	}
}

// WithoutAuth accepts unauthenticated notifications. Serve refuses it on a
// listener that is not loopback (IsLoopback).
func WithoutAuth() ServerOption {
	return func(o *serverOptions) error { o.noAuth = true; return nil }
}

// WithStateFile sets where SaveState writes unfinished jobs and LoadState
// reads them.
func WithStateFile(path string) ServerOption {
	return func(o *serverOptions) error { o.stateFile = path; return nil }
}

// WithGracePeriod sets how long Serve lets queued and running jobs go on
// after its context ends. Default: DefaultGracePeriod.
func WithGracePeriod(d time.Duration) ServerOption {
	return func(o *serverOptions) error {
		if d < 0 {
			return fmt.Errorf("grace period must not be negative, got %s", d)
		}
		o.grace = d
		return nil
	}
}

// ServeOptions translates a [serve] table into server options, reading
// the token. Serve refuses no_auth on a listener that is not loopback.
func ServeOptions(c *ServeConfig) ([]ServerOption, error) {
	opts := []ServerOption{WithQueue(c.Queue, c.QueuePerRepository), WithMaxEvents(c.MaxEvents), WithStateFile(c.StateFile), WithGracePeriod(c.Grace())}
	if c.NoAuth {
		return append(opts, WithoutAuth()), nil
	}
	tok, err := c.Token()
	if err != nil {
		return nil, err
	}
	if tok == nil {
		return nil, errors.New("serve: notifications must be authenticated: set serve.token_file or serve.token_env (or serve.no_auth = true on a loopback listener)")
	}
	return append(opts, WithToken(tok)), nil
}

// Server converts images named by registry push notifications. Its handler
// serves POST /events (distribution's envelope or Harbor's payload; the
// path /webhook works too), GET /healthz and GET /metrics (Prometheus).
//
// POST /events requires the shared secret (WithToken) unless WithoutAuth;
// /healthz and /metrics are open (the metrics carry counts only, no image
// names). A request naming more than max events push events is refused
// whole (413). Each event's repository and tag are checked against the
// reference grammar before they are matched against the sources; events
// that fail, untagged pushes and pushes no source wants are ignored and
// counted by reason.
//
// Jobs wait in a bounded queue with one FIFO per source repository, served
// round-robin, so a flood of pushes to one repository only fills that
// repository's share; a job already waiting is not queued twice. A push
// that finds its repository's share full is answered 429, one that finds
// the queue full 503, both with Retry-After, so the registry retries. A
// job reads the source by tag when it runs, so a tag pushed twice while
// its job waits is converted once, at its newest digest. (distribution
// sends the notification before it links the tag: the first read may find
// no tag, and the image's next attempt does.)
//
// Close stops accepting; Run then drains the queue and returns, or stops
// when its context ends; Unfinished and SaveState account for every job
// answered 202 that was not done.
type Server struct {
	m *Mirror
	o serverOptions
	q *fairQueue

	mu          sync.Mutex
	interrupted []Job

	reg          *prometheus.Registry
	events       *prometheus.CounterVec
	ignored      *prometheus.CounterVec
	unauthorized prometheus.Counter
	images       *prometheus.CounterVec
	seconds      *prometheus.HistogramVec
	layers       *prometheus.CounterVec
	inflight     prometheus.Gauge
}

// NewServer returns a Server over m. Authentication must be chosen:
// WithToken or WithoutAuth.
func NewServer(m *Mirror, opts ...ServerOption) (*Server, error) {
	o := serverOptions{queue: DefaultQueue, perRepo: DefaultQueuePerRepository, workers: m.cfg.Concurrency, maxEvents: DefaultMaxEvents, grace: DefaultGracePeriod}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	switch {
	case o.token == nil && !o.noAuth:
		return nil, errors.New("serve: no authentication: pass a token, or explicitly none for a loopback listener")
	case o.token != nil && o.noAuth:
		return nil, errors.New("serve: both a token and no authentication given")
	}
	o.workers = max(o.workers, 1)
	s := &Server{
		m:   m,
		o:   o,
		q:   newFairQueue(o.queue, o.perRepo),
		reg: prometheus.NewRegistry(),
		events: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazybase_mirror_events_total",
			Help: "Pushed images named by notifications, by what was done with them (queued, deduplicated, ignored, rejected).",
		}, []string{"result"}),
		ignored: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazybase_mirror_events_ignored_total",
			Help: "Push events not queued, by reason (untagged, invalid_tag, invalid_repository, no_source).",
		}, []string{"reason"}),
		unauthorized: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "lazybase_mirror_unauthorized_requests_total",
			Help: "Notifications refused for lack of a valid token or signature.",
		}),
		images: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "lazybase_mirror_images_total",
			Help: "Images mirrored, by status (converted, skipped, failed (new failures), quarantined (known bad), interrupted).",
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
	s.reg.MustRegister(s.events, s.ignored, s.unauthorized, s.images, s.seconds, s.layers, s.inflight,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "lazybase_mirror_queue_length",
			Help: "Jobs waiting in the queue.",
		}, func() float64 { return float64(s.q.len()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "lazybase_mirror_http_retries_total",
			Help: "Registry requests retried.",
		}, func() float64 { return float64(m.Retries()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "lazybase_mirror_record_write_failures_total",
			Help: "Conversion records that could not be written.",
		}, func() float64 { return float64(m.recordFailures.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "lazybase_mirror_records_rejected_total",
			Help: "Conversion records found without a valid MAC (their layers were converted again).",
		}, func() float64 { return float64(m.recordsRejected.Load()) }),
	)
	return s, nil
}

// Registry returns the server's Prometheus registry.
func (s *Server) Registry() *prometheus.Registry { return s.reg }

// Enqueue queues a job unless the same source is already waiting. It
// returns "queued", "deduplicated", or why it was rejected: "repository
// queue full", "queue full" or "shutting down".
func (s *Server) Enqueue(j Job) string {
	return s.enqueue(j, false)
}

func (s *Server) enqueue(j Job, force bool) string {
	res := s.q.push(j, force)
	switch res {
	case queued, deduplicated:
		s.events.WithLabelValues(res).Inc()
	default:
		s.events.WithLabelValues("rejected").Inc()
	}
	return res
}

// Run converts queued jobs, Workers at a time, until Close was called and
// the queue is empty, or ctx ends; it returns when the images in progress
// are done. Images that ctx's end interrupted are kept for Unfinished.
func (s *Server) Run(ctx context.Context) {
	var wg sync.WaitGroup
	for range s.o.workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				j, ok := s.q.pop(ctx)
				if !ok {
					return
				}
				s.process(ctx, j)
			}
		}()
	}
	wg.Wait()
}

// Close stops accepting jobs (notifications are answered 503 with
// Retry-After); Run takes the jobs still waiting, then returns.
func (s *Server) Close() { s.q.close() }

// Unfinished returns the jobs accepted but not done: those Run's context
// interrupted, then those still waiting (which it removes from the
// queue). Call it after Run returned.
func (s *Server) Unfinished() []Job {
	s.mu.Lock()
	out := append([]Job(nil), s.interrupted...)
	s.interrupted = nil
	s.mu.Unlock()
	return append(out, s.q.drain()...)
}

func (s *Server) process(ctx context.Context, j Job) {
	s.inflight.Inc()
	defer s.inflight.Dec()
	r := s.m.MirrorImage(ctx, j)
	status := r.Status
	if status == StatusFailed && ctx.Err() != nil {
		status = "interrupted"
		s.mu.Lock()
		s.interrupted = append(s.interrupted, j)
		s.mu.Unlock()
	}
	s.images.WithLabelValues(status).Inc()
	s.seconds.WithLabelValues(status).Observe(r.Seconds)
	s.layers.WithLabelValues("converted").Add(float64(r.LayersConverted))
	s.layers.WithLabelValues("record").Add(float64(r.LayersFromRecords))
	s.layers.WithLabelValues("shared").Add(float64(r.LayersShared))
	l := log.G(ctx).WithFields(log.Fields{"image": r.Source, "status": status, "seconds": r.Seconds, "digest": r.Digest})
	switch status {
	case StatusFailed:
		l.WithField("reason", r.Reason).Error("image failed")
	case "interrupted":
		l.Warn("image interrupted by shutdown")
	default:
		l.Info("image done")
	}
}

// stateFile is the JSON document SaveState writes.
type stateFile struct {
	Version int        `json:"version"`
	Jobs    []stateJob `json:"jobs"`
}

type stateJob struct {
	Source string `json:"source"`
	Tag    string `json:"tag"`
}

// SaveState saves jobs (Unfinished's) to the state file, replacing it
// atomically, or removes the file when there are none. Without a state
// file the jobs are logged by name as dropped. Every job is logged by
// name either way.
func (s *Server) SaveState(ctx context.Context, jobs []Job) error {
	if s.o.stateFile == "" {
		for _, j := range jobs {
			log.G(ctx).WithField("image", j.Source).Error("job not finished before shutdown and not saved (no serve.state_file); the next full mirror run converts it")
		}
		return nil
	}
	if len(jobs) == 0 {
		if err := os.Remove(s.o.stateFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("removing state file %s: %w", s.o.stateFile, err)
		}
		return nil
	}
	st := stateFile{Version: 1}
	for _, j := range jobs {
		st.Jobs = append(st.Jobs, stateJob{Source: j.Source, Tag: j.Tag})
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(s.o.stateFile), ".mirror-state-*")
	if err != nil {
		return fmt.Errorf("saving state file %s: %w", s.o.stateFile, err)
	}
	_, werr := tmp.Write(append(b, '\n'))
	serr := tmp.Sync()
	cerr := tmp.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("saving state file %s: %w", s.o.stateFile, err)
	}
	if err := os.Rename(tmp.Name(), s.o.stateFile); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("saving state file %s: %w", s.o.stateFile, err)
	}
	for _, j := range jobs {
		log.G(ctx).WithField("image", j.Source).WithField("state_file", s.o.stateFile).Warn("job not finished before shutdown; saved for the next start")
	}
	return nil
}

// LoadState queues the jobs of the state file (regardless of the queue's
// bounds) and returns how many it queued. A job whose source the config
// no longer names is logged and left out. The file stays until SaveState
// replaces it, so a crash before then loses nothing (a job done twice is
// skipped after one manifest request).
func (s *Server) LoadState(ctx context.Context) (int, error) {
	if s.o.stateFile == "" {
		return 0, nil
	}
	b, err := os.ReadFile(s.o.stateFile)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading state file %s: %w", s.o.stateFile, err)
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return 0, fmt.Errorf("state file %s: %w", s.o.stateFile, jsonError(err))
	}
	if st.Version != 1 {
		return 0, fmt.Errorf("state file %s: version %d, want 1", s.o.stateFile, st.Version)
	}
	n := 0
	for _, sj := range st.Jobs {
		j, ok := s.m.jobForSource(sj.Source, sj.Tag)
		if !ok {
			log.G(ctx).WithField("image", sj.Source).Warn("saved job names no configured source any more; dropped")
			continue
		}
		if s.enqueue(j, true) == queued {
			n++
			log.G(ctx).WithField("image", j.Source).Info("queued saved job")
		}
	}
	return n, nil
}

// EventsResponse is the JSON answer to a notification.
type EventsResponse struct {
	Queued       []string `json:"queued,omitempty"`
	Deduplicated []string `json:"deduplicated,omitempty"`
	Rejected     []string `json:"rejected,omitempty"`
	Ignored      int      `json:"ignored"`
	// IgnoredReasons counts the ignored events by reason (ReasonUntagged,
	// ReasonInvalidTag, ReasonInvalidRepository, ReasonNoSource).
	IgnoredReasons map[string]int `json:"ignored_reasons,omitempty"`
	// Error says why the answer is not 202 Accepted.
	Error string `json:"error,omitempty"`
}

// ErrorResponse is the JSON body of a refused request.
type ErrorResponse struct {
	Error string `json:"error"`
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

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v)
}

// bearerOK reports whether the Authorization header carries the secret,
// after "Bearer " or verbatim. The comparison takes the same time whatever
// the header holds.
func (s *Server) bearerOK(r *http.Request) bool {
	a := r.Header.Get("Authorization")
	if a == "" {
		return false
	}
	if len(a) > 7 && strings.EqualFold(a[:7], "bearer ") {
		a = strings.TrimSpace(a[7:])
	}
	got, want := sha256.Sum256([]byte(a)), sha256.Sum256(s.o.token)
	return subtle.ConstantTimeCompare(got[:], want[:]) == 1
}

// signatureOK reports whether SignatureHeader holds the body's HMAC.
func (s *Server) signatureOK(r *http.Request, body []byte) bool {
	sig, ok := strings.CutPrefix(r.Header.Get(SignatureHeader), "sha256=")
	if !ok {
		return false
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return false
	}
	mac := hmac.New(sha256.New, s.o.token)
	mac.Write(body)
	return hmac.Equal(got, mac.Sum(nil))
}

// Sign returns the SignatureHeader value of body under secret.
func Sign(secret, body []byte) string {
	mac := hmac.New(sha256.New, secret)
	mac.Write(body)
	return "sha256=" + hex.EncodeToString(mac.Sum(nil))
}

func (s *Server) unauthorizedResponse(w http.ResponseWriter, r *http.Request) {
	s.unauthorized.Inc()
	log.G(r.Context()).WithField("remote", r.RemoteAddr).Warn("notification refused: no valid token or signature")
	w.Header().Set("WWW-Authenticate", `Bearer realm="lazybase-mirror"`)
	writeJSON(w, http.StatusUnauthorized, ErrorResponse{Error: "authentication required: send the shared secret as \"Authorization: Bearer TOKEN\" or sign the body (" + SignatureHeader + ")"})
}

func (s *Server) handleEvents(w http.ResponseWriter, r *http.Request) {
	authed := s.o.noAuth || s.bearerOK(r)
	if !authed && r.Header.Get(SignatureHeader) == "" {
		s.unauthorizedResponse(w, r)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, MaxEventBody))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			writeJSON(w, http.StatusRequestEntityTooLarge, ErrorResponse{Error: fmt.Sprintf("body larger than %d bytes", MaxEventBody)})
			return
		}
		writeJSON(w, http.StatusBadRequest, ErrorResponse{Error: "reading the body: " + err.Error()})
		return
	}
	if !authed && !s.signatureOK(r, body) {
		s.unauthorizedResponse(w, r)
		return
	}
	evs, err := ParseEvents(body)
	if err != nil {
		code := http.StatusBadRequest
		if errors.Is(err, ErrNotNotification) {
			code = http.StatusUnprocessableEntity
		}
		writeJSON(w, code, ErrorResponse{Error: err.Error()})
		return
	}
	if len(evs) > s.o.maxEvents {
		writeJSON(w, http.StatusRequestEntityTooLarge, ErrorResponse{Error: fmt.Sprintf("%d push events in one request; at most %d are accepted", len(evs), s.o.maxEvents)})
		return
	}
	var (
		resp                EventsResponse
		full, repoFull, bye []string
	)
	ignore := func(reason string) {
		resp.Ignored++
		if resp.IgnoredReasons == nil {
			resp.IgnoredReasons = map[string]int{}
		}
		resp.IgnoredReasons[reason]++
		s.events.WithLabelValues("ignored").Inc()
		s.ignored.WithLabelValues(reason).Inc()
	}
	for _, e := range evs {
		if reason := e.Check(); reason != "" {
			ignore(reason)
			continue
		}
		j, ok := s.m.JobFor(e.Host, e.Repository, e.Tag)
		if !ok {
			ignore(ReasonNoSource)
			continue
		}
		switch s.Enqueue(j) {
		case queued:
			resp.Queued = append(resp.Queued, j.Source)
		case deduplicated:
			resp.Deduplicated = append(resp.Deduplicated, j.Source)
		case rejectedRepo:
			resp.Rejected = append(resp.Rejected, j.Source)
			repoFull = append(repoFull, j.Source)
		case rejectedClosing:
			resp.Rejected = append(resp.Rejected, j.Source)
			bye = append(bye, j.Source)
		default:
			resp.Rejected = append(resp.Rejected, j.Source)
			full = append(full, j.Source)
		}
	}
	// The registry retries notifications it could not deliver; the
	// events already queued are deduplicated then.
	switch {
	case len(bye) > 0:
		resp.Error = "shutting down: " + strings.Join(bye, ", ") + " not queued"
		w.Header().Set("Retry-After", "30")
		writeJSON(w, http.StatusServiceUnavailable, resp)
	case len(full) > 0:
		resp.Error = fmt.Sprintf("queue full (%d jobs waiting): %s not queued", s.o.queue, strings.Join(full, ", "))
		w.Header().Set("Retry-After", "30")
		writeJSON(w, http.StatusServiceUnavailable, resp)
	case len(repoFull) > 0:
		resp.Error = fmt.Sprintf("too many jobs waiting for the repository (%d at most): %s not queued", s.o.perRepo, strings.Join(repoFull, ", "))
		w.Header().Set("Retry-After", "30")
		writeJSON(w, http.StatusTooManyRequests, resp)
	default:
		writeJSON(w, http.StatusAccepted, resp)
	}
}

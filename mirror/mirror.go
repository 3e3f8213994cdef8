package mirror

import (
	"errors"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/prefetch"
)

// Mirror converts the images a Config names into the mirror registry.
// It is safe for concurrent use; Run and MirrorImage may be called many
// times (serve does).
type Mirror struct {
	cfg     *Config
	o       options
	client  *imageio.Client
	rt      *RetryTransport
	listRT  http.RoundTripper
	records name.Repository
	format  string

	sessMu   sync.Mutex
	sessions map[*session]bool
	closed   convert.Stats // counters of closed sessions' converters

	flightMu sync.Mutex
	flights  map[string]*layerFlight // by record key, across sessions

	listMu sync.Mutex
	lists  map[string]prefetch.Source

	converted, fromRecords, recordFailures atomic.Int64
	// recordsRejected counts records found without a valid MAC.
	recordsRejected atomic.Int64
	// holder names this process in conversion claims; claimWaits counts
	// layers found claimed by another process, claimRecords those of them
	// taken from the record it wrote, claimTakeovers expired claims taken
	// over.
	holder                                   string
	claimWaits, claimRecords, claimTakeovers atomic.Int64
	emptyMu                                  sync.Mutex
	emptyUp                                  bool // the empty blob is in the records repository

	onImageMu sync.Mutex // serializes WithImageDone calls

	sweepOnce sync.Once
	swept     atomic.Int64 // leftovers of killed runs removed
}

// New returns a Mirror for cfg (as ParseConfig returns it).
func New(cfg *Config, opts ...Option) (*Mirror, error) {
	o := options{keychain: authn.DefaultKeychain, userAgent: "lazybase-mirror"}
	for _, opt := range opts {
		if opt == nil {
			continue
		}
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	// Each request attempt is bounded below the retry transport, which
	// does not retry a timeout: the image's attempts do.
	var base http.RoundTripper
	if o.transport != nil {
		base = imageio.BoundedTransport(o.transport, cfg.Timeouts())
	} else {
		base = imageio.NewTransport(cfg.Insecure, cfg.Timeouts())
	}
	initial, max, afterMax := cfg.durations()
	rt := NewRetryTransport(base, RetryPolicy{Retries: *cfg.Retries, Initial: initial, Max: max, RetryAfterMax: afterMax}, o.onRetry)
	copts := []imageio.Option{
		imageio.WithTransport(rt),
		imageio.WithPlainHTTP(cfg.PlainHTTP),
		imageio.WithKeychain(o.keychain),
		imageio.WithJobs(cfg.TransferJobs),
		imageio.WithUserAgent(o.userAgent),
	}
	if o.backoff != nil {
		copts = append(copts, imageio.WithRetryBackoff(*o.backoff))
	}
	client, err := imageio.New(copts...)
	if err != nil {
		return nil, err
	}
	if o.recordKey == nil {
		if o.recordKey, err = cfg.Key(); err != nil {
			return nil, err
		}
	}
	if o.recordKey == nil {
		log.L.Warn("mirror: no record key (record_key_file, record_key_env): conversion records are neither read nor written; every layer is converted")
	}
	f, _ := convert.ParseFormat(cfg.Format)
	m := &Mirror{
		cfg:      cfg,
		o:        o,
		client:   client,
		rt:       rt,
		listRT:   imageio.PolicyTransport(rt, cfg.PlainHTTP),
		format:   FormatAnnotation(f, cfg.Level, cfg.ChunkSize),
		sessions: map[*session]bool{},
		flights:  map[string]*layerFlight{},
		holder:   newHolder(o.shard),
		lists:    map[string]prefetch.Source{},
	}
	ref, err := client.ParseRef(cfg.RecordsRepository + ":probe")
	if err != nil || ref.IsLayout() {
		return nil, fmt.Errorf("records_repository %q: not a registry repository: %v", cfg.RecordsRepository, err)
	}
	m.records = ref.Registry.Context()
	return m, nil
}

// Close releases the converters of runs and images still in progress and
// their temporary files.
func (m *Mirror) Close() error {
	m.sessMu.Lock()
	var live []*session
	for s := range m.sessions {
		live = append(live, s)
	}
	m.sessMu.Unlock()
	var errs []error
	for _, s := range live {
		errs = append(errs, s.close())
	}
	return errors.Join(errs...)
}

// Format returns the AnnotationFormat value of this mirror's output.
func (m *Mirror) Format() string { return m.format }

// Stats sums the counters of every converter the mirror used.
func (m *Mirror) Stats() convert.Stats {
	m.sessMu.Lock()
	defer m.sessMu.Unlock()
	st := m.closed
	for s := range m.sessions {
		addStats(&st, s.stats())
	}
	return st
}

func addStats(to *convert.Stats, s convert.Stats) {
	to.BlobReads += s.BlobReads
	to.Decompressions += s.Decompressions
	to.Converted += s.Converted
	to.Reused += s.Reused
	to.Joined += s.Joined
}

// Retries returns how many HTTP requests were retried so far.
func (m *Mirror) Retries() int64 { return m.rt.Retries() }

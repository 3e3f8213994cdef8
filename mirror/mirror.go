package mirror

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/prefetch"
)

// Option configures a Mirror.
type Option func(*options) error

type options struct {
	keychain  authn.Keychain
	transport http.RoundTripper
	shard     Shard
	force     bool
	onImage   func(ImageReport)
	onLayer   func(convert.Event)
	onRetry   func(*http.Request, int, error)
	backoff   *remote.Backoff
	userAgent string
	recordKey []byte
}

// WithKeychain sets where registry credentials come from. The default is
// authn.DefaultKeychain (docker config and credential helpers).
func WithKeychain(kc authn.Keychain) Option {
	return func(o *options) error { o.keychain = kc; return nil }
}

// WithTransport sets the base HTTP transport under the retry transport. The
// default is go-containerregistry's, with TLS verification unless the
// config's insecure is set. The config's registry timeouts are applied on
// top of either (imageio.BoundedTransport).
func WithTransport(rt http.RoundTripper) Option {
	return func(o *options) error { o.transport = rt; return nil }
}

// WithShard restricts Run to one shard of the images.
func WithShard(s Shard) Option {
	return func(o *options) error {
		if s.Count > 0 && (s.Index < 0 || s.Index >= s.Count) {
			return fmt.Errorf("shard %s: index out of range", s)
		}
		o.shard = s
		return nil
	}
}

// WithForce converts images even when the destination already holds their
// conversion, and ignores conversion records.
func WithForce(b bool) Option { return func(o *options) error { o.force = b; return nil } }

// WithImageDone registers a function called when an image is done. Calls
// come from the worker goroutines, one at a time; fn must not block for long.
func WithImageDone(fn func(ImageReport)) Option {
	return func(o *options) error { o.onImage = fn; return nil }
}

// WithLayerProgress passes the converter's progress events to fn.
func WithLayerProgress(fn func(convert.Event)) Option {
	return func(o *options) error { o.onLayer = fn; return nil }
}

// WithRetryHook registers a function called before each HTTP retry.
func WithRetryHook(fn func(req *http.Request, status int, err error)) Option {
	return func(o *options) error { o.onRetry = fn; return nil }
}

// WithOperationBackoff sets go-containerregistry's per-operation retry
// (whole blob uploads, see RetryTransport). The default is its own.
func WithOperationBackoff(b remote.Backoff) Option {
	return func(o *options) error { o.backoff = &b; return nil }
}

// WithUserAgent sets the User-Agent sent to registries.
func WithUserAgent(ua string) Option {
	return func(o *options) error { o.userAgent = ua; return nil }
}

// WithRecordKey sets the key that authenticates conversion records,
// instead of the config's record_key_file or record_key_env. It must be at
// least MinSecretLength bytes long.
func WithRecordKey(key []byte) Option {
	return func(o *options) error {
		if len(key) < MinSecretLength {
			return fmt.Errorf("record key: %d bytes long, want at least %d", len(key), MinSecretLength)
		}
		o.recordKey = append([]byte(nil), key...)
		return nil
	}
}

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

	layerSF singleflight.Group // by record key, across sessions

	listMu sync.Mutex
	lists  map[string]prefetch.Source

	converted, fromRecords, recordFailures atomic.Int64
	// recordsRejected counts records found without a valid MAC.
	recordsRejected atomic.Int64

	onImageMu sync.Mutex // serializes WithImageDone calls
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
}

// session owns converters and the converted layers they keep in temporary
// files: a Run has one for all its images (layers shared between them are
// converted once and kept until the run ends), an image mirrored on its own
// (MirrorImage, as serve does) has its own, so a long-running server does
// not accumulate files; images of different sessions share layers through
// conversion records.
type session struct {
	m      *Mirror
	mu     sync.Mutex
	convs  map[string]*convert.Converter     // prefetch fingerprint -> converter
	layers map[string]convert.ConvertedLayer // record key -> converted layer
	done   bool
}

func (m *Mirror) newSession() *session {
	s := &session{m: m, convs: map[string]*convert.Converter{}, layers: map[string]convert.ConvertedLayer{}}
	m.sessMu.Lock()
	m.sessions[s] = true
	m.sessMu.Unlock()
	return s
}

func (s *session) stats() convert.Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var st convert.Stats
	for _, c := range s.convs {
		addStats(&st, c.Stats())
	}
	return st
}

func (s *session) close() error {
	st := s.stats()
	s.mu.Lock()
	if s.done {
		s.mu.Unlock()
		return nil
	}
	s.done = true
	var errs []error
	for _, c := range s.convs {
		errs = append(errs, c.Close())
	}
	s.convs, s.layers = nil, nil
	s.mu.Unlock()
	s.m.sessMu.Lock()
	delete(s.m.sessions, s)
	addStats(&s.m.closed, st)
	s.m.sessMu.Unlock()
	return errors.Join(errs...)
}

func (s *session) get(key string) convert.ConvertedLayer {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.layers[key]
}

func (s *session) put(key string, l convert.ConvertedLayer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.done {
		s.layers[key] = l
	}
}

// Retries returns how many HTTP requests were retried so far.
func (m *Mirror) Retries() int64 { return m.rt.Retries() }

// Job is one image to mirror.
type Job struct {
	// Source is the source reference, REPOSITORY:TAG as configured.
	Source string `json:"source"`
	// Destination is the destination reference.
	Destination string `json:"destination"`
	// Tag is the source tag.
	Tag string `json:"tag"`

	src      *Source
	repoPath string
}

func (m *Mirror) job(s *Source, repoPath, tag string) Job {
	dest := s.Repository
	if m.cfg.Destination != "" {
		dest = m.cfg.Destination + "/" + repoPath
	}
	return Job{
		Source:      s.Repository + ":" + tag,
		Destination: dest + ":" + tag + m.cfg.TagSuffix,
		Tag:         tag,
		src:         s,
		repoPath:    repoPath,
	}
}

// writesIntoSource reports whether converted tags land in the source
// repository, so suffixed tags must not be taken as sources.
func (m *Mirror) writesIntoSource() bool { return m.cfg.Destination == "" }

func (m *Mirror) remoteOptions(ctx context.Context) []remote.Option {
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithTransport(m.listRT),
		remote.WithAuthFromKeychain(m.o.keychain),
		remote.WithUserAgent(m.o.userAgent),
	}
}

// Plan lists the tags of every source and returns the images this shard
// mirrors, in config order, each image once. Sources whose tags cannot be
// listed are returned as errors; the others are still planned.
func (m *Mirror) Plan(ctx context.Context) ([]Job, []error) {
	var (
		jobs []Job
		errs []error
		seen = map[string]bool{}
	)
	for i := range m.cfg.Sources {
		s := &m.cfg.Sources[i]
		ref, err := m.client.ParseRef(s.Repository)
		if err != nil || ref.IsLayout() {
			errs = append(errs, fmt.Errorf("source %s: not a registry repository: %v", s.Repository, err))
			continue
		}
		repo := ref.Registry.Context()
		tags, err := remote.List(repo, m.remoteOptions(ctx)...)
		if err != nil {
			errs = append(errs, fmt.Errorf("source %s: listing tags: %w", s.Repository, err))
			continue
		}
		if m.writesIntoSource() {
			tags = dropSuffixed(tags, m.cfg.TagSuffix)
		}
		selected, err := s.SelectTags(tags, func(tag string) (time.Time, error) { return m.created(ctx, repo.Tag(tag).String()) })
		if err != nil {
			errs = append(errs, fmt.Errorf("source %s: %w", s.Repository, err))
			continue
		}
		for _, t := range selected {
			j := m.job(s, repo.RepositoryStr(), t)
			if seen[j.Source] || !m.o.shard.Owns(j.Source) {
				continue
			}
			seen[j.Source] = true
			jobs = append(jobs, j)
		}
	}
	return jobs, errs
}

func dropSuffixed(tags []string, suffix string) []string {
	var out []string
	for _, t := range tags {
		if !strings.HasSuffix(t, suffix) {
			out = append(out, t)
		}
	}
	return out
}

// created returns the created time of an image's config (for an index, of
// its first image).
func (m *Mirror) created(ctx context.Context, s string) (time.Time, error) {
	ref, err := m.client.ParseRef(s)
	if err != nil {
		return time.Time{}, err
	}
	src, err := m.client.Open(ctx, ref)
	if err != nil {
		return time.Time{}, err
	}
	img := src.Image
	if img == nil {
		im, err := src.Index.IndexManifest()
		if err != nil {
			return time.Time{}, err
		}
		for _, d := range im.Manifests {
			if d.MediaType.IsImage() {
				if img, err = src.Index.Image(d.Digest); err != nil {
					return time.Time{}, err
				}
				break
			}
		}
		if img == nil {
			return time.Time{}, errors.New("index holds no image")
		}
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return time.Time{}, err
	}
	return cf.Created.Time, nil
}

// JobFor returns the job for a pushed image: repository is the path without
// the registry; host, when not empty, is matched against the sources'
// registries first. The tag must pass the source's filters (newest N is not
// applied to pushes). A repository or tag outside the reference grammar
// (PushEvent.Check) names no job.
func (m *Mirror) JobFor(host, repository, tag string) (Job, bool) {
	if (PushEvent{Repository: repository, Tag: tag}).Check() != "" {
		return Job{}, false
	}
	if m.writesIntoSource() && strings.HasSuffix(tag, m.cfg.TagSuffix) {
		return Job{}, false
	}
	var (
		found Job
		ok    bool
	)
	for i := range m.cfg.Sources {
		s := &m.cfg.Sources[i]
		ref, err := m.client.ParseRef(s.Repository)
		if err != nil || ref.IsLayout() {
			continue
		}
		repo := ref.Registry.Context()
		if repo.RepositoryStr() != repository || !s.MatchTag(tag) {
			continue
		}
		// Registries are often reached under several names: prefer the
		// source on the named registry, else take the first by path.
		if host != "" && repo.RegistryStr() == host {
			return m.job(s, repository, tag), true
		}
		if !ok {
			found, ok = m.job(s, repository, tag), true
		}
	}
	return found, ok
}

// jobForSource rebuilds a saved job: the source whose repository and tag
// make the reference source, if the tag is valid and the source's filters
// still take it.
func (m *Mirror) jobForSource(source, tag string) (Job, bool) {
	for i := range m.cfg.Sources {
		s := &m.cfg.Sources[i]
		if s.Repository+":"+tag != source || !s.MatchTag(tag) {
			continue
		}
		ref, err := m.client.ParseRef(s.Repository)
		if err != nil || ref.IsLayout() {
			continue
		}
		repoPath := ref.Registry.Context().RepositoryStr()
		if (PushEvent{Repository: repoPath, Tag: tag}).Check() != "" {
			continue
		}
		return m.job(s, repoPath, tag), true
	}
	return Job{}, false
}

// Run plans and mirrors every image of this shard, Concurrency at a time,
// and reports on each. One image failing does not stop the others. The
// error is the context's, when it ended the run early.
func (m *Mirror) Run(ctx context.Context) (*Report, error) {
	start := time.Now()
	rep := &Report{Started: start.UTC()}
	if m.o.shard.Count > 1 {
		rep.Shard = m.o.shard.String()
	}
	jobs, errs := m.Plan(ctx)
	for _, e := range errs {
		log.G(ctx).WithError(e).Error("planning")
		rep.Errors = append(rep.Errors, e.Error())
	}
	results := make([]ImageReport, len(jobs))
	sess := m.newSession()
	defer sess.close()
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(m.cfg.Concurrency, max(len(jobs), 1)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				results[i] = m.mirrorImage(ctx, sess, jobs[i])
			}
		}()
	}
	sent := 0
feed:
	for ; sent < len(jobs); sent++ {
		select {
		case next <- sent:
		case <-ctx.Done():
			break feed
		}
	}
	close(next)
	wg.Wait()
	for i := sent; i < len(jobs); i++ {
		results[i] = ImageReport{Source: jobs[i].Source, Destination: jobs[i].Destination, Status: StatusFailed, Reason: "not started: " + context.Cause(ctx).Error()}
	}
	for _, r := range results {
		rep.add(r)
	}
	rep.Seconds = time.Since(start).Seconds()
	rep.Layers = LayerCounts{Converted: m.converted.Load(), FromRecords: m.fromRecords.Load(), RecordWriteFailures: m.recordFailures.Load(), RecordsRejected: m.recordsRejected.Load()}
	rep.Retries = m.rt.Retries()
	return rep, ctx.Err()
}

type imageStats struct {
	sess                           *session
	converted, fromRecords, shared atomic.Int64
	bytes                          atomic.Int64
}

// MirrorImage mirrors one image, with up to image_attempts attempts, and
// reports what happened. Its converted layers are released when it
// returns; layers it shares with other images are found through their
// conversion records.
func (m *Mirror) MirrorImage(ctx context.Context, j Job) ImageReport {
	sess := m.newSession()
	defer sess.close()
	return m.mirrorImage(ctx, sess, j)
}

func (m *Mirror) mirrorImage(ctx context.Context, sess *session, j Job) ImageReport {
	start := time.Now()
	r := ImageReport{Source: j.Source, Destination: j.Destination}
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("image", j.Source))
	initial, maxWait, _ := m.cfg.durations()
	wait := 4 * initial
	for attempt := 1; ; attempt++ {
		r.Attempts = attempt
		st := &imageStats{sess: sess}
		status, src, dgst, err := m.attempt(ctx, j, st)
		r.SourceDigest, r.Digest, r.Status = src, dgst, status
		r.LayersConverted, r.LayersFromRecords, r.LayersShared = int(st.converted.Load()), int(st.fromRecords.Load()), int(st.shared.Load())
		r.Bytes = st.bytes.Load()
		if err == nil {
			if status == StatusSkipped {
				r.Reason = "the destination already holds the conversion of " + src
			}
			break
		}
		r.Status, r.Reason = StatusFailed, err.Error()
		if attempt >= m.cfg.ImageAttempts || ctx.Err() != nil {
			break
		}
		log.G(ctx).WithError(err).WithField("attempt", attempt).Warn("image failed; trying again")
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait = min(2*wait, maxWait)
	}
	r.Seconds = time.Since(start).Seconds()
	if m.o.onImage != nil {
		m.onImageMu.Lock()
		m.o.onImage(r)
		m.onImageMu.Unlock()
	}
	return r
}

func (m *Mirror) attempt(ctx context.Context, j Job, st *imageStats) (status, srcDigest, digest string, err error) {
	srcRef, err := m.client.ParseRef(j.Source)
	if err != nil {
		return "", "", "", err
	}
	destRef, err := m.client.ParseRef(j.Destination)
	if err != nil {
		return "", "", "", err
	}
	src, err := m.client.Open(ctx, srcRef)
	if err != nil {
		return "", "", "", err
	}
	srcDigest = src.Descriptor.Digest.String()
	if !m.o.force {
		done, dgst, err := m.upToDate(ctx, destRef, srcDigest)
		if err != nil {
			return "", srcDigest, "", err
		}
		if done {
			return StatusSkipped, srcDigest, dgst, nil
		}
	}
	list, err := m.prefetchFor(ctx, j, src.Descriptor.Digest)
	if err != nil {
		return "", srcDigest, "", err
	}
	var art imageio.Artifact
	if src.Index != nil {
		art, err = m.buildIndex(ctx, src.Index, j.src.platforms, list, st)
	} else {
		art, err = m.buildImage(ctx, src.Image, list, st)
	}
	if err != nil {
		return "", srcDigest, "", err
	}
	desc, err := m.client.Write(ctx, destRef, art, nil)
	if err != nil {
		return "", srcDigest, "", err
	}
	return StatusConverted, srcDigest, desc.Digest.String(), nil
}

// upToDate reads the destination manifest once and tells whether it is the
// conversion of srcDigest with this mirror's format.
func (m *Mirror) upToDate(ctx context.Context, dest imageio.Ref, srcDigest string) (bool, string, error) {
	d, err := m.client.Open(ctx, dest)
	if err != nil {
		if errors.Is(err, imageio.ErrNotFound) {
			return false, "", nil
		}
		return false, "", fmt.Errorf("checking the destination: %w", err)
	}
	var ann map[string]string
	if d.Index != nil {
		im, err := d.Index.IndexManifest()
		if err != nil {
			return false, "", err
		}
		ann = im.Annotations
	} else {
		man, err := d.Image.Manifest()
		if err != nil {
			return false, "", err
		}
		ann = man.Annotations
	}
	ok := ann[convert.AnnotationSourceManifest] == srcDigest && ann[convert.AnnotationFormat] == m.format
	return ok, d.Descriptor.Digest.String(), nil
}

// layer returns the converted form of one source layer: from this
// session's memory, from a conversion record in the registry, or converted
// now (and recorded). Concurrent requests for the same layer, from any
// session, wait for one another.
func (m *Mirror) layer(ctx context.Context, src v1.Layer, desc v1.Descriptor, diffID v1.Hash, files []string, st *imageStats) (convert.ConvertedLayer, error) {
	fp := PrefetchFingerprint(files)
	key := RecordKey(desc.Digest, m.format, fp)
	sess := st.sess
	if l := sess.get(key); l != nil {
		st.shared.Add(1)
		return l, nil
	}
	var mine bool
	v, err, _ := m.layerSF.Do(key, func() (any, error) {
		mine = true
		p, err := m.produce(ctx, sess, key, src, desc, diffID, files, st)
		if err == nil {
			// Before the flight ends: a caller of this session arriving
			// just after it must find the layer here, not start another.
			sess.put(key, p.l)
		}
		return p, err
	})
	if err != nil {
		return nil, err
	}
	p := v.(*produced)
	if !mine {
		if p.owner != nil && p.owner != sess {
			// Converted by another session, whose files go away when
			// it ends: take the layer from its record instead.
			if p, err = m.produce(ctx, sess, key, src, desc, diffID, files, st); err != nil {
				return nil, err
			}
		} else {
			st.shared.Add(1)
		}
	}
	sess.put(key, p.l)
	return p.l, nil
}

// produced is a layer and the session whose converter made it (nil when
// it came from a record).
type produced struct {
	l     convert.ConvertedLayer
	owner *session
}

func (m *Mirror) produce(ctx context.Context, sess *session, key string, src v1.Layer, desc v1.Descriptor, diffID v1.Hash, files []string, st *imageStats) (*produced, error) {
	fp := PrefetchFingerprint(files)
	if !m.o.force && m.recordsEnabled() {
		l, err := m.lookupRecord(ctx, key, desc.Digest, fp)
		if err != nil {
			log.G(ctx).WithError(err).WithField("layer", desc.Digest).Warn("reading the conversion record failed; converting")
		}
		if l != nil {
			m.fromRecords.Add(1)
			st.fromRecords.Add(1)
			return &produced{l: l}, nil
		}
	}
	conv, err := sess.converter(files)
	if err != nil {
		return nil, err
	}
	cl, err := conv.Layer(ctx, src, diffID)
	if err != nil {
		return nil, err
	}
	d, _ := cl.Descriptor()
	m.converted.Add(1)
	st.converted.Add(1)
	if !m.recordsEnabled() {
		return &produced{l: cl, owner: sess}, nil
	}
	// Record writes are idempotent; they are retried a few times, as a
	// registry may refuse a manifest while another writer is linking the
	// same blob into the repository (distribution's filesystem driver
	// rewrites link files in place).
	initial, _, _ := m.cfg.durations()
	for attempt, wait := 1, initial; ; attempt, wait = attempt+1, 2*wait {
		err := m.writeRecord(ctx, key, desc.Digest, fp, cl)
		if err == nil {
			break
		}
		if attempt >= 3 || ctx.Err() != nil {
			m.recordFailures.Add(1)
			log.G(ctx).WithError(err).WithField("layer", desc.Digest).Warn("writing the conversion record failed")
			break
		}
		log.G(ctx).WithError(err).WithField("layer", desc.Digest).Debug("writing the conversion record failed; trying again")
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
	}
	return &produced{
		l:     &remote.MountableLayer{Layer: cl, Reference: m.records.Digest(d.Digest.String())},
		owner: sess,
	}, nil
}

// fixedFiles is a prefetch source that returns the same files for any layer:
// the mirror picks a converter per file list.
type fixedFiles []string

func (f fixedFiles) PrefetchFiles(v1.Hash, v1.Hash) []string { return f }

func (s *session) converter(files []string) (*convert.Converter, error) {
	m := s.m
	fp := PrefetchFingerprint(files)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done {
		return nil, errors.New("mirror session is closed")
	}
	if c, ok := s.convs[fp]; ok {
		return c, nil
	}
	f, _ := convert.ParseFormat(m.cfg.Format)
	opts := []convert.Option{convert.WithFormat(f)}
	if m.cfg.Level != 0 {
		opts = append(opts, convert.WithCompressionLevel(m.cfg.Level))
	}
	if m.cfg.ChunkSize != 0 {
		opts = append(opts, convert.WithChunkSize(m.cfg.ChunkSize))
	}
	if m.cfg.Jobs != 0 {
		opts = append(opts, convert.WithJobs(m.cfg.Jobs), convert.WithWorkers(m.cfg.Jobs))
	}
	if m.cfg.TempDir != "" {
		opts = append(opts, convert.WithTempDir(m.cfg.TempDir))
	}
	if m.o.onLayer != nil {
		opts = append(opts, convert.WithProgress(m.o.onLayer))
	}
	if len(files) > 0 {
		opts = append(opts, convert.WithPrefetch(fixedFiles(files)))
	}
	c, err := convert.New(opts...)
	if err != nil {
		return nil, err
	}
	s.convs[fp] = c
	return c, nil
}

// PrefetchFile returns the prefetch list files tried for a repository path
// and tag, in order.
func PrefetchFile(dir, repoPath, tag string) []string {
	base := strings.ReplaceAll(repoPath, "/", "_")
	return []string{filepath.Join(dir, base+"."+tag+".json"), filepath.Join(dir, base+".json")}
}

func (m *Mirror) prefetchFor(ctx context.Context, j Job, digest v1.Hash) (prefetch.Source, error) {
	if m.cfg.PrefetchDir == "" {
		return nil, nil
	}
	for _, f := range PrefetchFile(m.cfg.PrefetchDir, j.repoPath, j.Tag) {
		if _, err := os.Stat(f); err != nil {
			continue
		}
		m.listMu.Lock()
		l, ok := m.lists[f]
		m.listMu.Unlock()
		if !ok {
			var err error
			if l, err = prefetch.Load(f); err != nil {
				return nil, err
			}
			m.listMu.Lock()
			m.lists[f] = l
			m.listMu.Unlock()
		}
		// A profile recorded for another image (say, an older tag) is
		// ignored with a warning.
		return prefetch.For(ctx, l, j.Source, digest), nil
	}
	return nil, nil
}

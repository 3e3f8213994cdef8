package lazypull

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/reference"
	"github.com/containerd/log"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/service/resolver"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/prefetch"
)

// Bounds of the profile publisher's memory, whatever the configuration.
const (
	// maxPublishImages bounds how many images the publisher keeps records
	// of at once; records of further images are dropped (and counted).
	maxPublishImages = 64
	// maxPendingRecords bounds the records kept for all images together
	// (about 250 bytes each); further ones are dropped (and counted).
	maxPendingRecords = 200000
	// maxUseDepth bounds the walk from a snapshot in use to the lazily
	// mounted image below it.
	maxUseDepth = 256
	// maxShutdownPublish bounds the publish at shutdown, all images
	// together.
	maxShutdownPublish = 10 * time.Second
	// publishTick is how often the publisher looks for images to publish.
	publishTick = time.Second
)

// Publish results, the "result" label of the publish metric.
const (
	publishOK     = "ok"
	publishFailed = "failed"
)

// ProfileStatus is what the profile publisher knows of one image: the
// access records it holds and its last publish.
type ProfileStatus struct {
	Image string `json:"image"`
	// PendingRecords are the first accesses recorded since the last
	// successful publish; DroppedRecords those left out because the image
	// had profile.max_files pending already.
	PendingRecords int `json:"pending_records"`
	DroppedRecords int `json:"dropped_records,omitempty"`
	// InUse is how many snapshots over the image's layers are in use
	// (active or views): the image is published once none is, after
	// profile.delay.
	InUse int `json:"in_use"`
	// LastAttempt, LastResult ("ok" or "failed") and LastError tell about
	// the last publish; Host is the registry host that took it (or the
	// last one that refused it), Subject the image manifest it refers to,
	// Artifact the published manifest's digest and Files how many files
	// its profile holds.
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	LastResult  string    `json:"last_result,omitempty"`
	LastError   string    `json:"last_error,omitempty"`
	Host        string    `json:"host,omitempty"`
	Subject     string    `json:"subject,omitempty"`
	Artifact    string    `json:"artifact,omitempty"`
	Files       int       `json:"files,omitempty"`
}

// publishTarget is one image's pending records and publish state.
type publishTarget struct {
	recs       []AccessRecord
	dropped    int
	lastRecord time.Time // when the latest record arrived
	lastBusy   time.Time // when a snapshot over the image was last seen in use
	st         ProfileStatus
}

// snapshotUse is a snapshot in use (active or view) and the image below
// it, once the publisher has walked its parents.
type snapshotUse struct {
	parent   string
	image    string
	resolved bool
}

// profilePublisher publishes what the lazy mounts of each image served
// as a prefetch profile artifact (prefetch.BuildArtifact) referring to the
// image's manifest, in the registry the image came from, reached through
// the daemon's registry hosts and credentials.
//
// It keeps, in memory and bounded, the first accesses recorded since an
// image's last publish, and tracks the snapshots in use above each image
// (Prepare and View over its layers, until their Commit or Remove). An
// image is published once none is in use and no access was recorded for
// profile.delay, or once no access was recorded for profile.idle whatever
// is in use (BuildKit keeps the snapshot of a finished step active until
// it needs it committed, so "in use" may last as long as its cache), and
// at most once per profile.min_interval; at Close,
// what is pending is published if the interval allows. A publish never
// blocks a snapshot request, and its failure is logged, counted and
// shown in Status, nothing more.
type profilePublisher struct {
	cfg       ProfileConfig
	manifests prefetch.ManifestSource
	hosts     source.RegistryHosts
	creds     resolver.Credential // nil: anonymous
	// stat reads a snapshot's info (the upstream snapshotter's Stat).
	stat    func(ctx context.Context, key string) (snapshots.Info, error)
	results *prometheus.CounterVec
	now     func() time.Time

	mu      sync.Mutex
	targets map[string]*publishTarget
	uses    map[string]*snapshotUse
	dropped int // records of images beyond maxPublishImages
	pending int // records kept, all images together

	stop chan struct{}
	done chan struct{}
	once sync.Once
}

var _ accessRecorder = (*profilePublisher)(nil)

func newProfilePublisher(cfg ProfileConfig, manifests prefetch.ManifestSource, hosts source.RegistryHosts,
	creds resolver.Credential, m *metrics) *profilePublisher {
	p := &profilePublisher{
		cfg: cfg, manifests: manifests, hosts: hosts, creds: creds,
		now:     time.Now,
		targets: map[string]*publishTarget{},
		uses:    map[string]*snapshotUse{},
		stop:    make(chan struct{}),
		done:    make(chan struct{}),
	}
	if m != nil {
		p.results = m.publishes
	}
	return p
}

// start runs the publisher until close.
func (p *profilePublisher) start(ctx context.Context) {
	ctx = context.WithoutCancel(ctx)
	go func() {
		defer close(p.done)
		t := time.NewTicker(publishTick)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.publishReady(ctx, false)
			}
		}
	}()
}

// close stops the publisher and publishes what is pending, as far as
// profile.min_interval allows, within profile.timeout or
// maxShutdownPublish, whichever is shorter, for all images together: a
// stopping daemon is not held up by a registry that stalls.
func (p *profilePublisher) close(ctx context.Context) {
	p.once.Do(func() {
		close(p.stop)
		<-p.done
		ctx, cancel := context.WithTimeout(ctx, min(p.cfg.Timeout.D(), maxShutdownPublish))
		defer cancel()
		p.publishReady(ctx, true)
	})
}

// stopNow stops the publisher without publishing.
func (p *profilePublisher) stopNow() {
	p.once.Do(func() {
		close(p.stop)
		<-p.done
	})
}

// recordAccess implements accessRecorder: it keeps rec for its image's
// next publish.
func (p *profilePublisher) recordAccess(_ context.Context, rec AccessRecord) error {
	if rec.Image == "" {
		return nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	t := p.targets[rec.Image]
	if t == nil {
		if len(p.targets) >= maxPublishImages && !p.evictLocked() {
			p.dropped++
			return nil
		}
		t = &publishTarget{st: ProfileStatus{Image: rec.Image}}
		p.targets[rec.Image] = t
	}
	t.lastRecord = p.now()
	if len(t.recs) >= p.cfg.MaxFiles || p.pending >= maxPendingRecords {
		t.dropped++
		return nil
	}
	t.recs = append(t.recs, rec)
	p.pending++
	return nil
}

// evictLocked forgets the image with no pending record whose last
// publish is the oldest, and reports whether there was one.
func (p *profilePublisher) evictLocked() bool {
	var oldest string
	for img, t := range p.targets {
		if len(t.recs) > 0 {
			continue
		}
		if oldest == "" || t.st.LastAttempt.Before(p.targets[oldest].st.LastAttempt) {
			oldest = img
		}
	}
	if oldest == "" {
		return false
	}
	delete(p.targets, oldest)
	return true
}

// using tells the publisher that snapshot key, over parent, is in use.
func (p *profilePublisher) using(key, parent string) {
	if parent == "" {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.uses[key] = &snapshotUse{parent: parent}
}

// released tells the publisher that snapshot key is no longer in use
// (committed or removed).
func (p *profilePublisher) released(key string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if u, ok := p.uses[key]; ok {
		if u.image != "" {
			if t := p.targets[u.image]; t != nil {
				t.lastBusy = p.now()
			}
		}
		delete(p.uses, key)
	}
}

// imageBelow returns the image reference of the lazily mounted layer
// nearest below parent, "" if there is none.
func (p *profilePublisher) imageBelow(ctx context.Context, parent string) string {
	for key, i := parent, 0; key != "" && i < maxUseDepth; i++ {
		info, err := p.stat(ctx, key)
		if err != nil {
			return ""
		}
		if snapshotMode(info.Labels) != "" {
			if ref := imageRef(info.Labels); ref != "" {
				return ref
			}
		}
		key = info.Parent
	}
	return ""
}

// resolveUses finds the image below each snapshot in use not resolved
// yet and marks the images in use as busy now.
func (p *profilePublisher) resolveUses(ctx context.Context) {
	p.mu.Lock()
	var todo []string
	for key, u := range p.uses {
		if !u.resolved {
			todo = append(todo, key)
		}
	}
	p.mu.Unlock()
	found := map[string]string{}
	if p.stat != nil {
		for _, key := range todo {
			p.mu.Lock()
			u := p.uses[key]
			p.mu.Unlock()
			if u != nil {
				found[key] = p.imageBelow(ctx, u.parent)
			}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for key, img := range found {
		if u := p.uses[key]; u != nil {
			u.image, u.resolved = img, true
		}
	}
	now := p.now()
	for _, u := range p.uses {
		if t := p.targets[u.image]; u.image != "" && t != nil {
			t.lastBusy = now
		}
	}
}

// publishReady publishes each image that has records, no snapshot in use
// and no record for profile.delay, or no record for profile.idle (at
// shutdown: every image with records), and whose last attempt is
// profile.min_interval ago.
func (p *profilePublisher) publishReady(ctx context.Context, shutdown bool) {
	p.resolveUses(ctx)
	now := p.now()
	p.mu.Lock()
	inUse := map[string]int{}
	for _, u := range p.uses {
		inUse[u.image]++
	}
	var ready []string
	for img, t := range p.targets {
		if len(t.recs) == 0 {
			continue
		}
		if !t.st.LastAttempt.IsZero() && now.Sub(t.st.LastAttempt) < p.cfg.MinInterval.D() {
			if shutdown {
				log.G(ctx).WithFields(log.Fields{"image": img, "records": len(t.recs)}).
					Info("not publishing the prefetch profile at shutdown: profile.min_interval has not passed since the last publish")
			}
			continue
		}
		unused := inUse[img] == 0 && now.Sub(t.lastBusy) >= p.cfg.Delay.D() && now.Sub(t.lastRecord) >= p.cfg.Delay.D()
		idle := now.Sub(t.lastRecord) >= p.cfg.Idle.D()
		if !shutdown && !unused && !idle {
			continue
		}
		ready = append(ready, img)
	}
	p.mu.Unlock()
	slices.Sort(ready)
	for _, img := range ready {
		select {
		case <-p.stop:
			if !shutdown {
				return
			}
		default:
		}
		p.publishImage(ctx, img)
	}
}

// publishImage publishes the pending records of img, bounded by
// profile.timeout, and records the outcome.
func (p *profilePublisher) publishImage(ctx context.Context, img string) {
	p.mu.Lock()
	t := p.targets[img]
	if t == nil {
		p.mu.Unlock()
		return
	}
	recs := slices.Clone(t.recs)
	t.st.LastAttempt = p.now()
	p.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout.D())
	defer cancel()
	start := time.Now()
	res, err := p.publish(ctx, img, recs)
	l := log.G(ctx).WithFields(log.Fields{"image": img, "records": len(recs), "host": res.host, "duration": time.Since(start)})

	p.mu.Lock()
	defer p.mu.Unlock()
	t.st.Host, t.st.Subject, t.st.Files = res.host, res.subject, res.files
	if err != nil {
		t.st.LastResult, t.st.LastError, t.st.Artifact = publishFailed, err.Error(), ""
		p.count(publishFailed)
		l.WithError(err).Warn("publishing the prefetch profile failed; the build is not affected, the records are kept for the next attempt")
		return
	}
	t.st.LastResult, t.st.LastError, t.st.Artifact = publishOK, "", res.artifact
	p.count(publishOK)
	// The records published are the first len(recs): later ones stay.
	n := min(len(recs), len(t.recs))
	t.recs = slices.Delete(t.recs, 0, n)
	p.pending -= n
	t.dropped = 0
	l.WithFields(log.Fields{"subject": res.subject, "artifact": res.artifact, "files": res.files}).Info("published the prefetch profile")
}

func (p *profilePublisher) count(result string) {
	if p.results != nil {
		p.results.WithLabelValues(result).Inc()
	}
}

// publishResult is what one publish did.
type publishResult struct {
	host, subject, artifact string
	files                   int
}

// publish turns recs into img's profile, resolves it against img's
// manifest (the platform manifest holding the recorded layers is the
// subject), and pushes it to the first of img's registry hosts (mirrors
// first) that takes it.
func (p *profilePublisher) publish(ctx context.Context, img string, recs []AccessRecord) (publishResult, error) {
	var res publishResult
	prof, err := prefetch.FromRecords(img, recs)
	if err != nil {
		return res, fmt.Errorf("profile of %s: %w", img, err)
	}
	if err := prefetch.ResolveImage(ctx, prof, p.manifests); err != nil {
		return res, fmt.Errorf("resolving the profile against %s: %w", img, err)
	}
	spec, err := parseRef(img)
	if err != nil {
		return res, err
	}
	subjectRef := spec.Locator + "@" + prof.Digest
	raw, err := p.manifests.Manifest(ctx, subjectRef)
	if err != nil {
		return res, fmt.Errorf("reading the subject manifest %s: %w", subjectRef, err)
	}
	res.subject = raw.Digest.String()
	subject := v1.Descriptor{MediaType: raw.MediaType, Digest: raw.Digest, Size: int64(len(raw.Body))}
	art, cut, err := prefetch.BuildArtifact(subject, prof, p.cfg.MaxFiles)
	if err != nil {
		return res, fmt.Errorf("profile artifact of %s: %w", img, err)
	}
	for _, l := range cut.Layers {
		res.files += len(l.Files)
	}
	d, err := art.Digest()
	if err != nil {
		return res, err
	}
	res.artifact = d.String()
	hosts, err := p.hosts(spec)
	if err != nil {
		return res, fmt.Errorf("registry hosts of %s: %w", spec.Locator, err)
	}
	repoPath := strings.TrimPrefix(spec.Locator, spec.Hostname()+"/")
	var errs []error
	for _, h := range hosts {
		res.host = h.Host
		if err := ctx.Err(); err != nil {
			errs = append(errs, err)
			break
		}
		if h.Path != "" && h.Path != "/v2" {
			errs = append(errs, fmt.Errorf("host %s: path %s: only /v2 is supported for publishing", h.Host, h.Path))
			continue
		}
		var nopts []name.Option
		if h.Scheme == "http" {
			nopts = append(nopts, name.Insecure)
		}
		repo, err := name.NewRepository(h.Host+"/"+repoPath, nopts...)
		if err != nil {
			errs = append(errs, fmt.Errorf("host %s: %w", h.Host, err))
			continue
		}
		var tr http.RoundTripper = http.DefaultTransport
		if h.Client != nil && h.Client.Transport != nil {
			tr = h.Client.Transport
		}
		if len(h.Header) > 0 {
			tr = headerTransport{header: h.Header, next: tr}
		}
		err = remote.Write(repo.Digest(d.String()), art,
			remote.WithContext(ctx),
			remote.WithTransport(tr),
			remote.WithAuth(hostAuth{creds: p.creds, host: h.Host, spec: spec}),
			remote.WithRetryBackoff(remote.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Steps: 2}),
			remote.WithUserAgent("lazybase-snapshotter"))
		if err == nil {
			return res, nil
		}
		errs = append(errs, fmt.Errorf("pushing to %s: %w", repo, err))
	}
	if len(errs) == 0 {
		return res, fmt.Errorf("no registry host for %s", spec.Locator)
	}
	return res, errors.Join(errs...)
}

// status returns what the publisher knows, sorted by image.
func (p *profilePublisher) status() []ProfileStatus {
	p.mu.Lock()
	defer p.mu.Unlock()
	inUse := map[string]int{}
	for _, u := range p.uses {
		if u.image != "" {
			inUse[u.image]++
		}
	}
	out := make([]ProfileStatus, 0, len(p.targets))
	for img, t := range p.targets {
		st := t.st
		st.PendingRecords, st.DroppedRecords, st.InUse = len(t.recs), t.dropped, inUse[img]
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b ProfileStatus) int { return strings.Compare(a.Image, b.Image) })
	return out
}

// hostAuth is go-containerregistry's authenticator over the daemon's
// credentials for one registry host.
type hostAuth struct {
	creds resolver.Credential
	host  string
	spec  reference.Spec
}

// Authorization implements authn.Authenticator.
func (a hostAuth) Authorization() (*authn.AuthConfig, error) {
	if a.creds == nil {
		return &authn.AuthConfig{}, nil
	}
	user, secret, err := a.creds(a.host, a.spec)
	if err != nil {
		return nil, fmt.Errorf("credentials for %s: %w", a.host, err)
	}
	switch {
	case user == "" && secret == "":
		return &authn.AuthConfig{}, nil
	case user == "":
		return &authn.AuthConfig{IdentityToken: secret}, nil
	}
	return &authn.AuthConfig{Username: user, Password: secret}, nil
}

// headerTransport adds a host's configured headers (hosts.toml) to every
// request.
type headerTransport struct {
	header http.Header
	next   http.RoundTripper
}

func (t headerTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	req = req.Clone(req.Context())
	for k, vs := range t.header {
		for _, v := range vs {
			req.Header.Add(k, v)
		}
	}
	return t.next.RoundTrip(req)
}

package mirror

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/convert/job"
	"github.com/lazybase/lazybase/internal/imageio"
	"github.com/lazybase/lazybase/prefetch"
)

// Run plans and mirrors every image of this shard, Concurrency at a time,
// and reports on each. One image failing does not stop the others. The
// error is the context's, when it ended the run early.
func (m *Mirror) Run(ctx context.Context) (*Report, error) {
	start := time.Now()
	m.sweep(ctx)
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
	if m.profilesEnabled() {
		// One prefetch list per source layer for every image of the
		// run, so that a shared layer is converted once.
		sess.lists = m.planLayerLists(ctx, jobs)
	}
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
	rep.Layers = LayerCounts{Converted: m.converted.Load(), FromRecords: m.fromRecords.Load(), RecordWriteFailures: m.recordFailures.Load(), RecordsRejected: m.recordsRejected.Load(),
		ClaimWaits: m.claimWaits.Load(), ClaimRecords: m.claimRecords.Load(), ClaimTakeovers: m.claimTakeovers.Load()}
	rep.Retries = m.rt.Retries()
	rep.Swept = m.swept.Load()
	return rep, ctx.Err()
}

type imageStats struct {
	sess *session
	// repo is the source repository, from which a shared layer is read
	// detached from this image (nil: read through the image).
	repo                           *name.Repository
	converted, fromRecords, shared atomic.Int64
	bytes                          atomic.Int64
	// profiles is what the closed prefetch loop did (nil when off).
	profiles *ProfileReport
}

// MirrorImage mirrors one image, with up to image_attempts attempts, and
// reports what happened. Its converted layers are released when it
// returns; layers it shares with other images are found through their
// conversion records.
//
// A job whose source keeps only the newest N tags is first checked against
// the repository's current tags, as a scheduled run selects them: a pushed
// tag that is not among them is skipped, saying so.
func (m *Mirror) MirrorImage(ctx context.Context, j Job) ImageReport {
	if ok, err := m.newestOK(ctx, j); err != nil || !ok {
		r := ImageReport{Source: j.Source, Destination: j.Destination, Status: StatusSkipped}
		if err != nil {
			r.Status, r.Reason = StatusFailed, "checking the source's newest filter: "+err.Error()
		} else {
			r.Reason = fmt.Sprintf("not among the newest %d tags of %s", j.src.Newest, j.src.Repository)
		}
		return m.done(r)
	}
	sess := m.newSession()
	defer sess.close()
	return m.mirrorImage(ctx, sess, j)
}

func (m *Mirror) mirrorImage(ctx context.Context, sess *session, j Job) ImageReport {
	ctx = log.WithLogger(ctx, log.G(ctx).WithField("image", j.Source))
	q := &imageFailures{}
	r := m.tryImage(ctx, sess, j, q)
	if m.quarantineEnabled() && r.Status != StatusSkipped && r.Status != StatusQuarantined {
		r = m.noteOutcome(ctx, q.get(ctx, m, j.Source), r)
	}
	return m.done(r)
}

// done passes an image's report to WithImageDone's function.
func (m *Mirror) done(r ImageReport) ImageReport {
	if m.o.onImage != nil {
		m.onImageMu.Lock()
		m.o.onImage(r)
		m.onImageMu.Unlock()
	}
	return r
}

// tryImage mirrors one image with up to image_attempts attempts.
func (m *Mirror) tryImage(ctx context.Context, sess *session, j Job, q *imageFailures) ImageReport {
	start := time.Now()
	r := ImageReport{Source: j.Source, Destination: j.Destination}
	initial, maxWait, _ := m.cfg.durations()
	wait := 4 * initial
	for attempt := 1; ; attempt++ {
		r.Attempts = attempt
		st := &imageStats{sess: sess, repo: m.sourceRepo(j)}
		status, src, dgst, err := m.attempt(ctx, j, st, q)
		r.SourceDigest, r.Digest, r.Status = src, dgst, status
		r.LayersConverted, r.LayersFromRecords, r.LayersShared = int(st.converted.Load()), int(st.fromRecords.Load()), int(st.shared.Load())
		r.Bytes = st.bytes.Load()
		if st.profiles != nil {
			pr := *st.profiles
			r.Profiles = &pr
		}
		if err == nil {
			if status == StatusSkipped {
				r.Reason = "the destination already holds the conversion of " + src
			}
			break
		}
		var qe *quarantinedError
		if errors.As(err, &qe) {
			// Known bad and unchanged: not tried (only manifests read).
			r.Status, r.Reason, r.Attempts = StatusQuarantined, qe.f.describe(), 0
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
	return r
}

// sourceRepo returns the repository of a job's source, nil when it is not
// a registry repository.
func (m *Mirror) sourceRepo(j Job) *name.Repository {
	ref, err := m.client.ParseRef(j.Source)
	if err != nil || ref.IsLayout() {
		return nil
	}
	repo := ref.Registry.Context()
	return &repo
}

func (m *Mirror) attempt(ctx context.Context, j Job, st *imageStats, q *imageFailures) (status, srcDigest, digest string, err error) {
	list, err := m.prefetchList(j)
	if err != nil {
		return "", "", "", err
	}
	f, _ := convert.ParseFormat(m.cfg.Format)
	req := job.Request{
		Source: j.Source, Destination: j.Destination, Client: m.client,
		Format: f, Level: m.cfg.Level, ChunkSize: m.cfg.ChunkSize,
		Platforms: j.src.platforms, AnyImagePlatform: true,
		Prefetch: list, Layer: m.layerFunc(st),
	}
	if !m.o.force {
		req.UpToDate = m.upToDate
		if m.quarantineEnabled() {
			req.UpToDate = m.upToDateOrQuarantined(j, q)
		}
	}
	var pp *profilePlan
	if m.profilesEnabled() {
		pp = &profilePlan{static: list}
		req.Prefetch = pp
		ll := st.sess.lists
		if ll == nil {
			ll = m.planLayerLists(ctx, []Job{j})
		}
		req.UpToDate = m.withProfiles(j, pp, ll, req.UpToDate)
		st.profiles = &pp.rep
	}
	rep, err := job.Run(ctx, req)
	switch {
	case err != nil:
		return "", rep.SourceDigest, "", err
	case rep.UpToDate:
		return StatusSkipped, rep.SourceDigest, rep.Digest, nil
	}
	if pp != nil && pp.shared != nil {
		// The merged runs of its layers, carried forward, and the lists
		// the conversion was made with, which the next run compares with
		// the layers' shared lists.
		layers := pp.shared.layers()
		carry, folded := pp.shared.ll.carry(layers)
		used := profileOf(layers, func(src string) []prefetch.File { return pp.shared.ll.list(src).files })
		if len(carry.Layers) == 0 {
			carry = nil
		}
		if carry != nil || len(used.Layers) > 0 {
			d, err := m.publishMerged(ctx, j.Destination, rep.Digest, carry, folded, used)
			if err != nil {
				log.G(ctx).WithError(err).Warn("publishing the merged prefetch profile failed; the next run converts again")
				pp.rep.Reason += "; publishing the merged profile failed: " + err.Error()
			}
			pp.rep.Published = d
		}
	} else if pp != nil && pp.carry != nil && len(pp.carry.Layers) > 0 {
		// The next run reads it as the conversion's profile and carries
		// the builders' runs forward to it.
		d, err := m.publishMerged(ctx, j.Destination, rep.Digest, pp.carry, pp.folded, nil)
		if err != nil {
			log.G(ctx).WithError(err).Warn("publishing the merged prefetch profile failed; the next run converts again")
			pp.rep.Reason += "; publishing the merged profile failed: " + err.Error()
		}
		pp.rep.Published = d
	}
	return StatusConverted, rep.SourceDigest, rep.Digest, nil
}

// upToDate reads the destination manifest once and tells whether it is the
// conversion of src with this mirror's format.
func (m *Mirror) upToDate(ctx context.Context, dest imageio.Ref, src *imageio.Source) (string, bool, error) {
	if r, ok := ctx.Value(destReadKey{}).(*destRead); ok && r.ref.String() == dest.String() {
		// withProfiles read it already.
		if r.err != nil {
			if errors.Is(r.err, imageio.ErrNotFound) {
				return "", false, nil
			}
			return "", false, r.err
		}
		var man struct {
			Annotations map[string]string `json:"annotations"`
		}
		if err := json.Unmarshal(r.body, &man); err != nil {
			return "", false, fmt.Errorf("manifest %s of %s: %w", r.desc.Digest, dest, err)
		}
		ann := man.Annotations
		ok := ann[convert.AnnotationSourceManifest] == src.Descriptor.Digest.String() && ann[convert.AnnotationFormat] == m.format
		return r.desc.Digest.String(), ok, nil
	}
	d, err := m.client.Open(ctx, dest)
	if err != nil {
		if errors.Is(err, imageio.ErrNotFound) {
			return "", false, nil
		}
		return "", false, err
	}
	var ann map[string]string
	if d.Index != nil {
		im, err := d.Index.IndexManifest()
		if err != nil {
			return "", false, err
		}
		ann = im.Annotations
	} else {
		man, err := d.Image.Manifest()
		if err != nil {
			return "", false, err
		}
		ann = man.Annotations
	}
	ok := ann[convert.AnnotationSourceManifest] == src.Descriptor.Digest.String() && ann[convert.AnnotationFormat] == m.format
	return d.Descriptor.Digest.String(), ok, nil
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
	p, mine, err := m.join(ctx, key, func(fctx context.Context) (*produced, error) {
		l, err := m.detach(fctx, st.repo, src, desc)
		if err != nil {
			return nil, err
		}
		p, err := m.produce(fctx, sess, key, l, desc, diffID, files, st)
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
	if m.claimsEnabled() {
		l, release, err := m.claimLayer(ctx, key, desc.Digest, fp)
		if err != nil {
			return nil, err
		}
		if l != nil {
			m.fromRecords.Add(1)
			st.fromRecords.Add(1)
			return &produced{l: l}, nil
		}
		// Released once the record is written (or the conversion
		// failed), so a waiting process takes the record or over.
		defer release()
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

// prefetchList loads the prefetch list or profile of a job's repository
// and tag, if the prefetch directory has one; the convert job binds it to
// the source image (a profile recorded for another image, say an older
// tag, is ignored with a warning).
func (m *Mirror) prefetchList(j Job) (prefetch.Source, error) {
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
		return l, nil
	}
	return nil, nil
}

// sweep removes, once per Mirror, what killed runs left in temp_dir: the
// converters' temporary directories (converted layers, spooled tars) that
// no live process holds.
func (m *Mirror) sweep(ctx context.Context) {
	m.sweepOnce.Do(func() {
		removed, err := convert.SweepTempDir(ctx, m.cfg.TempDir)
		if err != nil {
			log.G(ctx).WithError(err).Warn("sweeping leftovers of earlier runs")
		}
		if len(removed) > 0 {
			log.G(ctx).WithField("removed", len(removed)).Info("removed temporary files of killed runs")
		}
		m.swept.Add(int64(len(removed)))
	})
}

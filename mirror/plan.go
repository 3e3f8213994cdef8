package mirror

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
)

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
// registries first. The tag must pass the source's globs and regex;
// newest N needs the repository's tags and is applied when the job runs
// (MirrorImage, see newestOK). A repository or tag outside the reference grammar
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

// newestOK reports whether a job's tag is among the newest N tags of its
// source as a scheduled run selects them (the repository's current tags,
// the source's filters and order), so a pushed image passes the same
// filters as a planned one. Sources without newest take every matching
// tag without a request.
func (m *Mirror) newestOK(ctx context.Context, j Job) (bool, error) {
	s := j.src
	if s == nil || s.Newest == 0 {
		return true, nil
	}
	ref, err := m.client.ParseRef(s.Repository)
	if err != nil || ref.IsLayout() {
		return false, fmt.Errorf("source %s: not a registry repository: %v", s.Repository, err)
	}
	repo := ref.Registry.Context()
	tags, err := remote.List(repo, m.remoteOptions(ctx)...)
	if err != nil {
		return false, fmt.Errorf("source %s: listing tags: %w", s.Repository, err)
	}
	if m.writesIntoSource() {
		tags = dropSuffixed(tags, m.cfg.TagSuffix)
	}
	selected, err := s.SelectTags(tags, func(tag string) (time.Time, error) { return m.created(ctx, repo.Tag(tag).String()) })
	if err != nil {
		return false, fmt.Errorf("source %s: %w", s.Repository, err)
	}
	for _, t := range selected {
		if t == j.Tag {
			return true, nil
		}
	}
	return false, nil
}

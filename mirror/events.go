package mirror

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strings"

	"github.com/distribution/reference"
)

// Media types of registry notifications.
const (
	// MediaTypeDistributionEvents is distribution's notification envelope.
	MediaTypeDistributionEvents = "application/vnd.docker.distribution.events.v1+json"
)

// PushEvent is one pushed image named by a registry notification.
type PushEvent struct {
	// Host is the registry's host[:port] as the notification names it
	// (empty when it does not).
	Host string
	// Repository is the repository path without the registry.
	Repository string
	// Tag is the pushed tag (empty for pushes by digest).
	Tag string
	// Digest is the pushed manifest's digest, when given.
	Digest string
}

// distribution's envelope: {"events": [{"action": "push", "target": {...},
// "request": {"host": ...}}]}.
type distEnvelope struct {
	Events []struct {
		Action string `json:"action"`
		Target struct {
			MediaType  string `json:"mediaType"`
			Digest     string `json:"digest"`
			Repository string `json:"repository"`
			URL        string `json:"url"`
			Tag        string `json:"tag"`
		} `json:"target"`
		Request struct {
			Host string `json:"host"`
		} `json:"request"`
	} `json:"events"`
}

// Harbor's webhook payload: {"type": "PUSH_ARTIFACT", "event_data":
// {"resources": [{"digest", "tag", "resource_url"}], "repository":
// {"name", "namespace", "repo_full_name"}}}.
type harborPayload struct {
	Type      string `json:"type"`
	EventData struct {
		Resources []struct {
			Digest      string `json:"digest"`
			Tag         string `json:"tag"`
			ResourceURL string `json:"resource_url"`
		} `json:"resources"`
		Repository struct {
			Name         string `json:"name"`
			Namespace    string `json:"namespace"`
			RepoFullName string `json:"repo_full_name"`
		} `json:"repository"`
	} `json:"event_data"`
}

// ErrNotNotification is returned for bodies that are neither a distribution
// envelope nor a Harbor payload.
var ErrNotNotification = errors.New("neither a distribution notification envelope nor a Harbor webhook payload")

// ParseEvents reads a notification body: distribution's envelope (any
// content type; it is recognized by its "events" array) or Harbor's webhook
// payload (by its "type" and "event_data"). It returns the manifest pushes
// it names; other actions (pulls, deletes, blob pushes, scans) are left out.
func ParseEvents(body []byte) ([]PushEvent, error) {
	var probe map[string]json.RawMessage
	if err := json.Unmarshal(body, &probe); err != nil {
		return nil, fmt.Errorf("decoding notification: %w", jsonError(err))
	}
	switch {
	case probe["events"] != nil:
		var env distEnvelope
		if err := json.Unmarshal(body, &env); err != nil {
			return nil, fmt.Errorf("decoding distribution envelope: %w", jsonError(err))
		}
		var out []PushEvent
		for _, e := range env.Events {
			if e.Action != "push" || e.Target.Repository == "" || !isManifestType(e.Target.MediaType) {
				continue
			}
			host := e.Request.Host
			if host == "" {
				host = urlHost(e.Target.URL)
			}
			out = append(out, PushEvent{Host: host, Repository: e.Target.Repository, Tag: e.Target.Tag, Digest: e.Target.Digest})
		}
		return out, nil
	case probe["event_data"] != nil && probe["type"] != nil:
		var p harborPayload
		if err := json.Unmarshal(body, &p); err != nil {
			return nil, fmt.Errorf("decoding Harbor payload: %w", jsonError(err))
		}
		if p.Type != "PUSH_ARTIFACT" && p.Type != "pushImage" {
			return nil, nil
		}
		repo := p.EventData.Repository.RepoFullName
		if repo == "" && p.EventData.Repository.Name != "" {
			repo = p.EventData.Repository.Name
			if ns := p.EventData.Repository.Namespace; ns != "" {
				repo = ns + "/" + repo
			}
		}
		var out []PushEvent
		for _, r := range p.EventData.Resources {
			host, rrepo := "", repo
			if r.ResourceURL != "" {
				// "harbor.example.com/library/nginx:latest" or "...@sha256:..."
				u := r.ResourceURL
				if i := strings.IndexByte(u, '@'); i >= 0 {
					u = u[:i]
				}
				if i := strings.LastIndexByte(u, ':'); i > strings.LastIndexByte(u, '/') {
					u = u[:i]
				}
				if h, p, ok := strings.Cut(u, "/"); ok && strings.ContainsAny(h, ".:") {
					host = h
					if rrepo == "" {
						rrepo = p
					}
				}
			}
			if rrepo == "" {
				continue
			}
			out = append(out, PushEvent{Host: host, Repository: rrepo, Tag: r.Tag, Digest: r.Digest})
		}
		return out, nil
	}
	return nil, ErrNotNotification
}

func isManifestType(mt string) bool {
	switch mt {
	case "", "application/vnd.docker.distribution.manifest.v2+json",
		"application/vnd.docker.distribution.manifest.list.v2+json",
		"application/vnd.oci.image.manifest.v1+json",
		"application/vnd.oci.image.index.v1+json":
		return true
	}
	return false
}

func urlHost(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return ""
	}
	return u.Host
}

// jsonError rewrites encoding/json's errors in JSON's terms: a field of
// the wrong kind is named by its JSON path and the JSON kinds, not by Go
// types.
func jsonError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if field == "" {
			field = "the document"
		}
		return fmt.Errorf("%s: want %s, got %s", field, jsonKind(te.Type), te.Value)
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Errorf("malformed JSON at byte %d: %s", se.Offset, strings.TrimPrefix(se.Error(), "json: "))
	}
	return errors.New(strings.TrimPrefix(err.Error(), "json: "))
}

func jsonKind(t reflect.Type) string {
	if t == nil {
		return "another kind"
	}
	switch t.Kind() {
	case reflect.Slice, reflect.Array:
		return "an array"
	case reflect.Struct, reflect.Map:
		return "an object"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "a boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64,
		reflect.Float32, reflect.Float64:
		return "a number"
	}
	return "another kind"
}

// Reasons a push event is not queued (the ignored_reasons of
// EventsResponse and the reason label of
// lazybase_mirror_events_ignored_total).
const (
	// ReasonUntagged: a push by digest, without a tag; the mirror follows
	// tags only.
	ReasonUntagged = "untagged"
	// ReasonInvalidTag: a tag outside the distribution grammar
	// [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
	ReasonInvalidTag = "invalid_tag"
	// ReasonInvalidRepository: a repository path outside the reference
	// grammar (lowercase components separated by "/", no "." or ".."
	// components, at most 255 characters).
	ReasonInvalidRepository = "invalid_repository"
	// ReasonNoSource: no [[source]] matches the repository and tag.
	ReasonNoSource = "no_source"
)

// Check returns why a push event cannot name an image to mirror, or ""
// when it can: its repository must follow the reference grammar and its
// tag the tag grammar (distribution's reference package), checked before
// the event is matched against the sources' filters, so a value such as
// "1.9@sha256:..." never reaches a glob.
func (e PushEvent) Check() string {
	// A fixed domain makes the whole repository the reference's path.
	named, err := reference.WithName("lazybase.invalid/" + e.Repository)
	if err != nil || e.Repository == "" {
		return ReasonInvalidRepository
	}
	if e.Tag == "" {
		return ReasonUntagged
	}
	if _, err := reference.WithTag(named, e.Tag); err != nil {
		return ReasonInvalidTag
	}
	return ""
}

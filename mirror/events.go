package mirror

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
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
		return nil, fmt.Errorf("decoding notification: %w", err)
	}
	switch {
	case probe["events"] != nil:
		var env distEnvelope
		if err := json.Unmarshal(body, &env); err != nil {
			return nil, fmt.Errorf("decoding distribution envelope: %w", err)
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
			return nil, fmt.Errorf("decoding Harbor payload: %w", err)
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

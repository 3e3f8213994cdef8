package mirror

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/validate"

	"github.com/lazybase/lazybase/internal/eventually"
)

const distPush = `{"events":[{"id":"1","timestamp":"2026-01-01T00:00:00Z","action":"push",
 "target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","size":100,
  "digest":"sha256:aaaa","length":100,"repository":"library/debian",
  "url":"https://registry.example.com/v2/library/debian/manifests/sha256:aaaa","tag":"12"},
 "request":{"id":"r","addr":"10.0.0.1","host":"registry.example.com","method":"PUT","useragent":"docker"},
 "actor":{},"source":{"addr":"x","instanceID":"y"}},
 {"action":"pull","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"library/debian","tag":"12"}},
 {"action":"push","target":{"mediaType":"application/octet-stream","digest":"sha256:bbbb","repository":"library/debian"}}]}`

const harborPush = `{"type":"PUSH_ARTIFACT","occur_at":1700000000,"operator":"admin",
 "event_data":{"resources":[{"digest":"sha256:cccc","tag":"1.25","resource_url":"harbor.example.com:8443/library/nginx:1.25"}],
 "repository":{"date_created":1,"name":"nginx","namespace":"library","repo_full_name":"library/nginx","repo_type":"private"}}}`

func TestParseEventsDistributionAndHarbor(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		want       []PushEvent
		err        bool
	}{
		{"distribution", distPush, []PushEvent{{Host: "registry.example.com", Repository: "library/debian", Tag: "12", Digest: "sha256:aaaa"}}, false},
		{"distribution host from url", `{"events":[{"action":"push","target":{"repository":"a/b","tag":"t","url":"http://127.0.0.1:5000/v2/a/b/manifests/t"}}]}`,
			[]PushEvent{{Host: "127.0.0.1:5000", Repository: "a/b", Tag: "t"}}, false},
		{"distribution by digest", `{"events":[{"action":"push","target":{"repository":"a/b","digest":"sha256:dd"}}]}`,
			[]PushEvent{{Repository: "a/b", Digest: "sha256:dd"}}, false},
		{"distribution empty", `{"events":[]}`, nil, false},
		{"harbor", harborPush, []PushEvent{{Host: "harbor.example.com:8443", Repository: "library/nginx", Tag: "1.25", Digest: "sha256:cccc"}}, false},
		{"harbor without repo_full_name", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"x","resource_url":"h.example.com/p/r@sha256:ee"}],"repository":{"name":"r","namespace":"p"}}}`,
			[]PushEvent{{Host: "h.example.com", Repository: "p/r", Tag: "x"}}, false},
		{"harbor resource url only", `{"type":"PUSH_ARTIFACT","event_data":{"resources":[{"tag":"x","resource_url":"h.example.com/p/r:x"}]}}`,
			[]PushEvent{{Host: "h.example.com", Repository: "p/r", Tag: "x"}}, false},
		{"harbor delete", `{"type":"DELETE_ARTIFACT","event_data":{"resources":[{"tag":"x"}],"repository":{"repo_full_name":"p/r"}}}`, nil, false},
		{"not json", `nope`, nil, true},
		{"other json", `{"hello":"world"}`, nil, true},
		{"wrong shape", `{"events":{"a":1}}`, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseEvents([]byte(tc.body))
			if (err != nil) != tc.err {
				t.Fatalf("err = %v, want error %v", err, tc.err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// FuzzParseEvents feeds notification bodies to the parser and the event
// checks: no panic, no event without a repository, error messages free of
// Go type names, and every event that passes Check has a tag in the
// distribution grammar and a repository without "", "." or ".."
// components. Seeds: testdata/fuzz/FuzzParseEvents (distribution
// envelopes, Harbor payloads, junk).
func FuzzParseEvents(f *testing.F) {
	f.Add([]byte(distPush))
	f.Add([]byte(harborPush))
	tagRE := regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
	f.Fuzz(func(t *testing.T, body []byte) {
		evs, err := ParseEvents(body)
		if err != nil {
			if evs != nil {
				t.Fatal("events returned with an error")
			}
			for _, gone := range []string{"struct", "Go value", "mirror.", "[]"} {
				if strings.Contains(err.Error(), gone) {
					t.Fatalf("error %q shows %q", err, gone)
				}
			}
		}
		for _, e := range evs {
			if e.Repository == "" {
				t.Fatalf("event without repository: %+v", e)
			}
			if e.Check() != "" {
				continue
			}
			if !tagRE.MatchString(e.Tag) {
				t.Fatalf("tag %q passed the check", e.Tag)
			}
			for _, c := range strings.Split(e.Repository, "/") {
				if c == "" || c == "." || c == ".." || strings.ToLower(c) != c {
					t.Fatalf("repository %q passed the check", e.Repository)
				}
			}
		}
	})
}

func TestServerConvertsPushedImage(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	m := newMirror(t, testConfig(t, src, dst, ""))
	s, err := NewServer(m, WithQueue(4, 4), WithWorkers(1), WithToken(testToken))
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()

	post := func(body string) (int, string) {
		req, _ := http.NewRequest(http.MethodPost, hs.URL+"/events", strings.NewReader(body))
		req.Header.Set("Content-Type", MediaTypeDistributionEvents)
		req.Header.Set("Authorization", "Bearer "+string(testToken))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	ev := fmt.Sprintf(`{"events":[{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"lib/a","tag":"1.3"},"request":{"host":%q}}]}`, src.host)
	// Queued twice before the workers run: the second is deduplicated.
	if code, body := post(ev); code != http.StatusAccepted || !strings.Contains(body, `"queued"`) {
		t.Fatalf("%d %s", code, body)
	}
	if code, body := post(ev); code != http.StatusAccepted || !strings.Contains(body, `"deduplicated"`) {
		t.Fatalf("%d %s", code, body)
	}
	// A repository that is no source is ignored.
	if code, body := post(`{"events":[{"action":"push","target":{"repository":"other/x","tag":"1"}}]}`); code != http.StatusAccepted || !strings.Contains(body, `"ignored":1`) {
		t.Fatalf("%d %s", code, body)
	}
	if code, _ := post(`garbage`); code != http.StatusBadRequest {
		t.Fatalf("garbage: %d", code)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.Run(ctx); close(done) }()
	eventually.Require(t, 20*time.Second, "the pushed image is converted", func() error {
		if metrics := get(t, hs.URL+"/metrics"); !strings.Contains(metrics, `lazybase_mirror_images_total{status="converted"} 1`) {
			return fmt.Errorf("metrics:\n%s", metrics)
		}
		return nil
	})
	if metrics := get(t, hs.URL+"/metrics"); !strings.Contains(metrics, `lazybase_mirror_events_total{result="deduplicated"} 1`) ||
		!strings.Contains(metrics, `lazybase_mirror_events_total{result="ignored"} 1`) {
		t.Errorf("metrics:\n%s", metrics)
	}
	cancel()
	<-done
	if got := get(t, hs.URL+"/healthz"); got != "ok\n" {
		t.Errorf("healthz %q", got)
	}
	dref, _ := name.ParseReference(dst.host + "/mirror/lib/a:1.3")
	out, err := remote.Image(dref)
	if err != nil {
		t.Fatal(err)
	}
	if err := validate.Image(out); err != nil {
		t.Error(err)
	}
}

func get(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func TestFuzzParseEventsSeedCorpusPresent(t *testing.T) {
	ents, err := os.ReadDir(filepath.Join("testdata", "fuzz", "FuzzParseEvents"))
	if err != nil || len(ents) == 0 {
		t.Fatalf("seed corpus missing: %v", err)
	}
}

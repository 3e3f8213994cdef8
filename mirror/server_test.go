package mirror

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/lazybase/lazybase/internal/eventually"
)

// pushEvents is a distribution envelope naming one push per "repo:tag"
// (or "repo@digest" for a push by digest).
func pushEvents(refs ...string) string {
	var evs []string
	for _, r := range refs {
		target := ""
		if repo, dgst, ok := strings.Cut(r, "@"); ok && !strings.Contains(repo, ":") {
			target = fmt.Sprintf(`"repository":%q,"digest":%q`, repo, dgst)
		} else {
			repo, tag, _ := strings.Cut(r, ":")
			target = fmt.Sprintf(`"repository":%q,"tag":%q`, repo, tag)
		}
		evs = append(evs, `{"action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json",`+target+`}}`)
	}
	return `{"events":[` + strings.Join(evs, ",") + `]}`
}

type reply struct {
	code   int
	header http.Header
	body   string
}

func postEvents(t *testing.T, url, body string, header map[string]string) reply {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, url+"/events", strings.NewReader(body))
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return reply{resp.StatusCode, resp.Header, string(b)}
}

func newTestServer(t *testing.T, m *Mirror, opts ...ServerOption) (*Server, *httptest.Server) {
	t.Helper()
	s, err := NewServer(m, opts...)
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(s.Handler())
	t.Cleanup(hs.Close)
	return s, hs
}

func TestNewServerNeedsAuthChoice(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, ""))
	for _, tc := range []struct {
		name string
		opts []ServerOption
	}{
		{"none", nil},
		{"both", []ServerOption{WithToken(testToken), WithoutAuth()}},
		{"short token", []ServerOption{WithToken([]byte("short"))}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := NewServer(m, tc.opts...); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestServeOptionsReadTokenWithoutShowingIt(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "token")
	os.WriteFile(file, []byte("file-token-0123456789abcdef\n"), 0o600)
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("tiny-secret\n"), 0o600)
	t.Setenv("LB_SERVE_TEST_TOKEN", "env-token-0123456789abcdef")
	t.Setenv("LB_SERVE_TEST_SHORT", "tiny-secret")
	for _, tc := range []struct {
		name, doc, err string
	}{
		{"file", fmt.Sprintf("token_file = %q", file), ""},
		{"env", `token_env = "LB_SERVE_TEST_TOKEN"`, ""},
		{"no_auth", `no_auth = true`, ""},
		{"missing", ``, "serve.token_file or serve.token_env"},
		{"short env", `token_env = "LB_SERVE_TEST_SHORT"`, "want at least 16"},
		{"missing file", fmt.Sprintf("token_file = %q", filepath.Join(dir, "nope")), "reading the serve token"},
		{"short file", fmt.Sprintf("token_file = %q", short), "want at least 16"},
		{"unset env", `token_env = "LB_SERVE_TEST_UNSET"`, "environment variable LB_SERVE_TEST_UNSET"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := ParseConfig([]byte("destination = \"r.example.com/m\"\n[[source]]\nrepository = \"r.example.com/a\"\n[serve]\n" + tc.doc + "\n"))
			if err != nil {
				t.Fatal(err)
			}
			_, err = ServeOptions(&c.Serve)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("err = %v, want %q", err, tc.err)
			}
			if err != nil && strings.Contains(err.Error(), "tiny-secret") {
				t.Fatalf("the error shows the secret: %v", err)
			}
		})
	}
}

func TestServeConfigErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct{ doc, err string }{
		{"[serve]\ntoken_file = \"a\"\ntoken_env = \"B\"\n", "serve.token_file, serve.token_env"},
		{"[serve]\nno_auth = true\ntoken_env = \"B\"\n", "serve.no_auth"},
		{"[serve]\nmax_events = -1\n", "serve.max_events"},
		{"[serve]\nqueue_per_repository = -2\n", "serve.queue_per_repository"},
		{"[serve]\ngrace_period = \"30\"\n", "serve.grace_period"},
		{"[serve]\ntokenfile = \"x\"\n", "serve.tokenfile"},
		{"record_key_file = \"a\"\nrecord_key_env = \"B\"\n", "record_key_file, record_key_env"},
	} {
		doc := "destination = \"r.example.com/m\"\n"
		if strings.HasPrefix(tc.doc, "record") {
			doc += tc.doc + "[[source]]\nrepository = \"r.example.com/a\"\n"
		} else {
			doc += "[[source]]\nrepository = \"r.example.com/a\"\n" + tc.doc
		}
		if _, err := ParseConfig([]byte(doc)); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("%q: err = %v, want %q", tc.doc, err, tc.err)
		}
	}
	c, err := ParseConfig([]byte("destination = \"r.example.com/m\"\n[[source]]\nrepository = \"r.example.com/a\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Serve.MaxEvents != DefaultMaxEvents || c.Serve.Queue != DefaultQueue || c.Serve.QueuePerRepository != DefaultQueuePerRepository || c.Serve.Grace() != DefaultGracePeriod {
		t.Errorf("defaults %+v", c.Serve)
	}
}

// TestServerEventsNeedSecretHealthzAndMetricsOpen: POST /events needs the
// shared secret, as a bearer token, verbatim (Harbor's auth header) or as
// an HMAC of the body; /healthz and /metrics are open.
func TestServerEventsNeedSecretHealthzAndMetricsOpen(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, ""))
	_, hs := newTestServer(t, m, WithToken(testToken))
	body := pushEvents("lib/a:1.0")
	for _, tc := range []struct {
		name   string
		header map[string]string
		body   string
		want   int
	}{
		{"no header", nil, body, http.StatusUnauthorized},
		{"wrong bearer", map[string]string{"Authorization": "Bearer wrong-token-0123456789abcdef"}, body, http.StatusUnauthorized},
		{"bearer prefix of the token", map[string]string{"Authorization": "Bearer " + string(testToken[:20])}, body, http.StatusUnauthorized},
		{"basic", map[string]string{"Authorization": "Basic " + string(testToken)}, body, http.StatusUnauthorized},
		{"empty bearer", map[string]string{"Authorization": "Bearer "}, body, http.StatusUnauthorized},
		{"bearer", map[string]string{"Authorization": "Bearer " + string(testToken)}, body, http.StatusAccepted},
		{"bearer lowercase scheme", map[string]string{"Authorization": "bearer " + string(testToken)}, body, http.StatusAccepted},
		{"verbatim (Harbor auth header)", map[string]string{"Authorization": string(testToken)}, body, http.StatusAccepted},
		{"signature", map[string]string{SignatureHeader: Sign(testToken, []byte(body))}, body, http.StatusAccepted},
		{"signature of another body", map[string]string{SignatureHeader: Sign(testToken, []byte(body+" "))}, body, http.StatusUnauthorized},
		{"signature under another key", map[string]string{SignatureHeader: Sign([]byte("another-key-0123456789abcdef"), []byte(body))}, body, http.StatusUnauthorized},
		{"signature without prefix", map[string]string{SignatureHeader: strings.TrimPrefix(Sign(testToken, []byte(body)), "sha256=")}, body, http.StatusUnauthorized},
		{"signature not hex", map[string]string{SignatureHeader: "sha256=zz"}, body, http.StatusUnauthorized},
		{"unauthenticated garbage", nil, "garbage", http.StatusUnauthorized},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := postEvents(t, hs.URL, tc.body, tc.header)
			if r.code != tc.want {
				t.Fatalf("%d %s, want %d", r.code, r.body, tc.want)
			}
			if r.header.Get("Content-Type") != "application/json" || !json.Valid([]byte(r.body)) {
				t.Errorf("not a JSON answer: %q %s", r.header.Get("Content-Type"), r.body)
			}
			if r.code == http.StatusUnauthorized {
				var e ErrorResponse
				if json.Unmarshal([]byte(r.body), &e); !strings.Contains(e.Error, "authentication required") || r.header.Get("WWW-Authenticate") == "" {
					t.Errorf("401 body %s, WWW-Authenticate %q", r.body, r.header.Get("WWW-Authenticate"))
				}
				if strings.Contains(r.body, string(testToken)) {
					t.Error("the answer shows the token")
				}
			}
		})
	}
	if got := get(t, hs.URL+"/healthz"); got != "ok\n" {
		t.Errorf("healthz %q", got)
	}
	metrics := get(t, hs.URL+"/metrics")
	if !strings.Contains(metrics, "lazybase_mirror_unauthorized_requests_total 10") {
		t.Errorf("unauthorized requests not counted:\n%s", metrics)
	}
}

// TestServerChecksGrammarAndCountsIgnoredEvents: repositories and tags are
// checked against the reference grammar before the sources' filters see
// them; untagged pushes are ignored; every ignored event is counted by
// reason.
func TestServerChecksGrammarAndCountsIgnoredEvents(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, "")) // lib/a: any tag; lib/b: tags 1.*
	long := strings.Repeat("x", 129)
	for _, tc := range []struct {
		name   string
		refs   []string
		queued int
		reason string
	}{
		{"valid", []string{"lib/b:1.9"}, 1, ""},
		{"tag with a digest", []string{"lib/b:1.9@sha256:" + strings.Repeat("a", 64)}, 0, ReasonInvalidTag},
		{"tag with a slash", []string{"lib/a:1.9/x"}, 0, ReasonInvalidTag},
		{"tag starting with a dot", []string{"lib/a:.hidden"}, 0, ReasonInvalidTag},
		{"tag starting with a dash", []string{"lib/a:-x"}, 0, ReasonInvalidTag},
		{"tag too long", []string{"lib/a:" + long}, 0, ReasonInvalidTag},
		{"tag of 128 characters", []string{"lib/a:" + long[:128]}, 1, ""},
		{"tag with a space", []string{"lib/a:1 0"}, 0, ReasonInvalidTag},
		{"dot-dot component", []string{"lib/../lib/a:1.0"}, 0, ReasonInvalidRepository},
		{"dot component", []string{"./lib/a:1.0"}, 0, ReasonInvalidRepository},
		{"empty component", []string{"lib//a:1.0"}, 0, ReasonInvalidRepository},
		{"uppercase", []string{"LIB/A:1.0"}, 0, ReasonInvalidRepository},
		{"trailing slash", []string{"lib/a/:1.0"}, 0, ReasonInvalidRepository},
		{"untagged", []string{"lib/a@sha256:" + strings.Repeat("b", 64)}, 0, ReasonUntagged},
		{"no source", []string{"other/x:1.0"}, 0, ReasonNoSource},
		{"filtered out", []string{"lib/b:2.0"}, 0, ReasonNoSource},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, hs := newTestServer(t, m, WithoutAuth())
			r := postEvents(t, hs.URL, pushEvents(tc.refs...), nil)
			if r.code != http.StatusAccepted {
				t.Fatalf("%d %s", r.code, r.body)
			}
			var resp EventsResponse
			if err := json.Unmarshal([]byte(r.body), &resp); err != nil {
				t.Fatal(err)
			}
			if len(resp.Queued) != tc.queued || s.q.len() != tc.queued {
				t.Errorf("queued %v (queue length %d), want %d", resp.Queued, s.q.len(), tc.queued)
			}
			if tc.reason != "" && (resp.Ignored != 1 || resp.IgnoredReasons[tc.reason] != 1) {
				t.Errorf("ignored %d %v, want 1 %s", resp.Ignored, resp.IgnoredReasons, tc.reason)
			}
			if tc.reason != "" && !strings.Contains(get(t, hs.URL+"/metrics"), fmt.Sprintf(`lazybase_mirror_events_ignored_total{reason=%q} 1`, tc.reason)) {
				t.Errorf("reason %s not counted", tc.reason)
			}
		})
	}
}

// TestServerRefusalsHaveJSONBodiesWithoutGoTerms: refused requests get a
// JSON body whose message speaks JSON, not Go.
func TestServerRefusalsHaveJSONBodiesWithoutGoTerms(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, ""))
	_, hs := newTestServer(t, m, WithoutAuth(), WithMaxEvents(3))
	for _, tc := range []struct {
		name, body string
		code       int
		want       string
	}{
		{"not JSON", "garbage", http.StatusBadRequest, "malformed JSON"},
		{"truncated", `{"events":[`, http.StatusBadRequest, "unexpected end of JSON input"},
		{"events not an array", `{"events":{"a":1}}`, http.StatusBadRequest, "events: want an array, got object"},
		{"action not a string", `{"events":[{"action":1}]}`, http.StatusBadRequest, "events.action: want a string, got number"},
		{"target not an object", `{"events":[{"action":"push","target":[1]}]}`, http.StatusBadRequest, "events.target: want an object, got array"},
		{"harbor resources not an array", `{"type":"PUSH_ARTIFACT","event_data":{"resources":"x"}}`, http.StatusBadRequest, "event_data.resources: want an array, got string"},
		{"array", `[1,2]`, http.StatusBadRequest, "the document: want an object, got array"},
		{"other JSON", `{"hello":"world"}`, http.StatusUnprocessableEntity, "neither a distribution"},
		{"too many events", pushEvents("lib/a:1", "lib/a:2", "lib/a:3", "lib/a:4"), http.StatusRequestEntityTooLarge, "4 push events in one request; at most 3"},
		{"body too large", `{"events":[` + strings.Repeat(" ", MaxEventBody) + `]}`, http.StatusRequestEntityTooLarge, "body larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := postEvents(t, hs.URL, tc.body, nil)
			if r.code != tc.code {
				t.Fatalf("%d %s, want %d", r.code, r.body, tc.code)
			}
			var e ErrorResponse
			if err := json.Unmarshal([]byte(r.body), &e); err != nil || r.header.Get("Content-Type") != "application/json" {
				t.Fatalf("not a JSON body: %v %s", err, r.body)
			}
			if !strings.Contains(e.Error, tc.want) {
				t.Errorf("error %q, want %q", e.Error, tc.want)
			}
			for _, gone := range []string{"struct", "mirror.", "Go value", "[]", "json:", "string;"} {
				if strings.Contains(e.Error, gone) {
					t.Errorf("error %q shows %q", e.Error, gone)
				}
			}
		})
	}
}

// TestServerQueueIsFairAndBounded: a flood of pushes to one repository
// fills that repository's share only; another repository's push is still
// queued, and the repositories take turns; past the global bound pushes
// are answered 503, and a job already waiting is not queued twice.
func TestServerQueueIsFairAndBounded(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, ""))
	s, hs := newTestServer(t, m, WithoutAuth(), WithQueue(6, 3))
	var flood []string
	for i := range 100 {
		flood = append(flood, fmt.Sprintf("lib/a:1.%d", i))
	}
	r := postEvents(t, hs.URL, pushEvents(flood...), nil)
	if r.code != http.StatusTooManyRequests || r.header.Get("Retry-After") == "" {
		t.Fatalf("flood: %d %s", r.code, r.body)
	}
	var resp EventsResponse
	json.Unmarshal([]byte(r.body), &resp)
	if len(resp.Queued) != 3 || len(resp.Rejected) != 97 || !strings.Contains(resp.Error, "too many jobs waiting for the repository") {
		t.Fatalf("flood: %d queued, %d rejected, error %q", len(resp.Queued), len(resp.Rejected), resp.Error)
	}
	// A second flood from the same repository changes nothing.
	if r := postEvents(t, hs.URL, pushEvents(flood[50:]...), nil); r.code != http.StatusTooManyRequests {
		t.Fatalf("second flood: %d %s", r.code, r.body)
	}
	// A real push to another repository is queued.
	if r := postEvents(t, hs.URL, pushEvents("lib/b:1.0"), nil); r.code != http.StatusAccepted || !strings.Contains(r.body, `"queued"`) {
		t.Fatalf("other repository: %d %s", r.code, r.body)
	}
	// The repositories take turns: lib/b's job is second, not fourth.
	ctx := context.Background()
	var order []string
	for range 4 {
		j, ok := s.q.pop(ctx)
		if !ok {
			t.Fatal("queue empty")
		}
		order = append(order, j.Source)
	}
	if !strings.HasSuffix(order[1], "/lib/b:1.0") || !strings.HasSuffix(order[0], "/lib/a:1.0") || !strings.HasSuffix(order[2], "/lib/a:1.1") {
		t.Errorf("order %v", order)
	}
	// The global bound answers 503.
	s2, hs2 := newTestServer(t, m, WithoutAuth(), WithQueue(2, 2))
	if r := postEvents(t, hs2.URL, pushEvents("lib/a:1.0", "lib/b:1.0", "lib/b:1.1"), nil); r.code != http.StatusServiceUnavailable || !strings.Contains(r.body, "queue full") {
		t.Fatalf("global bound: %d %s", r.code, r.body)
	}
	if s2.q.len() != 2 {
		t.Errorf("queue length %d", s2.q.len())
	}
	// Enqueue, as the handler uses it: a job already waiting is not
	// queued twice, and a full queue refuses the others.
	a, _ := m.JobFor("", "lib/a", "1.0")
	b, _ := m.JobFor("", "lib/b", "1.1")
	if got := s2.Enqueue(a); got != "deduplicated" {
		t.Errorf("Enqueue(lib/a:1.0 again) = %q", got)
	}
	if got := s2.Enqueue(b); got != "queue full" {
		t.Errorf("Enqueue(lib/b:1.1) = %q", got)
	}
}

// gate blocks GETs of source manifests of lib/a until it is opened or the
// request's context ends.
type gate struct {
	inner   http.RoundTripper
	host    string
	open    chan struct{}
	entered chan struct{}
	once    sync.Once
}

func (g *gate) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Host == g.host && strings.Contains(r.URL.Path, "/lib/a/manifests/") {
		g.once.Do(func() { close(g.entered) })
		select {
		case <-g.open:
		case <-r.Context().Done():
			return nil, r.Context().Err()
		}
	}
	return g.inner.RoundTrip(r)
}

// serveOutcome is what a Serve goroutine returned.
type serveOutcome struct {
	res ServeResult
	err error
}

// startServe runs s.Serve on a loopback listener until the returned
// cancel is called; wait returns what Serve returned.
func startServe(t *testing.T, s *Server) (url string, cancel context.CancelFunc, wait func() serveOutcome) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	out := make(chan serveOutcome, 1)
	go func() {
		res, err := s.Serve(ctx, ln)
		out <- serveOutcome{res, err}
	}()
	wait = func() serveOutcome {
		t.Helper()
		select {
		case o := <-out:
			return o
		case <-time.After(60 * time.Second):
			t.Fatal("Serve did not return")
			return serveOutcome{}
		}
	}
	return "http://" + ln.Addr().String(), cancel, wait
}

func sources(jobs []Job) string {
	var names []string
	for _, j := range jobs {
		names = append(names, j.Source)
	}
	return strings.Join(names, " ")
}

// TestServeSavesJobsLeftAfterGraceAndRequeuesThemOnNextStart: when Serve's
// context ends with an image blocked on its source, the grace period runs
// out, and the image in progress and the queued jobs are interrupted and
// saved, after which the server refuses notifications; the next Serve
// queues them again, converts them and removes the state file.
func TestServeSavesJobsLeftAfterGraceAndRequeuesThemOnNextStart(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	imageSet(t, src, 16<<10)
	g := &gate{inner: http.DefaultTransport, host: src.host, open: make(chan struct{}), entered: make(chan struct{})}
	m := newMirror(t, testConfig(t, src, dst, ""), WithTransport(g))
	state := filepath.Join(t.TempDir(), "state.json")
	s, err := NewServer(m, WithToken(testToken), WithWorkers(1), WithStateFile(state), WithGracePeriod(50*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	url, stop, wait := startServe(t, s)
	auth := map[string]string{"Authorization": "Bearer " + string(testToken)}
	if r := postEvents(t, url, pushEvents("lib/a:1.0", "lib/b:1.1", "lib/b:1.2"), auth); r.code != http.StatusAccepted {
		t.Fatalf("%d %s", r.code, r.body)
	}
	<-g.entered // lib/a:1.0 is in progress, blocked on its source
	stop()
	out := wait()
	if out.err != nil {
		t.Fatal(out.err)
	}
	want := src.host + "/lib/a:1.0 " + src.host + "/lib/b:1.1 " + src.host + "/lib/b:1.2"
	if got := sources(out.res.Unfinished); got != want || !out.res.GraceExpired || !out.res.Saved || out.res.Requeued != 0 {
		t.Fatalf("result %+v (unfinished %s), want grace expired and saved: %s", out.res, got, want)
	}
	hs := httptest.NewServer(s.Handler())
	defer hs.Close()
	if r := postEvents(t, hs.URL, pushEvents("lib/b:1.3"), auth); r.code != http.StatusServiceUnavailable || !strings.Contains(r.body, "shutting down") {
		t.Fatalf("after Serve returned: %d %s", r.code, r.body)
	}

	// The next start.
	close(g.open)
	s2, err := NewServer(m, WithToken(testToken), WithWorkers(1), WithStateFile(state))
	if err != nil {
		t.Fatal(err)
	}
	_, stop, wait = startServe(t, s2)
	eventually.Require(t, 30*time.Second, "the saved jobs are mirrored", func() error {
		for _, ref := range []string{"lib/a:1.0", "lib/b:1.1", "lib/b:1.2"} {
			r, _ := name.ParseReference(dst.host + "/mirror/" + ref)
			if _, err := remote.Head(r); err != nil {
				return fmt.Errorf("%s: %w", ref, err)
			}
		}
		return nil
	})
	stop()
	out = wait()
	if out.err != nil || out.res.Requeued != 3 || out.res.GraceExpired || len(out.res.Unfinished) != 0 || out.res.Saved {
		t.Fatalf("second start: %+v %v, want 3 requeued and a complete drain", out.res, out.err)
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state file kept after a complete drain: %v", err)
	}
}

// TestServeRefusesNoAuthOffLoopback: without authentication the server
// serves on loopback only, whether it is given an address or a listener.
func TestServeRefusesNoAuthOffLoopback(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, ""))
	s, err := NewServer(m, WithoutAuth())
	if err != nil {
		t.Fatal(err)
	}
	for _, listen := range []string{":0", "0.0.0.0:0", "[::]:0"} {
		if _, err := s.ListenAndServe(context.Background(), listen); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
			t.Errorf("ListenAndServe(%q): err = %v", listen, err)
		}
	}
	ln, err := net.Listen("tcp", "0.0.0.0:0")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Serve(context.Background(), ln); err == nil || !strings.Contains(err.Error(), "not a loopback address") {
		t.Errorf("Serve on %s: err = %v", ln.Addr(), err)
	}
	if err := ln.Close(); err == nil {
		t.Error("Serve left the refused listener open")
	}
}

func TestLoadStateDropsUnknownSources(t *testing.T) {
	src, dst := newServer(t), newServer(t)
	m := newMirror(t, testConfig(t, src, dst, ""))
	state := filepath.Join(t.TempDir(), "state.json")
	doc := fmt.Sprintf(`{"version":1,"jobs":[{"source":"%s/lib/a:1.0","tag":"1.0"},{"source":"%s/lib/b:2.0","tag":"2.0"},{"source":"elsewhere.example.com/x:1","tag":"1"},{"source":"%s/lib/a:1.0@sha256:00","tag":"1.0@sha256:00"}]}`, src.host, src.host, src.host)
	os.WriteFile(state, []byte(doc), 0o600)
	s, err := NewServer(m, WithoutAuth(), WithStateFile(state))
	if err != nil {
		t.Fatal(err)
	}
	if n, err := s.LoadState(context.Background()); err != nil || n != 1 {
		t.Fatalf("loaded %d: %v, want 1", n, err)
	}
	os.WriteFile(state, []byte(`{"version":1,"jobs":{}}`), 0o600)
	if _, err := s.LoadState(context.Background()); err == nil || !strings.Contains(err.Error(), "jobs: want an array, got object") {
		t.Fatalf("err = %v", err)
	}
	// No state file is no error.
	s3, _ := NewServer(m, WithoutAuth(), WithStateFile(filepath.Join(t.TempDir(), "none.json")))
	if n, err := s3.LoadState(context.Background()); err != nil || n != 0 {
		t.Fatalf("%d %v", n, err)
	}
}

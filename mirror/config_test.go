package mirror

import (
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/imageio"
)

func TestParseConfigErrorsNameTheKey(t *testing.T) {
	for _, tc := range []struct{ doc, key string }{
		{"destination = 'r/m'\nbogus = 1\n[[source]]\nrepository = 'r/a'", "bogus"},
		{"destination = 'r/m'\n[[source]]\nrepository = 'r/a'\ntagz = ['x']", "source.tagz"},
		{"destination = 'r/m'\nformat = 'lz4'\n[[source]]\nrepository = 'r/a'", "format"},
		{"destination = 'r/m'\nlevel = 10\n[[source]]\nrepository = 'r/a'", "level"},
		{"destination = 'r/m'\nconcurrency = 'two'\n[[source]]\nrepository = 'r/a'", "concurrency"},
		{"destination = 'r/m'\nretry_initial = 'soon'\n[[source]]\nrepository = 'r/a'", "retry_initial"},
		{"destination = 'r/m'\nconnect_timeout = '30'\n[[source]]\nrepository = 'r/a'", "connect_timeout"},
		{"destination = 'r/m'\ntls_timeout = '-1s'\n[[source]]\nrepository = 'r/a'", "tls_timeout"},
		{"destination = 'r/m'\nresponse_timeout = '0s'\n[[source]]\nrepository = 'r/a'", "response_timeout"},
		{"destination = 'r/m'\nidle_timeout = 'never'\n[[source]]\nrepository = 'r/a'", "idle_timeout"},
		{"destination = 'r/m'\nplatforms = ['linux/???']\n[[source]]\nrepository = 'r/a'", "platforms"},
		{"destination = 'r/m'", "source"},
		{"tag_suffix = '-esgz'\n[[source]]\nrepository = 'r/a'", "records_repository"},
		{"[[source]]\nrepository = 'r/a'", "tag_suffix"},
		{"destination = 'r/m'\n[[source]]\nrepository = 'r/a'\ntag_regex = '('", "source[0].tag_regex"},
		{"destination = 'r/m'\n[[source]]\nrepository = 'r/a'\norder = 'age'", "source[0].order"},
		{"destination = 'r/m'\n[[source]]\ntags = ['x']", "source[0].repository"},
	} {
		_, err := ParseConfig([]byte(tc.doc))
		if err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%q: err = %v, want one naming %s", tc.doc, err, tc.key)
		}
	}
}

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte("destination = 'r.example.com/m/'\n[[source]]\nrepository = 'r/a'\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Destination != "r.example.com/m" || c.RecordsRepository != "r.example.com/m/lazybase-records" ||
		c.Format != "estargz" || c.Concurrency != DefaultConcurrency || *c.Retries != DefaultRetries ||
		c.ImageAttempts != DefaultImageAttempts || c.Sources[0].Order != OrderSemver {
		t.Errorf("defaults: %+v", c)
	}
	if got := c.Timeouts(); got != imageio.DefaultTimeouts() {
		t.Errorf("default timeouts %+v, want %+v", got, imageio.DefaultTimeouts())
	}
	c, err = ParseConfig([]byte("destination = 'r/m'\nidle_timeout = '2m'\nconnect_timeout = '5s'\n[[source]]\nrepository = 'r/a'\n"))
	if err != nil || c.Timeouts().Idle != 2*time.Minute || c.Timeouts().Connect != 5*time.Second || c.Timeouts().ResponseHeader != imageio.DefaultResponseTimeout {
		t.Errorf("timeouts %+v %v", c.Timeouts(), err)
	}
	c, err = ParseConfig([]byte("destination = 'r/m'\nformat = 'zstd:chunked'\nlevel = 19\nretries = 0\n[[source]]\nrepository = 'r/a'\n"))
	if err != nil || c.Format != "zstd-chunked" || *c.Retries != 0 {
		t.Errorf("%+v %v", c, err)
	}
}

func TestFormatAnnotationMatchesConvert(t *testing.T) {
	// The skip check compares against what convert writes.
	for _, tc := range []struct {
		f            convert.Format
		level, chunk int
	}{{convert.FormatEStargz, 0, 0}, {convert.FormatEStargz, 9, 1 << 20}, {convert.FormatZstdChunked, 0, 0}} {
		opts := []convert.Option{convert.WithFormat(tc.f)}
		if tc.level != 0 {
			opts = append(opts, convert.WithCompressionLevel(tc.level))
		}
		if tc.chunk != 0 {
			opts = append(opts, convert.WithChunkSize(tc.chunk))
		}
		c, err := convert.New(opts...)
		if err != nil {
			t.Fatal(err)
		}
		img := tinyImage(t)
		res, err := c.Image(t.Context(), img)
		c.Close()
		if err != nil {
			t.Fatal(err)
		}
		m, _ := res.Image.Manifest()
		if got, want := FormatAnnotation(tc.f, tc.level, tc.chunk), m.Annotations[convert.AnnotationFormat]; got != want {
			t.Errorf("FormatAnnotation = %q, convert writes %q", got, want)
		}
	}
}

func TestSelectTagsNewestBySemverOrCreated(t *testing.T) {
	s := Source{Newest: 3, Order: OrderSemver, Tags: []string{"1.*", "v2*"}}
	got, err := s.SelectTags([]string{"1.9", "1.10", "1.9-rc1", "latest", "1.2", "v2.0.0", "v2.0.0-beta", "0.9"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, " ") != "v2.0.0 v2.0.0-beta 1.10" {
		t.Errorf("got %v", got)
	}
	for _, p := range [][2]string{{"1.10", "1.9"}, {"1.9", "1.9-rc2"}, {"1.9-rc2", "1.9-rc1"}, {"v1.2", "1.1"}, {"2", "1.99.99"}} {
		if CompareTags(p[0], p[1]) <= 0 || CompareTags(p[1], p[0]) >= 0 {
			t.Errorf("%s should be newer than %s", p[0], p[1])
		}
	}
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	created := map[string]time.Time{"a": base, "b": base.Add(time.Hour), "c": base.Add(-time.Hour)}
	s = Source{Newest: 2, Order: OrderCreated}
	got, _ = s.SelectTags([]string{"a", "b", "c"}, func(tag string) (time.Time, error) { return created[tag], nil })
	if strings.Join(got, " ") != "b a" {
		t.Errorf("created order: %v", got)
	}
}

func TestParseShardRejectsOutOfRange(t *testing.T) {
	if s, err := ParseShard("2/5"); err != nil || s != (Shard{2, 5}) {
		t.Errorf("%v %v", s, err)
	}
	for _, bad := range []string{"5/5", "-1/2", "1", "a/b", "0/0"} {
		if _, err := ParseShard(bad); err == nil {
			t.Errorf("%s parsed", bad)
		}
	}
}

func TestRetryTransportHonoursRetryAfter(t *testing.T) {
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch n.Add(1) {
		case 1:
			w.Header().Set("Retry-After", "1")
			w.WriteHeader(http.StatusTooManyRequests)
		case 2:
			w.WriteHeader(http.StatusBadGateway)
		default:
			w.Write([]byte("ok"))
		}
	}))
	defer srv.Close()
	rt := NewRetryTransport(http.DefaultTransport, RetryPolicy{Retries: 3, Initial: time.Millisecond, Max: 2 * time.Millisecond}, nil)
	start := time.Now()
	req, _ := http.NewRequest(http.MethodPut, srv.URL, strings.NewReader("body"))
	resp, err := rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || rt.Retries() != 2 || time.Since(start) < time.Second {
		t.Errorf("status %d, %d retries, %v", resp.StatusCode, rt.Retries(), time.Since(start))
	}
	if d, ok := retryAfter("Wed, 21 Oct 2015 07:28:10 GMT", time.Date(2015, 10, 21, 7, 28, 0, 0, time.UTC)); !ok || d != 10*time.Second {
		t.Errorf("HTTP-date Retry-After: %v %v", d, ok)
	}
	// A body that cannot be replayed is sent once.
	n.Store(0)
	rt = NewRetryTransport(http.DefaultTransport, RetryPolicy{Retries: 3, Initial: time.Millisecond}, nil)
	req, _ = http.NewRequest(http.MethodPut, srv.URL, struct{ *strings.Reader }{strings.NewReader("x")})
	req.GetBody = nil
	resp, err = rt.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTooManyRequests || rt.Retries() != 0 {
		t.Errorf("unreplayable body: status %d, %d retries", resp.StatusCode, rt.Retries())
	}
}

func TestExampleConfigsParse(t *testing.T) {
	c, err := LoadConfig("../deploy/mirror/mirror.toml")
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Sources) != 2 || c.Sources[1].Newest != 3 || !c.Sources[1].MatchTag("1.23.4-bookworm") || c.Sources[1].MatchTag("1.23.4") {
		t.Errorf("example config: %+v", c.Sources)
	}
	if !*c.Profiles.FromRegistry || *c.Profiles.MinChange != 0.1 || c.Profiles.MaxArtifacts != 64 {
		t.Errorf("example config profiles: %+v", c.Profiles)
	}
	// The ConfigMap carries a mirror.toml too.
	b, err := os.ReadFile("../deploy/kubernetes/mirror-configmap.yaml")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "mirror.toml: |\n")
	j := strings.Index(s, "\n---")
	if i < 0 || j < i {
		t.Fatal("no mirror.toml in the ConfigMap")
	}
	var doc strings.Builder
	for _, line := range strings.Split(s[i+len("mirror.toml: |\n"):j], "\n") {
		doc.WriteString(strings.TrimPrefix(line, "    ") + "\n")
	}
	if _, err := ParseConfig([]byte(doc.String())); err != nil {
		t.Errorf("ConfigMap mirror.toml: %v", err)
	}
}

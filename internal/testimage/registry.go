package testimage

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Registry is go-containerregistry's in-process registry on a loopback
// httptest server, with fault injection on blob reads.
type Registry struct {
	// Server is the running server; it is closed by the test's cleanup.
	Server *httptest.Server
	// Host is the server's host:port.
	Host string

	mu      sync.Mutex
	faults  map[string]int // digest -> HTTP status for GET/HEAD of that blob
	corrupt string         // digest of a blob served with one byte flipped
	reads   map[string]int // digest -> GETs of that blob
	stalls  map[string]stall
}

// NewRegistry starts an in-process registry that is closed when t ends.
func NewRegistry(t TB) *Registry {
	t.Helper()
	r := &Registry{faults: map[string]int{}, reads: map[string]int{}, stalls: map[string]stall{}}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	r.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if dgst, ok := blobDigest(req.URL.Path); ok && (req.Method == http.MethodGet || req.Method == http.MethodHead) {
			r.mu.Lock()
			status, faulty := r.faults[dgst]
			st, stalled := r.stalls[dgst]
			if req.Method == http.MethodGet {
				r.reads[dgst]++
			}
			r.mu.Unlock()
			if faulty {
				writeError(w, status)
				return
			}
			if stalled && req.Method == http.MethodGet {
				serveStalled(w, req, inner, st)
				return
			}
			if dgst == r.corruptDigest() && req.Method == http.MethodGet {
				rec := httptest.NewRecorder()
				inner.ServeHTTP(rec, req)
				body := rec.Body.Bytes()
				if len(body) > 0 {
					body[len(body)/2] ^= 0xff
				}
				for k, v := range rec.Header() {
					w.Header()[k] = v
				}
				w.WriteHeader(rec.Code)
				w.Write(body)
				return
			}
		}
		inner.ServeHTTP(w, req)
	}))
	// A stalled handler (Stall) returns when its client goes away.
	t.Cleanup(func() { r.Server.CloseClientConnections(); r.Server.Close() })
	r.Host = strings.TrimPrefix(r.Server.URL, "http://")
	return r
}

func blobDigest(p string) (string, bool) {
	i := strings.LastIndex(p, "/blobs/")
	if !strings.HasPrefix(p, "/v2/") || i < 0 {
		return "", false
	}
	d := p[i+len("/blobs/"):]
	if strings.HasPrefix(d, "uploads") {
		return "", false
	}
	return d, true
}

// writeError answers like a registry: 4xx with a registry error body, 5xx
// with an empty body, as proxies in front of registries often do.
func writeError(w http.ResponseWriter, status int) {
	if status >= 500 {
		w.WriteHeader(status)
		return
	}
	code := map[int]string{
		http.StatusUnauthorized: "UNAUTHORIZED",
		http.StatusForbidden:    "DENIED",
		http.StatusNotFound:     "BLOB_UNKNOWN",
	}[status]
	if code == "" {
		code = "UNKNOWN"
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"errors":[{"code":%q,"message":"injected fault"}]}`, code)
}

// Fail makes every GET and HEAD of the blob dgst answer with status (and,
// for 4xx, a registry error body). Status 0 removes the fault.
func (r *Registry) Fail(dgst v1.Hash, status int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if status == 0 {
		delete(r.faults, dgst.String())
		return
	}
	r.faults[dgst.String()] = status
}

// Corrupt makes GETs of the blob dgst answer with one byte of the blob
// flipped (same length, same headers). A zero Hash removes it.
func (r *Registry) Corrupt(dgst v1.Hash) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.corrupt = ""
	if dgst != (v1.Hash{}) {
		r.corrupt = dgst.String()
	}
}

func (r *Registry) corruptDigest() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.corrupt
}

// BlobReads returns how many times the blob dgst was fetched with GET.
func (r *Registry) BlobReads(dgst v1.Hash) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reads[dgst.String()]
}

// Ref returns a reference to repo:tag on this registry.
func (r *Registry) Ref(t TB, repoTag string) name.Reference {
	t.Helper()
	ref, err := name.ParseReference(r.Host+"/"+repoTag, name.Insecure)
	if err != nil {
		t.Fatalf("parsing reference: %v", err)
	}
	return ref
}

// Push writes img to repo:tag and returns its reference.
func (r *Registry) Push(t TB, repoTag string, img v1.Image) name.Reference {
	t.Helper()
	ref := r.Ref(t, repoTag)
	if err := remote.Write(ref, img); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	return ref
}

// PushIndex writes idx and its images to repo:tag and returns its reference.
func (r *Registry) PushIndex(t TB, repoTag string, idx v1.ImageIndex) name.Reference {
	t.Helper()
	ref := r.Ref(t, repoTag)
	if err := remote.WriteIndex(ref, idx); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	return ref
}

// DeleteBlob deletes the blob dgst from repo through the registry API (the
// in-process registry's blob store is shared by all repositories).
func (r *Registry) DeleteBlob(t TB, repo string, dgst v1.Hash) {
	t.Helper()
	req, err := http.NewRequest(http.MethodDelete, r.Server.URL+"/v2/"+repo+"/blobs/"+dgst.String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := r.Server.Client().Do(req)
	if err != nil {
		t.Fatalf("deleting blob %s: %v", dgst, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("deleting blob %s: status %d", dgst, resp.StatusCode)
	}
}

// Image reads ref back with remote.Image, without retries so that injected
// faults surface at once.
func (r *Registry) Image(t TB, ref name.Reference) v1.Image {
	t.Helper()
	img, err := remote.Image(ref, NoRetry()...)
	if err != nil {
		t.Fatalf("reading %s: %v", ref, err)
	}
	return img
}

// NoRetry returns remote options that turn off go-containerregistry's
// retries (which would otherwise back off for seconds on 5xx).
func NoRetry() []remote.Option {
	return []remote.Option{
		remote.WithRetryBackoff(remote.Backoff{Steps: 1}),
		remote.WithRetryStatusCodes(),
		remote.WithRetryPredicate(func(error) bool { return false }),
	}
}

package imageio

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// BlobUpload is a blob being uploaded to a registry repository while it is
// produced: its bytes go out in one streamed PATCH as they are written, and
// the blob exists in the registry only once Commit names its digest (the
// registry checks the bytes it received against it). Abort, or a Commit
// that fails, leaves nothing in the repository.
//
// Write never fails because of the upload: an upload that broke off only
// makes Commit fail, so that the caller falls back to an ordinary push.
type BlobUpload struct {
	repo   name.Repository
	client *http.Client

	pw   *io.PipeWriter
	done chan struct{} // closed when the PATCH has returned

	mu       sync.Mutex
	n        int64
	broken   error  // the PATCH failed; later writes are dropped
	location string // the session: where to PUT the digest once the PATCH returned
	finished bool   // Commit or Abort ran
}

// StartBlobUpload opens an upload session in the repository of ref (a
// registry reference) and starts the PATCH that streams what is written to
// the returned BlobUpload. ctx bounds the whole upload.
func (c *Client) StartBlobUpload(ctx context.Context, ref Ref) (*BlobUpload, error) {
	if ref.IsLayout() {
		return nil, fmt.Errorf("uploading to %s: not a registry", ref)
	}
	repo := ref.Registry.Context()
	auth, err := c.o.keychain.Resolve(repo)
	if err != nil {
		return nil, fmt.Errorf("uploading to %s: credentials: %w", repo, err)
	}
	rt, err := transport.NewWithContext(ctx, repo.Registry, auth, c.transport, []string{repo.Scope(transport.PushScope)})
	if err != nil {
		return nil, fmt.Errorf("uploading to %s: %w", repo, classify(err))
	}
	u := &BlobUpload{repo: repo, client: &http.Client{Transport: rt}, done: make(chan struct{})}
	// The session's own location until the PATCH gives the next one.
	start := url.URL{Scheme: repo.Scheme(), Host: repo.RegistryStr(), Path: fmt.Sprintf("/v2/%s/blobs/uploads/", repo.RepositoryStr())}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, start.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := u.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("uploading to %s: starting the upload: %w", repo, classify(err))
	}
	loc, err := location(resp, http.StatusAccepted)
	if err != nil {
		return nil, fmt.Errorf("uploading to %s: starting the upload: %w", repo, err)
	}
	pr, pw := io.Pipe()
	u.pw, u.location = pw, loc
	req, err = http.NewRequestWithContext(ctx, http.MethodPatch, loc, pr)
	if err != nil {
		pr.Close()
		return nil, err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	go func() {
		defer close(u.done)
		resp, err := u.client.Do(req)
		var next string
		if err == nil {
			next, err = location(resp, http.StatusAccepted, http.StatusNoContent, http.StatusCreated)
		}
		// Unblock a writer waiting on a PATCH that gave up.
		pr.CloseWithError(errUploadBroken)
		u.mu.Lock()
		defer u.mu.Unlock()
		if err != nil {
			u.broken = classify(err)
			return
		}
		u.location = next
	}()
	return u, nil
}

var errUploadBroken = errors.New("upload broke off")

// location checks resp's status and returns its Location header resolved
// against the request's URL.
func location(resp *http.Response, codes ...int) (string, error) {
	defer resp.Body.Close()
	if err := transport.CheckError(resp, codes...); err != nil {
		return "", err
	}
	loc, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
	if err != nil || resp.Header.Get("Location") == "" {
		return "", fmt.Errorf("registry gave no usable upload location (%q)", resp.Header.Get("Location"))
	}
	return loc.String(), nil
}

// Write sends p to the registry. It always reports success: after the
// upload broke off, the bytes are dropped and Commit fails.
func (u *BlobUpload) Write(p []byte) (int, error) {
	u.mu.Lock()
	broken := u.broken != nil
	u.mu.Unlock()
	if broken {
		return len(p), nil
	}
	n, err := u.pw.Write(p)
	u.mu.Lock()
	u.n += int64(n)
	if err != nil && u.broken == nil {
		u.broken = err
	}
	u.mu.Unlock()
	return len(p), nil
}

// Finish ends the stream and waits for the registry to have received it
// all; it returns the error that broke the upload off, if any. Commit
// finishes the stream itself when Finish was not called.
func (u *BlobUpload) Finish() error {
	u.pw.Close()
	<-u.done
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.broken
}

// Commit ends the stream and makes the blob appear in the repository under
// digest, which the registry checks against the bytes it received (size
// too, when the registry checks it). It fails, leaving no blob, when the
// upload broke off or the registry refuses the digest.
func (u *BlobUpload) Commit(ctx context.Context, digest v1.Hash, size int64) error {
	u.pw.Close()
	<-u.done
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.finished {
		return fmt.Errorf("blob %s: upload to %s already finished", digest, u.repo)
	}
	u.finished = true
	if u.broken != nil {
		return fmt.Errorf("blob %s: upload to %s: %w", digest, u.repo, u.broken)
	}
	if u.n != size {
		u.abort(ctx)
		return fmt.Errorf("blob %s: upload to %s: %d bytes streamed, blob has %d", digest, u.repo, u.n, size)
	}
	loc, err := url.Parse(u.location)
	if err != nil {
		return err
	}
	q := loc.Query()
	q.Set("digest", digest.String())
	loc.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodPut, loc.String(), nil)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := u.client.Do(req)
	if err != nil {
		return fmt.Errorf("blob %s: committing the upload to %s: %w", digest, u.repo, classify(err))
	}
	defer resp.Body.Close()
	if err := transport.CheckError(resp, http.StatusCreated); err != nil {
		return fmt.Errorf("blob %s: committing the upload to %s: %w", digest, u.repo, classify(err))
	}
	return nil
}

// Abort ends the stream without making a blob and asks the registry to
// drop what it received (best effort: a registry that keeps an abandoned
// upload session still holds no blob).
func (u *BlobUpload) Abort(ctx context.Context) {
	u.pw.CloseWithError(errUploadAborted)
	<-u.done
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.finished {
		return
	}
	u.finished = true
	u.abort(ctx)
}

var errUploadAborted = errors.New("upload aborted")

// abort deletes the upload session; u.mu is held.
func (u *BlobUpload) abort(ctx context.Context) {
	if u.location == "" {
		return
	}
	req, err := http.NewRequestWithContext(context.WithoutCancel(ctx), http.MethodDelete, u.location, nil)
	if err != nil {
		return
	}
	if resp, err := u.client.Do(req); err == nil {
		resp.Body.Close()
	}
}

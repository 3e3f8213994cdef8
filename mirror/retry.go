package mirror

import (
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/log"

	"github.com/lazybase/lazybase/internal/imageio"
)

// RetryPolicy says how a RetryTransport retries.
type RetryPolicy struct {
	// Retries is how many times one request is retried.
	Retries int
	// Initial is the first backoff; each retry doubles it up to Max. The
	// actual wait is drawn uniformly from [backoff/2, backoff] (jitter).
	Initial, Max time.Duration
	// RetryAfterMax caps how long a Retry-After header may make us wait.
	RetryAfterMax time.Duration
}

// RetryTransport is an http.RoundTripper that retries requests answered with
// 429, 500, 502, 503 or 504, and requests that failed with a connection
// reset or an unexpected EOF, with exponential backoff and jitter; it honours
// Retry-After (seconds or an HTTP date) on 429 and 503. Requests whose body
// cannot be replayed (no GetBody) are sent once.
//
// go-containerregistry's own retry (remote.WithRetryBackoff and
// WithRetryStatusCodes) retries the same status codes with backoff and jitter
// but ignores Retry-After and never retries a request whose body is already
// spent; it also retries whole blob uploads, which this transport cannot.
// The mirror uses both: this transport underneath, per request, and
// go-containerregistry's on top, per operation.
type RetryTransport struct {
	inner   http.RoundTripper
	policy  RetryPolicy
	retries atomic.Int64
	onRetry func(req *http.Request, status int, err error)
}

// NewRetryTransport wraps inner. onRetry, when not nil, is called before
// each retry.
func NewRetryTransport(inner http.RoundTripper, p RetryPolicy, onRetry func(req *http.Request, status int, err error)) *RetryTransport {
	if p.Initial <= 0 {
		p.Initial = DefaultRetryInitial
	}
	if p.Max < p.Initial {
		p.Max = p.Initial
	}
	if p.RetryAfterMax <= 0 {
		p.RetryAfterMax = DefaultRetryAfterMax
	}
	return &RetryTransport{inner: inner, policy: p, onRetry: onRetry}
}

// Retries returns how many retries the transport made.
func (t *RetryTransport) Retries() int64 { return t.retries.Load() }

func retryableStatus(code int) bool {
	switch code {
	case http.StatusTooManyRequests, http.StatusInternalServerError, http.StatusBadGateway,
		http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return true
	}
	return false
}

// retryableError reports connection resets and truncated responses. A
// registry that stayed silent for a whole timeout (imageio.TimeoutError) is
// not retried request by request: that would multiply the wait by retries
// for every request of an image; the image's attempts retry it.
func retryableError(err error) bool {
	var te *imageio.TimeoutError
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) || errors.As(err, &te) {
		return false
	}
	if errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// RoundTrip implements http.RoundTripper.
func (t *RetryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	backoff := t.policy.Initial
	for attempt := 0; ; attempt++ {
		r := req
		if attempt > 0 && req.Body != nil && req.Body != http.NoBody {
			body, err := req.GetBody()
			if err != nil {
				return nil, err
			}
			r = req.Clone(ctx)
			r.Body = body
		}
		resp, err := t.inner.RoundTrip(r)
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		retry := (err != nil && retryableError(err)) || (err == nil && retryableStatus(status))
		replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
		if !retry || !replayable || attempt >= t.policy.Retries || ctx.Err() != nil {
			return resp, err
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		if resp != nil && (status == http.StatusTooManyRequests || status == http.StatusServiceUnavailable) {
			if ra, ok := retryAfter(resp.Header.Get("Retry-After"), time.Now()); ok {
				wait = min(ra, t.policy.RetryAfterMax)
			}
		}
		if resp != nil {
			io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
		}
		backoff = min(backoff*2, t.policy.Max)
		t.retries.Add(1)
		if t.onRetry != nil {
			t.onRetry(req, status, err)
		}
		log.G(ctx).WithFields(log.Fields{"method": req.Method, "url": req.URL.Redacted(), "status": status, "error": err, "wait": wait}).Debug("retrying registry request")
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-timer.C:
		}
	}
}

// retryAfter parses a Retry-After value: delay-seconds or an HTTP date.
func retryAfter(v string, now time.Time) (time.Duration, bool) {
	if v == "" {
		return 0, false
	}
	if s, err := strconv.Atoi(v); err == nil && s >= 0 {
		return time.Duration(s) * time.Second, true
	}
	if t, err := http.ParseTime(v); err == nil {
		d := t.Sub(now)
		if d < 0 {
			d = 0
		}
		return d, true
	}
	return 0, false
}

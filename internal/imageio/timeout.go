package imageio

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"sync"
	"time"
)

// Timeouts bound each phase of one registry request. None of them bounds a
// whole request: a large blob download that keeps delivering bytes runs as
// long as it needs to. A zero field takes its default.
type Timeouts struct {
	// Connect bounds a TCP connection attempt, DNS lookup included.
	// Default DefaultConnectTimeout.
	Connect time.Duration
	// TLSHandshake bounds a TLS handshake. Default DefaultTLSTimeout.
	TLSHandshake time.Duration
	// ResponseHeader bounds the wait for a response's headers once the
	// request is sent. Default DefaultResponseTimeout.
	ResponseHeader time.Duration
	// Idle bounds every wait for the next bytes of a response body, and
	// for the registry to accept the next bytes of a request body.
	// Default DefaultIdleTimeout.
	Idle time.Duration
}

// Default timeouts. Connect and TLSHandshake are Go's and
// go-containerregistry's own values (a TCP connect retries SYNs for about
// 30s before the kernel's two minutes; a handshake is a few round trips).
// Registries answer GET and HEAD in milliseconds; the slowest legitimate
// wait for headers is the final PUT of a blob upload, which a registry may
// hold while it moves or re-hashes the blob in its storage: a minute covers
// that for base-image layers. A body that sends nothing for a minute is
// stalled, not slow: a slow but live registry sends something every few
// milliseconds.
const (
	DefaultConnectTimeout  = 30 * time.Second
	DefaultTLSTimeout      = 10 * time.Second
	DefaultResponseTimeout = 60 * time.Second
	DefaultIdleTimeout     = 60 * time.Second
)

// DefaultTimeouts returns the default Timeouts.
func DefaultTimeouts() Timeouts {
	return Timeouts{
		Connect:        DefaultConnectTimeout,
		TLSHandshake:   DefaultTLSTimeout,
		ResponseHeader: DefaultResponseTimeout,
		Idle:           DefaultIdleTimeout,
	}
}

// WithDefaults returns t with every zero field set to its default.
func (t Timeouts) WithDefaults() Timeouts {
	d := DefaultTimeouts()
	if t.Connect == 0 {
		t.Connect = d.Connect
	}
	if t.TLSHandshake == 0 {
		t.TLSHandshake = d.TLSHandshake
	}
	if t.ResponseHeader == 0 {
		t.ResponseHeader = d.ResponseHeader
	}
	if t.Idle == 0 {
		t.Idle = d.Idle
	}
	return t
}

// Validate reports a negative timeout.
func (t Timeouts) Validate() error {
	for _, f := range []struct {
		name string
		d    time.Duration
	}{
		{"connect", t.Connect}, {"TLS handshake", t.TLSHandshake},
		{"response", t.ResponseHeader}, {"idle", t.Idle},
	} {
		if f.d < 0 {
			return fmt.Errorf("%s timeout must not be negative, got %s", f.name, f.d)
		}
	}
	return nil
}

// Phases of a request a TimeoutError names.
const (
	PhaseConnect  = "connect"
	PhaseTLS      = "TLS handshake"
	PhaseSend     = "request body"
	PhaseResponse = "response headers"
	PhaseBody     = "response body"
)

// TimeoutError reports a registry that stopped answering in one phase of a
// request. It is a net.Error whose Timeout is true; it is not Temporary, so
// go-containerregistry does not retry the request (see BoundedTransport).
type TimeoutError struct {
	// Host is the host:port the request went to.
	Host string
	// Phase is one of the Phase constants.
	Phase string
	// Limit is the timeout that ran out.
	Limit time.Duration
}

var _ net.Error = (*TimeoutError)(nil)

func (e *TimeoutError) Error() string {
	lim := formatLimit(e.Limit)
	var what string
	switch e.Phase {
	case PhaseConnect:
		what = "no TCP connection within " + lim
	case PhaseTLS:
		what = "TLS handshake not done within " + lim
	case PhaseSend:
		what = "request body not accepted for " + lim
	case PhaseResponse:
		what = "no response headers within " + lim
	case PhaseBody:
		what = "response body stalled, no data for " + lim
	default:
		what = e.Phase + " timed out after " + lim
	}
	return fmt.Sprintf("registry %s: %s", e.Host, what)
}

// Timeout implements net.Error.
func (e *TimeoutError) Timeout() bool { return true }

// Temporary implements net.Error. A registry that stayed silent for a
// whole timeout is not retried request by request: the caller's own
// retries (an image attempt, a guard attempt) decide.
func (e *TimeoutError) Temporary() bool { return false }

// formatLimit writes whole seconds as "60s" rather than "1m0s".
func formatLimit(d time.Duration) string {
	if d >= time.Second && d%time.Second == 0 {
		return fmt.Sprintf("%ds", d/time.Second)
	}
	return d.String()
}

// NewTransport returns the transport every registry client of lazybase
// uses: BaseTransport with its dialer and TLS handshake bounded by t,
// wrapped by BoundedTransport. Zero fields of t take their defaults.
func NewTransport(insecure bool, t Timeouts) http.RoundTripper {
	t = t.WithDefaults()
	base := BaseTransport(insecure)
	base.DialContext = (&net.Dialer{Timeout: t.Connect, KeepAlive: 30 * time.Second}).DialContext
	base.TLSHandshakeTimeout = t.TLSHandshake
	base.ResponseHeaderTimeout = t.ResponseHeader
	return BoundedTransport(base, t)
}

// BoundedTransport wraps inner (normally an *http.Transport, as NewTransport
// builds it) so that no phase of a request waits longer than t allows: the
// TCP connect, the TLS handshake, the registry accepting the request body
// (time spent producing the body is not counted), the response headers,
// and each read of the response body (time the caller spends between reads
// is not counted). A request that runs out of time fails with a
// *TimeoutError naming the host and the phase, and its connection is
// dropped. Zero fields of t take their defaults.
//
// Put it below any retrying transport: it bounds one attempt. Its errors
// are not Temporary, so go-containerregistry's retry transport does not
// retry them; the worst case of one request is then Connect + TLSHandshake
// + ResponseHeader (100s by default), plus Idle per stalled body read.
func BoundedTransport(inner http.RoundTripper, t Timeouts) http.RoundTripper {
	return &boundedTransport{inner: inner, t: t.WithDefaults()}
}

type boundedTransport struct {
	inner http.RoundTripper
	t     Timeouts
}

// watchdog times the phase a request is in and cancels the request when a
// phase runs out of time. It has one timer, reset for every phase and every
// body read (no allocation per read).
type watchdog struct {
	host   string
	parent context.Context // the caller's
	cancel context.CancelCauseFunc

	mu       sync.Mutex
	timer    *time.Timer
	phase    string // armed phase, "" when none
	limit    time.Duration
	deadline time.Time
	fired    *TimeoutError
	closed   bool // the round trip is over: ignore late trace events
}

func (w *watchdog) arm(phase string, d time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.fired != nil {
		return
	}
	w.phase, w.limit = phase, d
	w.deadline = time.Now().Add(d)
	if w.timer == nil {
		w.timer = time.AfterFunc(d, w.fire)
	} else {
		w.timer.Reset(d)
	}
}

func (w *watchdog) disarm() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.phase = ""
	if w.timer != nil {
		w.timer.Stop()
	}
}

// fire runs when the timer expires; an expiry that a later arm or disarm
// overtook finds no phase armed or a deadline still ahead, and does nothing.
func (w *watchdog) fire() {
	w.mu.Lock()
	if w.fired != nil || w.phase == "" || time.Now().Before(w.deadline) {
		w.mu.Unlock()
		return
	}
	w.fired = &TimeoutError{Host: w.host, Phase: w.phase, Limit: w.limit}
	err := w.fired
	w.mu.Unlock()
	w.cancel(err)
}

// current returns the phase armed now (for a timeout error that came from
// the inner transport's own timers).
func (w *watchdog) current() (string, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.phase, w.limit
}

func (w *watchdog) timedOut() *TimeoutError {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.fired
}

// start arms phase on a trace event or a read of the request body, unless
// the round trip is over (a dial the request started may finish after it;
// a transport may still read the request body after the response arrived).
// Starting the phase already armed keeps its timer, except for PhaseSend,
// which restarts on every piece of the body.
func (w *watchdog) start(phase string, d time.Duration) {
	w.mu.Lock()
	closed, armed := w.closed, w.phase
	w.mu.Unlock()
	if !closed && (phase != armed || phase == PhaseSend) {
		w.arm(phase, d)
	}
}

// end disarms phase if it is the one armed: a dial that this request
// started but another request's connection overtook may finish while this
// request waits for its response.
func (w *watchdog) end(phase string) {
	w.mu.Lock()
	armed := w.phase == phase && !w.closed
	w.mu.Unlock()
	if armed {
		w.disarm()
	}
}

// translate returns the error a failed operation reports: the watchdog's
// TimeoutError when it fired, a TimeoutError for the inner transport's own
// timeouts in a phase the watchdog was timing, err otherwise.
func (w *watchdog) translate(err error) error {
	if err == nil {
		return nil
	}
	if te := w.timedOut(); te != nil {
		return te
	}
	if w.parent.Err() != nil {
		return err // the caller's cancellation or deadline
	}
	var te *TimeoutError
	if errors.As(err, &te) {
		return err
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		if phase, limit := w.current(); phase != "" {
			return &TimeoutError{Host: w.host, Phase: phase, Limit: limit}
		}
	}
	return err
}

func (t *boundedTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx, cancel := context.WithCancelCause(req.Context())
	w := &watchdog{host: req.URL.Host, parent: req.Context(), cancel: cancel}
	trace := &httptrace.ClientTrace{
		ConnectStart: func(string, string) { w.start(PhaseConnect, t.t.Connect) },
		ConnectDone: func(_, _ string, err error) {
			if err == nil {
				w.end(PhaseConnect)
			}
		},
		TLSHandshakeStart: func() { w.start(PhaseTLS, t.t.TLSHandshake) },
		TLSHandshakeDone: func(_ tls.ConnectionState, err error) {
			if err == nil {
				w.end(PhaseTLS)
			}
		},
		WroteRequest: func(httptrace.WroteRequestInfo) { w.start(PhaseResponse, t.t.ResponseHeader) },
	}
	r := req.WithContext(httptrace.WithClientTrace(ctx, trace))
	if req.Body != nil && req.Body != http.NoBody {
		r.Body = &sendBody{rc: req.Body, w: w, idle: t.t.Idle}
		if req.GetBody != nil {
			r.GetBody = func() (io.ReadCloser, error) {
				b, err := req.GetBody()
				if err != nil || b == nil || b == http.NoBody {
					return b, err
				}
				return &sendBody{rc: b, w: w, idle: t.t.Idle}, nil
			}
		}
	}
	resp, err := t.inner.RoundTrip(r)
	err = w.translate(err)
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
	w.disarm()
	if err != nil {
		cancel(err)
		return nil, err
	}
	resp.Body = &recvBody{rc: resp.Body, w: w, idle: t.t.Idle}
	return resp, nil
}

// sendBody is a request body: the registry has Idle to take each piece the
// transport reads from it. The time Read itself takes (the caller producing
// the body) is not counted.
type sendBody struct {
	rc   io.ReadCloser
	w    *watchdog
	idle time.Duration
}

func (b *sendBody) Read(p []byte) (int, error) {
	b.w.end(PhaseSend)
	n, err := b.rc.Read(p)
	if err == nil || err == io.EOF {
		// The transport now writes what it read; after EOF it writes the
		// rest and WroteRequest arms the response timer.
		b.w.start(PhaseSend, b.idle)
	}
	return n, err
}

func (b *sendBody) Close() error { return b.rc.Close() }

// recvBody is a response body: each Read has Idle to return. The time the
// caller spends between reads is not counted.
type recvBody struct {
	rc   io.ReadCloser
	w    *watchdog
	idle time.Duration
	once sync.Once
}

func (b *recvBody) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return b.rc.Read(p)
	}
	b.w.arm(PhaseBody, b.idle)
	n, err := b.rc.Read(p)
	b.w.disarm()
	if err != nil && err != io.EOF {
		err = b.w.translate(err)
	}
	return n, err
}

func (b *recvBody) Close() error {
	err := b.rc.Close()
	b.once.Do(func() {
		b.w.disarm()
		b.w.cancel(context.Canceled)
	})
	return err
}

package shaper

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"sync"
	"sync/atomic"
	"time"
)

// chunk is the largest write the proxy sends through the token bucket at once.
const chunk = 32 << 10

// Proxy is a shaping, counting reverse proxy in front of one registry.
type Proxy struct {
	target *url.URL
	rp     *httputil.ReverseProxy
	bucket bucket
	rtt    atomic.Int64 // nanoseconds

	mu     sync.Mutex
	phase  string
	events []Event

	srv *http.Server
	ln  net.Listener
}

type options struct {
	bandwidth int64
	burst     int64
	rtt       time.Duration
}

// Option configures a Proxy.
type Option func(*options) error

// WithBandwidth limits the bytes per second sent back to all clients
// together; zero (the default) means unlimited.
func WithBandwidth(bytesPerSecond int64) Option {
	return func(o *options) error {
		if bytesPerSecond < 0 {
			return fmt.Errorf("bandwidth %d: must not be negative", bytesPerSecond)
		}
		o.bandwidth = bytesPerSecond
		return nil
	}
}

// WithBurst sets how many bytes the bucket may save up; the default is 64 KiB.
func WithBurst(bytes int64) Option {
	return func(o *options) error {
		if bytes <= 0 {
			return fmt.Errorf("burst %d: must be positive", bytes)
		}
		o.burst = bytes
		return nil
	}
}

// WithRTT adds d of latency to every request; zero (the default) adds none.
func WithRTT(d time.Duration) Option {
	return func(o *options) error {
		if d < 0 {
			return fmt.Errorf("rtt %s: must not be negative", d)
		}
		o.rtt = d
		return nil
	}
}

// New returns a Proxy forwarding to the registry at target
// (e.g. "http://127.0.0.1:5000"). It does not listen until Start.
func New(target string, opts ...Option) (*Proxy, error) {
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("target %q: %w", target, err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("target %q: want http(s)://host:port", target)
	}
	o := options{burst: 64 << 10}
	for _, opt := range opts {
		if err := opt(&o); err != nil {
			return nil, err
		}
	}
	p := &Proxy{target: u}
	p.bucket.set(o.bandwidth, o.burst)
	p.rtt.Store(int64(o.rtt))
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(r *httputil.ProxyRequest) {
			r.SetURL(u)
			// Keep the client's Host so the registry's absolute URLs
			// (upload locations) point back at the proxy.
			r.Out.Host = r.In.Host
		},
		FlushInterval: -1,
	}
	return p, nil
}

// SetBandwidth changes the bandwidth limit; zero means unlimited.
func (p *Proxy) SetBandwidth(bytesPerSecond int64) {
	p.bucket.mu.Lock()
	burst := int64(p.bucket.burst)
	p.bucket.mu.Unlock()
	p.bucket.set(bytesPerSecond, burst)
}

// SetRTT changes the latency added to every request.
func (p *Proxy) SetRTT(d time.Duration) { p.rtt.Store(int64(d)) }

// SetPhase labels the events recorded from now on; Stats can be filtered by
// phase with StatsFor.
func (p *Proxy) SetPhase(name string) {
	p.mu.Lock()
	p.phase = name
	p.mu.Unlock()
}

// Start listens on a free loopback port and serves until Close.
func (p *Proxy) Start() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fmt.Errorf("shaper listen: %w", err)
	}
	p.ln = ln
	p.srv = &http.Server{Handler: p, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = p.srv.Serve(ln) }()
	return nil
}

// Addr returns the host:port the proxy listens on, after Start.
func (p *Proxy) Addr() string {
	if p.ln == nil {
		return ""
	}
	return p.ln.Addr().String()
}

// Close stops the listener and every open connection.
func (p *Proxy) Close() error {
	if p.srv == nil {
		return nil
	}
	err := p.srv.Close()
	if errors.Is(err, http.ErrServerClosed) {
		err = nil
	}
	return err
}

// ServeHTTP shapes, forwards and records one request.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	if d := time.Duration(p.rtt.Load()); d > 0 {
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
	repo, kind, ref := parsePath(r.URL.Path)
	cw := &countingWriter{ResponseWriter: w, ctx: r.Context(), bucket: &p.bucket}
	// ReverseProxy panics with http.ErrAbortHandler when the client goes
	// away mid-body: record in a defer so aborted transfers count too.
	defer p.record(r, cw, start, repo, kind, ref)
	p.rp.ServeHTTP(cw, r)
}

func (p *Proxy) record(r *http.Request, cw *countingWriter, start time.Time, repo string, kind Kind, ref string) {
	ev := Event{
		Time:     start,
		Duration: time.Since(start),
		Method:   r.Method,
		Path:     r.URL.Path,
		Repo:     repo,
		Kind:     kind,
		Ref:      ref,
		Range:    r.Header.Get("Range"),
		Status:   cw.status,
		Bytes:    cw.n,
		Size:     -1,
	}
	if ev.Status == 0 {
		ev.Status = http.StatusOK
	}
	ev.Requested = parseRange(ev.Range)
	if ev.Method == http.MethodGet && ev.Bytes > 0 {
		switch ev.Status {
		case http.StatusPartialContent:
			if rg, size, ok := parseContentRange(cw.Header().Get("Content-Range")); ok {
				ev.Served = []Range{{Start: rg.Start, End: rg.Start + ev.Bytes - 1}}
				ev.Size = size
			}
		case http.StatusOK:
			ev.Served = []Range{{Start: 0, End: ev.Bytes - 1}}
			ev.Size = cw.contentLength
		}
	}
	p.mu.Lock()
	ev.Phase = p.phase
	p.events = append(p.events, ev)
	p.mu.Unlock()
}

// countingWriter counts and throttles the response body.
type countingWriter struct {
	http.ResponseWriter
	ctx           context.Context
	bucket        *bucket
	status        int
	contentLength int64
	n             int64
}

func (c *countingWriter) WriteHeader(code int) {
	if c.status == 0 {
		c.status = code
		c.contentLength = -1
		if cl := c.Header().Get("Content-Length"); cl != "" {
			fmt.Sscan(cl, &c.contentLength)
		}
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if c.status == 0 {
		c.WriteHeader(http.StatusOK)
	}
	written := 0
	for len(b) > 0 {
		n := min(len(b), chunk)
		if err := c.bucket.take(c.ctx, n); err != nil {
			return written, err
		}
		m, err := c.ResponseWriter.Write(b[:n])
		written += m
		c.n += int64(m)
		if err != nil {
			return written, err
		}
		b = b[n:]
	}
	return written, nil
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

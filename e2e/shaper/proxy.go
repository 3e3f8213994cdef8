package shaper

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
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
	down   atomic.Bool  // SetDown

	mu     sync.Mutex
	phase  string
	events []*Event

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

// SetDown makes the proxy close every connection unanswered while down
// is true, as a registry that is gone.
func (p *Proxy) SetDown(down bool) { p.down.Store(down) }

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

// ServeHTTP shapes, forwards and records one request. The event is recorded
// when the request arrives and updated before each header and body write
// reaches the client, so a client that has its response sees it counted.
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if p.down.Load() {
		// Gone: the connection closes unanswered, nothing is recorded.
		if c, _, err := http.NewResponseController(w).Hijack(); err == nil {
			c.Close()
		}
		return
	}
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
	ev := &Event{
		Time:   start,
		Method: r.Method,
		Path:   r.URL.Path,
		Repo:   repo,
		Kind:   kind,
		Ref:    ref,
		Range:  r.Header.Get("Range"),
		Size:   -1,
	}
	ev.Requested = parseRange(ev.Range)
	p.mu.Lock()
	ev.Duration = time.Since(start) // the added latency; final at the end
	ev.Phase = p.phase
	p.events = append(p.events, ev)
	p.mu.Unlock()

	cw := &countingWriter{ResponseWriter: w, ctx: r.Context(), p: p, ev: ev}
	// ReverseProxy panics with http.ErrAbortHandler when the client goes
	// away mid-body: finish the event in a defer so that counts too.
	defer func() {
		p.mu.Lock()
		ev.Duration = time.Since(start)
		if ev.Status == 0 {
			ev.Status = http.StatusOK
		}
		p.mu.Unlock()
	}()
	p.rp.ServeHTTP(cw, r)
}

// countingWriter counts and throttles the response body, updating its event
// before bytes reach the client.
type countingWriter struct {
	http.ResponseWriter
	ctx         context.Context
	p           *Proxy
	ev          *Event
	wroteHeader bool
	offset      int64 // blob offset of the first body byte
}

func (c *countingWriter) WriteHeader(code int) {
	if !c.wroteHeader {
		c.wroteHeader = true
		h := c.Header()
		c.p.mu.Lock()
		c.ev.Status = code
		switch code {
		case http.StatusPartialContent:
			if rg, size, ok := parseContentRange(h.Get("Content-Range")); ok {
				c.offset = rg.Start
				c.ev.Size = size
			}
		case http.StatusOK:
			if cl := h.Get("Content-Length"); cl != "" && c.ev.Method == http.MethodGet {
				if n, err := strconv.ParseInt(cl, 10, 64); err == nil {
					c.ev.Size = n
				}
			}
		}
		c.p.mu.Unlock()
	}
	c.ResponseWriter.WriteHeader(code)
}

func (c *countingWriter) Write(b []byte) (int, error) {
	if !c.wroteHeader {
		c.WriteHeader(http.StatusOK)
	}
	written := 0
	for len(b) > 0 {
		n := min(len(b), chunk)
		if err := c.p.bucket.take(c.ctx, n); err != nil {
			return written, err
		}
		c.count(int64(n))
		m, err := c.ResponseWriter.Write(b[:n])
		written += m
		if m < n {
			c.count(int64(m - n))
		}
		if err != nil {
			return written, err
		}
		b = b[n:]
	}
	return written, nil
}

// count adds n (possibly negative, to take back what was not written) body
// bytes to the event.
func (c *countingWriter) count(n int64) {
	c.p.mu.Lock()
	defer c.p.mu.Unlock()
	ev := c.ev
	ev.Bytes += n
	if ev.Method != http.MethodGet || ev.Status != http.StatusOK && ev.Status != http.StatusPartialContent {
		return
	}
	if ev.Bytes <= 0 {
		ev.Served = nil
		return
	}
	ev.Served = []Range{{Start: c.offset, End: c.offset + ev.Bytes - 1}}
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (c *countingWriter) Unwrap() http.ResponseWriter { return c.ResponseWriter }

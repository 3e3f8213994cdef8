package progress

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
)

// DefaultInterval is the default time between two redraws on a terminal; it
// keeps the display at ten updates a second or fewer.
const DefaultInterval = 100 * time.Millisecond

// Option configures a Display.
type Option func(*Display)

// WithTerminal selects the live display (true) or plain log lines (false).
func WithTerminal(tty bool) Option { return func(d *Display) { d.tty = tty } }

// WithInterval sets the time between two redraws. Values below
// DefaultInterval are raised to it.
func WithInterval(iv time.Duration) Option {
	return func(d *Display) {
		if iv > DefaultInterval {
			d.interval = iv
		}
	}
}

// WithClock replaces time.Now, for tests.
func WithClock(now func() time.Time) Option { return func(d *Display) { d.now = now } }

type layerState struct {
	digest   v1.Hash
	total    int64
	complete int64
	started  time.Time
	result   *convert.LayerResult
	err      error
}

// Display renders conversion progress. Handle may be called from any
// goroutine; Start and Stop from the one that owns the Display.
type Display struct {
	w        io.Writer
	tty      bool
	interval time.Duration
	now      func() time.Time

	mu      sync.Mutex
	active  []*layerState // layers in progress, in start order
	byHash  map[v1.Hash]*layerState
	pending []string // permanent lines not yet written
	dirty   bool
	drawn   int // lines of the live block on screen
	status  string
	partial []byte // Write's unfinished last line

	stop chan struct{}
	done chan struct{}
}

// New returns a Display writing to w. It shows plain lines unless
// WithTerminal(true) is given.
func New(w io.Writer, opts ...Option) *Display {
	d := &Display{
		w:        w,
		interval: DefaultInterval,
		now:      time.Now,
		byHash:   map[v1.Hash]*layerState{},
	}
	for _, o := range opts {
		o(d)
	}
	return d
}

// Start begins rendering in a goroutine of the Display's own.
func (d *Display) Start() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stop != nil {
		return
	}
	d.stop = make(chan struct{})
	d.done = make(chan struct{})
	go d.loop(d.stop, d.done)
}

// Stop renders what is left, erases the live block, and returns when the
// rendering goroutine has ended. A Display may be started again.
func (d *Display) Stop() {
	d.mu.Lock()
	stop, done := d.stop, d.done
	d.stop, d.done = nil, nil
	d.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
	d.mu.Lock()
	d.render(true)
	d.mu.Unlock()
}

func (d *Display) loop(stop, done chan struct{}) {
	defer close(done)
	t := time.NewTicker(d.interval)
	defer t.Stop()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			d.mu.Lock()
			d.render(false)
			d.mu.Unlock()
		}
	}
}

// Handle records an event. It never waits for the terminal.
func (d *Display) Handle(ev convert.Event) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.dirty = true
	st := d.byHash[ev.Layer]
	if st == nil {
		st = &layerState{digest: ev.Layer, started: d.now()}
		d.byHash[ev.Layer] = st
		d.active = append(d.active, st)
	}
	if ev.Total > 0 {
		st.total = ev.Total
	}
	switch ev.Kind {
	case convert.LayerStarted:
		st.started = d.now()
		st.complete = 0
	case convert.LayerProgress:
		if ev.Complete > st.complete {
			st.complete = ev.Complete
		}
	case convert.LayerDone, convert.LayerFailed:
		st.result, st.err = ev.Result, ev.Err
		if st.err == nil && st.result == nil {
			st.err = fmt.Errorf("no result")
		}
		d.pending = append(d.pending, d.finishedLine(st))
		d.removeActive(st)
		delete(d.byHash, ev.Layer)
	}
}

// Status sets a line shown under the layers of the live block on a
// terminal, such as the progress of an upload; "" removes it. Plain output
// ignores it.
func (d *Display) Status(s string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if s != d.status {
		d.status = s
		d.dirty = true
	}
}

// Write adds whole lines of p as permanent lines above the live block, so
// that a logger can share the terminal with the display. It never fails.
func (d *Display) Write(p []byte) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.partial = append(d.partial, p...)
	for {
		i := bytes.IndexByte(d.partial, '\n')
		if i < 0 {
			break
		}
		d.pending = append(d.pending, string(d.partial[:i]))
		d.partial = d.partial[i+1:]
		d.dirty = true
	}
	if len(d.partial) == 0 {
		d.partial = nil
	}
	if d.stop == nil {
		d.render(true)
	}
	return len(p), nil
}

// Printf adds a permanent line above the live block (or a plain line).
func (d *Display) Printf(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.pending = append(d.pending, strings.TrimRight(fmt.Sprintf(format, args...), "\n"))
	d.dirty = true
	if d.stop == nil {
		d.render(true)
	}
}

func (d *Display) removeActive(st *layerState) {
	for i, a := range d.active {
		if a == st {
			d.active = append(d.active[:i], d.active[i+1:]...)
			return
		}
	}
}

// render writes pending lines and, on a terminal, redraws the live block.
// final erases the live block instead. d.mu must be held.
func (d *Display) render(final bool) {
	if !d.dirty && !(final && d.drawn > 0) && !(d.tty && (len(d.active) > 0 || d.status != "")) {
		return
	}
	var b strings.Builder
	if d.tty && d.drawn > 0 {
		// Back to the first line of the live block, and clear to the end
		// of the screen.
		fmt.Fprintf(&b, "\x1b[%dA\r\x1b[J", d.drawn)
	}
	d.drawn = 0
	for _, l := range d.pending {
		b.WriteString(l)
		b.WriteByte('\n')
	}
	d.pending = d.pending[:0]
	if d.tty && !final {
		now := d.now()
		for _, st := range d.active {
			b.WriteString(d.activeLine(st, now))
			b.WriteByte('\n')
			d.drawn++
		}
		if d.status != "" {
			b.WriteString(d.status)
			b.WriteByte('\n')
			d.drawn++
		}
	}
	d.dirty = false
	if b.Len() > 0 {
		// A failed write to the terminal is not worth failing a conversion.
		_, _ = io.WriteString(d.w, b.String())
	}
}

func (d *Display) activeLine(st *layerState, now time.Time) string {
	el := now.Sub(st.started).Seconds()
	state := "converting"
	if st.complete == 0 {
		state = "starting"
	}
	total := "?"
	if st.total > 0 {
		total = Bytes(st.total)
	}
	rate := ""
	if el > 0 && st.complete > 0 {
		rate = Rate(float64(st.complete) / el)
	}
	return fmt.Sprintf("%s  %10s / %-10s %12s  %s", Short(st.digest), Bytes(st.complete), total, rate, state)
}

func (d *Display) finishedLine(st *layerState) string {
	if st.err != nil {
		return fmt.Sprintf("layer %s failed: %v", st.digest, st.err)
	}
	r := st.result
	verb := "converted"
	if r.Reused {
		verb = "reused"
	}
	rate := ""
	if r.Seconds > 0 {
		rate = ", " + Rate(float64(r.Source.Size)/r.Seconds)
	}
	return fmt.Sprintf("layer %s %s: %s -> %s (%s) in %.2fs%s",
		Short(r.Source.Digest), verb, Bytes(r.Source.Size), Bytes(r.Output.Size), Short(r.Output.Digest), r.Seconds, rate)
}

// Short returns "sha256:" and the first 12 hex digits of h.
func Short(h v1.Hash) string {
	hex := h.Hex
	if len(hex) > 12 {
		hex = hex[:12]
	}
	if h.Algorithm == "" {
		return hex
	}
	return h.Algorithm + ":" + hex
}

// Bytes formats a byte count in decimal units.
func Bytes(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.2f GB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1f MB", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1f kB", float64(n)/1e3)
	}
	return fmt.Sprintf("%d B", n)
}

// Rate formats a byte rate in MB/s.
func Rate(bytesPerSecond float64) string {
	return fmt.Sprintf("%.1f MB/s", bytesPerSecond/1e6)
}

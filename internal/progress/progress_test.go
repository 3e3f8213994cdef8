package progress

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
	"github.com/lazybase/lazybase/internal/eventually"
)

type syncBuf struct {
	mu     sync.Mutex
	b      bytes.Buffer
	writes int
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func hash(c byte) v1.Hash {
	return v1.Hash{Algorithm: "sha256", Hex: strings.Repeat(string(c), 64)}
}

func done(src, out v1.Hash, reused bool) convert.Event {
	return convert.Event{Kind: convert.LayerDone, Layer: src, Result: &convert.LayerResult{
		Source:  v1.Descriptor{Digest: src, Size: 2_000_000},
		Output:  v1.Descriptor{Digest: out, Size: 2_100_000},
		Seconds: 0.5,
		Reused:  reused,
	}}
}

// TestPlainOutputIsOneLinePerFinishedLayer: without a terminal, each layer
// that ends gives one line (converted, reused or failed) and Printf one
// more, in order, with no escape sequences and nothing for progress events.
func TestPlainOutputIsOneLinePerFinishedLayer(t *testing.T) {
	var buf syncBuf
	d := New(&buf)
	d.Start()
	a, b, c := hash('a'), hash('b'), hash('c')
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: a, Total: 2_000_000})
	d.Handle(convert.Event{Kind: convert.LayerProgress, Layer: a, Total: 2_000_000, Complete: 1_000_000})
	d.Handle(done(a, hash('1'), false))
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: b, Total: 10})
	d.Handle(done(b, hash('2'), true))
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: c, Total: 10})
	d.Handle(convert.Event{Kind: convert.LayerFailed, Layer: c, Err: errors.New("truncated gzip")})
	d.Printf("writing %s", "dst")
	d.Stop()
	got := buf.String()
	want := []string{
		"layer sha256:aaaaaaaaaaaa converted: 2.0 MB -> 2.1 MB (sha256:111111111111) in 0.50s, 4.0 MB/s",
		"layer sha256:bbbbbbbbbbbb reused: 2.0 MB -> 2.1 MB (sha256:222222222222) in 0.50s, 4.0 MB/s",
		"layer sha256:" + strings.Repeat("c", 64) + " failed: truncated gzip",
		"writing dst",
	}
	if got != strings.Join(want, "\n")+"\n" {
		t.Fatalf("got:\n%s\nwant:\n%s", got, strings.Join(want, "\n"))
	}
	if strings.Contains(got, "\x1b") {
		t.Fatal("escape sequences in plain output")
	}
}

// TestTerminalRedrawsLiveBlockAtMostTenTimesASecond: on a terminal, a burst
// of events gives at most one redraw per interval, the live block shows
// each active layer's size, rate and state and is redrawn in place, and
// Stop leaves only the finished lines.
func TestTerminalRedrawsLiveBlockAtMostTenTimesASecond(t *testing.T) {
	var buf syncBuf
	now := time.Unix(1000, 0)
	var mu sync.Mutex
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	d := New(&buf, WithTerminal(true), WithClock(clock))
	a, b := hash('a'), hash('b')
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: a, Total: 50_000_000})
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: b, Total: 8_000_000})
	mu.Lock()
	now = now.Add(2 * time.Second)
	mu.Unlock()
	d.Start()
	// Many events in a short time: at most ten redraws a second.
	start := time.Now()
	for i := int64(1); i <= 2000; i++ {
		d.Handle(convert.Event{Kind: convert.LayerProgress, Layer: a, Complete: i * 10_000})
		if i%200 == 0 {
			time.Sleep(30 * time.Millisecond)
		}
	}
	elapsed := time.Since(start)
	buf.mu.Lock()
	writes := buf.writes
	buf.mu.Unlock()
	if max := int(elapsed/DefaultInterval) + 2; writes > max {
		t.Errorf("%d redraws in %v, want at most %d", writes, elapsed, max)
	}
	// The ticker draws the last state after the burst.
	eventually.Require(t, 5*time.Second, "live lines for layers a and b, redrawn in place", func() error {
		s := buf.String()
		if !strings.Contains(s, "sha256:aaaaaaaaaaaa     20.0 MB / 50.0 MB       10.0 MB/s  converting") {
			return fmt.Errorf("no live line for layer a at 20 MB:\n%q", s)
		}
		if !strings.Contains(s, "sha256:bbbbbbbbbbbb") || !strings.Contains(s, "starting") {
			return fmt.Errorf("no live line for layer b:\n%q", s)
		}
		if !strings.Contains(s, "\x1b[2A\r\x1b[J") {
			return fmt.Errorf("no redraw in place:\n%q", s)
		}
		return nil
	})
	d.Handle(done(a, hash('1'), false))
	d.Handle(done(b, hash('2'), false))
	d.Stop()
	s := buf.String()
	tail := s[strings.LastIndex(s, "\x1b[J")+3:]
	if !strings.HasPrefix(tail, "layer sha256:aaaaaaaaaaaa converted") || strings.Count(tail, "\n") != 2 {
		t.Errorf("final render %q", tail)
	}
}

// TestStatusLineShownOnTerminalOnly: a status line is drawn under the live
// block on a terminal and erased when cleared; plain output never shows it.
func TestStatusLineShownOnTerminalOnly(t *testing.T) {
	var buf syncBuf
	d := New(&buf, WithTerminal(true))
	d.Start()
	d.Status("writing dst  1.0 MB / 2.0 MB")
	eventually.Require(t, 5*time.Second, "status line drawn", func() error {
		if s := buf.String(); !strings.Contains(s, "writing dst  1.0 MB / 2.0 MB\n") {
			return fmt.Errorf("output %q", s)
		}
		return nil
	})
	d.Status("")
	d.Stop()
	if s := buf.String(); !strings.HasSuffix(s, "\x1b[1A\r\x1b[J") {
		t.Errorf("status line not erased: %q", s)
	}
	// Plain output has no status line: the ticker renders the line
	// printed after the status, and nothing else.
	var plain syncBuf
	p := New(&plain)
	p.Start()
	p.Status("writing")
	p.Printf("marker")
	eventually.Require(t, 5*time.Second, "plain output rendered by the ticker", func() error {
		if plain.String() == "" {
			return errors.New("nothing written")
		}
		return nil
	})
	p.Stop()
	if got := plain.String(); got != "marker\n" {
		t.Errorf("plain output %q, want only the printed line", got)
	}
}

// TestLogLinesGoAboveLiveBlock: lines written to the Display (a logger's
// output) are printed above the live block, joined across writes, and the
// block is redrawn under them.
func TestLogLinesGoAboveLiveBlock(t *testing.T) {
	var buf syncBuf
	d := New(&buf, WithTerminal(true))
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: hash('a'), Total: 10})
	d.Start()
	eventually.Require(t, 5*time.Second, "live block drawn", func() error {
		if s := buf.String(); !strings.Contains(s, "sha256:aaaaaaaaaaaa") {
			return fmt.Errorf("output %q", s)
		}
		return nil
	})
	if _, err := d.Write([]byte("level=warning msg=one\nlevel=info ")); err != nil {
		t.Fatal(err)
	}
	d.Write([]byte("msg=two\n"))
	const want = "\x1b[1A\r\x1b[Jlevel=warning msg=one\nlevel=info msg=two\nsha256:aaaaaaaaaaaa"
	eventually.Require(t, 5*time.Second, "log lines above the redrawn live block", func() error {
		if s := buf.String(); !strings.Contains(s, want) {
			return fmt.Errorf("output %q", s)
		}
		return nil
	})
	d.Stop()
}

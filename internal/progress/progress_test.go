package progress

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/lazybase/lazybase/convert"
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

func TestPlain(t *testing.T) {
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

func TestTerminal(t *testing.T) {
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
	time.Sleep(2 * DefaultInterval)
	s := buf.String()
	if !strings.Contains(s, "sha256:aaaaaaaaaaaa     20.0 MB / 50.0 MB       10.0 MB/s  converting") {
		t.Errorf("no live line for layer a:\n%q", s)
	}
	if !strings.Contains(s, "sha256:bbbbbbbbbbbb") || !strings.Contains(s, "starting") {
		t.Errorf("no live line for layer b:\n%q", s)
	}
	if !strings.Contains(s, "\x1b[2A\r\x1b[J") {
		t.Errorf("no redraw in place:\n%q", s)
	}
	d.Handle(done(a, hash('1'), false))
	d.Handle(done(b, hash('2'), false))
	d.Stop()
	s = buf.String()
	tail := s[strings.LastIndex(s, "\x1b[J")+3:]
	if !strings.HasPrefix(tail, "layer sha256:aaaaaaaaaaaa converted") || strings.Count(tail, "\n") != 2 {
		t.Errorf("final render %q", tail)
	}
}

func TestStatus(t *testing.T) {
	var buf syncBuf
	d := New(&buf, WithTerminal(true))
	d.Start()
	d.Status("writing dst  1.0 MB / 2.0 MB")
	time.Sleep(3 * DefaultInterval)
	d.Status("")
	d.Stop()
	s := buf.String()
	if !strings.Contains(s, "writing dst  1.0 MB / 2.0 MB\n") || !strings.HasSuffix(s, "\x1b[1A\r\x1b[J") {
		t.Errorf("status output %q", s)
	}
	// Plain output has no status line.
	var plain syncBuf
	p := New(&plain)
	p.Start()
	p.Status("writing")
	time.Sleep(2 * DefaultInterval)
	p.Stop()
	if plain.String() != "" {
		t.Errorf("plain output %q", plain.String())
	}
}

func TestWriter(t *testing.T) {
	var buf syncBuf
	d := New(&buf, WithTerminal(true))
	d.Handle(convert.Event{Kind: convert.LayerStarted, Layer: hash('a'), Total: 10})
	d.Start()
	time.Sleep(2 * DefaultInterval)
	if _, err := d.Write([]byte("level=warning msg=one\nlevel=info ")); err != nil {
		t.Fatal(err)
	}
	d.Write([]byte("msg=two\n"))
	time.Sleep(2 * DefaultInterval)
	d.Stop()
	s := buf.String()
	// Log lines go above the live block, which is redrawn under them.
	if !strings.Contains(s, "\x1b[1A\r\x1b[Jlevel=warning msg=one\nlevel=info msg=two\nsha256:aaaaaaaaaaaa") {
		t.Errorf("output %q", s)
	}
}

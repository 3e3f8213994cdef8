package cpuacct

import (
	"bytes"
	"compress/gzip"
	"crypto/sha256"
	"io"
	"runtime"
	"sync"
	"testing"
	"time"
)

// burn spends d of CPU time on the calling thread, which the caller has
// locked to its goroutine.
func burn(t testing.TB, d time.Duration) {
	t.Helper()
	start := ThreadCPU()
	var sum [32]byte
	buf := make([]byte, 4096)
	for ThreadCPU()-start < d {
		for range 16 {
			sum = sha256.Sum256(buf)
			buf[0] = sum[0]
		}
	}
}

// burnUnlocked spends about d of CPU time outside any span.
func burnUnlocked(t testing.TB, d time.Duration) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	burn(t, d)
}

func TestSpanChargesItsActivity(t *testing.T) {
	a := New()
	p0, err := ProcessCPU()
	if err != nil {
		t.Fatal(err)
	}
	a.Do(Guard, func() { burn(t, 50*time.Millisecond) })
	p1, err := ProcessCPU()
	if err != nil {
		t.Fatal(err)
	}
	got := a.CPU(Guard)
	if got < 50*time.Millisecond {
		t.Errorf("guard CPU %v, burned 50ms in its span", got)
	}
	// getrusage counts in microseconds at least as fine; allow its rounding.
	if got > p1-p0+time.Millisecond {
		t.Errorf("guard CPU %v exceeds the process's %v over the span", got, p1-p0)
	}
	for _, act := range Activities() {
		if act != Guard && a.CPU(act) != 0 {
			t.Errorf("%s charged %v for a guard span", act, a.CPU(act))
		}
	}
	if s := a.Snapshot(); s.Units["guard"] != 1 {
		t.Errorf("guard units %d, want 1", s.Units["guard"])
	}
}

// TestActivitiesDoNotLeak runs a span that sleeps while other goroutines
// burn CPU, in a span of another activity and outside any span.
func TestActivitiesDoNotLeak(t *testing.T) {
	a := New()
	var wg sync.WaitGroup
	wg.Add(3)
	go func() {
		defer wg.Done()
		a.Do(LocalUnpack, func() { time.Sleep(200 * time.Millisecond) })
	}()
	go func() {
		defer wg.Done()
		a.Do(BackgroundFetch, func() { burn(t, 150*time.Millisecond) })
	}()
	go func() {
		defer wg.Done()
		burnUnlocked(t, 150*time.Millisecond)
	}()
	wg.Wait()
	if got := a.CPU(LocalUnpack); got > 10*time.Millisecond {
		t.Errorf("a sleeping local unpack was charged %v while others burned", got)
	}
	if got := a.CPU(BackgroundFetch); got < 150*time.Millisecond || got > 250*time.Millisecond {
		t.Errorf("background fetch charged %v, burned 150ms", got)
	}
	for _, act := range []Activity{Guard, Hashing, OnDemand, TOC} {
		if a.CPU(act) != 0 {
			t.Errorf("%s charged %v without a span", act, a.CPU(act))
		}
	}
}

func TestNestedSpanSplitsItsPart(t *testing.T) {
	a := New()
	a.Do(Guard, func() {
		burn(t, 30*time.Millisecond)
		a.Do(Hashing, func() {
			if act, ok := a.Current(); !ok || act != Hashing {
				t.Errorf("current activity in the inner span: %v %v, want hashing", act, ok)
			}
			burn(t, 60*time.Millisecond)
		})
		if act, ok := a.Current(); !ok || act != Guard {
			t.Errorf("current activity after the inner span: %v %v, want guard", act, ok)
		}
		burn(t, 30*time.Millisecond)
	})
	if g := a.CPU(Guard); g < 60*time.Millisecond || g > 80*time.Millisecond {
		t.Errorf("guard charged %v, burned 60ms outside the hashing span", g)
	}
	if h := a.CPU(Hashing); h < 60*time.Millisecond || h > 80*time.Millisecond {
		t.Errorf("hashing charged %v, burned 60ms", h)
	}
	if _, ok := a.Current(); ok {
		t.Error("a span is current after every span ended")
	}
}

func TestConcurrentUnits(t *testing.T) {
	a := New()
	const workers, units = 4, 5
	p0, err := ProcessCPU()
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range units {
				a.Do(OnDemand, func() { burn(t, 5*time.Millisecond) })
			}
		}()
	}
	wg.Wait()
	p1, err := ProcessCPU()
	if err != nil {
		t.Fatal(err)
	}
	got := a.CPU(OnDemand)
	if want := workers * units * 5 * time.Millisecond; got < want {
		t.Errorf("on-demand charged %v, burned %v", got, want)
	}
	if got > p1-p0+time.Millisecond {
		t.Errorf("on-demand charged %v, more than the process's %v", got, p1-p0)
	}
	s := a.Snapshot()
	if s.Units["on_demand"] != workers*units {
		t.Errorf("units %d, want %d", s.Units["on_demand"], workers*units)
	}
	if s.ProcessCPUSeconds < s.CPUSeconds["on_demand"] {
		t.Errorf("process CPU %.3fs below the accounted %.3fs", s.ProcessCPUSeconds, s.CPUSeconds["on_demand"])
	}
	if s.GoGCCPUSeconds < 0 || s.GoGCCPUSeconds > s.ProcessCPUSeconds {
		t.Errorf("Go GC CPU %.3fs, process %.3fs", s.GoGCCPUSeconds, s.ProcessCPUSeconds)
	}
	if s.CPUSeconds[Other] < 0 {
		t.Errorf("%s is negative: %v", Other, s.CPUSeconds[Other])
	}
}

func TestFetchedBytesFollowTheSpan(t *testing.T) {
	a := New()
	a.AddFetchedCurrent(7)
	a.Do(TOC, func() { a.AddFetchedCurrent(100) })
	a.Do(BackgroundFetch, func() {
		a.AddFetchedCurrent(1000)
		// Another goroutine, not in the span, counts as outside.
		done := make(chan struct{})
		go func() { defer close(done); a.AddFetchedCurrent(10000) }()
		<-done
	})
	a.AddFetched(Guard, 5)
	a.AddWritten(LocalUnpack, 42)
	s := a.Snapshot()
	for k, want := range map[string]int64{"toc": 100, "background_fetch": 1000, "guard": 5, OtherBytes: 10007, "on_demand": 0} {
		if got := s.RegistryBytes[k]; got != want {
			t.Errorf("registry bytes %s = %d, want %d", k, got, want)
		}
	}
	if got := s.DiskWrittenBytes["local_unpack"]; got != 42 {
		t.Errorf("written local_unpack = %d, want 42", got)
	}
}

func TestActivityNames(t *testing.T) {
	seen := map[string]bool{}
	for _, act := range Activities() {
		n := act.String()
		if n == "" || n == "unknown" || n == Other || seen[n] {
			t.Errorf("activity %d has name %q", act, n)
		}
		seen[n] = true
	}
	if Activity(200).String() != "unknown" {
		t.Error("an out-of-range activity has a name")
	}
}

// BenchmarkSpan measures the overhead of one measured unit (Start and End
// around nothing).
func BenchmarkSpan(b *testing.B) {
	a := New()
	for b.Loop() {
		a.Start(Guard).End()
	}
}

// BenchmarkSpanParallel is BenchmarkSpan on every P at once.
func BenchmarkSpanParallel(b *testing.B) {
	a := New()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			a.Start(BackgroundFetch).End()
		}
	})
}

// BenchmarkUnit puts the overhead next to a unit of the size the
// snapshotter measures: inflating one 50 kB eStargz-like chunk (stargz's
// default chunk size is 4 MiB at most, 50 kB typical for small files),
// bare and inside a span.
func BenchmarkUnit(b *testing.B) {
	var zbuf bytes.Buffer
	zw := gzip.NewWriter(&zbuf)
	plain := make([]byte, 50<<10)
	for i := range plain {
		plain[i] = byte(i * 7 % 61) // compressible, like text and binaries
	}
	if _, err := zw.Write(plain); err != nil {
		b.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		b.Fatal(err)
	}
	z := zbuf.Bytes()
	out := make([]byte, len(plain))
	inflate := func() {
		zr, err := gzip.NewReader(bytes.NewReader(z))
		if err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(zr, out); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("bare", func(b *testing.B) {
		for b.Loop() {
			inflate()
		}
	})
	b.Run("measured", func(b *testing.B) {
		a := New()
		for b.Loop() {
			a.Do(OnDemand, inflate)
		}
	})
}

package cpuacct

import (
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Activity is a kind of work the account measures.
type Activity uint8

// The activities the snapshotter measures.
const (
	// Guard is the export guard's transfer of a blob: reading it from
	// the registry and writing it to containerd's content store.
	Guard Activity = iota
	// Hashing is sha256 computed by lazybase code in this process
	// (manifests and configs the guard's registry verifies; blob
	// digests when the content store hashes in process). containerd
	// hashes the blobs the guard streams into its content store on its
	// side, and stargz verifies the chunks it reads inside the reads
	// that follow.
	Hashing
	// LocalUnpack is the local unpack of a committed blob
	// (local.enable): decompression and writing the files.
	LocalUnpack
	// BackgroundFetch is stargz's background fetch of a layer: reading
	// and decompressing its chunks.
	BackgroundFetch
	// OnDemand is the lazy filesystem's reads of a layer's files that
	// decompress from the blob (FUSE reads missing the cache, prefetch).
	OnDemand
	// TOC is the check of a layer's TOC at mount: fetching and
	// decoding it.
	TOC

	numActivities
)

// Other labels what no span measured: CPU time in Snapshot.CPUSeconds
// (see the package documentation), bytes in Snapshot.RegistryBytes
// fetched outside any span.
const Other = "fuse_and_other"

// OtherBytes labels registry bytes fetched outside any span.
const OtherBytes = "other"

var activityNames = [numActivities]string{
	Guard:           "guard",
	Hashing:         "hashing",
	LocalUnpack:     "local_unpack",
	BackgroundFetch: "background_fetch",
	OnDemand:        "on_demand",
	TOC:             "toc",
}

// String returns the activity's label, as metrics and status show it.
func (a Activity) String() string {
	if a < numActivities {
		return activityNames[a]
	}
	return "unknown"
}

// Activities lists every activity in a fixed order.
func Activities() []Activity {
	out := make([]Activity, numActivities)
	for i := range out {
		out[i] = Activity(i)
	}
	return out
}

// fetches and writes tell which activities fetch from registries and
// which write to disk, in the byte counts Snapshot reports.
var (
	fetches = [numActivities]bool{Guard: true, BackgroundFetch: true, OnDemand: true, TOC: true}
	writes  = [numActivities]bool{Guard: true, LocalUnpack: true}
)

// Account sums CPU time and bytes per activity. Its methods are safe for
// concurrent use; the zero value is not usable, use New.
type Account struct {
	cpu     [numActivities]atomic.Int64 // nanoseconds
	units   [numActivities]atomic.Int64
	fetched [numActivities + 1]atomic.Int64 // the last one: outside any span
	written [numActivities]atomic.Int64

	// other is the highest "fuse_and_other" reported, which keeps it
	// from going down when a long span ends (see Snapshot).
	other atomic.Int64

	mu sync.Mutex
	// running holds the innermost span of each thread that runs one.
	running map[int]*Span
}

// New returns an empty account.
func New() *Account {
	return &Account{running: map[int]*Span{}}
}

// Default is the process's account. It is the one package-level account
// on purpose: what it measures (thread CPU clocks, getrusage) belongs to the
// process, so two daemons in one process (tests) share it and read the
// same figures.
var Default = New()

// Span is one unit of work being measured; End it on the goroutine that
// started it.
type Span struct {
	a     *Account
	act   Activity
	tid   int
	start int64 // the thread's CPU clock when the span last resumed
	outer *Span
}

// Start starts measuring a unit of act on the calling goroutine, which
// stays locked to its OS thread until End.
func (a *Account) Start(act Activity) *Span {
	runtime.LockOSThread()
	s := &Span{a: a, act: act, tid: unix.Gettid()}
	a.mu.Lock()
	s.outer = a.running[s.tid]
	a.running[s.tid] = s
	a.mu.Unlock()
	now := threadCPU()
	if s.outer != nil {
		a.cpu[s.outer.act].Add(now - s.outer.start)
	}
	s.start = now
	return s
}

// End charges the span's CPU time to its activity and unlocks the
// goroutine from its thread. The span's outer span, if any, resumes.
func (s *Span) End() {
	now := threadCPU()
	a := s.a
	a.cpu[s.act].Add(now - s.start)
	a.units[s.act].Add(1)
	a.mu.Lock()
	if s.outer != nil {
		a.running[s.tid] = s.outer
		s.outer.start = threadCPU()
	} else {
		delete(a.running, s.tid)
	}
	a.mu.Unlock()
	runtime.UnlockOSThread()
}

// Do runs fn as one unit of act.
func (a *Account) Do(act Activity, fn func()) {
	s := a.Start(act)
	defer s.End()
	fn()
}

// Current returns the activity of the span the calling goroutine runs in,
// if any. A goroutine in a span is locked to its thread and no other
// goroutine runs there, so the thread tells.
func (a *Account) Current() (Activity, bool) {
	tid := unix.Gettid()
	a.mu.Lock()
	s := a.running[tid]
	a.mu.Unlock()
	if s == nil {
		return 0, false
	}
	return s.act, true
}

// AddFetched counts n bytes fetched from a registry for act.
func (a *Account) AddFetched(act Activity, n int64) {
	if act < numActivities {
		a.fetched[act].Add(n)
	}
}

// AddFetchedOther counts n bytes fetched from a registry outside any span.
func (a *Account) AddFetchedOther(n int64) { a.fetched[numActivities].Add(n) }

// AddFetchedCurrent counts n registry bytes for the activity of the
// calling goroutine's span, or as fetched outside any span.
func (a *Account) AddFetchedCurrent(n int64) {
	if act, ok := a.Current(); ok {
		a.AddFetched(act, n)
		return
	}
	a.AddFetchedOther(n)
}

// AddWritten counts n bytes written to disk for act.
func (a *Account) AddWritten(act Activity, n int64) {
	if act < numActivities {
		a.written[act].Add(n)
	}
}

// CPU returns the CPU time charged to act so far.
func (a *Account) CPU(act Activity) time.Duration {
	if act >= numActivities {
		return 0
	}
	return time.Duration(a.cpu[act].Load())
}

// Snapshot is an account's totals at one moment.
type Snapshot struct {
	// ProcessCPUSeconds is the whole process's CPU time, user and
	// kernel, all threads; -1 when it could not be read.
	ProcessCPUSeconds float64 `json:"process_cpu_seconds"`
	// CPUSeconds is the CPU time per activity, plus "fuse_and_other":
	// the process's time that no span measured. That one never goes
	// down: it leads the truth by at most the CPU time of the spans in
	// flight (a local unpack is one span).
	CPUSeconds map[string]float64 `json:"cpu_seconds"`
	// GoGCCPUSeconds is the Go runtime's estimate of the CPU time its
	// garbage collector has used (runtime/metrics
	// /cpu/classes/gc/total:cpu-seconds), -1 when unknown: most of it is
	// in fuse_and_other, the assists that units make in their spans.
	GoGCCPUSeconds float64 `json:"go_gc_cpu_seconds"`
	// Units counts the measured units per activity.
	Units map[string]int64 `json:"units"`
	// RegistryBytes are the bytes fetched from registries per activity
	// that fetches (guard, background_fetch, on_demand, toc), plus "other"
	// for bytes fetched outside any span.
	RegistryBytes map[string]int64 `json:"registry_bytes"`
	// DiskWrittenBytes are the bytes written to disk per activity, where
	// known (guard: into containerd's ingest; local_unpack: the layer's
	// uncompressed tar stream).
	DiskWrittenBytes map[string]int64 `json:"disk_written_bytes"`
}

// Snapshot returns the account's totals with the process's CPU time.
func (a *Account) Snapshot() Snapshot {
	s := Snapshot{
		CPUSeconds:       map[string]float64{},
		Units:            map[string]int64{},
		RegistryBytes:    map[string]int64{},
		DiskWrittenBytes: map[string]int64{},
	}
	var accounted time.Duration
	for _, act := range Activities() {
		d := a.CPU(act)
		accounted += d
		s.CPUSeconds[act.String()] = d.Seconds()
		s.Units[act.String()] = a.units[act].Load()
		if fetches[act] {
			s.RegistryBytes[act.String()] = a.fetched[act].Load()
		}
		if writes[act] {
			s.DiskWrittenBytes[act.String()] = a.written[act].Load()
		}
	}
	s.RegistryBytes[OtherBytes] = a.fetched[numActivities].Load()
	s.GoGCCPUSeconds = goGCCPU()
	s.ProcessCPUSeconds = -1
	s.CPUSeconds[Other] = 0
	if p, err := ProcessCPU(); err == nil {
		s.ProcessCPUSeconds = p.Seconds()
		s.CPUSeconds[Other] = a.otherSince(p - accounted).Seconds()
	}
	return s
}

// otherSince returns the CPU time no span measured, given the process's
// time less the accounted time: a span in flight is in the process's time
// but not yet accounted, so the difference falls back when it ends. The
// result never goes below an earlier one (it is a counter), so it leads
// the truth by at most the CPU time of the spans in flight.
func (a *Account) otherSince(d time.Duration) time.Duration {
	for {
		prev := a.other.Load()
		if int64(d) <= prev {
			return time.Duration(prev)
		}
		if a.other.CompareAndSwap(prev, int64(d)) {
			return d
		}
	}
}

// gcMetric is the runtime metric of the garbage collector's CPU time.
const gcMetric = "/cpu/classes/gc/total:cpu-seconds"

// goGCCPU returns the runtime's estimate of the garbage collector's CPU
// time in seconds, -1 when the runtime does not have it.
func goGCCPU() float64 {
	sample := []metrics.Sample{{Name: gcMetric}}
	metrics.Read(sample)
	if sample[0].Value.Kind() != metrics.KindFloat64 {
		return -1
	}
	return sample[0].Value.Float64()
}

// threadCPU returns the calling thread's CPU clock in nanoseconds.
func threadCPU() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_THREAD_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}

// ThreadCPU returns the calling thread's CPU time so far. Only meaningful
// while the goroutine is locked to its thread.
func ThreadCPU() time.Duration { return time.Duration(threadCPU()) }

// ProcessCPU returns the process's CPU time so far, user and kernel, all
// threads (getrusage RUSAGE_SELF).
func ProcessCPU() (time.Duration, error) {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		return 0, err
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()), nil
}

package shaper

import (
	"slices"
	"sort"
	"time"
)

// Event is one request the proxy forwarded.
type Event struct {
	Time      time.Time
	Duration  time.Duration // until the response ended; while in flight, until forwarded
	Phase     string
	Method    string
	Path      string
	Repo      string
	Kind      Kind
	Ref       string  // blob digest, or manifest tag or digest
	Range     string  // the Range header as sent
	Requested []Range // parsed Range header; nil for none
	Served    []Range // body bytes actually sent, as blob offsets
	Size      int64   // whole blob size when the response told it, else -1
	Status    int
	Bytes     int64 // body bytes sent to the client
}

// Mark is a position in the proxy's record.
type Mark int

// Mark returns the current position, for Since.
func (p *Proxy) Mark() Mark {
	p.mu.Lock()
	defer p.mu.Unlock()
	return Mark(len(p.events))
}

// Events returns a copy of the record.
func (p *Proxy) Events() []Event {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.copyEvents(p.events)
}

// copyEvents copies events; the caller holds p.mu.
func (p *Proxy) copyEvents(evs []*Event) []Event {
	out := make([]Event, len(evs))
	for i, e := range evs {
		out[i] = *e
		out[i].Requested = slices.Clone(e.Requested)
		out[i].Served = slices.Clone(e.Served)
	}
	return out
}

// Reset forgets every recorded event.
func (p *Proxy) Reset() {
	p.mu.Lock()
	p.events = nil
	p.mu.Unlock()
}

// Stats summarises every recorded event.
func (p *Proxy) Stats() Stats { return p.Since(0) }

// Since summarises the events recorded after m. After a Reset, marks taken
// before it count from the start.
func (p *Proxy) Since(m Mark) Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	if int(m) > len(p.events) {
		m = 0
	}
	return Summarize(p.copyEvents(p.events[m:]))
}

// StatsFor summarises the events recorded in the named phase.
func (p *Proxy) StatsFor(phase string) Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	var evs []*Event
	for _, e := range p.events {
		if e.Phase == phase {
			evs = append(evs, e)
		}
	}
	return Summarize(p.copyEvents(evs))
}

// Stats summarises a set of events.
type Stats struct {
	Requests  int   // all requests
	Bytes     int64 // all body bytes sent
	Manifests int   // manifest requests (GET and HEAD)
	Blobs     map[string]*BlobStats
}

// BlobStats summarises the requests for one blob digest.
type BlobStats struct {
	Digest    string
	Size      int64 // -1 when no response told it
	GETs      int
	HEADs     int
	FullGETs  int // GETs without a Range header
	RangeGETs int
	Bytes     int64   // body bytes sent, counting repeats
	Served    []Range // served ranges, in request order
}

// Covered returns how many distinct bytes of the blob were sent.
func (b *BlobStats) Covered() int64 {
	rs := slices.Clone(b.Served)
	sort.Slice(rs, func(i, j int) bool { return rs[i].Start < rs[j].Start })
	var total int64
	end := int64(-1) // last byte counted
	for _, r := range rs {
		s := max(r.Start, end+1)
		if r.End >= s {
			total += r.End - s + 1
			end = r.End
		}
	}
	return total
}

// Repeated returns how many bytes were sent more than once.
func (b *BlobStats) Repeated() int64 { return b.Bytes - b.Covered() }

// Summarize computes Stats from events.
func Summarize(events []Event) Stats {
	s := Stats{Blobs: map[string]*BlobStats{}}
	for _, e := range events {
		s.Requests++
		s.Bytes += e.Bytes
		switch e.Kind {
		case KindManifest:
			s.Manifests++
		case KindBlob:
			b := s.Blobs[e.Ref]
			if b == nil {
				b = &BlobStats{Digest: e.Ref, Size: -1}
				s.Blobs[e.Ref] = b
			}
			if e.Size >= 0 {
				b.Size = e.Size
			}
			switch e.Method {
			case "HEAD":
				b.HEADs++
			case "GET":
				b.GETs++
				if e.Range == "" {
					b.FullGETs++
				} else {
					b.RangeGETs++
				}
			}
			b.Bytes += e.Bytes
			b.Served = append(b.Served, e.Served...)
		}
	}
	return s
}

// Blob returns the stats of one digest; a zero BlobStats when it was never
// requested.
func (s Stats) Blob(digest string) BlobStats {
	if b := s.Blobs[digest]; b != nil {
		return *b
	}
	return BlobStats{Digest: digest, Size: -1}
}

// BlobBytes returns the body bytes sent for blobs.
func (s Stats) BlobBytes() int64 {
	var n int64
	for _, b := range s.Blobs {
		n += b.Bytes
	}
	return n
}

// Fetched returns the digests of blobs whose bytes were sent, sorted.
func (s Stats) Fetched() []string {
	var out []string
	for d, b := range s.Blobs {
		if b.Bytes > 0 {
			out = append(out, d)
		}
	}
	sort.Strings(out)
	return out
}

// Coverage returns the fraction of a blob of the given size that was sent.
func (s Stats) Coverage(digest string, size int64) float64 {
	if size <= 0 {
		return 0
	}
	b := s.Blob(digest)
	return float64(b.Covered()) / float64(size)
}

package shaper

import (
	"sort"
	"time"
)

// End is when the response to e ended (or, while in flight, when it was
// forwarded).
func (e Event) End() time.Time { return e.Time.Add(e.Duration) }

// SequentialChain returns the longest chain of events in which each
// starts no earlier than the one before it ended, in order: the round
// trips a client made one after the other. Its length is a lower bound of
// the latency the events cost (one round trip each) whatever the
// bandwidth; events that overlap cost one round trip together. Ties
// between chains of the same length go to the one ending first.
func SequentialChain(events []Event) []Event {
	n := len(events)
	if n == 0 {
		return nil
	}
	// Order by end (then start, then record order); best[i] is the
	// longest chain ending with byEnd[i], prev[i] its predecessor.
	byEnd := make([]int, n)
	for i := range byEnd {
		byEnd[i] = i
	}
	sort.SliceStable(byEnd, func(a, b int) bool {
		ea, eb := events[byEnd[a]].End(), events[byEnd[b]].End()
		if !ea.Equal(eb) {
			return ea.Before(eb)
		}
		return events[byEnd[a]].Time.Before(events[byEnd[b]].Time)
	})
	best := make([]int, n)
	prev := make([]int, n)
	// top[k] is the position in byEnd, among those seen so far, of the
	// longest chain ending at or before byEnd[k] (prefix maximum).
	top := make([]int, n)
	for k, i := range byEnd {
		start := events[i].Time
		// The last event (in end order) that ended by start.
		j := sort.Search(k, func(m int) bool { return events[byEnd[m]].End().After(start) }) - 1
		best[k], prev[k] = 1, -1
		if j >= 0 {
			best[k], prev[k] = best[top[j]]+1, top[j]
		}
		top[k] = k
		if k > 0 && best[top[k-1]] >= best[k] {
			top[k] = top[k-1]
		}
	}
	var chain []Event
	for k := top[n-1]; k >= 0; k = prev[k] {
		chain = append(chain, events[byEnd[k]])
	}
	for a, b := 0, len(chain)-1; a < b; a, b = a+1, b-1 {
		chain[a], chain[b] = chain[b], chain[a]
	}
	return chain
}

package shaper

import (
	"math/rand/v2"
	"testing"
	"time"
)

// ev is an event from a ms to b ms after t0, named by its Path.
func ev(name string, a, b int) Event {
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	return Event{Path: name, Time: t0.Add(time.Duration(a) * time.Millisecond), Duration: time.Duration(b-a) * time.Millisecond}
}

func names(evs []Event) []string {
	var out []string
	for _, e := range evs {
		out = append(out, e.Path)
	}
	return out
}

func TestSequentialChain(t *testing.T) {
	for _, tc := range []struct {
		name   string
		events []Event
		want   []string
	}{
		{"none", nil, nil},
		{"one", []Event{ev("a", 0, 20)}, []string{"a"}},
		{"all at once", []Event{ev("a", 0, 20), ev("b", 1, 21), ev("c", 2, 40)}, []string{"a"}},
		{"one after the other", []Event{ev("c", 40, 60), ev("a", 0, 20), ev("b", 20, 40)}, []string{"a", "b", "c"}},
		{
			// token, manifest, config, then three layers' TOCs in
			// parallel, then one read: 5 round trips for 7 requests.
			"pull then parallel then one",
			[]Event{ev("token", 0, 20), ev("manifest", 21, 41), ev("config", 42, 62),
				ev("toc1", 63, 90), ev("toc2", 63, 85), ev("toc3", 64, 95), ev("read", 96, 120)},
			[]string{"token", "manifest", "config", "toc2", "read"},
		},
		{
			// A long request overlapping a chain of short ones does not
			// shorten it.
			"long beside short",
			[]Event{ev("long", 0, 100), ev("s1", 1, 10), ev("s2", 11, 20), ev("s3", 21, 30), ev("after", 101, 110)},
			[]string{"s1", "s2", "s3", "after"},
		},
		{"overlap by one ms is not sequential", []Event{ev("a", 0, 20), ev("b", 19, 40)}, []string{"a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := names(SequentialChain(tc.events))
			if len(got) != len(tc.want) {
				t.Fatalf("chain %q, want %q", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("chain %q, want %q", got, tc.want)
				}
			}
		})
	}
}

// TestSequentialChainLongest checks SequentialChain against a quadratic
// reference on random intervals: the chain is valid (each starts after the
// one before ended) and as long as the longest.
func TestSequentialChainLongest(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		n := rng.IntN(40)
		evs := make([]Event, n)
		for i := range evs {
			a := rng.IntN(500)
			evs[i] = ev("e", a, a+1+rng.IntN(60))
		}
		chain := SequentialChain(evs)
		for i := 1; i < len(chain); i++ {
			if chain[i].Time.Before(chain[i-1].End()) {
				t.Fatalf("round %d: chain step %d starts %s before the previous ended %s", round, i, chain[i].Time, chain[i-1].End())
			}
		}
		// Reference: the longest chain starting at each event, by
		// recursion (durations are positive: no cycles).
		memo := map[int]int{}
		var from func(i int) int
		from = func(i int) int {
			if v, ok := memo[i]; ok {
				return v
			}
			m := 1
			for j := range evs {
				if !evs[j].Time.Before(evs[i].End()) {
					m = max(m, 1+from(j))
				}
			}
			memo[i] = m
			return m
		}
		best := 0
		for i := range evs {
			best = max(best, from(i))
		}
		if len(chain) != best {
			t.Fatalf("round %d: chain of %d, the longest has %d", round, len(chain), best)
		}
	}
}

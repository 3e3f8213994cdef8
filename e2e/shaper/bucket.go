package shaper

import (
	"context"
	"sync"
	"time"
)

// bucket is a token bucket of bytes: rate bytes per second, at most burst
// bytes saved up. A rate of zero or less means unlimited.
type bucket struct {
	mu     sync.Mutex
	rate   float64
	burst  float64
	tokens float64
	last   time.Time
}

func (b *bucket) set(rate, burst int64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.rate, b.burst = float64(rate), float64(burst)
	b.tokens = b.burst
	b.last = time.Now()
}

// take reserves n bytes and waits until they may be sent.
func (b *bucket) take(ctx context.Context, n int) error {
	b.mu.Lock()
	if b.rate <= 0 {
		b.mu.Unlock()
		return nil
	}
	now := time.Now()
	b.tokens += now.Sub(b.last).Seconds() * b.rate
	if b.tokens > b.burst {
		b.tokens = b.burst
	}
	b.last = now
	b.tokens -= float64(n)
	var wait time.Duration
	if b.tokens < 0 {
		wait = time.Duration(-b.tokens / b.rate * float64(time.Second))
	}
	b.mu.Unlock()
	if wait == 0 {
		return nil
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

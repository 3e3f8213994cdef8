package eventually

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Polling intervals: the first retry comes quickly, later ones back off so
// that a slow condition does not spin.
const (
	firstInterval = 5 * time.Millisecond
	maxInterval   = 200 * time.Millisecond
)

// errNotYet is the reason given when a condition never ran to completion.
var errNotYet = errors.New("condition not checked")

// Wait calls cond until it returns nil, ctx is done or timeout has passed.
// On timeout it returns an error that wraps cond's last error.
func Wait(ctx context.Context, timeout time.Duration, cond func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	last := errNotYet
	interval := firstInterval
	for {
		if last = cond(); last == nil {
			return nil
		}
		t := time.NewTimer(interval)
		select {
		case <-ctx.Done():
			t.Stop()
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return fmt.Errorf("not true after %s: %w", timeout, last)
			}
			return fmt.Errorf("%w (last: %w)", ctx.Err(), last)
		case <-t.C:
		}
		interval = min(2*interval, maxInterval)
	}
}

// TB is the part of testing.TB that Require uses.
type TB interface {
	Helper()
	Fatalf(format string, args ...any)
}

// Require is Wait for a test: it fails t at once, naming what, when cond
// does not hold within timeout.
func Require(t TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	if err := Wait(context.Background(), timeout, cond); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

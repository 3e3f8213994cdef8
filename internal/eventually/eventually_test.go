package eventually

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestWaitReturnsOnceConditionHolds(t *testing.T) {
	var calls atomic.Int32
	err := Wait(context.Background(), 5*time.Second, func() error {
		if calls.Add(1) < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := calls.Load(); n != 3 {
		t.Errorf("condition ran %d times, want 3", n)
	}
}

func TestWaitTimeoutWrapsLastReason(t *testing.T) {
	reason := errors.New("layer sha256:abc is scheduled")
	start := time.Now()
	err := Wait(context.Background(), 50*time.Millisecond, func() error { return reason })
	if !errors.Is(err, reason) {
		t.Fatalf("error %v does not wrap the last reason", err)
	}
	if !strings.Contains(err.Error(), "50ms") {
		t.Errorf("error %q does not say how long it waited", err)
	}
	if el := time.Since(start); el < 50*time.Millisecond {
		t.Errorf("gave up after %s, before the timeout", el)
	}
}

func TestWaitStopsWhenContextIsCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := Wait(ctx, time.Minute, func() error { return errors.New("never") })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
}

type recorder struct{ failed string }

func (r *recorder) Helper() {}
func (r *recorder) Fatalf(format string, args ...any) {
	r.failed = fmt.Sprintf(format, args...)
}

func TestRequireFailsNamingWhatAndWhy(t *testing.T) {
	var r recorder
	Require(&r, 20*time.Millisecond, "daemon listening", func() error { return errors.New("no socket") })
	if !strings.Contains(r.failed, "daemon listening") || !strings.Contains(r.failed, "no socket") {
		t.Errorf("failure %q does not name what was awaited and why it failed", r.failed)
	}
	r = recorder{}
	Require(&r, time.Second, "ok", func() error { return nil })
	if r.failed != "" {
		t.Errorf("failed although the condition held: %s", r.failed)
	}
}

package exportguard

import (
	"errors"
	"fmt"
	"time"

	"github.com/containerd/containerd/v2/core/leases"
	"github.com/prometheus/client_golang/prometheus"
)

// Defaults for a Guard's options.
const (
	DefaultParallelism    = 4
	DefaultAttempts       = 5
	DefaultInitialBackoff = 200 * time.Millisecond
	DefaultMaxBackoff     = 5 * time.Second
)

// Option configures a Guard.
type Option func(*options) error

type options struct {
	parallelism int
	attempts    int
	backoff     time.Duration
	maxBackoff  time.Duration
	leases      leases.Manager
	leaseID     string
	leaseOpts   []leases.Opt
	gcRoot      bool
	retain      string // retention lease id (WithRetention)
	maxBytes    int64  // retention budget (WithRetention)
	labels      map[string]string
	progress    func(Progress)
	registerer  prometheus.Registerer
	now         func() time.Time
}

func defaults() options {
	return options{
		parallelism: DefaultParallelism,
		attempts:    DefaultAttempts,
		backoff:     DefaultInitialBackoff,
		maxBackoff:  DefaultMaxBackoff,
		now:         time.Now,
	}
}

// WithParallelism sets how many blobs are transferred at the same time
// (DefaultParallelism unless given).
func WithParallelism(n int) Option {
	return func(o *options) error {
		if n <= 0 {
			return fmt.Errorf("parallelism must be positive, got %d", n)
		}
		o.parallelism = n
		return nil
	}
}

// WithRetry sets how many attempts a blob gets (the first included) and the
// backoff between them: initial before the second attempt, doubling up to max.
// Each attempt resumes from the bytes the content store already holds.
func WithRetry(attempts int, initial, max time.Duration) Option {
	return func(o *options) error {
		if attempts <= 0 {
			return fmt.Errorf("attempts must be positive, got %d", attempts)
		}
		if initial < 0 || max < initial {
			return fmt.Errorf("backoff must satisfy 0 <= initial (%s) <= max (%s)", initial, max)
		}
		o.attempts, o.backoff, o.maxBackoff = attempts, initial, max
		return nil
	}
}

// WithLease holds every blob the Guard materializes or finds present in the
// lease id of m, so that containerd's garbage collection keeps them while the
// lease lives. The lease is created with opts when it does not exist yet, and
// ingests are written under it. Independently of this option, a blob is also
// added to the lease that Ensure's context carries (leases.WithLease), when m
// is given.
func WithLease(m leases.Manager, id string, opts ...leases.Opt) Option {
	return func(o *options) error {
		if m == nil {
			return errors.New("lease manager is nil")
		}
		o.leases, o.leaseID, o.leaseOpts = m, id, opts
		return nil
	}
}

// WithLeaseManager lets the Guard add each blob to the lease carried by
// Ensure's context, without a lease of its own.
func WithLeaseManager(m leases.Manager) Option {
	return func(o *options) error {
		if m == nil {
			return errors.New("lease manager is nil")
		}
		o.leases = m
		return nil
	}
}

// WithGCRoot labels every blob the Guard materializes or finds present as a
// garbage collection root (containerd.io/gc.root). Whoever owns the builder
// removes the label when the layer is no longer mounted.
func WithGCRoot() Option {
	return func(o *options) error { o.gcRoot = true; return nil }
}

// WithLabels adds labels to every blob the Guard commits.
func WithLabels(labels map[string]string) Option {
	return func(o *options) error {
		if o.labels == nil {
			o.labels = map[string]string{}
		}
		for k, v := range labels {
			o.labels[k] = v
		}
		return nil
	}
}

// WithProgress calls fn as blobs are found present, fetched, committed or
// given up on. fn is called from transfer goroutines and must not block.
func WithProgress(fn func(Progress)) Option {
	return func(o *options) error { o.progress = fn; return nil }
}

// WithRegisterer registers the Guard's Prometheus metrics on r.
func WithRegisterer(r prometheus.Registerer) Option {
	return func(o *options) error { o.registerer = r; return nil }
}

package exportguard

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

const metricsNamespace = "lazybase_exportguard"

// metrics are the Guard's Prometheus collectors. They exist whether or not a
// registerer was given.
type metrics struct {
	materialized   prometheus.Counter
	present        prometheus.Counter
	bytes          prometheus.Counter
	retries        prometheus.Counter
	verifyFailures prometheus.Counter
	failures       prometheus.Counter
	duration       prometheus.Histogram
	inflight       prometheus.Gauge
}

func newMetrics() *metrics {
	return &metrics{
		materialized: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "blobs_materialized_total",
			Help: "Blobs fetched, verified and committed to the content store.",
		}),
		present: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "blobs_present_total",
			Help: "Blobs asked for that the content store already held.",
		}),
		bytes: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "fetched_bytes_total",
			Help: "Bytes read from registries.",
		}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "retries_total",
			Help: "Transfer attempts after the first one.",
		}),
		verifyFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "verify_failures_total",
			Help: "Transfers whose bytes did not match the descriptor's digest or size.",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: metricsNamespace, Name: "blobs_failed_total",
			Help: "Blobs given up on.",
		}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Name: "materialize_duration_seconds",
			Help:    "Time from the start of a blob's transfer to its commit.",
			Buckets: prometheus.ExponentialBuckets(0.01, 2, 15),
		}),
		inflight: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: metricsNamespace, Name: "transfers_in_flight",
			Help: "Transfers running now.",
		}),
	}
}

func (m *metrics) register(r prometheus.Registerer) error {
	var errs []error
	for _, c := range []prometheus.Collector{m.materialized, m.present, m.bytes, m.retries, m.verifyFailures, m.failures, m.duration, m.inflight} {
		if err := r.Register(c); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	return nil
}

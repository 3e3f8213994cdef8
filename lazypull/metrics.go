package lazypull

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazybase/lazybase/internal/cpuacct"
)

// metrics are lazypull's own Prometheus collectors. They live in a
// per-Daemon registry, with the export guard's; the upstream filesystem registers its metrics
// (stargz_fs_*) in the default registry, and the metrics endpoint serves
// both.
type metrics struct {
	reg *prometheus.Registry

	decisions     *prometheus.CounterVec
	lazyMounts    *prometheus.CounterVec
	fallbacks     *prometheus.CounterVec
	mounted       prometheus.Gauge
	mountDuration prometheus.Histogram
	publishes     *prometheus.CounterVec
}

func newMetrics() *metrics {
	const ns, sub = "lazybase", "snapshotter"
	m := &metrics{
		reg: prometheus.NewRegistry(),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "policy_decisions_total",
			Help: "Policy decisions on layers offered for a remote mount, by mode and by what decided (rule or default).",
		}, []string{"mode", "decided_by"}),
		lazyMounts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "lazy_mounts_total",
			Help: "Lazy FUSE mounts attempted, by result (ok or failed).",
		}, []string{"result"}),
		fallbacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "fallbacks_total",
			Help: "Layers offered for a remote mount that were pulled normally instead, by reason (policy, not_estargz, no_reference, mount_failed, invalid_toc).",
		}, []string{"reason"}),
		mounted: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "mounted_layers",
			Help: "Layers currently mounted lazily.",
		}),
		mountDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "mount_duration_seconds",
			Help:    "Time to resolve, verify and mount a layer lazily.",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14),
		}),
	}
	m.publishes = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: ns, Subsystem: sub, Name: "profile_publish_total",
		Help: "Prefetch profiles published to the registry of their image ([profile]), by result (ok or failed).",
	}, []string{"result"})
	m.reg.MustRegister(m.decisions, m.lazyMounts, m.fallbacks, m.mounted, m.mountDuration, m.publishes, newAccountCollector(cpuacct.Default))
	// Pre-create the series so they read 0 rather than being absent.
	for _, r := range []string{ReasonPolicy, ReasonNotEStargz, ReasonNoReference, ReasonMountFailed, ReasonInvalidTOC} {
		m.fallbacks.WithLabelValues(r)
	}
	m.lazyMounts.WithLabelValues("ok")
	m.lazyMounts.WithLabelValues("failed")
	m.publishes.WithLabelValues(publishOK)
	m.publishes.WithLabelValues(publishFailed)
	return m
}

// gatherer returns lazypull's metrics followed by the default registry's,
// where the upstream filesystem metrics and the Go runtime metrics live.
func (m *metrics) gatherer() prometheus.Gatherer {
	return prometheus.Gatherers{m.reg, defaultGatherer()}
}

// defaultGatherer is where the upstream filesystem registers its metrics.
func defaultGatherer() prometheus.Gatherer { return prometheus.DefaultGatherer }

// accountCollector serves the process's CPU and I/O account
// (internal/cpuacct) as counters, read at each scrape.
type accountCollector struct {
	acct                *cpuacct.Account
	cpu, fetched, wrote *prometheus.Desc
}

func newAccountCollector(a *cpuacct.Account) *accountCollector {
	const ns, sub = "lazybase", "snapshotter"
	return &accountCollector{
		acct: a,
		cpu: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "cpu_seconds_total"),
			"CPU time of the snapshotter by activity (guard, hashing, local_unpack, background_fetch, on_demand, toc), measured on each unit's thread CPU clock; fuse_and_other is the rest of the process's CPU time (FUSE serving by the upstream filesystem, Go runtime, gRPC).",
			[]string{"activity"}, nil),
		fetched: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "registry_bytes_total"),
			"Bytes fetched from registries by activity (guard, toc, on_demand, background_fetch; other: outside any measured unit, such as stargz's prefetch of the prefetch section).",
			[]string{"activity"}, nil),
		wrote: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "disk_written_bytes_total"),
			"Bytes written to disk by activity, where known (guard: into containerd's ingest; local_unpack: the uncompressed layer).",
			[]string{"activity"}, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *accountCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.cpu
	ch <- c.fetched
	ch <- c.wrote
}

// Collect implements prometheus.Collector.
func (c *accountCollector) Collect(ch chan<- prometheus.Metric) {
	s := c.acct.Snapshot()
	for act, v := range s.CPUSeconds {
		ch <- prometheus.MustNewConstMetric(c.cpu, prometheus.CounterValue, v, act)
	}
	for act, v := range s.RegistryBytes {
		ch <- prometheus.MustNewConstMetric(c.fetched, prometheus.CounterValue, float64(v), act)
	}
	for act, v := range s.DiskWrittenBytes {
		ch <- prometheus.MustNewConstMetric(c.wrote, prometheus.CounterValue, float64(v), act)
	}
}

// Package metrics turns what the probes aggregated in the kernel into
// Prometheus metrics. Each probe contributes a Collector; the Exporter fans
// out to them on every scrape and reports per-collector duration and
// success, in the manner of node_exporter.
package metrics

import (
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Namespace prefixes every metric.
const Namespace = "ktel"

// Collector is what a probe contributes: it sends the current values of its
// metrics. Update may be called concurrently.
type Collector interface {
	Update(ch chan<- prometheus.Metric) error
}

// Exporter is the prometheus.Collector that fans out to named collectors.
type Exporter struct {
	log        *slog.Logger
	collectors map[string]Collector
	duration   *prometheus.Desc
	success    *prometheus.Desc
}

// NewExporter returns an exporter over collectors, keyed by name (the
// `collector` label).
func NewExporter(collectors map[string]Collector, log *slog.Logger) *Exporter {
	return &Exporter{
		log:        log,
		collectors: collectors,
		duration: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "scrape", "collector_duration_seconds"),
			"Time a collector took during this scrape: its whole update, reading its maps and sending its metrics.", []string{"collector"}, nil),
		success: prometheus.NewDesc(prometheus.BuildFQName(Namespace, "scrape", "collector_success"),
			"Whether a collector succeeded during this scrape (1) or not (0).", []string{"collector"}, nil),
	}
}

// Describe sends the exporter's own descriptors only: the collectors'
// metrics depend on what the kernel saw, so the exporter is unchecked for
// them, as node_exporter is.
func (e *Exporter) Describe(ch chan<- *prometheus.Desc) {
	ch <- e.duration
	ch <- e.success
}

// Collect runs every collector in parallel.
func (e *Exporter) Collect(ch chan<- prometheus.Metric) {
	var wg sync.WaitGroup
	for name, c := range e.collectors {
		wg.Go(func() {
			start := time.Now()
			err := c.Update(ch)
			ok := 1.0
			if err != nil {
				ok = 0
				e.log.Error("collector failed", "collector", name, "err", err)
			}
			ch <- prometheus.MustNewConstMetric(e.duration, prometheus.GaugeValue, time.Since(start).Seconds(), name)
			ch <- prometheus.MustNewConstMetric(e.success, prometheus.GaugeValue, ok, name)
		})
	}
	wg.Wait()
}

package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/internal/probe"
)

// Span counters: the kernel's drops are reported by each probe's collector,
// the exporter's by the spans collector, under the same metric names.
var (
	spansDroppedDesc = prometheus.NewDesc("ktel_spans_dropped_total",
		"Outlier events that did not become exported spans, by probe and reason: rate_limited and ringbuf_full in the kernel, queue_full and export_failed in ktel.",
		[]string{"probe", "reason"}, nil)
	spansExportedDesc = prometheus.NewDesc("ktel_spans_exported_total",
		"Spans exported to the OTLP endpoint, by probe.", []string{"probe"}, nil)
)

// sendKernelSpanDrops reports what a probe's kernel side refused.
func sendKernelSpanDrops(ch chan<- prometheus.Metric, probeName string, d probe.SpanDrops) {
	ch <- prometheus.MustNewConstMetric(spansDroppedDesc, prometheus.CounterValue, float64(d.RateLimited), probeName, "rate_limited")
	ch <- prometheus.MustNewConstMetric(spansDroppedDesc, prometheus.CounterValue, float64(d.RingbufFull), probeName, "ringbuf_full")
}

// SpanCounts are the exporter's per-probe counters.
type SpanCounts struct {
	Exported, QueueFull, ExportFailed uint64
}

type spansCollector struct {
	counts func() map[string]SpanCounts
}

// NewSpansCollector exports the span exporter's counters.
func NewSpansCollector(counts func() map[string]SpanCounts) Collector {
	return &spansCollector{counts: counts}
}

func (c *spansCollector) Update(ch chan<- prometheus.Metric) error {
	for p, n := range c.counts() {
		ch <- prometheus.MustNewConstMetric(spansExportedDesc, prometheus.CounterValue, float64(n.Exported), p)
		ch <- prometheus.MustNewConstMetric(spansDroppedDesc, prometheus.CounterValue, float64(n.QueueFull), p, "queue_full")
		ch <- prometheus.MustNewConstMetric(spansDroppedDesc, prometheus.CounterValue, float64(n.ExportFailed), p, "export_failed")
	}
	return nil
}

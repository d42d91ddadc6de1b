package metrics

import (
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// LBKube is what the load balancer's Kubernetes source measures
// (internal/kubelb.Metrics), as kube-proxy's sync metrics: its own
// instruments, since the values are made in user space.
type LBKube struct {
	syncDuration prometheus.Histogram
	programming  prometheus.Histogram
	lastSync     *prometheus.Desc
	noLocal      *prometheus.Desc
	skipped      *prometheus.Desc

	mu          sync.Mutex
	last        time.Time
	noLocalN    int
	skippedByRs map[string]int
}

// lbSkipReasons are always exported, at 0 when nothing is skipped for
// them (internal/kubelb.Skip*).
var lbSkipReasons = []string{"protocol", "invalid_ip", "invalid_name", "conflict", "invalid_endpoint"}

// NewLBKube returns the metrics of the Kubernetes source.
func NewLBKube() *LBKube {
	return &LBKube{
		// kube-proxy's sync_proxy_rules_duration_seconds buckets (1 ms to
		// 16 s), and a native histogram beside them.
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:                        "ktel_lb_sync_duration_seconds",
			Help:                        "Time a sync of the load balancer from the Kubernetes caches took: translating Services and EndpointSlices, writing the maps and closing connected UDP sockets to removed backends.",
			Buckets:                     prometheus.ExponentialBuckets(0.001, 2, 15),
			NativeHistogramBucketFactor: 1.1,
		}),
		// kube-proxy's network_programming_duration_seconds buckets.
		programming: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:                        "ktel_lb_network_programming_duration_seconds",
			Help:                        "Time from an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time annotation) to the end of the map writes that applied it (and of the closing of connected UDP sockets to the backends it removed).",
			Buckets:                     programmingBuckets(),
			NativeHistogramBucketFactor: 1.1,
		}),
		lastSync: prometheus.NewDesc("ktel_lb_sync_last_timestamp_seconds",
			"When the load balancer last applied the Kubernetes caches, in seconds since the epoch.", nil, nil),
		noLocal: prometheus.NewDesc("ktel_lb_services_no_local_endpoints",
			"Service ports (per ClusterIP) with internalTrafficPolicy Local and no usable endpoint on this node, at the last sync; connects to them are refused.", []string{"traffic_policy"}, nil),
		skipped: prometheus.NewDesc("ktel_lb_kubernetes_skipped",
			"What the last sync left out, by reason: protocol (a port neither TCP nor UDP, such as SCTP), invalid_ip (a ClusterIP or port that is not valid), invalid_name (namespace/name:port longer than 128 bytes), conflict (a VIP:port another Service port has), invalid_endpoint (an endpoint address that does not parse or is of the wrong family).", []string{"reason"}, nil),
	}
}

func programmingBuckets() []float64 {
	var b []float64
	b = append(b, prometheus.LinearBuckets(0.25, 0.25, 2)...)
	b = append(b, prometheus.LinearBuckets(1, 1, 59)...)
	b = append(b, prometheus.LinearBuckets(60, 5, 12)...)
	return append(b, prometheus.LinearBuckets(120, 30, 7)...)
}

// ObserveSync records a sync's duration.
func (m *LBKube) ObserveSync(d time.Duration) { m.syncDuration.Observe(d.Seconds()) }

// ObserveNetworkProgramming records one change's programming latency.
func (m *LBKube) ObserveNetworkProgramming(d time.Duration) { m.programming.Observe(d.Seconds()) }

// Synced records the state of the last sync.
func (m *LBKube) Synced(at time.Time, noLocal int, skipped map[string]int) {
	m.mu.Lock()
	m.last, m.noLocalN, m.skippedByRs = at, noLocal, skipped
	m.mu.Unlock()
}

// Update implements Collector.
func (m *LBKube) Update(ch chan<- prometheus.Metric) error {
	m.syncDuration.Collect(ch)
	m.programming.Collect(ch)
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.last.IsZero() {
		ch <- prometheus.MustNewConstMetric(m.lastSync, prometheus.GaugeValue, float64(m.last.UnixNano())/1e9)
	}
	ch <- prometheus.MustNewConstMetric(m.noLocal, prometheus.GaugeValue, float64(m.noLocalN), "internal")
	for _, r := range lbSkipReasons {
		ch <- prometheus.MustNewConstMetric(m.skipped, prometheus.GaugeValue, float64(m.skippedByRs[r]), r)
	}
	for r, n := range m.skippedByRs {
		if !slices.Contains(lbSkipReasons, r) {
			ch <- prometheus.MustNewConstMetric(m.skipped, prometheus.GaugeValue, float64(n), r)
		}
	}
	return nil
}

// Collectors is one Collector of several (a probe's and its source's).
type Collectors []Collector

// Update implements Collector; every collector is updated, and the first
// error returned.
func (cs Collectors) Update(ch chan<- prometheus.Metric) error {
	var first error
	for _, c := range cs {
		if err := c.Update(ch); err != nil && first == nil {
			first = err
		}
	}
	return first
}

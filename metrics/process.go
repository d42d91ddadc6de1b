package metrics

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// processCollector is client_golang's process collector without its
// process_network_receive_bytes_total and process_network_transmit_bytes_total.
// It reads those from /proc/self/net/netstat, the counters of the whole
// network namespace: where ktel runs in the host's (systemd, or the
// packets component's hostNetwork), every byte the node sent or received,
// and in a pod every byte of the pod; never ktel's own, which the name
// says they are.
type processCollector struct{ prometheus.Collector }

// NewProcessCollector returns the process collector. It reports what it
// cannot read as an error of the scrape.
func NewProcessCollector() prometheus.Collector {
	return processCollector{collectors.NewProcessCollector(collectors.ProcessCollectorOpts{ReportErrors: true})}
}

// namespaceWide reports whether d is one of the network counters.
func namespaceWide(d *prometheus.Desc) bool {
	return strings.Contains(d.String(), `fqName: "process_network_`)
}

func (c processCollector) Describe(ch chan<- *prometheus.Desc) {
	all := make(chan *prometheus.Desc)
	go func() { c.Collector.Describe(all); close(all) }()
	for d := range all {
		if !namespaceWide(d) {
			ch <- d
		}
	}
}

func (c processCollector) Collect(ch chan<- prometheus.Metric) {
	all := make(chan prometheus.Metric)
	go func() { c.Collector.Collect(all); close(all) }()
	for m := range all {
		if !namespaceWide(m.Desc()) {
			ch <- m
		}
	}
}

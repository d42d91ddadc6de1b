package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ktel-dev/ktel/bpf/lb"
)

// LBSource is what the load-balancer collector reads: the loaded probe, or
// a fake in tests.
type LBSource interface {
	Snapshot() (*lb.Snapshot, error)
}

type lbCollector struct {
	snap        *Cached[*lb.Snapshot]
	svcConns    *prometheus.Desc
	backConns   *prometheus.Desc
	noBackend   *prometheus.Desc
	services    *prometheus.Desc
	backends    *prometheus.Desc
	reloads     *prometheus.Desc
	lastReload  *prometheus.Desc
	datapathErr *prometheus.Desc
}

// NewLBCollector exports the socket load balancer's per-CPU counters,
// summed, and the state of its services file. Series exist for the
// services and backends of the applied file only: a removed backend's
// series ends, and starts again from 0 if it comes back.
func NewLBCollector(src LBSource) Collector {
	return &lbCollector{
		snap: NewCached(src.Snapshot, DefaultMaxAge),
		svcConns: prometheus.NewDesc("ktel_lb_service_connections_total",
			"Connects and unconnected UDP datagrams sent to a service address, including refused ones.", []string{"service"}, nil),
		backConns: prometheus.NewDesc("ktel_lb_backend_connections_total",
			"Connects and unconnected UDP datagrams sent to a service and rewritten to this backend.", []string{"service", "backend"}, nil),
		noBackend: prometheus.NewDesc("ktel_lb_no_backend_total",
			"Connects and datagrams refused (ECONNREFUSED) because the service had no backend.", []string{"service"}, nil),
		services: prometheus.NewDesc("ktel_lb_services",
			"Services in the applied services file.", nil, nil),
		backends: prometheus.NewDesc("ktel_lb_backends",
			"Backends in the applied services file, summed over services.", nil, nil),
		reloads: prometheus.NewDesc("ktel_lb_config_reloads_total",
			"Loads of the services file (at start, on change, on SIGHUP), by result: success, or error when the previous configuration was kept.", []string{"result"}, nil),
		lastReload: prometheus.NewDesc("ktel_lb_config_last_reload_success_timestamp_seconds",
			"When the services file was last applied, in seconds since the epoch.", nil, nil),
		datapathErr: prometheus.NewDesc("ktel_lb_datapath_errors_total",
			"Kernel-side failures: reverse (recording the VIP of a socket, failed), slot (a backend slot missing, not rewritten), maglev (a Maglev table missing, picked at random).", []string{"reason"}, nil),
	}
}

func (c *lbCollector) Update(ch chan<- prometheus.Metric) error {
	s, err := c.snap.Get()
	if err != nil {
		return err
	}
	for _, sv := range s.Services {
		ch <- prometheus.MustNewConstMetric(c.svcConns, prometheus.CounterValue, float64(sv.Connections), sv.Name)
		ch <- prometheus.MustNewConstMetric(c.noBackend, prometheus.CounterValue, float64(sv.NoBackend), sv.Name)
		for _, b := range sv.Backends {
			ch <- prometheus.MustNewConstMetric(c.backConns, prometheus.CounterValue, float64(b.Connections), sv.Name, b.Address)
		}
	}
	ch <- prometheus.MustNewConstMetric(c.services, prometheus.GaugeValue, float64(len(s.Services)))
	ch <- prometheus.MustNewConstMetric(c.backends, prometheus.GaugeValue, float64(s.Backends))
	ch <- prometheus.MustNewConstMetric(c.reloads, prometheus.CounterValue, float64(s.ReloadSuccess), "success")
	ch <- prometheus.MustNewConstMetric(c.reloads, prometheus.CounterValue, float64(s.ReloadError), "error")
	if !s.LastReloadSuccess.IsZero() {
		ch <- prometheus.MustNewConstMetric(c.lastReload, prometheus.GaugeValue, float64(s.LastReloadSuccess.UnixNano())/1e9)
	}
	ch <- prometheus.MustNewConstMetric(c.datapathErr, prometheus.CounterValue, float64(s.ReverseFailed), "reverse")
	ch <- prometheus.MustNewConstMetric(c.datapathErr, prometheus.CounterValue, float64(s.SlotMissing), "slot")
	ch <- prometheus.MustNewConstMetric(c.datapathErr, prometheus.CounterValue, float64(s.MaglevMissing), "maglev")
	return nil
}

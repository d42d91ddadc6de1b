package metrics

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/ktel-dev/ktel/bpf/lb"
)

// LBSource is what the load-balancer collector reads: the loaded probe, or
// a fake in tests.
type LBSource interface {
	Snapshot() (*lb.Snapshot, error)
}

type lbCollector struct {
	snap        *Cached[*lb.Snapshot]
	labels      labelCache
	svcConns    *prometheus.Desc
	backConns   *prometheus.Desc
	noBackend   *prometheus.Desc
	services    *prometheus.Desc
	backends    *prometheus.Desc
	reloads     *prometheus.Desc
	lastReload  *prometheus.Desc
	datapathErr *prometheus.Desc
	udpClosed   *prometheus.Desc
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
			"Connects and datagrams refused (ECONNREFUSED; EPERM before Linux 5.18) because the service had no backend.", []string{"service"}, nil),
		services: prometheus.NewDesc("ktel_lb_services",
			"Services in the applied services file.", nil, nil),
		backends: prometheus.NewDesc("ktel_lb_backends",
			"Backends in the applied services file, summed over services.", nil, nil),
		reloads: prometheus.NewDesc("ktel_lb_config_reloads_total",
			"Loads of the services file (at start, on change, on SIGHUP), by result: success, or error when the previous configuration was kept.", []string{"result"}, nil),
		lastReload: prometheus.NewDesc("ktel_lb_config_last_reload_success_timestamp_seconds",
			"When the services file was last applied, in seconds since the epoch.", nil, nil),
		datapathErr: prometheus.NewDesc("ktel_lb_datapath_errors_total",
			"Datapath failures: reverse (recording the VIP of a socket, failed), slot (a backend slot missing, not rewritten), maglev (a Maglev table missing, picked at random), affinity (recording a client's backend for session affinity, failed), udp_close (a process of the load-balanced cgroup whose network namespace ktel could not read or enter, per pass closing UDP sockets to removed backends: hostPID and capabilities missing).", []string{"reason"}, nil),
		udpClosed: prometheus.NewDesc("ktel_lb_udp_sockets_destroyed_total",
			"Connected UDP sockets closed (their next receive fails with ECONNABORTED, a send with EDESTADDRREQ) because the backend they were sent to left the service.", nil, nil),
	}
}

func (c *lbCollector) Update(ch chan<- prometheus.Metric) error {
	s, err := c.snap.Get()
	if err != nil {
		return err
	}
	// Thousands of series with the same labels scrape after scrape: their
	// label pairs are made once (labelCache), not per series and scrape.
	c.labels.begin()
	n := 2 * len(s.Services)
	for _, sv := range s.Services {
		n += len(sv.Backends)
	}
	// The series' metrics in one allocation, not one each.
	cs := make([]counter, 0, n)
	for _, sv := range s.Services {
		svc := c.labels.get(c.svcConns, sv.Name, "")
		ch <- newCounter(&cs, c.svcConns, svc, sv.Connections)
		ch <- newCounter(&cs, c.noBackend, svc, sv.NoBackend)
		for _, b := range sv.Backends {
			ch <- newCounter(&cs, c.backConns, c.labels.get(c.backConns, sv.Name, b.Address), b.Connections)
		}
	}
	c.labels.end()
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
	ch <- prometheus.MustNewConstMetric(c.datapathErr, prometheus.CounterValue, float64(s.AffinityFailed), "affinity")
	ch <- prometheus.MustNewConstMetric(c.datapathErr, prometheus.CounterValue, float64(s.UDPCloseMissed), "udp_close")
	ch <- prometheus.MustNewConstMetric(c.udpClosed, prometheus.CounterValue, float64(s.UDPSocketsClosed))
	return nil
}

// labelCache keeps the label pairs of the series of the last scrape,
// keyed by their label values, for descriptors whose label names are the
// same wherever the values are (ktel_lb_service_connections_total and
// ktel_lb_no_backend_total share theirs). Pairs of series absent from a
// scrape are dropped at its end. Scrapes may run concurrently. A scrape
// that finds every series in it allocates nothing here.
type labelCache struct {
	mu   sync.Mutex
	gen  uint64
	hits int
	m    map[labelKey]labelEntry
}

// labelKey is a service's series (backend "", which no backend's address
// is) or a backend's.
type labelKey struct{ service, backend string }

type labelEntry struct {
	pairs []*dto.LabelPair
	gen   uint64 // of the last scrape that had the series
}

func (c *labelCache) begin() {
	c.mu.Lock()
	c.gen++
	c.hits = 0
	if c.m == nil {
		c.m = map[labelKey]labelEntry{}
	}
}

// get returns the label pairs of a service's series (backend "", desc
// with the label service) or of a backend's (desc with service and
// backend).
func (c *labelCache) get(desc *prometheus.Desc, service, backend string) []*dto.LabelPair {
	k := labelKey{service, backend}
	e, ok := c.m[k]
	if !ok {
		if backend == "" {
			e.pairs = prometheus.MakeLabelPairs(desc, []string{service})
		} else {
			e.pairs = prometheus.MakeLabelPairs(desc, []string{service, backend})
		}
	}
	if e.gen != c.gen {
		e.gen = c.gen
		c.hits++
		c.m[k] = e
	}
	return e.pairs
}

func (c *labelCache) end() {
	if c.hits < len(c.m) {
		for k, e := range c.m {
			if e.gen != c.gen {
				delete(c.m, k)
			}
		}
	}
	c.mu.Unlock()
}

// counter is a const counter with label pairs made beforehand: the
// registry and the encoders only read them.
type counter struct {
	desc   *prometheus.Desc
	labels []*dto.LabelPair
	value  float64
	c      dto.Counter
}

// newCounter appends the counter to cs, which has room for it (its
// address is handed out), and returns it.
func newCounter(cs *[]counter, desc *prometheus.Desc, labels []*dto.LabelPair, v uint64) prometheus.Metric {
	*cs = append(*cs, counter{desc: desc, labels: labels, value: float64(v)})
	m := &(*cs)[len(*cs)-1]
	m.c.Value = &m.value
	return m
}

func (m *counter) Desc() *prometheus.Desc { return m.desc }

func (m *counter) Write(out *dto.Metric) error {
	out.Label = m.labels
	out.Counter = &m.c
	return nil
}

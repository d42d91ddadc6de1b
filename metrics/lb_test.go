package metrics

import (
	"errors"
	"maps"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ktel-dev/ktel/bpf/lb"
)

type fakeLB struct {
	snap  *lb.Snapshot
	err   error
	reads atomic.Int32
}

func (f *fakeLB) Snapshot() (*lb.Snapshot, error) {
	f.reads.Add(1)
	return f.snap, f.err
}

func TestLBCollector(t *testing.T) {
	f := &fakeLB{snap: &lb.Snapshot{
		Services: []lb.ServiceStats{
			{Name: "empty", Connections: 4, NoBackend: 4},
			{Name: "web", Connections: 10, Backends: []lb.BackendStats{
				{Address: "10.0.0.1:8080", Connections: 6},
				{Address: "[fd00::1]:8080", Connections: 4},
			}},
		},
		Backends:          2,
		ReloadSuccess:     3,
		ReloadError:       1,
		LastReloadSuccess: time.Unix(1700000000, 500_000_000),
		SlotMissing:       2,
		UDPSocketsClosed:  5,
		UDPCloseMissed:    3,
	}}
	c := &collectorAdapter{NewLBCollector(f)}
	want := `
# HELP ktel_lb_backend_connections_total Connects and unconnected UDP datagrams sent to a service and rewritten to this backend.
# TYPE ktel_lb_backend_connections_total counter
ktel_lb_backend_connections_total{backend="10.0.0.1:8080",service="web"} 6
ktel_lb_backend_connections_total{backend="[fd00::1]:8080",service="web"} 4
# HELP ktel_lb_backends Backends in the applied services file, summed over services.
# TYPE ktel_lb_backends gauge
ktel_lb_backends 2
# HELP ktel_lb_config_last_reload_success_timestamp_seconds When the services file was last applied, in seconds since the epoch.
# TYPE ktel_lb_config_last_reload_success_timestamp_seconds gauge
ktel_lb_config_last_reload_success_timestamp_seconds 1.7000000005e+09
# HELP ktel_lb_config_reloads_total Loads of the services file (at start, on change, on SIGHUP), by result: success, or error when the previous configuration was kept.
# TYPE ktel_lb_config_reloads_total counter
ktel_lb_config_reloads_total{result="error"} 1
ktel_lb_config_reloads_total{result="success"} 3
# HELP ktel_lb_datapath_errors_total Datapath failures: reverse (recording the VIP of a socket, failed), slot (a backend slot missing, not rewritten), maglev (a Maglev table missing, picked at random), affinity (recording a client's backend for session affinity, failed), udp_close (a process of the load-balanced cgroup whose network namespace ktel could not read or enter, per pass closing UDP sockets to removed backends: hostPID and capabilities missing).
# TYPE ktel_lb_datapath_errors_total counter
ktel_lb_datapath_errors_total{reason="affinity"} 0
ktel_lb_datapath_errors_total{reason="maglev"} 0
ktel_lb_datapath_errors_total{reason="reverse"} 0
ktel_lb_datapath_errors_total{reason="slot"} 2
ktel_lb_datapath_errors_total{reason="udp_close"} 3
# HELP ktel_lb_no_backend_total Connects and datagrams refused (ECONNREFUSED; EPERM before Linux 5.18) because the service had no backend.
# TYPE ktel_lb_no_backend_total counter
ktel_lb_no_backend_total{service="empty"} 4
ktel_lb_no_backend_total{service="web"} 0
# HELP ktel_lb_service_connections_total Connects and unconnected UDP datagrams sent to a service address, including refused ones.
# TYPE ktel_lb_service_connections_total counter
ktel_lb_service_connections_total{service="empty"} 4
ktel_lb_service_connections_total{service="web"} 10
# HELP ktel_lb_services Services in the applied services file.
# TYPE ktel_lb_services gauge
ktel_lb_services 2
# HELP ktel_lb_udp_sockets_destroyed_total Connected UDP sockets closed (their next receive fails with ECONNABORTED, a send with EDESTADDRREQ) because the backend they were sent to left the service.
# TYPE ktel_lb_udp_sockets_destroyed_total counter
ktel_lb_udp_sockets_destroyed_total 5
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
	// Scrapes within a second share one read.
	if n := f.reads.Load(); n != 1 {
		t.Errorf("%d reads for back-to-back scrapes", n)
	}
}

func TestLBCollectorError(t *testing.T) {
	f := &fakeLB{err: errors.New("map gone")}
	if err := NewLBCollector(f).Update(make(chan prometheus.Metric, 16)); err == nil {
		t.Error("error not returned")
	}
}

// Label pairs are reused from scrape to scrape, but a series follows the
// services file: a backend moved to another service is exported under it,
// and the pairs of series gone are forgotten.
func TestLBCollectorLabelsFollowServices(t *testing.T) {
	f := &fakeLB{snap: &lb.Snapshot{Services: []lb.ServiceStats{
		{Name: "web", Connections: 3, Backends: []lb.BackendStats{{Address: "10.0.0.1:80", Connections: 1}, {Address: "10.0.0.2:80", Connections: 2}}},
	}}}
	c := NewLBCollector(f).(*lbCollector)
	c.snap = NewCached(f.Snapshot, 0)
	backends := func() map[string]float64 {
		t.Helper()
		return updateSeries(t, c)["ktel_lb_backend_connections_total"]
	}
	backends()
	f.snap = &lb.Snapshot{Services: []lb.ServiceStats{
		{Name: "web", Connections: 5, Backends: []lb.BackendStats{{Address: "10.0.0.2:80", Connections: 5}}},
		{Name: "api", Backends: []lb.BackendStats{{Address: "10.0.0.1:80", Connections: 7}}},
	}}
	want := map[string]float64{
		"backend=10.0.0.2:80,service=web": 5,
		"backend=10.0.0.1:80,service=api": 7,
	}
	if got := backends(); !maps.Equal(got, want) {
		t.Errorf("backend series %v, want %v", got, want)
	}
	if n := len(c.labels.m); n != 4 { // 2 services, 2 backends
		t.Errorf("%d label sets kept, want 4", n)
	}
}

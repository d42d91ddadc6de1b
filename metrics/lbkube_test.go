package metrics

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestLBKube(t *testing.T) {
	m := NewLBKube()
	m.ObserveSync(3 * time.Millisecond)
	m.ObserveNetworkProgramming(1500 * time.Millisecond)
	m.ObserveNetworkProgramming(700 * time.Millisecond)
	m.Synced(time.Unix(1700000000, 500e6), 2, map[string]int{"conflict": 1})
	c := NewExporter(map[string]Collector{"lb": Collectors{m}}, nil)
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	if probs, err := testutil.GatherAndLint(reg); err != nil || len(probs) > 0 {
		t.Fatalf("lint: %v %v", probs, err)
	}
	want := `
# HELP ktel_lb_services_no_local_endpoints Service ports (per ClusterIP) with internalTrafficPolicy Local and no usable endpoint on this node, at the last sync; connects to them are refused.
# TYPE ktel_lb_services_no_local_endpoints gauge
ktel_lb_services_no_local_endpoints{traffic_policy="internal"} 2
# HELP ktel_lb_sync_last_timestamp_seconds When the load balancer last applied the Kubernetes caches, in seconds since the epoch.
# TYPE ktel_lb_sync_last_timestamp_seconds gauge
ktel_lb_sync_last_timestamp_seconds 1.7000000005e+09
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "ktel_lb_services_no_local_endpoints", "ktel_lb_sync_last_timestamp_seconds"); err != nil {
		t.Error(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := 0
	for _, mf := range mfs {
		switch mf.GetName() {
		case "ktel_lb_kubernetes_skipped":
			found++
			if n := len(mf.GetMetric()); n != len(lbSkipReasons) {
				t.Errorf("%d skipped series, want one per reason (%d)", n, len(lbSkipReasons))
			}
		case "ktel_lb_network_programming_duration_seconds":
			found++
			// Two changes applied: the histogram counts both.
			h := mf.GetMetric()[0].GetHistogram()
			if h.GetSampleCount() != 2 || h.GetSampleSum() != 2.2 {
				t.Errorf("programming latency: count %d sum %v, want 2 and 2.2", h.GetSampleCount(), h.GetSampleSum())
			}
		}
	}
	if found != 2 {
		t.Errorf("%d of the skipped and programming latency families found", found)
	}
}

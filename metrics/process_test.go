package metrics

import (
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// The process collector reports what client_golang's reports, under the
// same names and types, without the network counters. It is client_golang's
// collector behind a filter, so the values are the library's own (read
// moments apart, they differ by whatever the process did meanwhile).
func TestProcessCollector(t *testing.T) {
	c := NewProcessCollector()
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	gather := func(c prometheus.Collector) map[string]*dto.MetricFamily {
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(c)
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]*dto.MetricFamily{}
		for _, mf := range mfs {
			out[mf.GetName()] = mf
		}
		return out
	}
	mine := gather(c)
	ref := gather(collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for name, want := range ref {
		got, ok := mine[name]
		if !ok {
			if name != "process_network_receive_bytes_total" && name != "process_network_transmit_bytes_total" {
				t.Errorf("%s missing", name)
			}
			continue
		}
		if got.GetType() != want.GetType() || got.GetHelp() != want.GetHelp() {
			t.Errorf("%s: type %v help %q, want %v %q", name, got.GetType(), got.GetHelp(), want.GetType(), want.GetHelp())
		}
		delete(mine, name)
	}
	for name := range mine {
		t.Errorf("%s: not in client_golang's collector", name)
	}
}

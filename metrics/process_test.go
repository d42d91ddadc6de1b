package metrics

import (
	"math"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// The process collector reports what client_golang's reports, under the
// same names and types, without the network counters.
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
	value := func(mf *dto.MetricFamily) float64 {
		m := mf.GetMetric()[0]
		if mf.GetType() == dto.MetricType_COUNTER {
			return m.GetCounter().GetValue()
		}
		return m.GetGauge().GetValue()
	}
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
		g, w := value(got), value(want)
		// The same quantity read moments apart: memory and CPU move a
		// little, descriptors by the collectors' own.
		tol := map[string]float64{
			"process_cpu_seconds_total":     0.05,
			"process_resident_memory_bytes": 8 << 20,
			"process_virtual_memory_bytes":  64 << 20,
			"process_open_fds":              2,
		}[name]
		if math.Abs(g-w) > tol {
			t.Errorf("%s = %v, client_golang's %v", name, g, w)
		}
		delete(mine, name)
	}
	for name := range mine {
		t.Errorf("%s: not in client_golang's collector", name)
	}
}

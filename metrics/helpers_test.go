package metrics

import (
	"io"
	"log/slog"
	"math"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func discard() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// collectorAdapter makes a Collector a prometheus.Collector for testutil.
type collectorAdapter struct{ c Collector }

func (a *collectorAdapter) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(a, ch) }
func (a *collectorAdapter) Collect(ch chan<- prometheus.Metric) {
	if err := a.c.Update(ch); err != nil {
		panic(err)
	}
}

// gathered is what the daemon serves of c, as a prometheus.Gatherer for
// testutil.
func gathered(c Collector) prometheus.Gatherer {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collectorAdapter{c})
	return reg
}

func fmtFloat(e int) string { return strconv.FormatFloat(math.Ldexp(1, e), 'g', -1, 64) }
func itoa(n int) string     { return strconv.Itoa(n) }
func ftoa(f float64) string { return strconv.FormatFloat(f, 'g', -1, 64) }

// updateSeries runs one Update of c and returns the value of each counter
// or gauge series by family name, then by its labels: sorted name=value
// pairs joined by commas.
func updateSeries(t *testing.T, c Collector) map[string]map[string]float64 {
	t.Helper()
	ch := make(chan prometheus.Metric, 1024)
	if err := c.Update(ch); err != nil {
		t.Fatal(err)
	}
	close(ch)
	out := map[string]map[string]float64{}
	for m := range ch {
		var d dto.Metric
		if err := m.Write(&d); err != nil {
			t.Fatal(err)
		}
		_, name, _ := strings.Cut(m.Desc().String(), `fqName: "`)
		name, _, _ = strings.Cut(name, `"`)
		var ls []string
		for _, l := range d.Label {
			ls = append(ls, l.GetName()+"="+l.GetValue())
		}
		sort.Strings(ls)
		if out[name] == nil {
			out[name] = map[string]float64{}
		}
		v := d.GetCounter().GetValue()
		if d.Gauge != nil {
			v = d.GetGauge().GetValue()
		}
		out[name][strings.Join(ls, ",")] = v
	}
	return out
}

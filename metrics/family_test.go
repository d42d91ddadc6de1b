package metrics

import (
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/proto"
)

// staticFamilies is a FamilyCollector of fixed, empty families.
type staticFamilies struct {
	names []string
	dones *int
}

func (staticFamilies) Update(chan<- prometheus.Metric) error { return nil }
func (s staticFamilies) Families() ([]*dto.MetricFamily, func(), error) {
	var mfs []*dto.MetricFamily
	for _, n := range s.names {
		mfs = append(mfs, &dto.MetricFamily{Name: proto.String(n), Type: dto.MetricType_GAUGE.Enum(),
			Metric: []*dto.Metric{{Gauge: &dto.Gauge{Value: proto.Float64(1)}}}})
	}
	return mfs, func() { *s.dones++ }, nil
}

// The gatherer merges the collectors' own families with the registry's in
// name order, reports a family gathered twice and keeps one, and its done
// is each collector's.
func TestGathererMerges(t *testing.T) {
	reg := prometheus.NewRegistry()
	for _, n := range []string{"b", "d"} {
		reg.MustRegister(prometheus.NewGauge(prometheus.GaugeOpts{Name: n, Help: n}))
	}
	var dones int
	g := NewGatherer(reg, map[string]Collector{
		"x":     staticFamilies{[]string{"c", "a"}, &dones},
		"y":     staticFamilies{[]string{"e"}, &dones},
		"plain": &plainCollector{},
	})
	mfs, done, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, mf := range mfs {
		got = append(got, mf.GetName())
	}
	if want := []string{"a", "b", "c", "d", "e"}; !slices.Equal(got, want) {
		t.Errorf("families %v, want %v", got, want)
	}
	done()
	if dones != 2 {
		t.Errorf("%d collectors done with, want 2", dones)
	}

	g = NewGatherer(reg, map[string]Collector{"x": staticFamilies{[]string{"b"}, &dones}})
	mfs, done, err = g.Gather()
	done()
	if err == nil || !strings.Contains(err.Error(), "metric family b gathered twice") {
		t.Errorf("duplicate family: err %v", err)
	}
	if len(mfs) != 2 || mfs[0].GetName() != "b" || mfs[1].GetName() != "d" {
		t.Errorf("families after a duplicate: %v", mfs)
	}
}

// plainCollector is a Collector without families of its own.
type plainCollector struct{}

func (*plainCollector) Update(chan<- prometheus.Metric) error { return nil }

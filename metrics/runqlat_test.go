package metrics

import (
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"

	"github.com/ktel-dev/ktel/bpf/runqlat"
	"github.com/ktel-dev/ktel/internal/histogram"
)

type fakeRunqlat struct {
	layout *histogram.Layout
	snap   *runqlat.Snapshot
}

func (f *fakeRunqlat) Snapshot() (*runqlat.Snapshot, error) { return f.snap, nil }
func (f *fakeRunqlat) Layout() *histogram.Layout            { return f.layout }

func newFakeRunqlat(t *testing.T) *fakeRunqlat {
	l, err := histogram.NewLayout(3)
	if err != nil {
		t.Fatal(err)
	}
	cpu0 := make([]uint64, l.Slots())
	cpu1 := make([]uint64, l.Slots())
	cpu0[l.Slot(3000)] = 2      // 3 µs
	cpu1[l.Slot(5_000_000)] = 1 // 5 ms
	total := make([]uint64, l.Slots())
	for k := range total {
		total[k] = cpu0[k] + cpu1[k]
	}
	return &fakeRunqlat{layout: l, snap: &runqlat.Snapshot{
		Total:   runqlat.Hist{Slots: total, SumNs: 5_006_000},
		PerCPU:  []runqlat.Hist{{Slots: cpu0, SumNs: 6000}, {Slots: cpu1, SumNs: 5_000_000}},
		Dropped: 2,
	}}
}

func TestRunqlatCollector(t *testing.T) {
	f := newFakeRunqlat(t)
	bucket := func(labels string, le string, n string) string {
		return "ktel_runqueue_latency_seconds_bucket{" + labels + `le="` + le + `"} ` + n + "\n"
	}
	for _, tc := range []struct {
		perCPU bool
		want   string
	}{
		{false, bucket("", "3.814697265625e-06", "2") + bucket("", "0.00390625", "2") + bucket("", "0.0078125", "3") +
			"ktel_runqueue_latency_seconds_sum 0.005006\nktel_runqueue_latency_seconds_count 3\n"},
		{true, bucket(`cpu="0",`, "3.814697265625e-06", "2") + bucket(`cpu="1",`, "0.0078125", "1") +
			"ktel_runqueue_latency_seconds_count{cpu=\"0\"} 2\nktel_runqueue_latency_seconds_count{cpu=\"1\"} 1\n"},
	} {
		c := &collectorAdapter{NewRunqlatCollector(f, tc.perCPU, nil)}
		got, err := testutil.CollectAndFormat(c, expfmt.TypeTextPlain, "ktel_runqueue_latency_seconds")
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(strings.TrimSpace(tc.want), "\n") {
			if !strings.Contains(string(got), line+"\n") {
				t.Errorf("perCPU=%v: missing %q in\n%s", tc.perCPU, line, got)
			}
		}
		if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
			t.Errorf("lint: %v %v", err, problems)
		}
		if n := testutil.CollectAndCount(c, "ktel_runqueue_dropped_total"); n != 1 {
			t.Errorf("%d dropped series", n)
		}
	}
}

package metrics

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"

	sysprobe "github.com/ktel-dev/ktel/bpf/syscall"
	"github.com/ktel-dev/ktel/internal/histogram"
	"github.com/ktel-dev/ktel/internal/probe"
)

type fakeSyscalls struct {
	layout *histogram.Layout
	snap   *sysprobe.Snapshot
	err    error
	reads  atomic.Int32
}

func (f *fakeSyscalls) Snapshot() (*sysprobe.Snapshot, error) {
	f.reads.Add(1)
	return f.snap, f.err
}
func (f *fakeSyscalls) Layout() *histogram.Layout { return f.layout }

func newFake(t *testing.T) *fakeSyscalls {
	t.Helper()
	l, err := histogram.NewLayout(3)
	if err != nil {
		t.Fatal(err)
	}
	slots := make([]uint64, l.Slots())
	slots[l.Slot(500)]++       // 500 ns
	slots[l.Slot(3000)] += 2   // 3 µs
	slots[l.Slot(2_000_000)]++ // 2 ms
	return &fakeSyscalls{layout: l, snap: &sysprobe.Snapshot{
		Counts:  map[uint32]uint64{0: 40, 39: 9},
		Latency: map[uint32]sysprobe.Hist{0: {Slots: slots, SumNs: 500 + 6000 + 2_000_000}},
		Errors: map[sysprobe.ErrorKey]uint64{
			{Nr: 0, Errno: 11}:  7,
			{Nr: 0, Errno: 512}: 1,
		},
		ErrorsDropped: 3,
		StartsDropped: 2,
		SpanDrops:     probe.SpanDrops{RateLimited: 5},
	}}
}

func names(nr uint32) string { return sysprobe.Name("amd64", nr) }

func TestSyscallCollector(t *testing.T) {
	f := newFake(t)
	g := gathered(NewSyscallCollector(f, names, nil))
	want := `
# HELP ktel_syscall_errors_dropped_total Failed syscalls not counted in ktel_syscall_errors_total because its kernel map was full.
# TYPE ktel_syscall_errors_dropped_total counter
ktel_syscall_errors_dropped_total 3
# HELP ktel_syscall_errors_total Syscalls that returned an error, per syscall and errno.
# TYPE ktel_syscall_errors_total counter
ktel_syscall_errors_total{errno="512",syscall="read"} 1
ktel_syscall_errors_total{errno="EAGAIN",syscall="read"} 7
# HELP ktel_syscalls_total Syscalls entered, per syscall: every one, whether ktel_syscall_latency_seconds times it or not.
# TYPE ktel_syscalls_total counter
ktel_syscalls_total{syscall="getpid"} 9
ktel_syscalls_total{syscall="read"} 40
# HELP ktel_syscall_untimed_total Syscalls chosen for timing but missing from ktel_syscall_latency_seconds because the kernel had no memory to keep their start.
# TYPE ktel_syscall_untimed_total counter
ktel_syscall_untimed_total 2
# HELP ktel_spans_dropped_total Outlier events that did not become exported spans, by probe and reason: rate_limited and ringbuf_full in the kernel, queue_full and export_failed in ktel.
# TYPE ktel_spans_dropped_total counter
ktel_spans_dropped_total{probe="syscall",reason="rate_limited"} 5
ktel_spans_dropped_total{probe="syscall",reason="ringbuf_full"} 0
# HELP ktel_syscall_latency_seconds Time from syscall entry to exit, per syscall, of the syscalls timed (KTEL_SYSCALL_TIMING: all, a sample, listed syscalls or chosen cgroups'); ktel_syscalls_total counts them all.
# TYPE ktel_syscall_latency_seconds histogram
` + classicLines("read", map[int]int{-20: 1, -18: 3, -8: 4}, 4, 0.0020065) + "\n"
	if err := testutil.GatherAndCompare(g, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.GatherAndLint(g); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", err, problems)
	}
}

// classicLines renders the expected classic buckets: cum maps the exponent
// from which a cumulative count applies to that count.
func classicLines(syscall string, cum map[int]int, count int, sum float64) string {
	var b strings.Builder
	n := 0
	for e := histogram.ClassicMinExp; e <= histogram.ClassicMaxExp; e++ {
		if c, ok := cum[e]; ok {
			n = c
		}
		b.WriteString("ktel_syscall_latency_seconds_bucket{syscall=\"" + syscall + "\",le=\"" + fmtFloat(e) + "\"} " + itoa(n) + "\n")
	}
	b.WriteString("ktel_syscall_latency_seconds_bucket{syscall=\"" + syscall + "\",le=\"+Inf\"} " + itoa(count) + "\n")
	b.WriteString("ktel_syscall_latency_seconds_sum{syscall=\"" + syscall + "\"} " + ftoa(sum) + "\n")
	b.WriteString("ktel_syscall_latency_seconds_count{syscall=\"" + syscall + "\"} " + itoa(count))
	return b.String()
}

func TestSyscallNativeHistogram(t *testing.T) {
	f := newFake(t)
	mfs, err := gathered(NewSyscallCollector(f, names, nil)).Gather()
	if err != nil {
		t.Fatal(err)
	}
	i := slices.IndexFunc(mfs, func(mf *dto.MetricFamily) bool { return mf.GetName() == SyscallLatency })
	if i < 0 || len(mfs[i].Metric) != 1 {
		t.Fatalf("families %v", mfs)
	}
	h := mfs[i].Metric[0].Histogram
	if h.GetSchema() != 3 || h.GetZeroThreshold() != 1.0/(1<<25) {
		t.Errorf("schema %d zero threshold %g", h.GetSchema(), h.GetZeroThreshold())
	}
	// Decode spans and deltas back into absolute buckets.
	got := map[int]int64{}
	idx, i, count := 0, 0, int64(0)
	for _, s := range h.PositiveSpan {
		idx += int(s.GetOffset())
		for range s.GetLength() {
			count += h.PositiveDelta[i]
			if count != 0 {
				got[idx] = count
			}
			i++
			idx++
		}
	}
	l := f.layout
	want := map[int]int64{
		l.FirstIndex() + l.Slot(500):       1,
		l.FirstIndex() + l.Slot(3000):      2,
		l.FirstIndex() + l.Slot(2_000_000): 1,
	}
	if len(got) != len(want) {
		t.Fatalf("native buckets %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("bucket %d = %d, want %d (all: %v)", k, got[k], v, got)
		}
	}
	if h.GetSampleCount() != 4 || len(h.Bucket) != 25 {
		t.Errorf("count %d, %d classic buckets", h.GetSampleCount(), len(h.Bucket))
	}
}

// The native buckets are encoded as spans and delta-encoded counts, empty
// buckets left out but for gaps of up to two.
func TestSpansAndDeltas(t *testing.T) {
	l, err := histogram.NewLayout(3)
	if err != nil {
		t.Fatal(err)
	}
	desc := prometheus.NewDesc(SyscallLatency, "", nil, nil)
	for _, tc := range []struct {
		name    string
		buckets map[int]uint64
		spans   [][2]int // offset, length
		deltas  []int64
	}{
		// An empty native histogram keeps one empty span.
		{"empty", nil, [][2]int{{0, 0}}, nil},
		{"one", map[int]uint64{-5: 3}, [][2]int{{-5, 1}}, []int64{3}},
		{"adjacent", map[int]uint64{1: 3, 2: 5}, [][2]int{{1, 2}}, []int64{3, 2}},
		{"gap of two filled", map[int]uint64{1: 3, 4: 1}, [][2]int{{1, 4}}, []int64{3, -3, 0, 1}},
		{"gap of three splits", map[int]uint64{1: 3, 5: 1}, [][2]int{{1, 1}, {3, 1}}, []int64{3, -2}},
		{"three spans", map[int]uint64{-7: 3, -3: 1, 2: 2}, [][2]int{{-7, 1}, {3, 1}, {4, 1}}, []int64{3, -2, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			slots := make([]uint64, l.Slots())
			for i, c := range tc.buckets {
				slots[i-l.FirstIndex()] = c
			}
			m, err := newLatencyHistogram(desc, l, slots, 0, nil)
			if err != nil {
				t.Fatal(err)
			}
			var d dto.Metric
			if err := m.Write(&d); err != nil {
				t.Fatal(err)
			}
			spans, deltas := d.Histogram.PositiveSpan, d.Histogram.PositiveDelta
			if len(spans) != len(tc.spans) {
				t.Fatalf("spans %v, want %v", spans, tc.spans)
			}
			for i, s := range spans {
				if int(s.GetOffset()) != tc.spans[i][0] || int(s.GetLength()) != tc.spans[i][1] {
					t.Errorf("span %d = %d/%d, want %v", i, s.GetOffset(), s.GetLength(), tc.spans[i])
				}
			}
			if len(deltas) != len(tc.deltas) {
				t.Fatalf("deltas %v, want %v", deltas, tc.deltas)
			}
			for i := range deltas {
				if deltas[i] != tc.deltas[i] {
					t.Errorf("deltas %v, want %v", deltas, tc.deltas)
					break
				}
			}
		})
	}
}

func TestExporterReportsFailure(t *testing.T) {
	f := newFake(t)
	f.err = errors.New("map gone")
	cs := map[string]Collector{"syscall": NewSyscallCollector(f, names, nil)}
	e := NewExporter(cs, discard())
	want := `
# HELP ktel_scrape_collector_success Whether a collector succeeded during this scrape (1) or not (0).
# TYPE ktel_scrape_collector_success gauge
ktel_scrape_collector_success{collector="syscall"} 0
`
	// The histograms are missing: that is a gathering error, served with
	// what was gathered.
	reg := prometheus.NewRegistry()
	reg.MustRegister(e)
	mfs, err := reg.Gather()
	if err == nil || !strings.Contains(err.Error(), SyscallLatency+": map gone") {
		t.Errorf("gathering error %v, want one about %s", err, SyscallLatency)
	}
	if len(mfs) == 0 || slices.ContainsFunc(mfs, func(mf *dto.MetricFamily) bool { return mf.GetName() == SyscallLatency }) {
		t.Errorf("families %v: want the others, not %s", len(mfs), SyscallLatency)
	}
	served := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) { return mfs, nil })
	if err := testutil.GatherAndCompare(served, strings.NewReader(want), "ktel_scrape_collector_success"); err != nil {
		t.Error(err)
	}
}

// Rapid scrapes share one map read.
func TestExporterSharesReads(t *testing.T) {
	f := newFake(t)
	cs := map[string]Collector{"syscall": NewSyscallCollector(f, names, nil)}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewExporter(cs, discard()))
	for range 5 {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.ContainsFunc(mfs, func(mf *dto.MetricFamily) bool { return mf.GetName() == SyscallLatency }) {
			t.Fatalf("no %s", SyscallLatency)
		}
	}
	if n := f.reads.Load(); n != 1 {
		t.Errorf("%d map reads for 5 rapid scrapes, want 1", n)
	}
}

// An exemplar recorded for a series shows on the classic bucket holding its
// value (OpenMetrics) and in the native histogram (protobuf).
func TestSyscallExemplars(t *testing.T) {
	f := newFake(t)
	ex := NewExemplars()
	ex.Observe(SyscallLatency, []string{"read"}, Exemplar{Value: 0.002, TraceID: "0af7651916cd43dd8448eb211c80319c",
		SpanID: "b7ad6b7169203331", Time: time.Unix(1700000000, 0)})
	// Above the last classic bound (a futex wait of 30 s): on +Inf.
	ex.Observe(SyscallLatency, []string{"read"}, Exemplar{Value: 30, TraceID: "1af7651916cd43dd8448eb211c80319c",
		SpanID: "c7ad6b7169203331", Time: time.Unix(1700000001, 0)})
	mfs, err := gathered(NewSyscallCollector(f, names, ex)).Gather()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	enc := expfmt.NewEncoder(&buf, expfmt.NewFormat(expfmt.TypeOpenMetrics))
	for _, mf := range mfs {
		if mf.GetName() == SyscallLatency {
			if err := enc.Encode(mf); err != nil {
				t.Fatal(err)
			}
			if n := len(mf.Metric[0].Histogram.Exemplars); n != 2 {
				t.Errorf("%d native exemplars, want 2", n)
			}
		}
	}
	want := `ktel_syscall_latency_seconds_bucket{syscall="read",le="0.00390625"} 4 # {trace_id="0af7651916cd43dd8448eb211c80319c",span_id="b7ad6b7169203331"} 0.002 1.7e+09`
	if !strings.Contains(buf.String(), want) {
		t.Errorf("OpenMetrics output lacks\n%s\nin\n%s", want, buf.String())
	}
	inf := regexp.MustCompile(`ktel_syscall_latency_seconds_bucket\{syscall="read",le="\+Inf"\} \d+ # \{trace_id="1af7651916cd43dd8448eb211c80319c",span_id="c7ad6b7169203331"\} 30\.0 1\.700000001e\+09`)
	if !inf.MatchString(buf.String()) || strings.Count(buf.String(), `syscall="read",le="+Inf"`) != 1 {
		t.Errorf("OpenMetrics output lacks one +Inf bucket with the 30 s exemplar:\n%s", buf.String())
	}
}

// countingSyscalls returns a new snapshot on every read: the k-th has every
// slot of its 50 syscalls at k.
type countingSyscalls struct {
	layout *histogram.Layout
	k      atomic.Uint64
}

func (c *countingSyscalls) Snapshot() (*sysprobe.Snapshot, error) {
	k := c.k.Add(1)
	s := &sysprobe.Snapshot{Latency: map[uint32]sysprobe.Hist{}}
	for nr := range uint32(50) {
		slots := make([]uint64, c.layout.Slots())
		for i := 100; i < 140; i++ {
			slots[i] = k
		}
		s.Latency[nr] = sysprobe.Hist{Slots: slots, SumNs: k}
	}
	return s, nil
}
func (c *countingSyscalls) Layout() *histogram.Layout { return c.layout }

// Concurrent scrapes, each of a new snapshot, never see another scrape's
// values: every histogram of a response has the same count.
func TestSyscallConcurrentScrapes(t *testing.T) {
	l, err := histogram.NewLayout(3)
	if err != nil {
		t.Fatal(err)
	}
	src := &countingSyscalls{layout: l}
	c := NewSyscallCollector(src, names, nil)
	c.snap = NewCached(src.Snapshot, 0)
	cs := map[string]Collector{"syscall": c}
	reg := prometheus.NewRegistry()
	reg.MustRegister(NewExporter(cs, discard()))
	srv := httptest.NewServer(Handler(prometheus.ToTransactionalGatherer(reg), HandlerOpts{}))
	defer srv.Close()

	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			for range 20 {
				resp, err := http.Get(srv.URL + "/metrics?name[]=" + SyscallLatency)
				if err != nil {
					errs <- err
					return
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					errs <- err
					return
				}
				counts := map[string]bool{}
				for line := range strings.Lines(string(b)) {
					if strings.HasPrefix(line, SyscallLatency+"_count") {
						counts[strings.Fields(line)[1]] = true
					}
				}
				if len(counts) != 1 {
					errs <- fmt.Errorf("one scrape, counts of several snapshots: %v", slices.Sorted(maps.Keys(counts)))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
